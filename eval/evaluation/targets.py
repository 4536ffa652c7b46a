"""What eval/evaluate.py evaluates: RUN_OR_MODEL resolved into models (every checkpoint of a run, one
checkpoint, a diffusers folder, an sdkd single file, toy or a hub id: train/models/names.py), the teacher they are
compared with, and loading each as an inference pipeline (eval/inference/pipeline.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdkd.cli.errors import UserError
from sdkd.eval.inference.pipeline import Pipeline, cast_models, load_pipeline, resolve_device_dtype
from sdkd.train.engine.checkpoints import list_checkpoints, saved_step
from sdkd.train.formats.model_files import META, read_metadata, recorded_sampling
from sdkd.train.models.names import PIPELINE_KINDS, resolve_model

TEACHER = "teacher"  # the teacher's row name and image folder


@dataclass
class Target:
    """One model to evaluate."""

    name: str
    """Its row in the report and its folder under images/ (checkpoint-STEP, the folder's or file's name)."""
    path: str
    """What `load_pipeline` loads: any model name (train/models/names.py)."""
    step: int | None = None
    """The training step of a checkpoint (where log_to_run logs its row)."""


def run_of(path: Path) -> Path | None:
    """The run folder a model path belongs to: the run itself, a checkpoint's or a pipeline folder's parent."""
    if (path / "config.yaml").is_file() and not (path / "model_index.json").is_file():
        return path
    if path.is_dir() and (path.parent / "config.yaml").is_file():
        return path.parent
    return None


def read_run_config(run: Path):
    """A run's config.yaml as a DictConfig with every key of its trainer's schema (defaults where an older run
    lacks one, e.g. its `eval` section); not validated."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from sdkd.train.tasks.diffusion_config import FinetuneConfig, KDConfig, LoraTrainConfig

    try:
        loaded = OmegaConf.load(run / "config.yaml")
        schema = LoraTrainConfig if "lora" in loaded else FinetuneConfig if "model" in loaded else KDConfig
        return OmegaConf.merge(OmegaConf.structured(schema), loaded)
    except (OSError, ValueError, OmegaConfBaseException) as err:
        raise UserError(f"run '{run}': its config.yaml cannot be read ({str(err).splitlines()[0]})") from None


def resolve_targets(src: str, latest_only: bool = False) -> list[Target]:
    """RUN_OR_MODEL -> the models to evaluate. A run: each complete checkpoint (or only the newest), else its
    final student/; any other model name (train/models/names.py): that model."""
    ref = resolve_model(src)
    path = Path(src)
    if ref.kind == "file":
        return [Target(path.stem, src)]
    if ref.kind in PIPELINE_KINDS:
        return [Target(path.name, src)]
    if ref.kind == "checkpoint":
        return [Target(path.name, src, saved_step(path))]
    checkpoints = list_checkpoints(path)
    if latest_only:
        checkpoints = checkpoints[-1:]
    if checkpoints:
        return [Target(c.name, str(c), saved_step(c)) for c in checkpoints]
    if (path / "student" / "model_index.json").is_file():
        return [Target("student", str(path / "student"))]
    raise UserError(f"run '{src}' has no checkpoint and no student/ yet: nothing to evaluate")


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher to compare with: a local folder or file, "toy", or a hub id (with revision and variant)."""

    path: str
    revision: str | None = None
    variant: str | None = None


def default_teacher(src: str) -> TeacherSpec | None:
    """The teacher of a run (its config.yaml, also for a checkpoint or the run's student/) or of an sdkd single file
    (its metadata); None when unknown."""
    path = Path(src)
    run = run_of(path) if path.is_dir() else None
    if run is not None:
        cfg = read_run_config(run)
        if not cfg.teacher:
            return None
        return TeacherSpec(cfg.teacher, cfg.get("teacher_revision"), cfg.get("teacher_variant"))
    if path.is_file() and path.suffix == ".safetensors":
        try:
            teacher = json.loads(read_metadata(path).get(META + "info", "{}")).get("teacher")
        except (UserError, ValueError):
            return None
        return TeacherSpec(teacher) if teacher else None
    return None


def load_teacher_model(spec: TeacherSpec, device: str, dtype: str, allow_pickle: bool = False) -> Pipeline:
    """The teacher as eval/inference/pipeline.py's Pipeline: as every model loads, but a hub model of a run's
    `teacher_revision` or `teacher_variant`, through the trainers' loader."""
    if not (spec.revision or spec.variant):
        return load_pipeline(spec.path, device=device, dtype=dtype, allow_pickle=allow_pickle)
    from sdkd.train.models.teacher import PipelineSource
    from sdkd.train.models.teacher import load_pipeline as load_named

    dev, torch_dtype = resolve_device_dtype(device, dtype)
    pipe = load_named(PipelineSource(spec.path, spec.revision, spec.variant, allow_pickle), what="teacher")
    pipe.to(dev, silence_dtype_warnings=True)
    cast_models(pipe, torch_dtype)
    return Pipeline(pipe, dev, torch_dtype, dict(model=spec.path, source=f"teacher `{spec.path}`"),
                    recorded_sampling(spec.path))
