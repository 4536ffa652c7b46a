"""Model files: a student's diffusers folder and single `.safetensors` file (LDM layout, two numberings),
written and read back.

`load_source` loads what users name as a model (train/models/names.py resolves the name): a run folder
(config.yaml; its `student/`, or with `ema` the newest checkpoint's `unet_ema/`), a `checkpoint-STEP` folder (its
`unet/` or `unet_ema/`, the other parts from the run's `student/` or its `model` / teacher), a diffusers pipeline
folder (model_index.json), an sdkd single file, `toy` or a hub id. train/export.py and eval/inference/pipeline.py
load models through it.

- diffusers: a pipeline folder with contiguous safetensors and a model card `README.md` (train/cards.py).
- single file: U-Net + VAE (AutoencoderKL or AutoencoderTiny) + text encoder(s) in one flat LDM state
  dict (SDXL: the SGM layout of A1111 and ComfyUI); the diffusers configs and the tokenizer files are
  stored in the safetensors metadata (k-diffusion's trick), so `load_single_file(file)` rebuilds the
  student from the file alone. Target `ldm`: packed numbering, for diffusers `from_single_file(file,
  config=FOLDER)` and other LDM tools; `sdcpp`: teacher-slot numbering, for stable-diffusion.cpp,
  refused for layouts sd.cpp has no model for. Model families the LDM layout has no place for
  (train/models/families.py `single_file`) are refused in one line.
  The metadata names each text encoder's config and each tokenizer's files by component name.

`save_pipeline(unet, teacher, folder)` is what the trainers call at the end of a run.

Every pipeline folder and single file sdkd writes carries the scheduler sdkd samples with (DPM-Solver++, built
from the training scheduler's config: train/engine/sampling.py `sampling_scheduler`) and its sampling settings
(steps, guidance scale: `SAMPLING_FILE` beside model_index.json, the `sdkd.sampling` metadata of a single file):
a run's `sample` section, a one-step student's 1 step without guidance, else what the source recorded. The
trainers still load the training (DDPM) scheduler from that config (train/models/teacher.py `load_teacher`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, DiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError, safe_open

from sdkd.cli.errors import UserError, first_line
from sdkd.cli.files import save_file, save_pretrained, written_whole
from sdkd.train.engine import console
from sdkd.train.engine.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, sampling_scheduler
from sdkd.train.formats import ldm_layout, lora_io
from sdkd.train.models.families import ModelFamily, family_of
from sdkd.train.models.names import PIPELINE_KINDS, resolve_model
from sdkd.train.models.teacher import (
    PipelineParts,
    PipelineSource,
    load_pipeline,
    load_teacher,
    resolve,
    safe_weights,
    scheduler_class,
    vae_class,
)

FORMAT_VERSION = "1"
META = "sdkd."  # metadata key prefix
SAMPLING_FILE = "sdkd_sampling.json"
"""A pipeline folder's sampling settings: {"steps": N, "guidance_scale": G}; diffusers leaves the file alone."""
ONE_STEP_LAYOUTS = ("sdxs", "sdxs09")  # one-step students: 1 step at t=999, guidance off
ONE_STEP = {"steps": 1, "guidance_scale": 0.0}


def default_sampling(unet_config) -> dict:
    """The settings of a model that records none: 1 step for a one-step student's layout, else sdkd's defaults."""
    if ldm_layout.unet_layout(dict(unet_config)) in ONE_STEP_LAYOUTS:
        return dict(ONE_STEP)
    return {"steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE}


def checked_sampling(raw, where: str) -> dict:
    """Recorded sampling settings as read back, checked: steps >= 1, guidance_scale >= 0."""
    steps = raw.get("steps") if isinstance(raw, dict) else None
    guidance = raw.get("guidance_scale") if isinstance(raw, dict) else None
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
            and isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and guidance >= 0):
        raise UserError(f"{where}: expected sampling settings {{\"steps\": N >= 1, \"guidance_scale\": G >= 0}}, "
                        f"got {raw!r}")
    return {"steps": steps, "guidance_scale": float(guidance)}


def write_sampling(folder: str | Path, settings: dict) -> Path:
    file = Path(folder) / SAMPLING_FILE
    file.write_text(json.dumps(checked_sampling(settings, str(file)), indent=1) + "\n")
    return file


def read_sampling(folder: str | Path) -> dict | None:
    """A pipeline folder's recorded sampling settings; None when it records none (a hub model, an older export)."""
    file = Path(folder) / SAMPLING_FILE
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"'{file}' is unreadable ({first_line(err)})") from None
    return checked_sampling(raw, f"'{file}'")


