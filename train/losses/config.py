"""The config sections the losses read: `loss`, the weights and options of the diffusion objective with
output and feature KD (kd.py, train/tasks/objective.py), and the held-out triples of teacher agreement
(agreement.py): a U-Net run's `eval`, eval/evaluate.py's `agreement`.

Nothing heavy is imported here: config loading and --help stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import auto
from typing import Optional

from sdkd.cli.errors import require
from sdkd.data.sources.config import Choice, Section


class PredictionType(Choice):
    epsilon = auto()
    v_prediction = auto()


@dataclass
class LossConfig(Section):
    lambda_task: float = 1.0
    """Weight of MSE(student prediction, diffusion target)."""
    lambda_out: float = 1.0
    """Weight of MSE(student prediction, teacher prediction)."""
    lambda_feat: float = 1.0
    """Weight of the sum over feature pairs of MSE(student feature, teacher feature)."""
    snr_gamma: Optional[float] = None
    """Min-SNR-gamma weighting applied to every term (5.0 is usual); null disables it."""
    noise_offset: float = 0.0
    """diffusers' noise offset: noise += noise_offset * randn(B, C, 1, 1), a per-sample, per-channel shift
    (lets the model learn very dark and bright images; 0.05-0.1 is usual). Target and teacher see the same noise."""
    input_perturbation: float = 0.0
    """diffusers' input perturbation (arXiv 2301.11706): the U-Nets' input is noised from
    noise + input_perturbation * randn_like(noise), the target from the unperturbed noise (0.1 is usual)."""
    prediction_type: Optional[PredictionType] = None
    """Train to predict this instead of the scheduler's prediction type (diffusers' --prediction_type; sample
    grids and the exported scheduler follow it). Output and feature KD need a teacher predicting the same
    (checked at start-up); null: the scheduler's."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.lambda_task + self.lambda_out + self.lambda_feat > 0, f"{at}.lambda_task",
                f"every loss weight ({at}.lambda_task, lambda_out, lambda_feat) is 0: nothing to train")
        for name in ("lambda_task", "lambda_out", "lambda_feat"):
            require(getattr(self, name) >= 0, f"{at}.{name}", "must be >= 0")
        require(self.snr_gamma is None or self.snr_gamma > 0, f"{at}.snr_gamma", "must be > 0 or null")
        require(self.noise_offset >= 0, f"{at}.noise_offset", "must be >= 0")
        require(self.input_perturbation >= 0, f"{at}.input_perturbation", "must be >= 0")


@dataclass
class TriplesConfig(Section):
    """Held-out (x_t, t, prompt) triples for teacher agreement (train/losses/agreement.py): made without data, once,
    from the teacher's own latents for fixed prompts and seeds, noised at fixed timesteps with fixed noise."""

    seed: int = 0
    """Seed of the triples: prompt i's clean latents start from seed + i, the noise added to them comes from a
    generator seeded from seed too (another stream)."""
    prompts: Optional[list[str]] = None
    """Prompts of the triples; null: sample.prompts in a run, the evaluation prompts in eval/evaluate.py."""
    num_prompts: int = 16
    """Use at most this many prompts (the first ones)."""
    timesteps: int = 4
    """Timesteps per prompt, spread evenly over the training schedule's (4 of 1000: 125, 375, 625, 875)."""
    teacher_steps: int = 8
    """Sampler steps (DPM-Solver++) the teacher takes to make each prompt's clean latents x_0."""
    guidance_scale: Optional[float] = None
    """Classifier-free guidance of the teacher's x_0; null: sample.guidance_scale in a run, the evaluation's
    guidance_scale in eval/evaluate.py."""
    resolution: Optional[int] = None
    """Image size of the triples; null: sample.resolution (else data.resolution) in a run, the evaluation's
    resolution in eval/evaluate.py."""
    batch_size: int = 8
    """Triples per U-Net forward."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.seed >= 0, f"{at}.seed", "must be >= 0")
        require(self.prompts is None or bool(self.prompts), f"{at}.prompts", "at least one prompt, or null")
        require(self.num_prompts > 0, f"{at}.num_prompts", "must be > 0")
        require(self.timesteps > 0, f"{at}.timesteps", "must be > 0")
        require(self.teacher_steps > 0, f"{at}.teacher_steps", "must be > 0")
        require(self.guidance_scale is None or self.guidance_scale >= 0, f"{at}.guidance_scale",
                "must be >= 0 or null")
        require(self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0), f"{at}.resolution",
                "must be a multiple of 8, or null")
        require(self.batch_size > 0, f"{at}.batch_size", "must be > 0")
