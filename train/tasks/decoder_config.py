"""The schema of train/tiny_decoder.py: the teacher whose VAE decoder is distilled, the tiny decoder
(`decoder`), its discriminator (`gan`) and the held-out evaluation (`eval`).

Nothing heavy is imported here: config loading and --help stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import auto
from typing import Optional

from sdkd.cli.errors import require
from sdkd.data.sources.config import Choice, Section
from sdkd.train.engine.config import EvalConfig
from sdkd.train.tasks.diffusion_config import TeacherRunConfig


class GanLoss(Choice):
    hinge = auto()
    non_saturating = auto()


@dataclass
class DecoderSection(Section):
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

    def check(self, at: str) -> None:
        super().check(at)
        require(self.channels > 0, f"{at}.channels", "must be > 0")
        require(self.downsample >= 1, f"{at}.downsample", "must be >= 1")
        weights = ("lambda_l1_down", "lambda_l1", "lambda_l2", "lambda_lpips")
        for name in weights:
            require(getattr(self, name) >= 0, f"{at}.{name}", "must be >= 0")
        require(sum(getattr(self, name) for name in weights) > 0, f"{at}.lambda_l1_down",
                "every reconstruction weight is 0: nothing to learn the teacher decoder from")
        require(self.lambda_lpips == 0 or self.lpips_weights is not None, f"{at}.lpips_weights",
                f"required when {at}.lambda_lpips > 0 (a local file; nothing is downloaded)")
        require(self.eval_latents > 0, f"{at}.eval_latents", "must be > 0")


@dataclass
class GanSection(Section):
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

    def check(self, at: str) -> None:
        super().check(at)
        require(self.weight >= 0, f"{at}.weight", "must be >= 0")
        require(self.start >= 0, f"{at}.start", "must be >= 0")
        require(self.every > 0, f"{at}.every", "must be > 0")
        require(self.lr > 0, f"{at}.lr", "must be > 0")
        require(bool(self.channels) and all(c > 0 for c in self.channels), f"{at}.channels", "positive widths")


@dataclass
class DecoderEvalConfig(EvalConfig):
    seed: int = 0
    """Seed of the held-out latents' draw from the teacher VAE's posterior (or from the cached mean and std)."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.seed >= 0, f"{at}.seed", "must be >= 0")


@dataclass
class TinyDecoderConfig(TeacherRunConfig):
    """train/tiny_decoder.py: a tiny decoder distilled from the teacher's VAE decoder."""

    decoder: DecoderSection = field(default_factory=DecoderSection)
    gan: GanSection = field(default_factory=GanSection)
    eval: DecoderEvalConfig = field(default_factory=DecoderEvalConfig)
    """PSNR and SSIM of the tiny decoder's images against the teacher decoder's, on the held-out latents
    (decoder.eval_latents), logged as eval/psnr and eval/ssim."""