def load_parts(source: str | PipelineSource, with_unet: bool = True, with_encoders: bool = True,
               what: str = "teacher") -> PipelineParts:
    """train/models/teacher.py's `load_teacher` for any model name (train/models/names.py): a run's, checkpoint's or
    single file's pipeline (`load_source`) as parts, with its family's training scheduler built from its scheduler's
    config."""
    src = source if isinstance(source, PipelineSource) else PipelineSource(source)
    ref = resolve(src, what)
    if ref.kind in PIPELINE_KINDS:
        return load_teacher(src, with_unet, with_encoders, what)
    pipe = load_source(ref.path, allow_pickle=src.allow_pickle, what=what).pipe
    parts = PipelineParts.of(pipe)
    parts.components["scheduler"] = parts.family.components["scheduler"].cls.from_config(pipe.scheduler.config)
    parts.vae_config = pipe.vae.config
    if not with_unet:
        parts.components["unet"] = None
    if not with_encoders:
        parts.components |= dict.fromkeys(parts.family.encoders)
    return parts


def recorded_sampling(teacher: str | PipelineSource) -> dict | None:
    """The sampling settings a model (any name train/models/names.py resolves; a hub model: none) records."""
    src = teacher if isinstance(teacher, PipelineSource) else PipelineSource(teacher)
    ref = resolve(src, "teacher")
    if ref.kind not in PIPELINE_KINDS:
        return load_source(ref.path, allow_pickle=src.allow_pickle).sampling
    return read_sampling(ref.path) if Path(ref.path).is_dir() else None


