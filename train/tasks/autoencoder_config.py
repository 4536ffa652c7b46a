"""The schema of train/autoencoder.py: the shared run keys and the `autoencoder` section (no teacher, U-Net,
KD or sampler keys: it reads none).

Nothing heavy is imported here: config loading and --help stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sdkd.cli.errors import require
from sdkd.data.sources.config import Section
from sdkd.train.engine.config import RunConfig


@dataclass
class AutoencoderSection(Section):
    model: Optional[str] = None
    """The VAE to train further: a VAE folder, a pipeline folder (its vae/), a hub id, or toy (the committed toy
    teacher's); null: a new AutoencoderKL of the toy VAE's architecture, its weights drawn from train.seed."""
    l1_weight: float = 1.0
    """Weight of the mean absolute reconstruction error (pixels in [-1, 1])."""
    mse_weight: float = 0.0
    """Weight of the mean squared reconstruction error."""
    kl_weight: float = 1.0e-6
    """Weight of the KL term (per sample, summed over latent elements): keeps the latents near N(0, I)
    without blurring the reconstruction."""
    fit_scaling_factor: bool = True
    """At export, set the VAE config's scaling_factor to 1 / the standard deviation of the posterior means of
    `scaling_samples` training images, so scaled latents have unit variance (how SD's 0.18215 was chosen);
    false: keep the config's."""
    scaling_samples: int = 256
    """Training images the scaling factor is measured on."""
    sample_images: int = 8
    """Training images shown in each sample grid (inputs above reconstructions)."""

    def check(self, at: str) -> None:
        super().check(at)
        for name in ("l1_weight", "mse_weight", "kl_weight"):
            require(getattr(self, name) >= 0, f"{at}.{name}", "must be >= 0")
        require(self.l1_weight + self.mse_weight > 0, f"{at}.l1_weight",
                f"{at}.l1_weight and mse_weight are both 0: no reconstruction loss")
        require(self.scaling_samples > 0, f"{at}.scaling_samples", "must be > 0")
        require(self.sample_images > 0, f"{at}.sample_images", "must be > 0")


@dataclass
class AutoencoderTrainConfig(RunConfig):
    """train/autoencoder.py: a VAE on its own data."""

    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)

    def check_inputs(self) -> None:
        super().check_inputs()
        model = self.autoencoder.model
        if model and not Path(model).exists():  # a local VAE folder is this trainer's own form
            from sdkd.train.models.names import resolve_model

            resolve_model(model, "autoencoder.model")

    def check(self, at: str) -> None:
        super().check(at)
        require(self.data.cache is None, "data.cache", "a latent cache holds no images: the VAE trains on pixels")
