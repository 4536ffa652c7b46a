"""The pure functions of one-step score distillation (train/tasks/one_step.py): no models, unit-testable.

- `x0_from_prediction`: a U-Net's prediction at timestep t -> the clean latents it implies (epsilon or
  v-prediction), as DMD2's `get_x0_from_noise`. The one-step student is this at t = T-1 from pure noise.
- `dmd_gradient` / `dmd_loss`: DMD2's distribution-matching term (tianweiy/DMD2 `sd_guidance.py`
  `compute_distribution_matching_loss`), SDXS's score-difference gradient F(t, x_t) of eq. 11 below αT:
  with p = x - x0 for the real (offline, frozen teacher with CFG) and fake (online) models' x0 on the
  re-noised student sample x, grad = (p_real - p_fake) / mean|p_real| per sample = (x0_fake - x0_real) /
  mean|x - x0_real|, and loss = 0.5 * mse(x, sg(x - grad)), whose gradient with respect to x is grad / numel:
  a descent step moves x from the fake model's denoising toward the real one's. Identical real and fake
  predictions give grad = 0, so no gradient at all.
- `diffusion_loss`: the online (fake) score model's loss on the detached student samples, the plain
  epsilon (or v) MSE of eq. 1.
- `ramp`: SDXS's schedules of α and λ_FM ("start with α close to 1 and λ_FM high, then lower both"):
  linear from a start to an end value over a number of steps, then constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def x0_from_prediction(pred: torch.Tensor, sample: torch.Tensor, alphas_cumprod: torch.Tensor,
                       timesteps: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """Clean latents from a prediction on `sample` = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε at `timesteps` (float32)."""
    alpha = alphas_cumprod.to(sample.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    pred, sample = pred.float(), sample.float()
    if prediction_type == "epsilon":
        return (sample - (1 - alpha).sqrt() * pred) / alpha.sqrt()
    if prediction_type == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * pred
    raise ValueError(f"prediction_type '{prediction_type}': epsilon or v_prediction")


def guided(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised distribution-matching gradient with respect to the student sample `x` (detached):
    (p_real - p_fake) / mean|p_real| per sample, p = x - x0; NaNs (a zero normaliser) become 0."""
    x, x0_real, x0_fake = x.detach().float(), x0_real.float(), x0_fake.float()
    p_real, p_fake = x - x0_real, x - x0_fake
    return torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True))


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mse(x, sg(x - grad)): a surrogate whose gradient with respect to x is grad / x.numel()."""
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad).detach())


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The online score model's denoising loss: mse(prediction, target) in float32."""
    return F.mse_loss(pred.float(), target.float())


def ramp(start: float, end: float, length: int, step: int) -> float:
    """`start` at step 0, linearly to `end` at step `length`, then `end` (length 0: `end` from the start)."""
    if length <= 0 or step >= length:
        return end
    return start + (end - start) * max(step, 0) / length
