"""Writing trained students out as complete diffusers pipeline folders."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline

from sdkd.train.teacher import load_teacher


def save_pipeline(unet, teacher: str, folder: str | Path) -> Path:
    """`unet` with the teacher's VAE, text encoder, tokenizer and scheduler, as safetensors.

    The frozen parts are read again from the teacher in their stored dtype: during training they
    were cast to the mixed-precision dtype, which must not leak into the export.
    """
    parts = load_teacher(teacher, with_unet=False)
    for p in unet.parameters():
        # Sliced or transposed tensors (e.g. after weight copies) must be written contiguous.
        p.data = p.data.contiguous()
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=unet,
        scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