def _contiguous(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        # Sliced or transposed tensors (e.g. after weight copies) must be written contiguous.
        p.data = p.data.contiguous()
    for b in module.buffers():
        b.data = b.data.contiguous()
    return module


def save_pipeline(unet, teacher: str | PipelineSource, folder: str | Path, prediction_type: str | None = None,
                  run: str | Path | None = None) -> Path:
    """`unet` with the teacher's VAE, text encoders, tokenizers and its scheduler as sdkd samples with, as
    safetensors; the scheduler set to `prediction_type` when given (what `unet` was trained to predict:
    loss.prediction_type). The sampling settings: `run`'s (a trainer's OUTPUT: its `sample` section), else the
    teacher's recorded ones; with `run`, a model card describing that run goes beside it.

    The frozen parts are read again from the teacher in their stored dtype: during training they
    were cast to the mixed-precision dtype, which must not leak into the export.
    """
    parts = load_parts(teacher, with_unet=False)
    if prediction_type is not None:
        parts.scheduler.register_to_config(prediction_type=prediction_type)
    _contiguous(unet)
    pipe = parts.family.pipeline(parts, unet, sampling_scheduler(parts.scheduler.config))
    save_pretrained(pipe, folder, safe_serialization=True)
    info = _run_info(Path(run)) if run is not None else {}
    source = Source(pipe, f"run `{Path(run).name}`, final `{Path(folder).name}/`" if run else "", info,
                    sampling=info.get("sampling") if run is not None else recorded_sampling(teacher))
    write_sampling(folder, recorded_or_default(source))
    if run is not None:
        write_card(folder, card_info(source), type(pipe))
    return Path(folder)


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class Source:
    pipe: DiffusionPipeline
    description: str
    """Where the weights came from, for the model card."""
    info: dict = field(default_factory=dict)
    """preset, teacher, training summary (whatever is known)."""
    unet_path: str = ""
    """The resolved U-Net weights: a `unet/` or `unet_ema/` folder, or the single file."""
    parts_path: str = ""
    """Where the VAE, text encoders, tokenizers and scheduler came from: a folder, a file or a teacher id."""
    sampling: dict | None = None
    """The sampling settings the model records ({"steps", "guidance_scale"}); None: it records none."""


def recorded_or_default(source: Source) -> dict:
    """The settings sdkd samples `source` with by default, and its exports record."""
    return source.sampling or default_sampling(source.pipe.unet.config)


def _load_pipeline_folder(folder: str | Path, allow_pickle: bool, what: str = "pipeline folder") -> DiffusionPipeline:
    """A diffusers pipeline: a local folder, or a hub id that train/models/names.py found on the hub."""
    console.quiet_third_party()  # now that diffusers is imported: its "Loading pipeline components" bar
    return load_pipeline(PipelineSource(str(folder), allow_pickle=allow_pickle), what=what)


def _load_unet(folder: Path, allow_pickle: bool) -> UNet2DConditionModel:
    if not (folder / "config.json").is_file():
        raise UserError(f"no U-Net at '{folder}' (expected config.json and diffusion_pytorch_model.safetensors)")
    safe = safe_weights("U-Net", allow_pickle, folder)
    try:
        return UNet2DConditionModel.from_pretrained(folder, local_files_only=True, **safe)
    except (OSError, ValueError, SafetensorError, RuntimeError) as err:
        raise UserError(f"U-Net '{folder}' could not be loaded: {first_line(err)}") from None


def _run_info(run: Path, checkpoint: Path | None = None) -> dict:
    """What a run folder's config.yaml, metrics.jsonl, checkpoints and sample grids say about its weights (those
    of `checkpoint`, else of the newest checkpoint): trainer, base model, recipe, data, steps, license, grid."""
    from omegaconf import OmegaConf

    from sdkd.train.engine.checkpoints import find_latest, saved_step

    info: dict = {}
    cfg_file = run / "config.yaml"
    if cfg_file.is_file():
        cfg = OmegaConf.load(cfg_file)
        info["trainer"] = "lora" if "lora" in cfg else "finetune" if "model" in cfg else "kd"
        info["teacher"] = cfg.get("teacher")
        if cfg.get("model"):  # fine-tune and LoRA runs: the pipeline that was trained
            info["model"] = cfg.get("model")
        else:  # a fine-tune's student.preset only describes its feature pairs: its card reads the layout
            info["preset"] = OmegaConf.select(cfg, "student.preset")
        info["license"] = cfg.get("license")
        info["prompts"] = list(OmegaConf.select(cfg, "sample.prompts") or [])
        summary = {k: OmegaConf.select(cfg, k) for k in (
            "train.max_steps", "train.batch_size", "train.grad_accum", "train.mixed_precision", "optim.lr",
            "loss.lambda_task", "loss.lambda_out", "loss.lambda_feat", "student.feature_pairs", "ema.enabled",
            "lora.rank", "lora.alpha", "data.source", "data.path", "data.cache", "data.resolution")}
        info["training"] = {k: v for k, v in summary.items() if v is not None}
        if "pairs" in cfg:  # the one-step trainer's: its student samples in one step, guidance off
            info["sampling"] = dict(ONE_STEP)
        elif OmegaConf.select(cfg, "sample.steps") is not None:
            info["sampling"] = checked_sampling({"steps": OmegaConf.select(cfg, "sample.steps"),
                                                 "guidance_scale": OmegaConf.select(cfg, "sample.guidance_scale")},
                                                f"'{cfg_file}' sample section")
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        if lines:
            try:
                info["last_metrics"] = json.loads(lines[-1])
            except json.JSONDecodeError:
                pass
    checkpoint = checkpoint or find_latest(run)
    if checkpoint is not None and (step := saved_step(checkpoint)) is not None:
        info["steps"] = step
    grids = sorted((int(p.stem.removeprefix("step-")), p) for p in (run / "samples").glob("step-*.png"))
    grids = [p for step, p in grids if step <= info.get("steps", step)]
    if grids:  # the newest sample grid of these weights; the teacher's row is on top when teacher.png exists
        info["sample_grid"] = str(grids[-1])
        info["teacher_row"] = (run / "samples" / "teacher.png").is_file()
    return info


def _other_parts(run: Path, info: dict, allow_pickle: bool) -> tuple[DiffusionPipeline, str]:
    """VAE, text encoders, tokenizers and scheduler of a run, and where they came from: its student/ folder,
    else the pipeline it trained (`model`, fine-tune runs) or its teacher."""
    if (run / "student" / "model_index.json").is_file():
        return _load_pipeline_folder(run / "student", allow_pickle), str(run / "student")
    base = info.get("model") or info.get("teacher")
    if not base:
        raise UserError(f"'{run}' has neither student/ nor a config.yaml naming the teacher: cannot find the "
                        f"VAE and text encoder to go with the U-Net")
    parts = load_parts(PipelineSource(base, allow_pickle=allow_pickle), with_unet=False)
    return parts.family.pipeline(parts, None, parts.scheduler), base


def _with_unet(run: Path, unet_dir: Path, description: str, info: dict, allow_pickle: bool) -> Source:
    """A checkpoint's U-Net with the rest of its run's pipeline."""
    pipe, parts_path = _other_parts(run, info, allow_pickle)
    pipe.unet = _load_unet(unet_dir, allow_pickle)
    return Source(pipe, description, info, str(unet_dir), parts_path)


def _refuse_lora(path: Path | None) -> None:
    """A LoRA file, run or checkpoint holds only an adapter: say what to load instead."""
    if path is None:
        return
    file = path if path.is_file() else path / lora_io.LORA_FILE
    base = read_metadata(file).get(META + "base_model") if file.suffix == ".safetensors" and file.is_file() else None
    if base is not None:
        raise UserError(f"'{path}' holds a LoRA adapter, not a model: load its base model with it "
                        f"(eval/sample.py --model {base or 'BASE'} --lora {file})")


def load_source(src: str | Path, ema: bool = False, vae: str | Path | None = None,
                allow_pickle: bool = False, what: str = "model") -> Source:
    """Any model name (train/models/names.py) -> one pipeline. Weights that exist only as pickle are refused unless
    `allow_pickle`."""
    ref = resolve_model(src, what)
    path = Path(ref.path)
    if ema and ref.kind in (*PIPELINE_KINDS, "file"):
        raise UserError(f"--ema needs a run folder or a checkpoint; '{src}' is a "
                        f"{'single file' if ref.kind == 'file' else 'pipeline'}, which holds one set of weights")
    _refuse_lora(path if path.exists() else None)
    if ref.kind == "file":
        meta = read_metadata(path)
        info = json.loads(meta.get(META + "info", "{}"))
        sampling = meta.get(META + "sampling")
        try:
            sampling = checked_sampling(json.loads(sampling), f"'{path}': its sdkd.sampling metadata") if sampling \
                else None
        except json.JSONDecodeError:
            raise UserError(f"'{path}': damaged sdkd.sampling metadata; re-export the model") from None
        source = Source(load_single_file(path), f"single file `{path.name}`", info, str(path), str(path),
                        sampling)
    elif ref.kind in ("toy", "hub"):
        pipe = _load_pipeline_folder(ref.path, allow_pickle, what)
        source = Source(pipe, f"{'toy teacher' if ref.kind == 'toy' else 'hub model'} `{ref.given}`", {},
                        str(path / "unet") if path.is_dir() else ref.path, ref.path,
                        read_sampling(path) if path.is_dir() else None)
    elif ref.kind == "diffusers":
        run = path.parent if (path.parent / "config.yaml").is_file() else None
        source = Source(_load_pipeline_folder(path, allow_pickle), f"diffusers folder `{path.name}`",
                        _run_info(run) if run else {}, str(path / "unet"), str(path), read_sampling(path))
    elif ref.kind == "checkpoint":
        sub = "unet_ema" if ema else "unet"
        if not (path / sub).is_dir():
            raise UserError(f"checkpoint '{src}' has no {sub}/ (the run was trained without ema.enabled)")
        source = _with_unet(path.parent, path / sub, f"checkpoint `{path.name}` ({sub})",
                            _run_info(path.parent, path), allow_pickle)
    else:  # a run
        from sdkd.train.engine.checkpoints import find_latest

        info = _run_info(path)
        latest = find_latest(path)
        _refuse_lora(latest)
        if ema:
            if latest is None or not (latest / "unet_ema").is_dir():
                raise UserError(f"run '{src}' has no EMA weights (no checkpoint with unet_ema/; train with "
                                f"ema.enabled=true)")
            source = _with_unet(path, latest / "unet_ema", f"run `{path.name}`, EMA weights of `{latest.name}`", info,
                                allow_pickle)
        elif (path / "student" / "model_index.json").is_file():
            student = path / "student"
            source = Source(_load_pipeline_folder(student, allow_pickle), f"run `{path.name}`, final `student/`", info,
                            str(student / "unet"), str(student), read_sampling(student))
        elif latest is not None:
            source = _with_unet(path, latest / "unet", f"run `{path.name}`, `{latest.name}`", info, allow_pickle)
        else:
            raise UserError(f"run '{src}' has no student/ and no checkpoint yet: nothing to load")
    if source.sampling is None:  # a run's or checkpoint's, or a folder's in a run: the run's sample section
        source.sampling = source.info.get("sampling")
    if vae is not None:
        source.pipe.vae = load_vae(vae, allow_pickle)
    return source


def load_vae(folder: str | Path, allow_pickle: bool = False):
    """AutoencoderKL or AutoencoderTiny from a diffusers folder (its config names the class)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file() and (folder / "vae" / "config.json").is_file():
        folder, config_file = folder / "vae", folder / "vae" / "config.json"
    if not config_file.is_file():
        raise UserError(f"no VAE at '{folder}' (expected a diffusers VAE folder with config.json)")
    try:
        cls_name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
    except (ValueError, AttributeError) as err:
        raise UserError(f"VAE '{folder}': config.json is unreadable ({first_line(err)})") from None
    cls = vae_class(cls_name, f"VAE '{folder}'")
    safe = safe_weights("VAE", allow_pickle, folder)
    try:
        return cls.from_pretrained(folder, local_files_only=True, **safe)
    except (OSError, ValueError, SafetensorError, RuntimeError) as err:
        raise UserError(f"VAE '{folder}' could not be loaded: {first_line(err)}") from None


# ---------------------------------------------------------------------------------------------
# Model card


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _teacher_params(teacher: str | None) -> int | None:
    from sdkd.train.models.students import count_params

    if not teacher:
        return None
    try:
        from sdkd.train.models.toy import TOY_NAMES, toy_teacher_folder

        if teacher in TOY_NAMES:
            teacher = toy_teacher_folder(teacher)
        config = UNet2DConditionModel.load_config(teacher, subfolder="unet", local_files_only=True)
        return count_params(config)
    except Exception:  # noqa: BLE001 - an uncached hub id (or any unreadable config): the card just leaves it out
        return None


def card_info(source: Source) -> dict:
    pipe, info = source.pipe, dict(source.info)
    unet_config = dict(pipe.unet.config)
    info.setdefault("preset", None)
    info["layout"] = ldm_layout.unet_layout(unet_config)
    info["preset"] = info["preset"] or info["layout"]
    info["source"] = source.description
    info["sampling"] = recorded_or_default(source)
    info["unet_params"] = _params(pipe.unet)
    teacher_params = _teacher_params(info.get("teacher"))
    if teacher_params:
        info["teacher_unet_params"] = teacher_params
    info["vae"] = f"{type(pipe.vae).__name__} ({_params(pipe.vae):,} params)"
    info["text_encoder_params"] = sum(_params(pipe.components[name]) for name in _family(pipe).text_encoders)
    return info


def _family(pipe: DiffusionPipeline) -> ModelFamily:
    return family_of(pipe.unet.config)


SAMPLE_FILE = "samples.png"  # the run's newest sample grid, copied beside the card


def model_card(info: dict, pipeline_class: type[DiffusionPipeline], half: bool = False) -> str:
    """README.md of a student pipeline folder (`card_info`), or of a LoRA run's files (`info["lora_files"]`);
    `pipeline_class`: the model family's, which its usage example loads it with."""
    lora, trainer, base = info.get("lora_files"), info.get("trainer"), info.get("model") or info.get("teacher")
    tag = "lora" if lora else "fine-tuned" if trainer == "finetune" else "knowledge-distillation"
    lines = ["---", *([f"license: {info['license']}"] if info.get("license") else []), "library_name: diffusers",
             "tags:", "- stable-diffusion", f"- {tag}", "- sdkd", "---", ""]
    if lora:
        lines += [f"# sdkd LoRA for `{base}`", "", "A LoRA adapter trained with sdkd.", "", "| | |", "|---|---|",
                  f"| base model | `{base}` |", f"| files | {', '.join(f'`{name}`' for name in lora)} |"]
    else:
        ratio = (f" ({info['unet_params'] / info['teacher_unet_params']:.1%} of the teacher's "
                 f"{info['teacher_unet_params']:,})") if info.get("teacher_unet_params") else ""
        title, what = (("fine-tune", f"`{base}` fine-tuned with sdkd.") if trainer == "finetune" else
                       ("student", "A block-removed Stable Diffusion student distilled with sdkd."))
        lines += [
            f"# sdkd {title}: {info['preset']}", "", what, "", "| | |", "|---|---|",
            f"| preset | `{info['preset']}` (U-Net layout `{info['layout']}`) |",
            f"| U-Net parameters | {info['unet_params']:,}{ratio} |",
            *([f"| base model | `{base}` |"] if trainer == "finetune" else []),
            f"| teacher | `{info.get('teacher') or ('none' if trainer else 'unknown')}` |",
            f"| VAE | {info['vae']} |",
            f"| text encoder parameters | {info['text_encoder_params']:,} |",
            f"| weights | {info['source']}, {'fp16' if half else 'stored dtype'} |",
        ]
    if trainer:
        steps = f"{info['steps']:,} steps " if "steps" in info else ""
        lines.append(f"| trained | {steps}with `train/{trainer}.py` |")
    if info.get("license"):
        lines.append(f"| license | `{info['license']}` |")
    lines.append("")
    if info.get("training"):
        lines += ["## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in info["training"].items()]
        if info.get("last_metrics"):
            lines += ["", "Last logged metrics: " + ", ".join(
                f"`{k}` {v:.4g}" if isinstance(v, float) else f"`{k}` {v}" for k, v in info["last_metrics"].items())]
        lines.append("")
    if info.get("sample_grid"):
        rows = "the teacher's row above this model's" if info.get("teacher_row") else "one row"
        prompts = "; ".join(f'"{p}"' for p in info.get("prompts", []))
        lines += ["## Samples", "", f"![samples]({SAMPLE_FILE})", "",
                  f"`{Path(info['sample_grid']).name}` of the run ({rows}); prompts, left to right: {prompts}.", ""]
    pipeline = pipeline_class.__name__
    lines += ["## Use", "", "```python", f"from diffusers import {pipeline}", ""]
    if lora:
        lines += [f'pipe = {pipeline}.from_pretrained("{base}")',
                  'pipe.load_lora_weights("PATH/TO/THIS/FOLDER")',
                  'image = pipe("a photo of a cat", num_inference_steps=25).images[0]', "```", "",
                  f"or `python eval/sample.py --model {base} --lora PATH/TO/THIS/FOLDER/{lora[0]} "
                  f"--prompt \"a photo of a cat\" --out samples/` (sdkd's pipeline).", ""]
        return "\n".join(lines)
    steps, cfg = info["sampling"]["steps"], info["sampling"]["guidance_scale"]  # as recorded in SAMPLING_FILE
    lines += [
        f'pipe = {pipeline}.from_pretrained("PATH/TO/THIS/FOLDER")',
        f'image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale={cfg}).images[0]', "```", "",
        "or `python eval/sample.py --model PATH/TO/THIS/FOLDER --prompt \"a photo of a cat\" --out samples/` "
        "(sdkd's pipeline).", "",
    ]
    return "\n".join(lines)


def write_card(folder: str | Path, info: dict, pipeline_class: type[DiffusionPipeline], half: bool = False) -> Path:
    """`folder`/README.md from `info`, with the run's newest sample grid copied beside it."""
    folder = Path(folder)
    if info.get("sample_grid"):
        shutil.copyfile(info["sample_grid"], folder / SAMPLE_FILE)
    card = folder / "README.md"
    card.write_text(model_card(info, pipeline_class, half))
    return card


def write_lora_card(run: Path, files: list[Path], family: ModelFamily) -> Path:
    """The LoRA trainer's card: README.md beside its LoRA file(s) in the run folder; `family`: its base model's."""
    return write_card(run, {**_run_info(run), "lora_files": [Path(f).name for f in files]}, family.pipeline_class)


# ---------------------------------------------------------------------------------------------
# Writers


def _cast(pipe: DiffusionPipeline, half: bool) -> None:
    for module in (pipe.components[name] for name in _family(pipe).models):
        module.to("cpu")
        if half:
            module.to(torch.float16)
        _contiguous(module)


def export_diffusers(source: Source, out: str | Path, half: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; --format diffusers writes a folder")
    pipe = source.pipe
    _cast(pipe, half)
    pipe.scheduler = sampling_scheduler(pipe.scheduler.config)
    save_pretrained(pipe, out, safe_serialization=True)
    write_sampling(out, recorded_or_default(source))
    write_card(out, card_info(source), type(pipe), half)
    return out


def _tokenizer_files(tok, allowed: frozenset[str]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}
    unexpected = set(files) - allowed
    assert not unexpected, f"the tokenizer wrote files the reader would refuse: {sorted(unexpected)}"
    return files


def _single_file_family(unet_config, where: str) -> ModelFamily:
    """The family of a U-Net config, which the LDM single file must have a place for; else one line naming it."""
    family = family_of(unet_config, where)
    if not family.single_file:
        raise UserError(f"{where}: model family '{family.name}' has no single-file layout (the LDM file has no "
                        f"place for its text encoders); export it with --format diffusers")
    return family


def _config_json(config) -> str:
    return json.dumps({k: v for k, v in dict(config).items()}, default=list)


def single_file_state(pipe: DiffusionPipeline, target: str) -> tuple[dict, dict]:
    """(flat LDM state dict, metadata) of a pipeline, in the numbering `target`."""
    family = _single_file_family(pipe.unet.config, "--format single-file")
    components = pipe.components
    vae_tiny = isinstance(pipe.vae, AutoencoderTiny)
    unet_config = dict(pipe.unet.config)
    flat = ldm_layout.to_ldm(
        pipe.unet.state_dict(), unet_config, target,
        vae=pipe.vae.state_dict(), vae_config=dict(pipe.vae.config), vae_tiny=vae_tiny,
        texts={slot: (components[name].state_dict(), components[name].config.to_dict())
               for name, slot in family.single_file.items()})
    meta = {
        "format": "pt",
        META + "format_version": FORMAT_VERSION,
        META + "numbering": target,
        META + "unet_config": _config_json(unet_config),
        META + "vae_class": type(pipe.vae).__name__,
        META + "vae_config": _config_json(pipe.vae.config),
        **{META + f"{name}_config": components[name].config.to_json_string(use_diff=False)
           for name in family.single_file},
        META + "scheduler_class": type(pipe.scheduler).__name__,
        META + "scheduler_config": _config_json(pipe.scheduler.config),
        **{META + name: json.dumps(_tokenizer_files(components[name], family.tokenizer_files))
           for name in family.tokenizers},
    }
    return flat, meta


def single_file_tensors(source: Source, target: str, half: bool = False,
                        what: str = "--format single-file") -> tuple[dict, dict]:
    """(flat LDM state dict, metadata with the model card's info and the sampling settings) of `source` in the
    numbering `target`; checked first (`what` names the export in the one-line refusals): its family must have a
    single-file layout, and for `sdcpp` sd.cpp must have a model for its layout (warnings go to stderr)."""
    pipe = source.pipe
    _single_file_family(pipe.unet.config, what)
    if target == "sdcpp":  # before anything is written: never a file that fails later
        for warning in ldm_layout.check_sdcpp(dict(pipe.unet.config), isinstance(pipe.vae, AutoencoderTiny)):
            print(f"warning: {warning}", file=sys.stderr)
    _cast(pipe, half)
    pipe.scheduler = sampling_scheduler(pipe.scheduler.config)
    flat, meta = single_file_state(pipe, target)
    info = card_info(source)
    meta[META + "info"] = json.dumps(info, default=str)
    meta[META + "sampling"] = json.dumps(info["sampling"])
    return flat, meta


def export_single_file(source: Source, out: str | Path, target: str = "ldm", half: bool = False) -> Path:
    out = Path(out)
    if out.is_dir() or out.suffix != ".safetensors":
        raise UserError(f"--out '{out}': --format single-file writes one file; give a path ending in .safetensors")
    flat, meta = single_file_tensors(source, target, half)
    with written_whole(out, errors=(SafetensorError,)) as tmp:
        save_file(flat, str(tmp), metadata=meta)
    return out


# ---------------------------------------------------------------------------------------------
# Reading our single files back


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file '{path}' not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"'{path}' is not a readable .safetensors file ({first_line(err)}); re-export it with "
                        f"python train/export.py") from None


def load_single_file(path: str | Path, dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """Rebuild the whole pipeline from an sdkd single file (configs and tokenizer files from its metadata)."""
    path = Path(path)
    meta = read_metadata(path)
    if META + "unet_config" not in meta:
        raise UserError(f"'{path}' has no sdkd metadata, so its U-Net layout is unknown; export the model with "
                        f"python train/export.py --format single-file, or load the file with diffusers "
                        f"from_single_file(file, config=DIFFUSERS_FOLDER)")
    try:
        unet_config = json.loads(meta[META + "unet_config"])
        family = _single_file_family(unet_config, f"'{path}'")  # which metadata names its components
        vae_class_name = meta[META + "vae_class"]
        vae_config = json.loads(meta[META + "vae_config"])
        text_configs = {name: json.loads(meta[META + f"{name}_config"]) for name in family.single_file}
        numbering = meta[META + "numbering"]
        tokenizer_files = {name: json.loads(meta[META + name]) for name in family.tokenizers}
        scheduler_cls = meta[META + "scheduler_class"]
        scheduler_config = json.loads(meta[META + "scheduler_config"])
    except (KeyError, json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"'{path}': damaged sdkd metadata ({first_line(err)}); re-export the model") from None
    # The file names what to build: only a scheduler or VAE class, and only the tokenizer files we write ourselves.
    scheduler_cls = scheduler_class(scheduler_cls, f"'{path}': its metadata")
    vae_cls = vae_class(vae_class_name, f"'{path}': its metadata")
    allowed = family.tokenizer_files
    for files in tokenizer_files.values():
        if not isinstance(files, dict) or not set(files) <= allowed or not all(
                isinstance(text, str) for text in files.values()):
            names = sorted(set(files) - allowed) if isinstance(files, dict) else files
            raise UserError(f"'{path}': metadata holds unexpected tokenizer files {names!r} (expected some of "
                            f"{', '.join(sorted(allowed))})")
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
            vae = vae_cls.from_config(vae_config)
            texts = {name: family.components[name].cls(family.components[name].cls.config_class.from_dict(config))
                     for name, config in text_configs.items()}
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise UserError(f"'{path}': its metadata holds configs no model can be built from ({first_line(err)}); "
                        f"re-export the model") from None
    try:
        from safetensors.torch import load_file

        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"'{path}' could not be read ({first_line(err)}); the file is damaged: re-export it") from None
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    src = str(path)
    unet.load_state_dict(ldm_layout.unet_from_ldm(flat, unet_config, numbering, shapes(unet), src),
                         strict=True, assign=True)
    vae.load_state_dict(ldm_layout.vae_from_ldm(flat, vae_config, vae_cls is AutoencoderTiny, shapes(vae), src),
                        strict=True, assign=True)
    for name, text in texts.items():
        te_state = ldm_layout.text_from_ldm(flat, family.single_file[name], text_configs[name], shapes(text), src)
        missing = text.load_state_dict(te_state, strict=False, assign=True)
        if missing.unexpected_keys or [k for k in missing.missing_keys if not k.endswith("position_ids")]:
            raise UserError(f"'{path}': text-encoder tensors do not fit its config; re-export the model")
        for buffer, buf in text.named_buffers():  # non-persistent buffers are not in the file
            if buf.is_meta:
                parent = text.get_submodule(buffer.rsplit(".", 1)[0])
                setattr(parent, buffer.rsplit(".", 1)[1], torch.arange(buf.shape[-1]).expand(buf.shape).clone())
    components = {"unet": unet, "vae": vae, **texts}
    for name, files in tokenizer_files.items():
        with tempfile.TemporaryDirectory() as tmp:
            for file in allowed & set(files):  # our own names, never the file's
                (Path(tmp) / file).write_text(files[file])
            try:
                components[name] = family.components[name].cls.from_pretrained(tmp, local_files_only=True)
            except (OSError, ValueError, TypeError) as err:
                raise UserError(f"'{path}': its tokenizer cannot be rebuilt ({first_line(err)}); re-export the "
                                f"model") from None
    components["scheduler"] = scheduler_cls.from_config(scheduler_config)
    pipe = family.pipeline(PipelineParts(components, family), unet, components["scheduler"])
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe




# ---------------------------------------------------------------------------------------------
# One-step students (train/one_step.py)


def save_one_step_pipeline(unet, teacher: str | PipelineSource, folder: str | Path, vae=None,
                           run: str | Path | None = None) -> Path:
    """A one-step student as a pipeline folder: `unet` with the teacher's text encoders and tokenizers, `vae` as
    its decoder (an AutoencoderTiny; None: the teacher's VAE) and sdkd's sampling scheduler of the teacher's with
    its timesteps spaced "trailing", so that a 1-step call (diffusers' num_inference_steps=1, guidance_scale=0, or
    sdkd's steps=1, the recorded settings) samples at t = T-1, where the student was trained. With `run`, its
    model card."""
    parts = load_parts(teacher, with_unet=False)
    if vae is not None:
        parts.components["vae"] = _contiguous(vae)
    pipe = parts.family.pipeline(parts, _contiguous(unet),
                                 sampling_scheduler(parts.scheduler.config, timestep_spacing="trailing"))
    save_pretrained(pipe, folder, safe_serialization=True)
    write_sampling(folder, ONE_STEP)
    if run is not None:
        info = _run_info(Path(run))
        # Not a fine-tune although its config has a `model` key; KD's loss weights played no part.
        info["trainer"] = "one_step"
        info["training"] = {k: v for k, v in info.get("training", {}).items() if not k.startswith("loss.")}
        write_card(folder, card_info(Source(pipe, f"run `{Path(run).name}`, final `{Path(folder).name}/`", info,
                                            sampling=dict(ONE_STEP))), type(pipe))
    return Path(folder)
