"""A LoRA on the U-Net and the text encoders at once, trained as one module (train/lora.py,
lora.train_text_encoder)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdkd.train.engine.step_random import StepRandom
from sdkd.train.tasks.objective import BatchEncoder


class TextConditionedUNet(torch.nn.Module):
    """U-Net + the family's text encoders as one trained module (a LoRA on all of them): called with what the
    text encoders read (`Tokens`) instead of a `Conditioning`, so the objective and the loop stay those of every
    other trainer."""

    def __init__(self, unet, family, text_encoders: dict[str, torch.nn.Module]):
        """`family`: the U-Net's model family (train/models/families.py); `text_encoders` by component name."""
        super().__init__()
        self.unet, self.family, self.text_encoders = unet, family, torch.nn.ModuleDict(text_encoders)

    def forward(self, sample, timestep, tokens: dict[str, torch.Tensor]):
        return self.unet(sample, timestep, **self.family.encode_tokens(self.text_encoders, tokens).unet_kwargs())


@dataclass(frozen=True)
class Tokens:
    """What the text encoders read (the family's `tokenize`), in the place of a `Conditioning`: what the objective
    hands a `TextConditionedUNet`. Never cast for a teacher: lora.train_text_encoder refuses one."""

    tokens: dict[str, torch.Tensor]

    def unet_kwargs(self) -> dict:
        return {"tokens": self.tokens}


class TokenEncoder(BatchEncoder):
    """Latents and `Tokens`: what a `TextConditionedUNet` is conditioned on."""

    def __call__(self, batch: dict, rng: StepRandom) -> tuple[torch.Tensor, Tokens]:
        return self.latents(batch, rng), Tokens(self.family.tokenize(self.parts, batch))
