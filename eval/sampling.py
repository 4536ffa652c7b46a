"""Sampling fixed prompts from a U-Net with frozen pipeline parts, and image grids.

Each prompt is generated alone (batch 1) with its own seed: the batch size changes the
latents and so the images (BK-SDM's FID moved 16.97-17.16 with it).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image


def sample_images(unet, parts, prompts: list[str], seed: int, steps: int, guidance_scale: float,
                  resolution: int, autocast=nullcontext) -> list[Image.Image]:
    """One image per prompt; prompt i uses seed + i. `parts` is a teacher.PipelineParts."""
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(parts.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    device = next(unet.parameters()).device
    images = []
    was_training = unet.training
    unet.eval()
    with torch.no_grad(), autocast():
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device).manual_seed(seed + i)
            images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                               height=resolution, width=resolution, generator=gen).images[0])
    unet.train(was_training)
    return images


def make_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of equal-size images -> one image."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w, len(rows) * h))
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im, (x * w, y * h))
    return grid
