"""Loading the teacher pipeline's parts (hub id, local diffusers folder, or the built-in toy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sdkd.train.errors import UserError, first_line


@dataclass
class PipelineParts:
    """The pieces of an SD-1.x/2.x pipeline a trainer needs. `unet` may be left out, and so may the VAE,
    text encoder and tokenizer (a run from a latent cache); `vae_config` is kept either way."""

    unet: UNet2DConditionModel | None
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel | None
    tokenizer: CLIPTokenizer | None
    scheduler: DDPMScheduler
    vae_config: Any = None
    """The VAE's config (a dict-like); taken from `vae` when not given."""

    def __post_init__(self) -> None:
        if self.vae_config is None:
            self.vae_config = self.vae.config

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def has_encoders(self) -> bool:
        return self.vae is not None


@dataclass(frozen=True)
class PipelineSource:
    """A pipeline to load: "toy", a local diffusers folder or a hub id, with the hub `revision` (branch, tag or
    commit) and weight `variant` (fp16: the `*.fp16.safetensors` files) of diffusers' `from_pretrained`."""

    path: str
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    """Load pickle weights (.bin) where there are no safetensors; pickle can run code when loaded."""

    @classmethod
    def of(cls, cfg, key: str = "teacher") -> "PipelineSource":
        """The config's `teacher` or `model`, with its `KEY_revision`, `KEY_variant` and `allow_pickle`."""
        return cls(getattr(cfg, key), getattr(cfg, f"{key}_revision"), getattr(cfg, f"{key}_variant"),
                   cfg.allow_pickle)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(folder: Path, what: str) -> None:
    """A model folder whose weights are pickle only: pickle can run code when loaded, so it is refused
    unless the user allows it by name (a hub id is refused by the loader itself: use_safetensors=True)."""
    files = [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
    pickled = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
    if pickled and not any(f.suffix == ".safetensors" for f in files):
        raise UserError(f"{what} '{folder}': weights only as pickle ({', '.join(pickled)}), which can run code when "
                        f"loaded; convert them to safetensors, or set allow_pickle=true if you trust the files")


def load_teacher(source: str | PipelineSource, with_unet: bool = True, with_encoders: bool = True,
                 what: str = "teacher") -> PipelineParts:
    """`source`: "toy", a local diffusers pipeline folder, or a hub id (cached or downloaded), as a path or a
    `PipelineSource`.

    `with_encoders=False` leaves out the VAE, text encoder and tokenizer (only the VAE's config is read).
    `what` names the pipeline in errors (the fine-tune and LoRA trainers load their `model` with it)."""
    src = source if isinstance(source, PipelineSource) else PipelineSource(source)
    source = src.path
    if source == "toy":
        from sdkd.train.toy import build_toy_pipeline

        p = build_toy_pipeline()
        enc = (p.vae, p.text_encoder, p.tokenizer) if with_encoders else (None, None, None)
        return PipelineParts(p.unet if with_unet else None, *enc, p.scheduler, vae_config=p.vae.config)
    local = Path(source)
    if local.exists() and not (local / "model_index.json").is_file():
        raise UserError(f"{what} '{source}': folder has no model_index.json (expected a diffusers pipeline folder)")
    if local.exists() and not src.allow_pickle:
        for sub in ("unet",) * with_unet + ("vae", "text_encoder") * with_encoders:
            refuse_pickle(local / sub, what)
    try:
        kw = dict(local_files_only=local.exists(), revision=src.revision)
        # Tokenizer and configs have no variants; safetensors only unless allowed.
        weights = dict(kw, variant=src.variant, use_safetensors=None if src.allow_pickle else True)
        return PipelineParts(
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights) if with_unet else None,
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **weights) if with_encoders else None,
            text_encoder=(CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights)
                          if with_encoders else None),
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw) if with_encoders else None,
            scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw),
            vae_config=None if with_encoders else AutoencoderKL.load_config(source, subfolder="vae", **kw),
        )
    except (OSError, ValueError) as err:
        variant = f" ({what}_variant={src.variant})" if src.variant else ""
        raise UserError(f"{what} '{source}'{variant} could not be loaded: {first_line(err)}") from None


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen models never enter accelerator.prepare: no DDP, no fp32 master copy, no grads."""
    module.requires_grad_(False)
    module.eval()
    module.to(device)
    # A no-op cast would still make diffusers warn about modules kept in fp32.
    return module.to(dtype=dtype) if module.dtype != dtype else module
