"""Sampling fixed prompts from a U-Net with frozen pipeline parts, and image grids labelled with them.

Each prompt is generated alone (batch 1) with its own seed: the batch size changes the
latents and so the images (BK-SDM's FID moved 16.97-17.16 with it).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image, ImageDraw, ImageFont

from sdkd.train.engine.frozen import own_dtype

DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 7.5
"""What sdkd samples a model with when it records no sampling settings of its own (train/formats/model_files.py)."""
LABEL_CELL = 128  # labelled grids upscale smaller images (toy runs: 32 px) so a prompt has room to be read
PAD = 4


def sampling_scheduler(config, **changes) -> DPMSolverMultistepScheduler:
    """The scheduler sdkd samples with: DPM-Solver++ (2M) built from a model's scheduler config, whose betas,
    prediction type and timestep spacing it keeps; exports ship it, so plain diffusers samples as sdkd does."""
    return DPMSolverMultistepScheduler.from_config(config, **{"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                               **changes})


def sample_images(unet, parts, prompts: list[str], seed: int, steps: int, guidance_scale: float,
                  resolution: int, autocast=nullcontext) -> list[Image.Image]:
    """One image per prompt; prompt i uses seed + i. `parts` is a teacher.PipelineParts."""
    pipe = parts.family.pipeline(parts, unet, sampling_scheduler(parts.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    device = next(unet.parameters()).device
    images = []
    was_training = unet.training
    unet.eval()
    with torch.no_grad(), autocast(), own_dtype(pipe.vae):  # the VAE decodes in its family's dtype
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device).manual_seed(seed + i)
            images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                               height=resolution, width=resolution, generator=gen).images[0])
    unet.train(was_training)
    return images


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text` cut to `width` pixels, ending in '...' when cut."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 3) -> str:
    """Word-wrap `text` to `width` pixels, at most `max_lines` lines (the last one cut with '...')."""
    lines = [""]
    for word in text.split():
        joined = f"{lines[-1]} {word}".strip()
        if draw.textlength(joined, font=font) <= width or not lines[-1]:
            lines[-1] = joined
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [lines[max_lines - 1] + "..."]
    return "\n".join(_fit(draw, line, font, width) for line in lines)


def make_grid(rows: list[list[Image.Image]], prompts: list[str] | None = None,
              row_labels: list[str] | None = None) -> Image.Image:
    """Rows of equal-size images -> one image. `prompts` label the columns in a band above the images,
    `row_labels` (e.g. "teacher", "student step 500") the rows in a band on their left; PIL's default font."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    scale = -(-LABEL_CELL // w) if (prompts or row_labels) and w < LABEL_CELL else 1
    w, h = w * scale, h * scale
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # for measuring text
    labels = [_wrap(draw, p, font, w - 2 * PAD) for p in prompts or []]
    top = max(draw.multiline_textbbox((0, 0), t, font=font)[3] for t in labels) + 2 * PAD if labels else 0
    names = [_fit(draw, r, font, LABEL_CELL - 2 * PAD) for r in row_labels or []]
    left = LABEL_CELL if names else 0  # fixed: grids of one run line up (teacher.png, step-N.png)
    grid = Image.new("RGB", (left + cols * w, top + len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for x, text in enumerate(labels):
        draw.multiline_text((left + x * w + PAD, PAD), text, fill="black", font=font)
    for y, name in enumerate(names):
        draw.text((PAD, top + y * h + h // 2), name, fill="black", font=font, anchor="lm")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.resize((w, h), Image.NEAREST) if scale > 1 else im, (left + x * w, top + y * h))
    return grid
