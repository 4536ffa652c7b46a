"""One training step of the tiny-decoder and autoencoder tasks (train/tasks/decoder.py, train/tasks/autoencoder.py)
in this process, without an update: each loss term measures the images the trainer promises, and reaches the loss
with its config weight. The trainers' runs are in test_tiny_decoder_e2e.py and test_autoencoder_e2e.py."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from sdkd.data.sources.core import collate
from sdkd.train.engine.config import load_config
from sdkd.train.engine.loop import make_accelerator
from sdkd.train.engine.step_random import StepRandom
from sdkd.train.engine.task import StepContext

from conftest import reset_process_state

SMALL = ["data.resolution=32", "data.num_samples=8", "train.batch_size=2", "log.trackers=[none]"]


@contextmanager
def first_step(cfg, build):
    """(task, batch, terms, {module: loss}) of step 0 with a batch of 2, as the loop runs it, without the update;
    the task's accelerator lives until the block ends."""
    reset_process_state()
    try:
        acc = make_accelerator(cfg)
        task, dataset = build(cfg, acc)
        batch = collate([dataset[i] for i in range(2)])
        losses = {}
        ctx = StepContext(0, {m.name: m.module for m in task.modules}, losses.__setitem__)
        yield task, batch, task.train_step(ctx, batch, StepRandom(0, "cpu", 2)), losses
    finally:
        reset_process_state()


def test_tiny_decoder_terms_compare_its_image_with_the_teacher_decoders(tmp_path):
    """L1 of both images 8x pooled, L1 and L2 at full size: each of the tiny decoder's image of the step's
    latents against the teacher decoder's image of them, weighted 2, 3 and 5 in the loss."""
    from sdkd.train.tasks.decoder import build_decoder_task
    from sdkd.train.tasks.decoder_config import TinyDecoderConfig

    cfg = load_config(None, ["teacher=toy", f"output_dir={tmp_path / 'run'}", *SMALL, "decoder.channels=16",
                             "decoder.eval_latents=2", "decoder.lambda_l1_down=2", "decoder.lambda_l1=3",
                             "decoder.lambda_l2=5", "gan.weight=0"], schema=TinyDecoderConfig)
    with first_step(cfg, build_decoder_task) as (task, batch, terms, losses), torch.no_grad():
        latents = task.encoder.latents(batch, StepRandom(0, "cpu", 2))
        vae = task.teacher_vae  # the toy VAE has no shift factor
        fake, target = task.tiny(latents).float(), vae.decode(latents / vae.config.scaling_factor).sample.float()
    pooled = F.l1_loss(F.avg_pool2d(fake, 8), F.avg_pool2d(target, 8))
    assert terms["l1_down"].item() == pytest.approx(pooled.item(), rel=1e-5)
    assert terms["l1"].item() == pytest.approx(F.l1_loss(fake, target).item(), rel=1e-5)
    assert terms["l2"].item() == pytest.approx(F.mse_loss(fake, target).item(), rel=1e-5)
    expected = 2 * terms["l1_down"] + 3 * terms["l1"] + 5 * terms["l2"]
    assert losses["decoder"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_autoencoder_loss_weighs_l1_mse_and_kl_of_its_reconstruction(tmp_path):
    """L1 and MSE of the VAE's reconstruction (of its posterior sample with the step's draw) against the batch's
    images, and the posterior's KL, weighted 2, 3 and 1e-3 in the loss; the KL part is over 1% of the loss."""
    from sdkd.train.tasks.autoencoder import AutoencoderTask, Reconstruct, latent_shape, load_vae_to_train
    from sdkd.train.tasks.autoencoder_config import AutoencoderTrainConfig
    from sdkd.train.tasks.diffusion import load_dataset

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", *SMALL, "autoencoder.l1_weight=2",
                             "autoencoder.mse_weight=3", "autoencoder.kl_weight=1e-3"], schema=AutoencoderTrainConfig)

    def build(cfg, acc):
        dataset = load_dataset(cfg, acc)
        return AutoencoderTask(cfg, acc, load_vae_to_train(None, cfg.train.seed), dataset), dataset

    with first_step(cfg, build) as (task, batch, terms, losses), torch.no_grad():
        pixels = batch["pixel_values"]
        noise = StepRandom(0, "cpu", 2).randn(latent_shape(task.vae, pixels))
        reconstruction, kl = Reconstruct(task.vae)(pixels, noise)
    assert terms["l1"].item() == pytest.approx((reconstruction - pixels).abs().mean().item(), rel=1e-5)
    assert terms["mse"].item() == pytest.approx((reconstruction - pixels).pow(2).mean().item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-5)
    expected = 2 * terms["l1"] + 3 * terms["mse"] + 1e-3 * terms["kl"]
    assert losses["vae"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert 1e-3 * terms["kl"].item() > 0.01 * losses["vae"].item()
