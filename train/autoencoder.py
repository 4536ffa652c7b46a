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

from sdkd.cli.words import counted
from sdkd.train.engine.trainer_cli import run_trainer
from sdkd.train.tasks.autoencoder_config import AutoencoderTrainConfig

SCHEMA = AutoencoderTrainConfig


def build(cfg: AutoencoderTrainConfig, acc):
    # Imported here, after the arguments are read: --help and launch.sh's config check stay fast.
    from sdkd.train.tasks.autoencoder import AutoencoderTask, load_vae_to_train
    from sdkd.train.tasks.diffusion import load_dataset

    dataset = load_dataset(cfg, acc)
    vae = load_vae_to_train(cfg.autoencoder.model, cfg.train.seed, cfg.allow_pickle)
    acc.print(f"VAE ({cfg.autoencoder.model or 'new, toy architecture'}) "
              f"{sum(p.numel() for p in vae.parameters()):,} params; on {counted(acc.num_processes, 'process')}")
    return AutoencoderTask(cfg, acc, vae, dataset), dataset


if __name__ == "__main__":
    run_trainer(SCHEMA, build, __doc__, __file__)
