import pytest
import torch
from diffusers import DDPMScheduler

from sdkd.train.losses.kd import KDLoss, diffusion_target, min_snr_weights


def scheduler(kind="epsilon"):
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)


def test_target_follows_prediction_type():
    lat, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(diffusion_target(scheduler(), lat, noise, t), noise)
    s = scheduler("v_prediction")
    assert torch.allclose(diffusion_target(s, lat, noise, t), s.get_velocity(lat, noise, t))


def test_terms_and_weighted_sum():
    pred, target, tpred = torch.zeros(2, 4), torch.ones(2, 4), torch.full((2, 4), 2.0)
    fs = [torch.zeros(2, 3, 2, 2), torch.zeros(2, 5)]
    ft = [torch.ones(2, 3, 2, 2), torch.full((2, 5), 3.0)]
    terms = KDLoss(0.5, 2.0, 0.1)(pred, target, tpred, fs, ft)
    assert terms["task"].item() == pytest.approx(1.0)
    assert terms["out"].item() == pytest.approx(4.0)
    assert terms["feat"].item() == pytest.approx(1.0 + 9.0)  # summed over pairs, not averaged
    assert terms["loss"].item() == pytest.approx(0.5 * 1 + 2 * 4 + 0.1 * 10)


def test_without_teacher_only_task():
    terms = KDLoss()(torch.zeros(2, 4), torch.ones(2, 4))
    assert set(terms) == {"task", "loss"} and terms["loss"].item() == pytest.approx(1.0)


def test_half_inputs_are_compared_in_fp32():
    a = torch.full((1, 4), 300.0, dtype=torch.float16)
    b = torch.zeros(1, 4, dtype=torch.float16)
    terms = KDLoss()(a, b, a, [a], [b])
    assert terms["feat"].dtype == torch.float32
    assert terms["feat"].item() == pytest.approx(90000.0)  # 300**2 overflows nothing in fp32 (fp16 max 65504)


def test_min_snr_weights_match_the_formula():
    s, t = scheduler(), torch.tensor([1, 500, 999])
    alpha = s.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    assert torch.allclose(min_snr_weights(s, t, 5.0), torch.clamp(snr, max=5.0) / snr, rtol=1e-4)
    v = scheduler("v_prediction")
    assert torch.allclose(min_snr_weights(v, t, 5.0), torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-4)


def test_snr_weighting_keeps_every_term_with_gradient():
    """With min-SNR weights the feature term (the only one weighted above 0 here) has a nonzero gradient, and its
    value is the per-sample squared error weighted and averaged, unlike the unweighted term's."""
    pred = torch.randn(3, 4, requires_grad=True)
    feat = torch.randn(3, 6, requires_grad=True)
    weights = min_snr_weights(scheduler(), torch.tensor([5, 400, 990]), 5.0)
    terms = KDLoss(0.0, 0.0, 1.0)(pred, torch.randn(3, 4), torch.randn(3, 4), [feat], [torch.randn(3, 6)], weights)
    terms["loss"].backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0
    unweighted = KDLoss(0.0, 0.0, 1.0)(pred, torch.zeros(3, 4), torch.zeros(3, 4), [feat], [torch.zeros(3, 6)])
    weighted = KDLoss(0.0, 0.0, 1.0)(pred, torch.zeros(3, 4), torch.zeros(3, 4), [feat], [torch.zeros(3, 6)], weights)
    per_sample = feat.detach().pow(2).mean(1)
    assert weighted["feat"].item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-5)
    assert unweighted["feat"].item() != pytest.approx(weighted["feat"].item())
