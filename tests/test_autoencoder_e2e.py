"""train/autoencoder.py: the VAE trainer on the shared loop, run as a user runs it, and its task's parts."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from sdkd.data.sources.core import SyntheticCaptions
from sdkd.data.sources.transforms import ImageTransform
from sdkd.train.tasks.autoencoder import Reconstruct, first_images, fit_scaling_factor, latent_shape, load_vae_to_train

from conftest import launch_trainer, run_script, same_state


def launch_vae(out, *overrides, ok=True):
    return launch_trainer("train/autoencoder.py", "configs/toy_vae.yaml", out, "log.trackers=[none]", *overrides,
                          check=ok)


def reconstruction_error(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    with torch.no_grad():
        return (vae.eval()(pixels, sample_posterior=False).sample - pixels).abs().mean().item()


@pytest.mark.e2e
def test_a_short_run_lowers_the_reconstruction_error(tmp_path):
    result = launch_vae(tmp_path, "train.max_steps=40", "train.batch_size=16", "train.sample_every=20",
                        "train.checkpoint_every=0", "optim.lr=2e-3", "optim.lr_scheduler=constant",
                        "optim.warmup_steps=0", "data.num_samples=256", "autoencoder.scaling_samples=64")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 41))
    assert all({"loss", "l1", "mse", "kl", "lr"} <= line.keys() for line in lines)
    assert all(line["loss"] == pytest.approx(line["l1"] + 1e-6 * line["kl"], rel=1e-5) for line in lines)
    assert "scaling_factor" in result.stdout and f"model        {tmp_path / 'vae'}" in result.stdout

    # The exported VAE reconstructs the training images better than the random one it started from.
    pixels, _ = first_images(SyntheticCaptions(256, ImageTransform(32), seed=0), 32)
    before = reconstruction_error(load_vae_to_train(None, seed=0), pixels)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    after = reconstruction_error(vae, pixels)
    assert after < 0.6 * before, (before, after)  # measured: 0.70 -> 0.30
    # Its scaling factor was refitted: scaled latents of the same images have unit variance.
    assert vae.config.scaling_factor != 0.18215
    latents = vae.encode(pixels[:64]).latent_dist.mean * vae.config.scaling_factor
    assert latents.std().item() == pytest.approx(1.0, rel=0.1)
    # Grids: one per sample step, both of one size, wider than tall.
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["step-20.png", "step-40.png"]
    first, last = (Image.open(tmp_path / "samples" / f"step-{s}.png") for s in (20, 40))
    assert first.size == last.size and first.width > first.height


@pytest.mark.e2e
def test_resumed_run_matches_uninterrupted(tmp_path, toy_teacher_dir):
    """Resumed from checkpoint-3, the run logs steps 4 to 6, and its checkpoint-6 VAE and EMA VAE and its exported VAE
    equal the uninterrupted run's (same_state)."""
    # From a given pipeline's VAE; EMA, accumulation and a cosine schedule are part of the state.
    common = [f"autoencoder.model={toy_teacher_dir}", "train.max_steps=6", "train.checkpoint_every=3",
              "train.sample_every=0", "train.grad_accum=2", "train.batch_size=4", "data.num_samples=32",
              "ema.enabled=true", "ema.decay=0.9", "autoencoder.mse_weight=0.5", "autoencoder.scaling_samples=8"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = launch_vae(full, *common)
    assert f"VAE ({toy_teacher_dir})" in result.stdout
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    result = launch_vae(resumed, *common, "resume=latest")
    assert "resumed from" in result.stdout + result.stderr
    for sub in ("vae", "vae_ema"):
        a = load_file(full / "checkpoint-6" / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / "checkpoint-6" / sub / "diffusion_pytorch_model.safetensors")
        assert same_state(a, b), sub
    assert same_state(*[load_file(run / "vae" / "diffusion_pytorch_model.safetensors") for run in (full, resumed)])
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 5, 6]


@pytest.mark.parametrize("override, message", [
    ("autoencoder.l1_weight=0", "error: config key 'autoencoder.l1_weight': autoencoder.l1_weight and mse_weight "
                                "are both 0: no reconstruction loss"),
    ("autoencoder.kl_weight=-1", "error: config key 'autoencoder.kl_weight': must be >= 0"),
    ("data.cache=/nowhere", "error: config key 'data.cache': a latent cache holds no images: the VAE trains on "
                            "pixels"),
])
def test_config_errors_are_one_line(tmp_path, override, message):
    result = run_script([sys.executable, "train/autoencoder.py", "--config", "configs/toy_vae.yaml",
                         f"output_dir={tmp_path}", override], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message


def test_reconstruct_is_diffusers_posterior_sample_and_kl():
    vae = load_vae_to_train(None, seed=0).eval()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn(latent_shape(vae, pixels), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reconstruction, kl = Reconstruct(vae)(pixels, noise)
        posterior = vae.encode(pixels).latent_dist
        expected = vae.decode(posterior.mean + posterior.std * noise).sample
    assert noise.shape == (2, 4, 16, 16)
    assert torch.equal(reconstruction, expected) and torch.equal(kl, posterior.kl())


def test_a_new_vae_is_drawn_from_the_seed_and_the_scaling_factor_fits():
    a, b, c = (load_vae_to_train(None, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    pixels = torch.rand(6, 3, 32, 32) * 2 - 1
    factor = fit_scaling_factor(a, pixels, batch_size=4)
    with torch.no_grad():
        assert (a.encode(pixels).latent_dist.mean * factor).std().item() == pytest.approx(1.0, rel=1e-4)
