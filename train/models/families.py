"""Model families: the one place that knows a family of pipelines' components and conditioning.

A family declares its pipeline's components (`Component`: name -> class, role, whether the trainers train it,
the dtype a frozen copy runs in under mixed precision), claims the U-Nets it conditions (from their config),
turns a batch's captions (and, for families that take them, the samples' sizes and crops) into the U-Net's
`Conditioning`, names the per-sample tensors a latent cache stores, says whether the LDM single file has a
place for it, and builds the pipeline class that samples and exports. Loading, casting and freezing, the
latent cache, sampling, cost counting, model files and LoRA files ask the family; the loop, the objective and
the cache see only `Conditioning`, component names and these declarations.

- SD-1.x and SD-2.x (`SD`): one CLIP text encoder; the conditioning is its last hidden state. The default.
- SDXL (`SDXL`, and its students: SSD-1B, Vega, KOALA): two CLIP text encoders whose penultimate hidden states
  are concatenated, the second's pooled projection as `text_embeds` and each sample's original size, crop and
  target size as `time_ids` (`added_cond_kwargs`); its U-Net has `addition_embed_type` "text_time".
- Another family joins through `register_family`; `family_of` hands a U-Net to the newest registered family
  that claims its config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Mapping

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdkd.cli.errors import UserError

HIDDEN = "embeds"  # the hidden states' name among a latent cache's tensors (its name before families)
CONTEXT = 77  # CLIP's context length: what every text encoder of the families so far pads captions to
ROLES = UNET, VAE, TEXT, TOKENIZER, SCHEDULER = ("unet", "vae", "text", "tokenizer", "scheduler")
MODEL_ROLES = (UNET, VAE, TEXT)
# What a CLIPTokenizer's save_pretrained writes: the only files an sdkd single file may carry for one.
CLIP_TOKENIZER_FILES = frozenset({"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                                  "special_tokens_map.json", "added_tokens.json"})


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


@dataclass(frozen=True)
class Component:
    """One component of a family's pipeline."""

    cls: type
    """What loads it (`from_pretrained` of its subfolder). The VAE's: the class when its config names none (an
    AutoencoderTiny folder loads as one); the scheduler's: the training one (a pipeline loads its own class)."""
    role: str
    """unet, vae, text (a text encoder), tokenizer or scheduler (`ROLES`): how it is loaded and what uses it."""
    trained: bool = False
    """Trained by the U-Net trainers (the U-Net); the other models stay frozen (a text-encoder LoRA adapts them
    without training their weights)."""
    fp32_under: tuple[torch.dtype, ...] = ()
    """Mixed-precision dtypes a frozen copy stays fp32 under instead of taking them (where it overflows)."""

    def dtype(self, mixed: torch.dtype) -> torch.dtype:
        """The dtype a frozen copy runs in when a run's mixed-precision dtype is `mixed`."""
        return torch.float32 if mixed in self.fp32_under else mixed


