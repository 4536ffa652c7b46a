"""Adversarial parts (train/losses/adversarial.py): the conditional patch discriminator, hinge and non-saturating
losses on simple logits, and the adaptive weight against the gradient-norm ratio computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sdkd.train.losses.adversarial import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss


def test_discriminator_logits_shape_and_latent_context():
    torch.manual_seed(0)
    disc = PatchDiscriminator(latent_channels=4, channels=(16, 32, 64))
    image, latent = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 4, 4)
    logits = disc(image, latent)
    assert logits.shape == (2, 1, 4, 4)  # one logit per patch, H / 2^3
    assert disc(image[:1], latent[:1]).shape == (1, 1, 4, 4)
    # The same image with another latent is judged differently: the latent is part of the input.
    assert not torch.allclose(disc(image, torch.randn(2, 4, 4, 4)), logits)
    # Two stages, any latent size (upsampled to the image), widths that 8 groups do not divide.
    odd = PatchDiscriminator(latent_channels=16, channels=(12, 20))
    assert odd(torch.randn(1, 3, 64, 48), torch.randn(1, 16, 8, 6)).shape == (1, 1, 16, 12)


@pytest.mark.parametrize("real, fake, expected", [
    (2.0, -2.0, 0.0),  # both beyond the margin
    (0.0, 0.0, 2.0),
    (0.5, 0.5, 0.5 + 1.5),
    (-1.0, 1.0, 4.0),
])
def test_hinge_discriminator_loss(real, fake, expected):
    r, f = torch.full((2, 1, 3, 3), real), torch.full((2, 1, 3, 3), fake)
    assert discriminator_loss(r, f, "hinge").item() == pytest.approx(expected)


def test_non_saturating_discriminator_loss():
    zeros = torch.zeros(4, 1, 2, 2)
    assert discriminator_loss(zeros, zeros, "non_saturating").item() == pytest.approx(2 * math.log(2))
    confident = discriminator_loss(torch.full_like(zeros, 20.0), torch.full_like(zeros, -20.0), "non_saturating")
    assert 0 <= confident.item() < 1e-8
    r, f = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2 + (
        math.log1p(math.exp(0.5)) + math.log1p(math.exp(3.0))) / 2
    assert discriminator_loss(r, f, "non_saturating").item() == pytest.approx(expected, rel=1e-6)


def test_generator_losses_reward_fooling_the_discriminator():
    fake = torch.tensor([1.0, -3.0], requires_grad=True)
    hinge = generator_loss(fake, "hinge")
    assert hinge.item() == pytest.approx(1.0)  # -mean D(fake)
    (grad,) = torch.autograd.grad(hinge, fake)
    assert torch.all(grad < 0)  # raising D(fake) lowers the generator's loss
    ns = generator_loss(fake, "non_saturating")
    assert ns.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(3.0))) / 2)
    (grad,) = torch.autograd.grad(ns, fake)
    assert torch.all(grad < 0)
    assert generator_loss(torch.zeros(3), "non_saturating").item() == pytest.approx(math.log(2))


def test_unknown_loss_kind_is_refused():
    with pytest.raises(ValueError, match="hinge or non_saturating"):
        discriminator_loss(torch.zeros(1), torch.zeros(1), "wasserstein")
    with pytest.raises(ValueError, match="hinge or non_saturating"):
        generator_loss(torch.zeros(1), "lsgan")


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    last = torch.nn.Conv2d(8, 3, 3, padding=1)
    features, target = torch.randn(2, 8, 8, 8), torch.randn(2, 3, 8, 8)
    disc = PatchDiscriminator(latent_channels=4, channels=(8, 16))
    image = last(features)
    reconstruction = (image - target).abs().mean()
    adversarial = generator_loss(disc(image, torch.randn(2, 4, 2, 2)), "hinge")
    weight = adaptive_weight(reconstruction, adversarial, last.weight)
    # By hand: each loss's gradient at the last layer's weight, one at a time.
    rec_grad = torch.autograd.grad(reconstruction, last.weight, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial, last.weight, retain_graph=True)[0]
    expected = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not weight.requires_grad  # a constant factor: no gradient flows through it
    # The graph is kept: both losses can still be back-propagated.
    (reconstruction + weight * adversarial).backward()
    assert last.weight.grad is not None


def test_adaptive_weight_clamps():
    w = torch.ones(3, requires_grad=True)
    reconstruction = (w * torch.tensor([3.0, 0.0, 4.0])).sum()  # gradient norm 5
    # An adversarial term with a tiny gradient: 5 / (1e-6 + 1e-4) ~ 5e4, clamped to max_weight.
    adversarial = (w * 1e-6 / math.sqrt(3)).sum()
    assert adaptive_weight(reconstruction, adversarial, w).item() == pytest.approx(1e4)
    assert adaptive_weight(reconstruction, adversarial, w, max_weight=7.0).item() == pytest.approx(7.0)
    # Exactly computed below the clamp: 5 / (2 + 1e-4).
    adversarial = (w * torch.tensor([0.0, 2.0, 0.0])).sum()
    assert adaptive_weight(reconstruction, adversarial, w).item() == pytest.approx(5 / (2 + 1e-4))
    # No reconstruction gradient: weight 0 (the lower clamp), never negative.
    assert adaptive_weight((w * 0).sum(), adversarial, w).item() == 0.0
