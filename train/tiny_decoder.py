"""Distil a tiny image decoder (diffusers `AutoencoderTiny`, the TAESD layout) from a teacher's VAE decoder:
SDXS's stage 2 (arXiv 2403.16627, eq. 5).

    accelerate launch train/tiny_decoder.py --config configs/sdxs_decoder.yaml [key=value ...]

Each step takes a batch of latents, the scaled ones the U-Net sees: from images through the teacher's
VAE, or from a latent cache (`data.cache`, written by train/cache_latents.py; with `--from-samples` it
holds the teacher pipeline's own sampled latents, as SDXS trains on). The frozen teacher decoder's image
of each latent is the target. The tiny decoder learns L1 between both images 8x average-pooled (plus
optional full-resolution L1 / L2 and LPIPS) and an adversarial term from a conditional patch
discriminator that sees the image with its latent (train/losses/adversarial.py); the discriminator trains from
`gan.start` on, every `gan.every` steps, with its own learning rate. `eval.every`: PSNR and SSIM
against the teacher decoder on held-out latents (at step 0, every `eval.every` steps and the last).
Writes OUTPUT/tiny_decoder/ (an AutoencoderTiny folder with a model card, the `vae` of our pipeline or of
a diffusers StableDiffusionPipeline; from scratch its encoder is untrained) and OUTPUT/taesd.safetensors
(the decoder, plus an encoder that came from `decoder.init`, for stable-diffusion.cpp's `--taesd`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import auto
from typing import Optional

from sdkd.cli.errors import require
from sdkd.data.sources.config import Choice
from sdkd.train.engine.config import Config
from sdkd.train.engine.trainer_cli import run_trainer


class GanLoss(Choice):
    hinge = auto()
    non_saturating = auto()


@dataclass
class DecoderSection:
    init: Optional[str] = None
    """Start from these weights: an AutoencoderTiny folder (or a pipeline folder's vae/) or a TAESD-format
    .safetensors (diffusers keys, e.g. madebyollin/taesd's diffusion_pytorch_model.safetensors, or our
    OUTPUT/taesd.safetensors; without encoder tensors the encoder stays untrained); null: from scratch,
    at `channels`."""
    channels: int = 64
    """Width of every decoder layer from scratch (TAESD and stable-diffusion.cpp: 64)."""
    downsample: int = 8
    """The L1 term compares both images average-pooled by this factor (SDXS eq. 5: 8)."""
    lambda_l1_down: float = 1.0
    """Weight of L1 between the downsampled images."""
    lambda_l1: float = 0.0
    """Weight of L1 at full resolution."""
    lambda_l2: float = 0.0
    """Weight of MSE at full resolution."""
    lambda_lpips: float = 0.0
    """Weight of LPIPS (VGG) at full resolution; needs lpips_weights."""
    lpips_weights: Optional[str] = None
    """Local LPIPS weights (see train/losses/perceptual.py); required when lambda_lpips > 0."""
    eval_latents: int = 8
    """Latents held out of training (the data set's last ones) for PSNR/SSIM (`eval.every`) and grids."""


@dataclass
class GanSection:
    weight: float = 0.1
    """λ_GAN of the adversarial term (with `adaptive`, a factor on the adaptive weight); 0: no discriminator."""
    adaptive: bool = False
    """Scale the adversarial term by |∇ reconstruction| / |∇ adversarial| at the decoder's last layer (taming)."""
    loss: GanLoss = GanLoss.hinge
    """Generator and discriminator loss."""
    start: int = 0
    """First step (0-based) with the adversarial term and discriminator updates."""
    every: int = 1
    """The discriminator updates every this many steps from `start` on."""
    lr: float = 1e-4
    """The discriminator's learning rate (its other optimizer settings are `optim`'s)."""
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    """Widths of the discriminator's stride-2 stages."""


@dataclass
class TinyDecoderConfig(Config):
    decoder: DecoderSection = field(default_factory=DecoderSection)
    gan: GanSection = field(default_factory=GanSection)

    def validate(self) -> None:
        d, g = self.decoder, self.gan
        require(d.channels > 0, "decoder.channels", "must be > 0")
        require(d.downsample >= 1, "decoder.downsample", "must be >= 1")
        for name in ("lambda_l1_down", "lambda_l1", "lambda_l2", "lambda_lpips"):
            require(getattr(d, name) >= 0, f"decoder.{name}", "must be >= 0")
        require(d.lambda_l1_down + d.lambda_l1 + d.lambda_l2 + d.lambda_lpips > 0, "decoder.lambda_l1_down",
                "every reconstruction weight is 0: nothing to learn the teacher decoder from")
        require(d.lambda_lpips == 0 or d.lpips_weights is not None, "decoder.lpips_weights",
                "required when decoder.lambda_lpips > 0 (a local file; nothing is downloaded)")
        require(d.eval_latents > 0, "decoder.eval_latents", "must be > 0")
        require(g.weight >= 0, "gan.weight", "must be >= 0")
        require(g.start >= 0, "gan.start", "must be >= 0")
        require(g.every > 0, "gan.every", "must be > 0")
        require(g.lr > 0, "gan.lr", "must be > 0")
        require(bool(g.channels) and all(c > 0 for c in g.channels), "gan.channels", "positive widths")


SCHEMA = TinyDecoderConfig


def build(cfg: TinyDecoderConfig, acc):
    # Imported here, after the arguments are read: --help and launch.sh's config check stay fast.
    from sdkd.train.tasks.decoder import build_decoder_task

    return build_decoder_task(cfg, acc)


if __name__ == "__main__":
    run_trainer(SCHEMA, build, __doc__, __file__)
