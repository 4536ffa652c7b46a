"""sdkd's inference pipeline: any model sdkd writes, set up for speed.

    from sdkd.eval.inference.pipeline import load_pipeline
    pipe = load_pipeline("runs/tiny")       # or "runs/tiny/checkpoint-500" (ema=True: unet_ema/), "tiny.safetensors"
    images = pipe(["a red fox", "a lighthouse"], steps=25, seed=0, negative_prompt="blurry")

- Models: a run folder (its final `student/`), a `checkpoint-STEP` folder, a diffusers pipeline
  folder or an sdkd single file, resolved by train/export.py's `load_source` (export takes the same).
- fp16 (or bf16) on a GPU, fp32 on CPU; PyTorch SDPA attention; channels_last on GPU;
  optional `torch.compile` of the U-Net.
- DPM-Solver++ (multistep, 2nd order) by default; `steps=1` is the one-step mode for one-step
  students (guidance off, the single step taken at t=999 via trailing timestep spacing).
- Steps and guidance default to the model's recorded sampling settings (train/formats/model_files.py: an
  export's sdkd_sampling.json, a run's `sample` section), else 25 and 7.5: with the scheduler sdkd's exports
  ship, one prompt and seed give the same image here and in plain diffusers.
- Optional tiny VAE (`AutoencoderTiny` folder), LoRA weights (diffusers/peft format).
- Image i of a call uses its own generator seeded `seed + i`, so an image does not depend on
  the batch size it was made in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderTiny, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from sdkd.cli import limits
from sdkd.cli.errors import UserError
from sdkd.cli.words import counted
from sdkd.train.engine.frozen import own_dtype
from sdkd.train.engine.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, sampling_scheduler
from sdkd.train.formats.lora_io import load_lora
from sdkd.train.formats.model_files import load_source, load_vae
from sdkd.train.models.families import family_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no CUDA GPU; use --device cpu (fp32)")
    if dtype == "auto":
        dtype = "fp16" if dev.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)} or auto, got '{dtype}'")
    if dev.type == "cpu" and dtype != "fp32":
        where = "this machine has no CUDA GPU" if not torch.cuda.is_available() else "--device cpu was asked for"
        raise UserError(f"--dtype {dtype} needs a GPU ({where}); on CPU use --dtype fp32 (the default there)")
    return dev, DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# The pipeline


class Pipeline:
    """A loaded model ready to generate; `__call__` returns PIL images. `loaded` says what was loaded
    (model source, LoRA, tiny VAE) and `settings()` what a call uses, for records such as samples.json.
    `sampling`: the model's recorded settings ({"steps", "guidance_scale"}), a call's defaults; None: it records
    none (25 steps, guidance 7.5)."""

    def __init__(self, pipe: DiffusionPipeline, device: torch.device, dtype: torch.dtype,
                 loaded: dict | None = None, sampling: dict | None = None):
        self.pipe, self.device, self.dtype, self.loaded = pipe, device, dtype, loaded or {}
        self.sampling = sampling
        self._multi = sampling_scheduler(pipe.scheduler.config)
        self._one = sampling_scheduler(pipe.scheduler.config, timestep_spacing="trailing")
        pipe.scheduler = self._multi
        pipe.set_progress_bar_config(disable=True)

    @property
    def unet(self):
        return self.pipe.unet

    def set_sampler(self, scheduler_class: type, **config) -> None:
        """Sample multi-step calls with another diffusers scheduler (built from this model's scheduler config and
        `config`) instead of DPM-Solver++; one step stays DPM-Solver++ at t=999."""
        self._multi = scheduler_class.from_config(self._multi.config, **config)

    def _scheduler(self, steps: int) -> DPMSolverMultistepScheduler:
        return self._one if steps == 1 else self._multi

    @property
    def default_steps(self) -> int:
        return self.sampling["steps"] if self.sampling else DEFAULT_STEPS

    @property
    def default_guidance(self) -> float:
        return self.sampling["guidance_scale"] if self.sampling else DEFAULT_GUIDANCE

    def describe_defaults(self) -> str:
        """Which steps and guidance a call without them uses, and where they come from (for the commands to print)."""
        where = "the model's recorded sampling settings" if self.sampling else "sdkd's defaults (none recorded)"
        return f"{self.default_steps} steps, guidance {self.default_guidance:g}: {where}"

    def settings(self, steps: int | None = None, guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None) -> dict:
        """The steps, guidance, size and scheduler a call with these arguments uses, defaults resolved."""
        steps = self.default_steps if steps is None else steps
        scheduler = self._scheduler(steps)
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        guidance = self.default_guidance if guidance_scale is None else guidance_scale
        config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
        return dict(steps=steps, guidance_scale=0.0 if steps == 1 else guidance, height=height or size,
                    width=width or size, scheduler={"class": type(scheduler).__name__, **config})

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                 batch_size: int | None = None, height: int | None = None, width: int | None = None,
                 output_type: str = "pil") -> list:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise UserError("no prompt given")
        steps = limits.check_steps(self.default_steps if steps is None else steps, "--steps")
        multiple = max(8, self.pipe.vae_scale_factor)  # diffusers' pipelines ask for multiples of 8
        for name, value in (("--height", height), ("--width", width)):
            if value is not None:
                limits.check_side(value, name, multiple)
        if batch_size is not None:
            limits.check_int(batch_size, "--batch-size", 1, limits.MAX_BATCH)
        if guidance_scale is not None:
            limits.check_guidance(guidance_scale, "--guidance")
        limits.check_seed(seed, "--seed", len(prompts))
        for text in [*prompts, *(negative_prompt if isinstance(negative_prompt, list) else [negative_prompt])]:
            if text is not None:
                limits.check_prompt(text, "prompt")
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * len(prompts)
        if len(negatives) != len(prompts):
            raise UserError(f"{counted(len(negatives), 'negative prompt')} for {counted(len(prompts), 'prompt')}")
        run = self.settings(steps, guidance_scale, height, width)
        self.pipe.scheduler = self._scheduler(steps)
        batch = batch_size or len(prompts)
        gen_device = "cpu" if self.device.type == "cpu" else self.device
        images = []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            negs = negatives[start:start + batch]
            gens = [torch.Generator(gen_device).manual_seed(seed + start + i) for i in range(len(chunk))]
            negative = None if all(n is None for n in negs) else [n or "" for n in negs]
            with own_dtype(self.pipe.vae):  # a VAE kept fp32 decodes fp16 latents
                out = self.pipe(chunk, negative_prompt=negative,
                                num_inference_steps=steps, guidance_scale=run["guidance_scale"], generator=gens,
                                height=run["height"], width=run["width"], output_type=output_type)
            images.extend(out.images)
        return images


def cast_models(pipe: DiffusionPipeline, dtype: torch.dtype) -> None:
    """Every model of `pipe` in the inference dtype, but for those its family keeps wider under it (SDXL's VAE:
    fp32 under fp16, as in training; `Pipeline` hands it its latents in its dtype). A replacement of the family's
    class (a tiny VAE for its AutoencoderKL) takes the inference dtype: the rule is about the model it replaces."""
    family = family_of(pipe.unet.config)
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        own = family.components.get(name)
        wanted = own.dtype(dtype) if own is not None and isinstance(module, own.cls) else dtype
        if module.dtype != wanted:  # a no-op cast still makes diffusers warn
            module.to(dtype=wanted)


def load_pipeline(model: str | Path, device: str = "auto", dtype: str = "auto", tiny_vae: str | Path | None = None,
                  compile: bool = False, channels_last: bool | None = None, lora: str | Path | None = None,
                  lora_scale: float = 1.0, ema: bool = False, allow_pickle: bool = False) -> Pipeline:
    """`model`: a run folder, a checkpoint folder (`ema`: its unet_ema/), a diffusers folder or an sdkd file."""
    dev, torch_dtype = resolve_device_dtype(device, dtype)
    source = load_source(model, ema=ema, allow_pickle=allow_pickle)
    pipe = source.pipe
    if tiny_vae is not None:
        vae = load_vae(tiny_vae, allow_pickle)
        if not isinstance(vae, AutoencoderTiny):
            raise UserError(f"--tiny-vae '{tiny_vae}' holds an {type(vae).__name__}, not an AutoencoderTiny")
        pipe.vae = vae
    if lora is not None:
        load_lora(pipe, lora, lora_scale)  # checked against this model's layout first
    # diffusers warns, per fp16 part, that fp16 cannot run on CPU: such parts are cast to fp32 just below.
    pipe.to(dev, silence_dtype_warnings=True)
    cast_models(pipe, torch_dtype)
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA (flash / memory-efficient kernels on GPU)
    if not isinstance(pipe.vae, AutoencoderTiny):
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    if channels_last if channels_last is not None else dev.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs" if dev.type == "cuda" else "default",
                                  fullgraph=False)
    loaded = dict(model=str(model), source=source.description, unet=source.unet_path, parts=source.parts_path,
                  ema=ema, lora=None if lora is None else str(lora), lora_scale=None if lora is None else lora_scale,
                  tiny_vae=None if tiny_vae is None else str(tiny_vae), compile=compile)
    return Pipeline(pipe, dev, torch_dtype, loaded, source.sampling)


def save_images(images: list[Image.Image], out: str | Path, stem: str = "image") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(out / f"{stem}-{i:03d}.png")
        im.save(paths[-1])
    return paths