class ModelFamily(ABC):
    """What one family of pipelines needs. `parts` below is whatever maps the family's component names to the
    components in `.components` (`teacher.PipelineParts`, a diffusers pipeline)."""

    name: str
    """Recorded in latent-cache manifests: a cache made for one family is refused by another."""
    pipeline_class: type[DiffusionPipeline]
    components: dict[str, Component]
    """The pipeline's components by their `pipeline_class` names (its subfolders); every family has a `unet`, a
    `vae` and a `scheduler`."""
    fields: tuple[str, ...]
    """The names of `Conditioning.tensors()`: what a latent cache stores per sample."""
    pipeline_extras: dict = {}
    """Further arguments of `pipeline_class` (components left out)."""
    single_file: dict[str, str] = {}
    """Where the LDM single file (train/formats/ldm_layout.py) holds each text encoder, by component name: its key
    prefix without the dot, ending `.transformer` (CLIP names) or `.model` (OpenCLIP names), or a slot whose naming
    the encoder's activation picks (`ldm_layout.text_prefix`). Empty: the file has no place for this family."""
    tokenizer_files: frozenset[str] = frozenset()
    """The files its tokenizers' `save_pretrained` writes: the only ones a single file may carry for them."""

    @abstractmethod
    def claims(self, unet_config: Mapping) -> bool:
        """Whether a U-Net of this config is of this family."""

    def named(self, *roles: str) -> tuple[str, ...]:
        """The names of the components of these roles, in `components` order."""
        return tuple(name for name, c in self.components.items() if c.role in roles)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return self.named(TEXT)

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return self.named(TOKENIZER)

    @property
    def encoders(self) -> tuple[str, ...]:
        """The VAE, the text encoders and the tokenizers: what encodes a batch, which a run from a latent cache
        leaves out."""
        return self.named(VAE, TEXT, TOKENIZER)

    @property
    def models(self) -> tuple[str, ...]:
        """The components that are torch modules: the U-Net, the VAE, the text encoders."""
        return self.named(*MODEL_ROLES)

    @property
    def frozen(self) -> tuple[str, ...]:
        """The models the trainers never train: the VAE and the text encoders, which a run from a latent cache
        leaves out."""
        return tuple(name for name in self.models if not self.components[name].trained)

    def dtype(self, name: str, mixed: torch.dtype) -> torch.dtype:
        """The dtype frozen component `name` runs in under mixed precision `mixed`."""
        return self.components[name].dtype(mixed)

    @abstractmethod
    def tokenize(self, parts, batch: dict) -> dict[str, torch.Tensor]:
        """What the text encoders read of a batch ("captions"; for families that take them, the samples'
        "original_size" and "crop_top_left", and "target_size" or the "pixel_values"' size): the inputs of
        `encode_tokens`, which need no text encoder to make, on the text encoders' device."""

    @abstractmethod
    def encode_tokens(self, encoders: Mapping[str, torch.nn.Module], tokens: dict[str, torch.Tensor]) -> Conditioning:
        """The conditioning of `tokenize`'s output, from the text encoders by name. Apart from `encode` for a
        text-encoder LoRA, whose trained module runs the text encoders itself (train/tasks/lora.py)."""

    def encode(self, parts, batch: dict) -> Conditioning:
        """A batch's conditioning."""
        return self.encode_tokens(parts.components, self.tokenize(parts, batch))

    @abstractmethod
    def empty_prompt(self, parts) -> dict[str, torch.Tensor]:
        """The caption-made tensors of "" for one sample: what caption dropout puts in a cached sample (the
        tensors not made from the caption, such as size ids, stay the sample's own)."""

    def pipeline(self, parts, unet, scheduler) -> DiffusionPipeline:
        """`parts`' components around `unet` and `scheduler`, as `pipeline_class`."""
        given = {name: parts.components[name] for name in self.components}
        return self.pipeline_class(**(given | dict(unet=unet, scheduler=scheduler)), **self.pipeline_extras)

    def assemble(self, unet, vae, scheduler, text_encoders: list, tokenizers: list) -> DiffusionPipeline:
        """`pipeline_class` of these models, the text encoders and tokenizers in `components` order (what
        builders of pipelines from configs give it: train/models/toy.py)."""
        return self.pipeline_class(unet=unet, vae=vae, scheduler=scheduler,
                                   **dict(zip(self.text_encoders, text_encoders, strict=True)),
                                   **dict(zip(self.tokenizers, tokenizers, strict=True)), **self.pipeline_extras)


