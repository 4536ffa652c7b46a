"""A LoRA on the U-Net and the text encoder at once, trained as one module (train/lora.py,
lora.train_text_encoder)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdkd.train.engine.step_random import StepRandom
from sdkd.train.models.families import SD
from sdkd.train.tasks.objective import BatchEncoder


class TextConditionedUNet(torch.nn.Module):
    """U-Net + text encoder as one trained module (a LoRA on both): called with token ids instead of a
    `Conditioning`, so the objective and the loop stay those of every other trainer. SD-1.x/2.x (one text
    encoder), which is all `load_teacher` loads for now."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, sample, timestep, input_ids):
        return self.unet(sample, timestep, **SD.encode_tokens(self, input_ids).unet_kwargs())


@dataclass(frozen=True)
class Tokens:
    """Token ids in the place of a `Conditioning`: what the objective hands a `TextConditionedUNet`. Never
    cast for a teacher: lora.train_text_encoder refuses one."""

    ids: torch.Tensor

    def unet_kwargs(self) -> dict:
        return {"input_ids": self.ids}


class TokenEncoder(BatchEncoder):
    """Latents and token ids: what a `TextConditionedUNet` is conditioned on."""

    def __call__(self, batch: dict, rng: StepRandom) -> tuple[torch.Tensor, Tokens]:
        return self.latents(batch, rng), Tokens(SD.tokenize(self.parts, batch["captions"]))
