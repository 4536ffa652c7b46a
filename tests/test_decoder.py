"""The tiny-decoder task (train/tasks/decoder.py) through the shared loop, in this process: its discriminator
learns to tell the teacher decoder's images from the tiny decoder's."""

from __future__ import annotations

import torch

from sdkd.train.losses.adversarial import PatchDiscriminator, discriminator_loss

from conftest import fit_task


def decoder_config(out, *overrides):
    from sdkd.train.engine.config import load_config
    from sdkd.train.tasks.decoder_config import TinyDecoderConfig

    return load_config("configs/toy_decoder.yaml", [
        f"output_dir={out}", "data.resolution=16", "data.num_samples=16", "train.batch_size=4", "train.max_steps=8",
        "train.checkpoint_every=0", "train.sample_every=0", "eval.every=0", "log.trackers=[none]", *overrides],
        schema=TinyDecoderConfig)


def test_the_discriminator_learns_to_tell_teacher_images_from_the_tiny_decoders(tmp_path):
    """8 steps with the discriminator on from step 0: its hinge loss on the held-out latents' teacher images
    (real) and the trained tiny decoder's (fake) falls well below what its starting weights score on the same
    pair. A discriminator whose loss never reaches its parameters keeps the starting score."""
    from sdkd.train.tasks.decoder import build_decoder_task

    cfg = decoder_config(tmp_path / "run", "gan.start=0", "gan.every=1", "gan.lr=1e-3", "gan.loss=hinge")
    task = fit_task(cfg, lambda acc: build_decoder_task(cfg, acc)[0])
    with torch.random.fork_rng(devices=[]):  # the task's own seeding of its discriminator
        torch.manual_seed(cfg.train.seed + 1)
        start = PatchDiscriminator(task.tiny.vae.config.latent_channels, tuple(cfg.gan.channels))
    latents = task.held_out
    with torch.no_grad():
        # The teacher decoder's images as DecoderTask.target makes them (the toy VAE has no shift factor).
        real = task.teacher_vae.decode(latents / task.teacher_vae.config.scaling_factor).sample
        fake = task.tiny(latents)
        before = discriminator_loss(start(real, latents), start(fake, latents), "hinge").item()
        after = discriminator_loss(task.disc(real, latents), task.disc(fake, latents), "hinge").item()
    assert after < before - 0.2, (before, after)
