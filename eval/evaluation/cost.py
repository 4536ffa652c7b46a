"""What a model costs: parameters, MACs of one U-Net forward, and latency per image.

- Parameters: of the U-Net, and of the whole pipeline (U-Net, VAE, text encoders).
- MACs: one U-Net forward at batch 1 and the evaluation's resolution, with the conditioning its model family
  gives it (train/models/families.py), counted with torch.utils.flop_counter.FlopCounterMode; MACs = FLOPs / 2
  (BK-SDM counts the U-Net at a 64x64 latent).
- Latency (warm-up runs excluded, median of the timed ones): seconds per image of the whole pipeline at batch 1
  (text encoding, every sampler step, VAE decoding) and of the U-Net alone (one forward at the guidance batch,
  2 with classifier-free guidance, times the steps).
"""

from __future__ import annotations

import statistics
import time

import torch

from sdkd.eval.bench.timing import sync as _sync
from sdkd.eval.bench.timing import unet_inputs as _unet_inputs
from sdkd.eval.bench.timing import unet_macs as _unet_macs
from sdkd.train.models.families import family_of


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pipeline_params(pipe) -> dict[str, int]:
    """`unet_params` and `params` (the U-Net, VAE and text encoders: its model family's models) of a diffusers
    pipeline."""
    models = family_of(pipe.unet.config).models
    return {"unet_params": params(pipe.unet), "params": sum(params(pipe.components[name]) for name in models)}


def unet_inputs(pipe, batch: int, resolution: int, device, dtype) -> tuple:
    """Fixed random U-Net inputs at `resolution`: latents, timestep 500, and keyword arguments with a
    full-length text context (and the added conditions of a family that takes them)."""
    return _unet_inputs(pipe.unet, batch, resolution, pipe.vae_scale_factor, device, dtype)


def unet_macs(pipe, resolution: int, device, dtype) -> int:
    """Multiply-accumulates of one U-Net forward at batch 1."""
    return _unet_macs(pipe.unet, resolution, pipe.vae_scale_factor, device, dtype)


def _median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def latency(pipeline, prompt: str, steps: int, guidance_scale: float, resolution: int, seed: int,
            negative_prompt: str | None, warmup: int = 1, repeats: int = 3) -> dict[str, float]:
    """`sec_per_image` of the whole pipeline at batch 1 and `unet_sec_per_image`; `pipeline` is
    eval/inference/pipeline.py's Pipeline (its scheduler and guidance rules: one step takes no guidance)."""
    device = pipeline.device
    run = pipeline.settings(steps, guidance_scale, resolution, resolution)
    whole = _median_seconds(lambda: pipeline(prompt, negative_prompt=negative_prompt, steps=steps,
                                             guidance_scale=guidance_scale, seed=seed, height=resolution,
                                             width=resolution, output_type="pt"), device, warmup, repeats)
    batch = 2 if run["guidance_scale"] > 1 else 1  # diffusers runs the U-Net on [uncond, cond] with guidance
    sample, t, cond = unet_inputs(pipeline.pipe, batch, resolution, device, pipeline.dtype)
    forward = _median_seconds(lambda: pipeline.unet(sample, t, **cond), device, warmup, repeats)
    return {"sec_per_image": whole, "unet_sec_per_image": forward * steps}
