"""A test model family shaped like SDXL at toy widths, defined here and registered by the tests that use it
(`registered`): two CLIP text encoders whose penultimate hidden states are concatenated, the second's pooled
projection as `text_embeds` and the samples' size/crop ids as `time_ids` (`added_cond_kwargs`), a three-level
U-Net with `addition_embed_type` "text_time", a VAE kept in fp32 under fp16, StableDiffusionXLPipeline.
Nothing outside train/models/families.py knows of it: the code under test asks whichever family claims a
U-Net."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdkd.train.models.families import (
    HIDDEN,
    SCHEDULER,
    TEXT,
    TOKENIZER,
    UNET,
    VAE,
    Component,
    Conditioning,
    ModelFamily,
    prompt_batch,
    register_family,
    unregister_family,
)
from sdkd.train.models.toy import SD_SCHEDULER, TOY_TEXT, TOY_VAE, toy_clip_tokenizer

TIME_IDS = 6  # original size, crop top-left, target size
POOLED = 16
XL_UNET = dict(  # SDXL's block structure: no attention at the highest level, deeper transformers further down
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 64, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4], use_linear_projection=True,
    cross_attention_dim=32, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=POOLED + TIME_IDS * 8,
)
XL_TEXT = {**TOY_TEXT, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}  # 16 + 16 = 32 wide
XL_TEXT_2 = {**XL_TEXT, "projection_dim": POOLED}
# The student of the tests: bk_small's cut on three levels (one resnet per level, no mid block).
XL_STUDENT = ["student.preset=custom", "student.keep_down=[[0],[0],[0]]", "student.keep_up=[[0,2],[0,2],[0,2]]",
              "student.mid_block=false"]


class TwoTextEncoders(ModelFamily):
    name = "xl-test"
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
    PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))

    def claims(self, unet_config) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    def tokenize(self, parts, batch: dict) -> dict[str, torch.Tensor]:
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


XL = TwoTextEncoders()


@contextmanager
def registered():
    """`XL` known to `family_of` inside the block."""
    register_family(XL)
    try:
        yield XL
    finally:
        unregister_family(XL)


def build_xl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """The test family's pipeline with random weights of `seed`."""
    tokenizers = [toy_clip_tokenizer(), toy_clip_tokenizer()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**XL_UNET)
        vae = AutoencoderKL(**TOY_VAE)
        texts = [CLIPTextModel(CLIPTextConfig(**XL_TEXT)), CLIPTextModelWithProjection(CLIPTextConfig(**XL_TEXT_2))]
    return XL.assemble(unet, vae, DDPMScheduler(**SD_SCHEDULER), texts, tokenizers)
