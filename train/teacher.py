"""Loading the teacher pipeline's parts (hub id, local diffusers folder, or the built-in toy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sdkd.train.config import UserError


@dataclass
class PipelineParts:
    """The pieces of an SD-1.x/2.x pipeline a trainer needs; `unet` may be left out."""

    unet: UNet2DConditionModel | None
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_teacher(source: str, with_unet: bool = True) -> PipelineParts:
    """`source`: "toy", a local diffusers pipeline folder, or a hub id (cached or downloaded)."""
    if source == "toy":
        from sdkd.train.toy import build_toy_pipeline

        p = build_toy_pipeline()
        return PipelineParts(p.unet if with_unet else None, p.vae, p.text_encoder, p.tokenizer, p.scheduler)
    local = Path(source)
    if local.exists() and not (local / "model_index.json").is_file():
        raise UserError(f"teacher '{source}': folder has no model_index.json (expected a diffusers pipeline folder)")
    try:
        kw = dict(local_files_only=local.exists())
        return PipelineParts(
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw) if with_unet else None,
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
            scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"teacher '{source}' could not be loaded: {first}") from None


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen models never enter accelerator.prepare: no DDP, no fp32 master copy, no grads."""
    module.requires_grad_(False)
    module.eval()
    module.to(device)
    # A no-op cast would still make diffusers warn about modules kept in fp32.
    return module.to(dtype=dtype) if module.dtype != dtype else module
