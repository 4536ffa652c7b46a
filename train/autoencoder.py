"""Train a Stable Diffusion VAE (diffusers AutoencoderKL) on images: reconstruction plus a small KL term.

    accelerate launch train/autoencoder.py --config configs/toy_vae.yaml [key=value ...]

The loss is `l1_weight * |x' - x| + mse_weight * (x' - x)^2` (means over pixels) + `kl_weight * KL`, KL being
the posterior's divergence from N(0, I) summed over the latent elements of a sample (diffusers' `kl()`),
averaged over the batch: LDM's autoencoder objective without its perceptual and GAN terms, enough for
flat synthetic images. Starts from a new VAE of the toy VAE's architecture (train/models/toy.py TOY_VAE), or
trains `autoencoder.model`'s further. Sample grids show inputs above their reconstructions. Writes
OUTPUT/vae/, a diffusers AutoencoderKL folder whose `scaling_factor` is refitted to the data (see
`autoencoder.fit_scaling_factor`). Loop, EMA, checkpoints, resume and trackers are the shared loop's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sdkd.cli.errors import require
from sdkd.train.engine.config import Config
from sdkd.train.engine.trainer_cli import run_trainer


@dataclass
class AutoencoderSection:
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


@dataclass
class AutoencoderTrainConfig(Config):
    """train/autoencoder.py: a VAE on its own data; the U-Net, KD and sampler settings are not read."""

    teacher: Optional[str] = None
    """Not used by this trainer (the VAE trained is autoencoder.model's)."""
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)

    def __post_init__(self) -> None:
        """This trainer's checks, made when the config loads (train/engine/config.py's `validate` makes the shared ones)."""
        check(self)


SCHEMA = AutoencoderTrainConfig


def check(cfg: AutoencoderTrainConfig) -> None:
    a = cfg.autoencoder
    for name in ("l1_weight", "mse_weight", "kl_weight"):
        require(getattr(a, name) >= 0, f"autoencoder.{name}", "must be >= 0")
    require(a.l1_weight + a.mse_weight > 0, "autoencoder.l1_weight",
            "autoencoder.l1_weight and mse_weight are both 0: no reconstruction loss")
    require(a.scaling_samples > 0, "autoencoder.scaling_samples", "must be > 0")
    require(a.sample_images > 0, "autoencoder.sample_images", "must be > 0")
    require(cfg.data.cache is None, "data.cache", "a latent cache holds no images: the VAE trains on pixels")


def build(cfg: AutoencoderTrainConfig, acc):
    # Imported here, after the arguments are read: --help and launch.sh's config check stay fast.
    from sdkd.train.tasks.autoencoder import AutoencoderTask, load_vae_to_train
    from sdkd.train.tasks.diffusion import load_dataset

    dataset = load_dataset(cfg, acc)
    vae = load_vae_to_train(cfg.autoencoder.model, cfg.train.seed, cfg.allow_pickle)
    acc.print(f"VAE ({cfg.autoencoder.model or 'new, toy architecture'}) "
              f"{sum(p.numel() for p in vae.parameters()):,} params; on {acc.num_processes} processes")
    return AutoencoderTask(cfg, acc, vae, dataset), dataset


if __name__ == "__main__":
    run_trainer(SCHEMA, build, __doc__, __file__)
