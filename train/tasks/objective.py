"""One training step's loss: encode the batch, noise it, run student (and teacher), KD terms.

Shared by every U-Net trainer: KD uses teacher + feature hooks, fine-tuning the same object
without a teacher (then only the task term remains).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch

from sdkd.cli.errors import UserError
from sdkd.train.engine.step_random import StepRandom
from sdkd.train.formats.fingerprint import component_fingerprint
from sdkd.train.losses.kd import KDLoss, diffusion_target, min_snr_weights
from sdkd.train.models.families import Conditioning
from sdkd.train.models.features import FeatureHooks, check_pairs, feature_pairs
from sdkd.train.models.students import removal_spec


class BatchEncoder:
    """Images and captions -> VAE latents (posterior sample, scaled) and the model family's conditioning."""

    def __init__(self, parts):
        """`parts`: a teacher.PipelineParts with its VAE, text encoders and tokenizers."""
        self.parts, self.vae, self.family = parts, parts.vae, parts.family

    @torch.no_grad()
    def __call__(self, batch: dict, rng: StepRandom) -> tuple[torch.Tensor, Conditioning]:
        return self.latents(batch, rng), self.conditioning(batch)

    @torch.no_grad()
    def latents(self, batch: dict, rng: StepRandom) -> torch.Tensor:
        device = self.vae.device
        pixels = batch["pixel_values"].to(device=device, dtype=self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        # diffusers' DiagonalGaussianDistribution.sample, with the step's draw.
        sample = posterior.mean + posterior.std * rng.randn(posterior.mean.shape, posterior.mean.dtype).to(device)
        latents = sample * self.vae.config.scaling_factor
        # The VAE may hand back a channels-last tensor; the U-Nets then pick other kernels than for the
        # cache's contiguous latents. One layout for both keeps cached and uncached runs identical.
        return latents.float().contiguous()

    @torch.no_grad()
    def posterior(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and standard deviation (unscaled): what the latent cache stores."""
        pixels = batch["pixel_values"].to(device=self.vae.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        return posterior.mean, posterior.std

    @torch.no_grad()
    def conditioning(self, batch: dict) -> Conditioning:
        return self.family.encode(self.parts, batch)

    @torch.no_grad()
    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The caption-made tensors of "" (one sample), which caption dropout swaps into a cached sample."""
        return self.family.empty_prompt(self.parts)


class CachedEncoder:
    """A latent cache's batch -> the latents `BatchEncoder` would sample, and the cached conditioning.

    Draws the posterior sample as `BatchEncoder` does (mean + std x the step's normal draw), so from the
    same mean, std and generator state it returns the same latents, bit for bit.
    """

    def __init__(self, parts, device: torch.device | str = "cpu"):
        """`parts`: a teacher.PipelineParts (its VAE config and family; the models may be left out)."""
        self.scaling_factor, self.fields = parts.vae_config["scaling_factor"], parts.family.fields
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, batch: dict, rng: StepRandom) -> tuple[torch.Tensor, Conditioning]:
        cached = {name: batch[name].to(self.device, torch.float32).contiguous() for name in self.fields}
        return self.latents(batch, rng), Conditioning.from_tensors(cached)

    @torch.no_grad()
    def latents(self, batch: dict, rng: StepRandom) -> torch.Tensor:
        mean = batch["latent_mean"].to(self.device, torch.float32)
        std = batch["latent_std"].to(self.device, torch.float32)
        noise = rng.randn(mean.shape, mean.dtype).to(self.device)
        return ((mean + std * noise) * self.scaling_factor).contiguous()


def build_encoder(data_cfg, parts, dataset, device: torch.device):
    """The trainer's encoder: the teacher's VAE and text encoders, or the latent cache's when `data.cache`
    is set (then checked against the teacher: model family, resolution, VAE scaling factor, text width, weights)."""
    if data_cfg.cache is None:
        return BatchEncoder(parts)
    dataset.check_teacher(parts, data_cfg.resolution, functools.partial(component_fingerprint, parts))
    return CachedEncoder(parts, device)


def set_prediction_type(scheduler, prediction_type: str | None, teacher_scheduler=None, teacher: str = "") -> None:
    """loss.prediction_type: train to predict this instead of what `scheduler` says, by rewriting its config as
    diffusers' scripts do (the target, min-SNR weights and sample grids read it there). `teacher_scheduler` is
    given when output or feature KD uses a teacher: matching one that predicts another kind means nothing."""
    if prediction_type is None:
        return
    theirs = teacher_scheduler.config.prediction_type if teacher_scheduler is not None else prediction_type
    if theirs != prediction_type:
        raise UserError(f"config key 'loss.prediction_type': {prediction_type}, but teacher '{teacher}' predicts "
                        f"{theirs}; output and feature KD (loss.lambda_out, loss.lambda_feat) need the same")
    scheduler.register_to_config(prediction_type=prediction_type)


class DiffusionObjective:
    """Loss of the trained U-Net on one batch of latents and their conditioning.

    `teacher` (frozen) and the hooks are optional: without a teacher only the task term is computed.
    `noise_offset` and `input_perturbation` are diffusers' options of those names (see `LossConfig`).
    """

    def __init__(self, scheduler, loss: KDLoss, snr_gamma: float | None = None,
                 teacher=None, student_hooks=None, teacher_hooks=None, autocast=nullcontext,
                 noise_offset: float = 0.0, input_perturbation: float = 0.0):
        self.scheduler, self.loss, self.snr_gamma = scheduler, loss, snr_gamma
        self.teacher, self.student_hooks, self.teacher_hooks = teacher, student_hooks, teacher_hooks
        self.autocast = autocast
        self.noise_offset, self.input_perturbation = noise_offset, input_perturbation
        self._alphas_on_device = False

    def _prepare_scheduler(self, device: torch.device) -> None:
        # add_noise moves alphas_cumprod to the device on every call; do it once.
        if not self._alphas_on_device:
            self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
            self._alphas_on_device = True

    def draw(self, latents: torch.Tensor, rng: StepRandom) -> tuple[torch.Tensor, ...]:
        """(noisy latents, timesteps, target): the input student and teacher both get, and the task target."""
        device = latents.device
        self._prepare_scheduler(device)
        randn = lambda *shape: rng.randn(shape, latents.dtype).to(device)  # noqa: E731
        noise = randn(*latents.shape)
        timesteps = rng.randint(self.scheduler.config.num_train_timesteps, latents.shape[0]).to(device)
        # Drawn after the timesteps: with both options off, runs draw exactly what they drew before them.
        if self.noise_offset:
            noise = noise + self.noise_offset * randn(*latents.shape[:2], 1, 1)
        input_noise = noise
        if self.input_perturbation:
            input_noise = noise + self.input_perturbation * randn(*noise.shape)
        noisy = self.scheduler.add_noise(latents, input_noise, timesteps)
        return noisy, timesteps, diffusion_target(self.scheduler, latents, noise, timesteps)

    def __call__(self, unet, latents: torch.Tensor, cond: Conditioning, rng: StepRandom) -> dict[str, torch.Tensor]:
        noisy, timesteps, target = self.draw(latents, rng)
        with self._capture(self.student_hooks):
            pred = unet(noisy, timesteps, **cond.unet_kwargs()).sample
        teacher_pred, student_feats, teacher_feats = None, [], []
        if self.teacher is not None:
            with torch.no_grad(), self.autocast(), self._capture(self.teacher_hooks):
                dtype = self.teacher.dtype
                teacher_pred = self.teacher(noisy.to(dtype), timesteps, **cond.to(dtype=dtype).unet_kwargs()).sample
        if self.student_hooks is not None:
            student_feats, teacher_feats = self.student_hooks.features, self.teacher_hooks.features

        weights = min_snr_weights(self.scheduler, timesteps, self.snr_gamma) if self.snr_gamma else None
        return self.loss(pred, target, teacher_pred, student_feats, teacher_feats, weights)

    @property
    def num_feature_pairs(self) -> int:
        return len(self.student_hooks.names) if self.student_hooks is not None else 0

    @staticmethod
    def _capture(hooks):
        return hooks.capture() if hooks is not None else nullcontext()


def kd_objective(cfg, scheduler, trained: torch.nn.Module, teacher: torch.nn.Module | None, latent_hw: int,
                 autocast=nullcontext) -> DiffusionObjective:
    """The objective of `trained` under a trainer's `loss` config, against `teacher` for its output and
    feature terms; written once for kd.py, finetune.py (continued KD) and the step benchmark.

    Feature KD pairs `cfg.student`'s block removal of the teacher with `trained`'s modules, checked by
    shape at `latent_hw`; the hooks go on the plain modules, before accelerate wraps `trained` in DDP."""
    loss = KDLoss.from_config(cfg.loss)
    pairs = feature_pairs(cfg.student, removal_spec(cfg.student), teacher.config) if cfg.loss.lambda_feat > 0 else []
    if pairs:
        check_pairs(teacher, trained, pairs, latent_hw)
    return DiffusionObjective(
        scheduler, loss, cfg.loss.snr_gamma, teacher=teacher if loss.needs_teacher else None,
        student_hooks=FeatureHooks(trained, [s for _, s in pairs]) if pairs else None,
        teacher_hooks=FeatureHooks(teacher, [t for t, _ in pairs]) if pairs else None,
        autocast=autocast, noise_offset=cfg.loss.noise_offset, input_perturbation=cfg.loss.input_perturbation,
    )
