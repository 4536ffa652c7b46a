"""sdkd's inference pipeline: a diffusers folder or an sdkd single file, set up for speed.

    from sdkd.eval.pipeline import load_pipeline
    pipe = load_pipeline("runs/tiny/student")                  # or "tiny.safetensors"
    images = pipe(["a red fox", "a lighthouse"], steps=25, seed=0, negative_prompt="blurry")

- fp16 (or bf16) on a GPU, fp32 on CPU; PyTorch SDPA attention; channels_last on GPU;
  optional `torch.compile` of the U-Net.
- DPM-Solver++ (multistep, 2nd order) by default; `steps=1` is the one-step mode for one-step
  students (guidance off, the single step taken at t=999 via trailing timestep spacing).
- Optional tiny VAE (`AutoencoderTiny` folder), LoRA weights (diffusers/peft format).
- Image i of a call uses its own generator seeded `seed + i`, so an image does not depend on
  the batch size it was made in.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderTiny, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from sdkd.train.config import UserError, first_line
from sdkd.train.export import load_single_file, load_vae
from sdkd.train.lora_io import load_lora

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 7.5


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


def load_model(model: str | Path) -> StableDiffusionPipeline:
    """A diffusers pipeline folder (model_index.json) or an sdkd `.safetensors` single file."""
    path = Path(model)
    if not path.exists():
        raise UserError(f"model '{model}' not found: give a diffusers pipeline folder or an sdkd .safetensors file")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"model '{model}' is a folder without model_index.json: not a diffusers pipeline folder")
        try:
            return StableDiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None,
                                                           feature_extractor=None, requires_safety_checker=False)
        except Exception as err:  # diffusers raises many kinds for a damaged folder
            raise UserError(f"model '{model}' could not be loaded ({first_line(err)}); re-export it with "
                            f"python train/export.py") from None
    if path.suffix != ".safetensors":
        raise UserError(f"model '{model}': expected a .safetensors file written by python train/export.py, "
                        f"or a diffusers folder")
    return load_single_file(path)


# ---------------------------------------------------------------------------------------------
# The pipeline


class Pipeline:
    """A loaded model ready to generate; `__call__` returns PIL images."""

    def __init__(self, pipe: StableDiffusionPipeline, device: torch.device, dtype: torch.dtype):
        self.pipe, self.device, self.dtype = pipe, device, dtype
        self._multi = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                              solver_order=2)
        self._one = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                            timestep_spacing="trailing")
        pipe.scheduler = self._multi
        pipe.set_progress_bar_config(disable=True)

    @property
    def unet(self):
        return self.pipe.unet

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 steps: int = DEFAULT_STEPS, guidance_scale: float | None = None, seed: int = 0,
                 batch_size: int | None = None, height: int | None = None, width: int | None = None,
                 output_type: str = "pil") -> list:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise UserError("no prompt given")
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * len(prompts)
        if len(negatives) != len(prompts):
            raise UserError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        one_step = steps == 1
        guidance = 0.0 if one_step else (DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale)
        self.pipe.scheduler = self._one if one_step else self._multi
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        height, width = height or size, width or size
        batch = batch_size or len(prompts)
        gen_device = "cpu" if self.device.type == "cpu" else self.device
        images = []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            negs = negatives[start:start + batch]
            gens = [torch.Generator(gen_device).manual_seed(seed + start + i) for i in range(len(chunk))]
            out = self.pipe(chunk, negative_prompt=None if all(n is None for n in negs) else [n or "" for n in negs],
                            num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                            height=height, width=width, output_type=output_type)
            images.extend(out.images)
        return images


def load_pipeline(model: str | Path, device: str = "auto", dtype: str = "auto", tiny_vae: str | Path | None = None,
                  compile: bool = False, channels_last: bool | None = None, lora: str | Path | None = None,
                  lora_scale: float = 1.0) -> Pipeline:
    dev, torch_dtype = resolve_device_dtype(device, dtype)
    pipe = load_model(model)
    if tiny_vae is not None:
        vae = load_vae(tiny_vae)
        if not isinstance(vae, AutoencoderTiny):
            raise UserError(f"--tiny-vae '{tiny_vae}' is a {type(vae).__name__}, not an AutoencoderTiny")
        pipe.vae = vae
    if lora is not None:
        load_lora(pipe, lora, lora_scale)  # checked against this model's layout first
    pipe.to(dev)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        if module.dtype != torch_dtype:  # a no-op cast still makes diffusers warn
            module.to(dtype=torch_dtype)
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA (flash / memory-efficient kernels on GPU)
    if not isinstance(pipe.vae, AutoencoderTiny):
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    if channels_last if channels_last is not None else dev.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs" if dev.type == "cuda" else "default",
                                  fullgraph=False)
    return Pipeline(pipe, dev, torch_dtype)


def save_images(images: list[Image.Image], out: str | Path, stem: str = "image") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(out / f"{stem}-{i:03d}.png")
        im.save(paths[-1])
    return paths
