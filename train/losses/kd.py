"""The KD loss: λ_task·task + λ_out·output-KD + λ_feat·Σ feature-KD, optionally min-SNR weighted.

BK-SDM (arXiv 2305.15798, eq. 1-3): task = MSE(ε_S, y), out = MSE(ε_S, ε_T),
feat = Σ_k MSE(f_S^k, f_T^k), features summed over pairs, every term in fp32.
Min-SNR-γ (arXiv 2303.09556) weights each sample of every term alike, so enabling it never
drops the KD terms (segmind's SSD-1B script replaced the whole loss with the weighted task loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_snr

from sdkd.cli.errors import UserError
from sdkd.train.losses.config import LossConfig


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net is trained to predict, per the teacher scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"teacher scheduler prediction_type '{kind}' is not supported (epsilon or v_prediction)")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weight min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v-prediction."""
    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def _mse(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    per_sample = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


@dataclass
class KDLoss:
    lambda_task: float = 1.0
    lambda_out: float = 1.0
    lambda_feat: float = 1.0

    @classmethod
    def from_config(cls, cfg: LossConfig) -> "KDLoss":
        return cls(cfg.lambda_task, cfg.lambda_out, cfg.lambda_feat)

    @property
    def needs_teacher(self) -> bool:
        return self.lambda_out > 0 or self.lambda_feat > 0

    def __call__(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        teacher_pred: torch.Tensor | None = None,
        student_feats: list[torch.Tensor] = (),
        teacher_feats: list[torch.Tensor] = (),
        weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns every term (for logging) and their weighted sum under "loss"."""
        terms = {"task": _mse(pred, target, weights)}
        if teacher_pred is not None:
            terms["out"] = _mse(pred, teacher_pred, weights)
        if student_feats:
            terms["feat"] = torch.stack(
                [_mse(fs, ft, weights) for fs, ft in zip(student_feats, teacher_feats, strict=True)]
            ).sum()
        lambdas = {"task": self.lambda_task, "out": self.lambda_out, "feat": self.lambda_feat}
        terms["loss"] = sum(lambdas[name] * value for name, value in terms.items())
        return terms
