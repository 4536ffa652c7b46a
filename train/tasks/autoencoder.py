"""The task of train/autoencoder.py: one trained AutoencoderKL, reconstruction plus KL, sample grids of
inputs above their reconstructions, and an export as a diffusers VAE folder with a refitted scaling factor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch.utils.data import IterableDataset

from sdkd.cli.errors import UserError
from sdkd.cli.files import save_pretrained
from sdkd.train.engine.checkpoints import ModelState
from sdkd.train.engine.task import SampleSink, StepContext, Task, TrainedModule


def load_vae_to_train(model: str | None, seed: int, allow_pickle: bool = False) -> AutoencoderKL:
    """`autoencoder.model`'s VAE (a VAE or pipeline folder, a hub id, or toy), or with None a new one of the
    toy VAE's architecture drawn from `seed`; float32, trainable."""
    if model is None:
        from sdkd.train.models.toy import TOY_VAE

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(**TOY_VAE)
    elif Path(model).exists():
        from sdkd.train.formats.model_files import load_vae

        vae = load_vae(model, allow_pickle)
    else:
        from sdkd.train.formats.model_files import load_parts
        from sdkd.train.models.teacher import PipelineSource

        vae = load_parts(PipelineSource(model, allow_pickle=allow_pickle), with_unet=False,
                           what="autoencoder.model").vae
    if not isinstance(vae, AutoencoderKL):
        raise UserError(f"autoencoder.model '{model}': its VAE is a {type(vae).__name__}; this trainer trains an "
                        f"AutoencoderKL")
    vae = vae.float()
    vae.requires_grad_(True)
    vae.train()
    return vae


class Reconstruct(torch.nn.Module):
    """A VAE's encode -> posterior sample -> decode as one forward: the loop wraps the trained module for
    several processes, and a DDP wrapper runs only `forward`."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (reconstruction, per-sample KL from N(0, I) summed over latent elements). `noise`: the step's
        standard normal draw, shaped like the latents (diffusers' posterior `sample()` with it)."""
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * noise
        return self.vae.decode(latents).sample, posterior.kl()


def latent_shape(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[int, ...]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (pixels.shape[0], vae.config.latent_channels, pixels.shape[2] // factor, pixels.shape[3] // factor)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> images."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def first_images(dataset, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first `n` usable samples of a dataset: pixels [n, 3, R, R] and captions. With size buckets
    (data.buckets), the first `n` of the first one's size: one tensor holds one size."""
    pixels, captions = [], []
    items = iter(dataset) if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    for item in items:
        if "skip" not in item and (not pixels or item["pixel_values"].shape == pixels[0].shape):
            pixels.append(item["pixel_values"])
            captions.append(item["caption"])
        if len(pixels) == n:
            break
    if not pixels:
        raise UserError("data: no usable image among the samples read for the VAE's grids or scaling factor")
    return torch.stack(pixels), captions


@torch.no_grad()
def fit_scaling_factor(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int) -> float:
    """1 / the standard deviation of the posterior means of `pixels` (over every latent element)."""
    device = next(vae.parameters()).device
    means = [vae.encode(chunk.to(device, vae.dtype)).latent_dist.mean.float()
             for chunk in pixels.split(batch_size)]
    return 1.0 / torch.cat(means).std().item()


class AutoencoderTask(Task):
    """Trains `vae` on `l1_weight * L1 + mse_weight * MSE + kl_weight * KL` of each batch's images."""

    def __init__(self, cfg, accelerator, vae: AutoencoderKL, dataset):
        self.cfg, self.accelerator, self.vae, self.dataset = cfg, accelerator, vae, dataset
        ema = cfg.ema.decay if cfg.ema.enabled else None
        self.modules = [TrainedModule("vae", Reconstruct(vae), cfg.optim, cfg.train.max_grad_norm, ema,
                                      state=ModelState(vae, "vae"))]
        self.frozen = {}
        self._grid_inputs = None

    def train_step(self, ctx: StepContext, batch: dict, rng) -> dict[str, torch.Tensor]:
        a = self.cfg.autoencoder
        pixels = batch["pixel_values"].to(self.accelerator.device)
        noise = rng.randn(latent_shape(self.vae, pixels)).to(pixels.device)
        reconstruction, kl = ctx.model("vae")(pixels, noise)
        error = reconstruction.float() - pixels
        terms = {"l1": error.abs().mean(), "mse": error.pow(2).mean(), "kl": kl.float().mean()}
        terms["loss"] = a.l1_weight * terms["l1"] + a.mse_weight * terms["mse"] + a.kl_weight * terms["kl"]
        ctx.backward("vae", terms["loss"])
        return terms

    @torch.no_grad()
    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior mean -> decode, in eval mode (the sample grids' and tests' reconstruction)."""
        was_training = self.vae.training
        self.vae.eval()
        device = next(self.vae.parameters()).device
        with self.accelerator.autocast():
            out = self.vae(pixels.to(device), sample_posterior=False).sample.float()
        self.vae.train(was_training)
        return out

    def sample(self, step: int, sink: SampleSink) -> None:
        if self._grid_inputs is None:  # fixed images, read before any epoch's augmentation changes them
            self._grid_inputs = first_images(self.dataset, self.cfg.autoencoder.sample_images)
        pixels, captions = self._grid_inputs
        inputs, outputs = to_pil(pixels), to_pil(self.reconstruct(pixels))
        sink.grid([inputs, outputs], captions, ["input", f"step {step}"])
        sink.log("samples/reconstruction", outputs, captions)

    def export(self, out: Path) -> list[Path]:
        a = self.cfg.autoencoder
        if a.fit_scaling_factor:
            pixels, _ = first_images(self.dataset, a.scaling_samples)
            factor = fit_scaling_factor(self.vae, pixels, self.cfg.train.batch_size)
            print(f"scaling_factor {factor:.5f}: 1 / std of the latents of {len(pixels)} images "
                  f"(was {self.vae.config.scaling_factor})", flush=True)
            self.vae.register_to_config(scaling_factor=factor)
        folder = out / "vae"
        save_pretrained(self.vae, folder, safe_serialization=True)
        return [folder]
