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

from sdkd.train.engine.trainer_cli import run_trainer
from sdkd.train.tasks.decoder_config import TinyDecoderConfig

SCHEMA = TinyDecoderConfig


def build(cfg: TinyDecoderConfig, acc):
    # Imported here, after the arguments are read: --help and launch.sh's config check stay fast.
    from sdkd.train.tasks.decoder import build_decoder_task

    return build_decoder_task(cfg, acc)


if __name__ == "__main__":
    run_trainer(SCHEMA, build, __doc__, __file__)
