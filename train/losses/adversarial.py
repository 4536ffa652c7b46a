"""Adversarial training parts: a conditional patch discriminator that needs no downloaded weights,
the generator and discriminator losses (hinge or non-saturating), and taming-transformers' adaptive
weight of the adversarial term.

The discriminator sees an image together with the latent it was decoded from (upsampled to the image,
concatenated as channels), as Seraena's `PatchDiscWithContext` does: it judges whether the image is a
faithful decoding of that latent, not only whether it looks real.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN: (image [B,3,H,W] in [-1, 1], latent [B,C,h,w]) -> logits [B,1,H/2^n,W/2^n].

    `channels` are the widths of the stride-2 stages (n = len(channels)); GroupNorm instead of BatchNorm
    keeps it independent of the batch split over processes (at most `groups` groups, as many as divide the width)."""

    def __init__(self, latent_channels: int = 4, channels: tuple[int, ...] = (64, 128, 256), groups: int = 8):
        super().__init__()
        layers, width = [], 3 + latent_channels
        for i, out in enumerate(channels):
            layers += [nn.Conv2d(width, out, 4, stride=2, padding=1)]
            if i > 0:  # pix2pix: no normalisation on the first layer
                layers += [nn.GroupNorm(math.gcd(groups, out), out)]
            layers += [nn.LeakyReLU(0.2)]
            width = out
        layers += [nn.Conv2d(width, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        context = F.interpolate(latent.to(image.dtype), size=image.shape[-2:], mode="nearest")
        return self.net(torch.cat([image, context], dim=1))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """hinge: mean relu(1 - D(real)) + relu(1 + D(fake)); non_saturating: softplus(-D(real)) + softplus(D(fake))."""
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if kind == "non_saturating":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    raise ValueError(f"unknown GAN loss {kind!r}: hinge or non_saturating")


def generator_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """hinge: -mean D(fake); non_saturating: mean softplus(-D(fake))."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"unknown GAN loss {kind!r}: hinge or non_saturating")


def adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """taming-transformers' (and Hybrid-SD's) balance: |grad of the reconstruction loss| / |grad of the
    adversarial loss| at the generator's last layer, so neither term drowns the other. Detached."""
    rec = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
    adv = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    return (rec.norm() / (adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()
