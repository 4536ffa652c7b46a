"""Model families: the one place that knows what a family of pipelines needs beside its U-Net.

A family names its text encoders and tokenizers (the pipeline components `load_teacher` loads), turns a
batch's captions (and, for SDXL, each sample's original size, crop and target size) into the U-Net's
`Conditioning`, names the per-sample tensors a latent cache stores, and builds the pipeline class that
samples and exports. The loop, the objective and the cache see only `Conditioning` and those names.

- SD-1.x and SD-2.x (`SD`): one CLIP text encoder; the conditioning is its last hidden state.
- SDXL (two text encoders, hidden states concatenated, a pooled embedding and size/crop time ids as
  `added_cond_kwargs`) is recognised by its U-Net config and refused until a family implements it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from sdkd.cli.errors import UserError

HIDDEN = "embeds"  # the hidden states' name among a latent cache's tensors (its name before families)


@dataclass(frozen=True)
class Conditioning:
    """What a batch's U-Net call is conditioned on besides the noisy latents and the timesteps."""

    hidden_states: torch.Tensor
    """`encoder_hidden_states` [B, tokens, width]."""
    added: dict[str, torch.Tensor] = field(default_factory=dict)
    """`added_cond_kwargs` by name (SDXL: `text_embeds`, `time_ids`); none for SD-1.x/2.x."""

    def to(self, device=None, dtype=None) -> Conditioning:
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return Conditioning(move(self.hidden_states), {name: move(t) for name, t in self.added.items()})

    def unet_kwargs(self) -> dict:
        """Keyword arguments of `UNet2DConditionModel.__call__`."""
        kwargs = {"encoder_hidden_states": self.hidden_states}
        if self.added:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs

    def tensors(self) -> dict[str, torch.Tensor]:
        """The named tensors a latent cache stores (first dimension: the batch)."""
        return {HIDDEN: self.hidden_states, **self.added}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Conditioning:
        """The inverse of `tensors`."""
        added = {name: t for name, t in tensors.items() if name != HIDDEN}
        return cls(tensors[HIDDEN], added)


class ModelFamily(ABC):
    """What one family of pipelines needs. `parts` below is whatever holds the family's components as
    attributes (`teacher.PipelineParts`, a diffusers pipeline)."""

    name: str
    """Recorded in latent-cache manifests: a cache made for one family is refused by another."""
    pipeline_class: type[DiffusionPipeline]
    text_encoders: dict[str, type]
    """Pipeline component (subfolder) -> class, loaded with the weights' variant."""
    tokenizers: dict[str, type]
    fields: tuple[str, ...]
    """The names of `Conditioning.tensors()`: what a latent cache stores per sample."""
    pipeline_extras: dict = {}
    """Further arguments of `pipeline_class` (components left out)."""

    @abstractmethod
    def encode(self, parts, batch: dict) -> Conditioning:
        """A batch's conditioning, from its "captions" (and the samples' sizes, for families that take them)."""

    @abstractmethod
    def empty_prompt(self, parts) -> dict[str, torch.Tensor]:
        """The caption-made tensors of "" for one sample: what caption dropout puts in a cached sample."""

    def pipeline(self, parts, unet, scheduler) -> DiffusionPipeline:
        """`parts`' VAE, text encoders and tokenizers around `unet` and `scheduler`."""
        text = {name: getattr(parts, name) for name in (*self.text_encoders, *self.tokenizers)}
        return self.pipeline_class(vae=parts.vae, unet=unet, scheduler=scheduler, **text, **self.pipeline_extras)


class StableDiffusion(ModelFamily):
    """SD-1.x and SD-2.x: one CLIP text encoder (CLIP-L, OpenCLIP-H) whose last hidden state is the
    conditioning."""

    name = "sd"
    pipeline_class = StableDiffusionPipeline
    text_encoders = {"text_encoder": CLIPTextModel}
    tokenizers = {"tokenizer": CLIPTokenizer}
    fields = (HIDDEN,)
    pipeline_extras = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def tokenize(self, parts, captions: list[str]) -> torch.Tensor:
        """Token ids, padded to the tokenizer's length, on the text encoder's device."""
        ids = parts.tokenizer(
            captions, padding="max_length", max_length=parts.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        return ids.to(parts.text_encoder.device)

    def encode_tokens(self, parts, ids: torch.Tensor) -> Conditioning:
        """The conditioning of token ids: apart from `encode` for a text-encoder LoRA, whose trained module runs
        the text encoder itself (lora_io.TextConditionedUNet)."""
        return Conditioning(parts.text_encoder(ids)[0])

    def encode(self, parts, batch: dict) -> Conditioning:
        return self.encode_tokens(parts, self.tokenize(parts, batch["captions"]))

    def empty_prompt(self, parts) -> dict[str, torch.Tensor]:
        return {HIDDEN: self.encode(parts, {"captions": [""]}).hidden_states[0]}


SD = StableDiffusion()


def family_of(unet_config, what: str = "model") -> ModelFamily:
    """The family of a U-Net, from its config: SDXL's U-Net takes a pooled text embedding and time ids
    (`addition_embed_type` "text_time"), SD-1.x/2.x's no added conditions. `what` names it in errors."""
    kind = unet_config.get("addition_embed_type")
    if kind == "text_time":
        raise UserError(f"{what}: SDXL is not supported yet (its U-Net has addition_embed_type 'text_time'); "
                        f"use an SD-1.x or SD-2.x model")
    if kind is not None:
        raise UserError(f"{what}: a U-Net with addition_embed_type '{kind}' is of no model family sdkd trains "
                        f"(SD-1.x, SD-2.x)")
    return SD
