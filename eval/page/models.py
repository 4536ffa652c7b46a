"""The models of eval/demo.py: named on the command line, loaded and checked at start-up, timed per image.

    specs = parse_models(["teacher=toy", "student=runs/tiny"])   # NAME=PATH; [] -> default_models()
    models, problems = load_models(specs, scratch=tmp)           # problems: one line per model left out
    result = generate(models[0], "a red fox", seed=0)            # image, seconds, steps, guidance used

A PATH is anything eval/inference/pipeline.py loads (run folder, checkpoint, diffusers folder, sdkd single file),
`toy` (the built-in toy teacher) or `toy:PRESET` (a student of that preset built from the toy teacher by
the weight map, its weights the teacher's). Each model is loaded, then generates one warm-up image: a
model that cannot be loaded or cannot generate (a bad path, an unsupported family, a LoRA or tiny VAE
that does not fit it) is left out with one line naming it and the reason, so the page only shows models
that work, and no model's first timed image pays for one-time set-up (CUDA kernels, allocator).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sdkd.cli import limits
from sdkd.cli.errors import UserError, first_line
from sdkd.cli.files import save_pretrained
from sdkd.eval.inference.pipeline import Pipeline, load_pipeline
from sdkd.train.engine.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS

TOY_PREFIX = "toy:"  # toy:PRESET, a student built from the toy teacher in memory
ONE_STEP_LAYOUTS = ("sdxs", "sdxs09")  # one-step students, as train/formats/model_files.py's model card says


def default_models() -> list[tuple[str, str]]:
    """With no --models: the toy teacher and a toy student, so the page shows something real on a CPU."""
    return [("teacher", "toy"), ("student", toy_student())]


def toy_student() -> str:
    """The toy student: the committed one where sdkd.train.models.toy offers it, else bk_small built from the
    teacher."""
    from sdkd.train.models import toy

    committed = getattr(toy, "TOY_STUDENT", None)
    return str(committed) if committed is not None and Path(committed).exists() else TOY_PREFIX + "bk_small"


def parse_models(entries: list[str]) -> list[tuple[str, str]]:
    """NAME=PATH entries -> [(name, path)]; a malformed or repeated name is a mistake in the command."""
    specs: list[tuple[str, str]] = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--models '{entry}': expected NAME=PATH, e.g. teacher=runs/tiny/student")
        if name in dict(specs):
            raise UserError(f"--models: the name '{name}' is given twice; give each model its own name")
        specs.append((name.strip(), path.strip()))
    return specs


def parse_loras(entries: list[str], names: list[str]) -> dict[str, str]:
    """NAME=FILE entries -> {model name: LoRA file}; NAME must be one of the models."""
    loras: dict[str, str] = {}
    for entry in entries:
        name, sep, file = entry.partition("=")
        if not sep or not file:
            raise UserError(f"--lora '{entry}': expected NAME=FILE, NAME one of the models ({', '.join(names)})")
        if name not in names:
            raise UserError(f"--lora '{entry}': no model is named '{name}' (models: {', '.join(names)})")
        if name in loras:
            raise UserError(f"--lora: two LoRA files for '{name}'; give one")
        loras[name] = file
    return loras


# ---------------------------------------------------------------------------------------------
# Loading and checking


@dataclass
class DemoModel:
    name: str
    path: str
    """What the user named (or the default's description)."""
    pipe: Pipeline
    params: int
    """The U-Net's parameter count."""
    one_step: bool
    """A one-step model: steps=1, guidance=1 by default."""
    default_steps: int = DEFAULT_STEPS
    default_guidance: float = DEFAULT_GUIDANCE
    """What the page starts with for this model."""
    defaults_from: str = "sdkd's defaults"
    """Where they come from: the command line, the model's recorded sampling settings or sdkd's defaults."""

    def describe(self) -> str:
        kind = "one-step" if self.one_step else f"{self.default_steps} steps, guidance {self.default_guidance:g}"
        size = self.pipe.settings()["width"]
        return f"{self.path} (U-Net {format_params(self.params)} params, {size} px, {kind}: {self.defaults_from})"


def format_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def is_one_step(pipe: Pipeline) -> bool:
    """The U-Net's layout is a one-step student's (SDXS), or its scheduler takes trailing timesteps (how
    one-step models such as SD-Turbo ship theirs: the single step at t=999)."""
    from sdkd.train.formats.ldm_layout import unet_layout

    spacing = pipe.pipe.scheduler.config.get("timestep_spacing")
    return unet_layout(dict(pipe.unet.config)) in ONE_STEP_LAYOUTS or spacing == "trailing"


def _toy_source(path: str, scratch: Path) -> Path:
    """`toy:PRESET`: a student built from the toy teacher, written as a diffusers folder under `scratch`, so that it
    loads like any model (device, dtype, tiny VAE, LoRA: eval/inference/pipeline.py)."""
    from sdkd.train.formats.model_files import recorded_sampling, write_sampling
    from sdkd.train.models.students import PRESETS, build_student
    from sdkd.train.models.teacher import load_pipeline as load_parts

    preset = path.removeprefix(TOY_PREFIX)
    if preset not in PRESETS:
        raise UserError(f"no student preset '{preset}' (one of {', '.join(PRESETS)})")
    folder = scratch / f"toy-{preset}"
    if not (folder / "model_index.json").is_file():
        pipe = load_parts("toy", what="toy teacher")
        pipe.unet = build_student(pipe.unet, PRESETS[preset])  # its weights copied from the teacher's
        save_pretrained(pipe, folder, safe_serialization=True)
        if (recorded := recorded_sampling("toy")) is not None:  # it samples as its teacher does
            write_sampling(folder, recorded)
    return folder


def load_model(name: str, path: str, scratch: Path, device: str = "auto", dtype: str = "auto",
               tiny_vae: str | None = None, lora: str | None = None, lora_scale: float = 1.0,
               allow_pickle: bool = False, steps: int | None = None, guidance: float | None = None) -> DemoModel:
    """One model, loaded and checked by a one-step warm-up image; a UserError says why it cannot be shown.
    `steps` and `guidance` (None: the model's recorded sampling settings, else 25 and 7.5): its defaults, unless
    it is a one-step model (1 step; guidance as recorded, else 1)."""
    source: str | Path = path
    if path.startswith(TOY_PREFIX) and not Path(path).exists():
        source = _toy_source(path, scratch)
    pipe = load_pipeline(source, device=device, dtype=dtype, tiny_vae=tiny_vae, lora=lora, lora_scale=lora_scale,
                         allow_pickle=allow_pickle)
    latent = pipe.pipe.vae.config.get("latent_channels")
    if latent is not None and latent != pipe.unet.config.in_channels:
        raise UserError(f"its VAE has {latent} latent channels, its U-Net takes {pipe.unet.config.in_channels}")
    recorded = pipe.sampling
    one_step = recorded["steps"] == 1 if recorded else is_one_step(pipe)
    if one_step:
        steps, guidance = 1, recorded["guidance_scale"] if recorded else 1.0
        where = "the model's recorded sampling settings" if recorded else "one-step model"
    else:
        where = ("the command line" if steps is not None and guidance is not None else
                 "the model's recorded sampling settings" if recorded else "sdkd's defaults (none recorded)")
        steps = pipe.default_steps if steps is None else steps
        guidance = pipe.default_guidance if guidance is None else guidance
    model = DemoModel(name, path, pipe, sum(p.numel() for p in pipe.unet.parameters()), one_step, steps, guidance,
                      where)
    try:
        generate(model, "warm-up", steps=1, seed=0)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:  # parts that do not fit together
        raise UserError(f"cannot generate: {first_line(err)}") from None
    return model


def load_models(specs: list[tuple[str, str]], scratch: str | Path, device: str = "auto", dtype: str = "auto",
                tiny_vae: str | None = None, loras: dict[str, str] | None = None, lora_scale: float = 1.0,
                allow_pickle: bool = False, steps: int | None = None,
                guidance: float | None = None) -> tuple[list[DemoModel], list[str]]:
    """The models that load and generate, and one line for each that does not (its name and the reason).
    --device/--dtype mistakes concern every model: they stop the start-up (UserError)."""
    from sdkd.eval.inference.pipeline import resolve_device_dtype

    resolve_device_dtype(device, dtype)
    loras = loras or {}
    models, problems = [], []
    for name, path in specs:
        try:
            models.append(load_model(name, path, Path(scratch), device, dtype, tiny_vae, loras.get(name), lora_scale,
                                     allow_pickle, steps, guidance))
        except (UserError, OSError, RuntimeError) as err:  # RuntimeError: e.g. out of GPU memory
            problems.append(f"model '{name}' ({path}) left out: {first_line(err)}")
    return models, problems


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass
class Result:
    image: Image.Image
    seconds: float
    """Wall time of the whole pipeline call: text encoding, every U-Net step and the VAE decode."""
    steps: int
    guidance: float
    """The guidance scale actually used (0 in one-step mode: the pipeline switches guidance off)."""


def generate(model: DemoModel, prompt: str, negative_prompt: str | None = None, steps: int | None = None,
             guidance: float | None = None, seed: int = 0) -> Result:
    """One image of `model`, timed; steps and guidance default to the model's own."""
    steps = model.default_steps if steps is None else limits.check_steps(steps, "steps")
    guidance = model.default_guidance if guidance is None else limits.check_guidance(guidance, "guidance")
    pipe = model.pipe
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    start = time.perf_counter()
    image = pipe(prompt, negative_prompt=negative_prompt or None, steps=steps, guidance_scale=guidance,
                 seed=seed)[0]  # a PIL image: the GPU work is done when it exists
    seconds = time.perf_counter() - start
    return Result(image, seconds, steps, pipe.settings(steps, guidance)["guidance_scale"])