class StableDiffusion(ModelFamily):
    """SD-1.x and SD-2.x: one CLIP text encoder (CLIP-L, OpenCLIP-H) whose last hidden state is the
    conditioning."""

    name = "sd"
    pipeline_class = StableDiffusionPipeline
    components = {
        "unet": Component(UNet2DConditionModel, UNET, trained=True),
        "vae": Component(AutoencoderKL, VAE),
        "text_encoder": Component(CLIPTextModel, TEXT),
        "tokenizer": Component(CLIPTokenizer, TOKENIZER),
        "scheduler": Component(DDPMScheduler, SCHEDULER),
    }
    fields = (HIDDEN,)
    pipeline_extras = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    single_file = {"text_encoder": "cond_stage_model"}  # CLIP-L (SD-1.x) or OpenCLIP-H (SD-2.x)
    tokenizer_files = CLIP_TOKENIZER_FILES

    def claims(self, unet_config: Mapping) -> bool:
        return unet_config.get("addition_embed_type") is None

    def tokenize(self, parts, batch: dict) -> dict[str, torch.Tensor]:
        """Token ids, padded to the tokenizer's length."""
        tokenizer, encoder = parts.components["tokenizer"], parts.components["text_encoder"]
        ids = tokenizer(batch["captions"], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return {"text_encoder": ids.to(encoder.device)}

    def encode_tokens(self, encoders, tokens: dict[str, torch.Tensor]) -> Conditioning:
        return Conditioning(encoders["text_encoder"](tokens["text_encoder"])[0])

    def empty_prompt(self, parts) -> dict[str, torch.Tensor]:
        return {HIDDEN: self.encode(parts, {"captions": [""]}).hidden_states[0]}


TIME_IDS = 6  # SDXL's size conditioning: original (height, width), crop top-left (y, x), target (height, width)


class StableDiffusionXL(ModelFamily):
    """SDXL: CLIP-L and OpenCLIP-bigG (with projection); the conditioning is both penultimate hidden states
    concatenated, the second's pooled projection and the six size/crop time ids, as diffusers'
    `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids` make them."""

    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    components = {
        "unet": Component(UNet2DConditionModel, UNET, trained=True),
        "vae": Component(AutoencoderKL, VAE, fp32_under=(torch.float16,)),  # SDXL's VAE overflows in fp16
        "text_encoder": Component(CLIPTextModel, TEXT),
        "text_encoder_2": Component(CLIPTextModelWithProjection, TEXT),
        "tokenizer": Component(CLIPTokenizer, TOKENIZER),
        "tokenizer_2": Component(CLIPTokenizer, TOKENIZER),
        "scheduler": Component(DDPMScheduler, SCHEDULER),
    }
    fields = (HIDDEN, "text_embeds", "time_ids")
    pipeline_extras = dict(image_encoder=None, feature_extractor=None, add_watermarker=False)
    # The SGM (A1111, ComfyUI) layout: CLIP-L in CLIP names, OpenCLIP-bigG in OpenCLIP names.
    single_file = {"text_encoder": "conditioner.embedders.0.transformer",
                   "text_encoder_2": "conditioner.embedders.1.model"}
    tokenizer_files = CLIP_TOKENIZER_FILES
    PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))

    def claims(self, unet_config: Mapping) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    def tokenize(self, parts, batch: dict) -> dict[str, torch.Tensor]:
        """Token ids of both tokenizers and the time ids: each sample's original size and crop, and its target
        size (given, or the size of the batch's images)."""
        c = parts.components
        tokens = {}
        for tok, encoder in self.PAIRS:
            ids = c[tok](batch["captions"], padding="max_length", max_length=c[tok].model_max_length,
                         truncation=True, return_tensors="pt").input_ids
            tokens[encoder] = ids.to(c[encoder].device)
        n = len(batch["captions"])
        target = (torch.as_tensor(batch["target_size"]) if "target_size" in batch
                  else torch.tensor(batch["pixel_values"].shape[-2:]).expand(n, 2))
        ids = torch.cat([torch.as_tensor(batch["original_size"]), torch.as_tensor(batch["crop_top_left"]), target], 1)
        # fp32 ids: fp16 holds integers exactly only up to 2048 (diffusers' examples cast them to the weights')
        tokens["time_ids"] = ids.float().to(c["text_encoder"].device)
        return tokens

    def encode_tokens(self, encoders, tokens: dict[str, torch.Tensor]) -> Conditioning:
        hidden = []
        for _, name in self.PAIRS:
            out = encoders[name](tokens[name], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's projection
        return Conditioning(torch.cat(hidden, dim=-1),
                            {"text_embeds": pooled, "time_ids": tokens["time_ids"].to(pooled.dtype)})

    def empty_prompt(self, parts) -> dict[str, torch.Tensor]:
        cond = self.encode(parts, prompt_batch([""], 0))  # the size ids stay each sample's own
        return {HIDDEN: cond.hidden_states[0], "text_embeds": cond.added["text_embeds"][0]}


SD = StableDiffusion()
SDXL = StableDiffusionXL()
_FAMILIES: list[ModelFamily] = [SDXL, SD]


def register_family(family: ModelFamily) -> ModelFamily:
    """Make `family_of` hand `family` the U-Nets it claims, before the families registered earlier (SD last)."""
    if any(f.name == family.name for f in _FAMILIES):
        raise ValueError(f"a model family named '{family.name}' is registered already")
    _FAMILIES.insert(0, family)
    return family


def unregister_family(family: ModelFamily) -> None:
    _FAMILIES.remove(family)


def registered_families() -> tuple[ModelFamily, ...]:
    """Every registered family, newest first (the order `family_of` asks them in)."""
    return tuple(_FAMILIES)


def family_of(unet_config: Mapping, what: str = "model") -> ModelFamily:
    """The family of a U-Net, from its config: the newest registered family that claims it. `what` names it in
    errors."""
    for family in _FAMILIES:
        if family.claims(unet_config):
            return family
    kind = unet_config.get("addition_embed_type")
    raise UserError(f"{what}: a U-Net with addition_embed_type '{kind}' is of no model family sdkd trains "
                    f"(SD-1.x, SD-2.x, SDXL)")


def prompt_batch(captions: list[str], resolution: int) -> dict:
    """Captions alone as a batch of uncropped `resolution`-pixel images: what a sampling pipeline conditions
    on (the sizes matter to families with size ids)."""
    size = torch.tensor([[resolution, resolution]] * len(captions))
    return {"captions": list(captions), "original_size": size, "crop_top_left": torch.zeros_like(size),
            "target_size": size}


def conditioning_shapes(unet_config: Mapping, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """The shapes of the `Conditioning.tensors()` a U-Net of this config is called with, from its config alone
    (whichever family claims it, if any): the inputs of shape checks, MAC counts and timings."""
    width = unet_config.get("encoder_hid_dim") or unet_config.get("cross_attention_dim", 1280)
    width = width[0] if isinstance(width, (list, tuple)) else width
    shapes = {HIDDEN: (batch, CONTEXT, width)}
    if unet_config.get("addition_embed_type") == "text_time":  # a pooled text embedding and the size/crop ids
        ids = TIME_IDS * unet_config["addition_time_embed_dim"]
        pooled = unet_config["projection_class_embeddings_input_dim"] - ids
        shapes |= {"text_embeds": (batch, pooled), "time_ids": (batch, TIME_IDS)}
    return shapes


def random_conditioning(unet_config: Mapping, batch: int = 1, generator: torch.Generator | None = None,
                        device: str | torch.device | None = None) -> Conditioning:
    """Standard-normal conditioning of `conditioning_shapes`, drawn from `generator` in their order; on the
    meta device, empty tensors."""
    if torch.device(device or "cpu").type == "meta":
        make = lambda shape: torch.empty(shape, device="meta")  # noqa: E731
    else:
        make = lambda shape: torch.randn(shape, generator=generator).to(device or "cpu")  # noqa: E731
    shapes = conditioning_shapes(unet_config, batch)
    return Conditioning.from_tensors({name: make(shape) for name, shape in shapes.items()})
