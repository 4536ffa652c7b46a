"""The built-in toy teacher: an SD-1.5-shaped pipeline at tiny widths.

Same block structure as SD-1.5 (four levels, two resnets per down block, cross-attention in
the first three, a cross-attention mid block), so every student preset applies to it. Nothing
is downloaded: the CLIP tokenizer's files are written here (byte-level BPE with no merges).

`teacher: toy` (and `model: toy`) loads the trained toy teacher committed in `toy_teacher/` beside
this file: its VAE and U-Net trained on the synthetic captioned shapes by sdkd's own trainers, the
text encoder as `build_toy_pipeline` makes it (frozen, as SD's). `python train/make_toy_teacher.py`
reproduces it (its `provenance.json` has the commands). `build_toy_pipeline` makes the same
architecture with random weights from a seed, in a fraction of a second (what tests build models from).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdkd.cli.errors import UserError
from sdkd.train.models.families import SD, SDXL, TIME_IDS, family_of
from sdkd.train.models.sd_configs import SD15_TEXT, SD15_VAE, SD21_TEXT, SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET

TOY_SEED = 0
TOY_TEACHER = Path(__file__).resolve().with_name("toy_teacher")
"""The committed trained toy teacher, a diffusers pipeline folder: what `toy` loads."""
TOY_SDXL_TEACHER = Path(__file__).resolve().with_name("toy_sdxl_teacher")
"""The committed trained toy SDXL-topology teacher (`build_toy_xl_pipeline`'s architecture): what `toy_sdxl` loads."""
TOY_NAMES = ("toy", "toy_sdxl")
"""The names `teacher:` and `model:` take for the committed toy teachers."""

TOY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=[32, 64, 64, 64],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TOY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[16, 32],
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
TOY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=1000,
    max_position_embeddings=77,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
# The toy teacher with SD-2.x's distinguishing traits: linear proj_in/proj_out, per-level head counts
# (diffusers' SD-2 `attention_head_dim` list; 16-dim heads here) and a GELU text encoder, which the
# single file stores in OpenCLIP names (`cond_stage_model.model.*`).
TOY_SD2_UNET = {**TOY_UNET, "use_linear_projection": True, "attention_head_dim": [2, 4, 4, 4]}
TOY_SD2_TEXT = {**TOY_TEXT, "hidden_act": "gelu"}
# The toy teacher with SDXL's topology: three levels, no attention at the highest, deeper transformers further
# down, size/crop time ids; two text encoders, the second wider and GELU as OpenCLIP-bigG is to CLIP-L (diffusers'
# single-file reader tells them apart by width), 16 + 24 = 40 wide concatenated (the U-Net's cross-attention
# width), the second with a 16-wide pooled projection.
TOY_XL_POOLED = 16
TOY_XL_TEXT = {**TOY_TEXT, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
TOY_XL_TEXT_2 = {**TOY_XL_TEXT, "hidden_size": 24, "intermediate_size": 48, "hidden_act": "gelu",
                 "projection_dim": TOY_XL_POOLED}
_TOY_XL_WIDTHS = dict(
    sample_size=16, block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], norm_num_groups=8,
    cross_attention_dim=TOY_XL_TEXT["hidden_size"] + TOY_XL_TEXT_2["hidden_size"], addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TOY_XL_POOLED + TIME_IDS * 8,
)
TOY_XL_UNET = {**SDXL_UNET, **_TOY_XL_WIDTHS, "transformer_layers_per_block": [1, 1, 2]}
# SDXL's blocks and depths ([1, 2, 10], mid depth 10: every SDXL preset applies) at the toy widths: what the SDXL
# single-file and layout tests build students from (widths "toy_xl").
TOY_XL_DEPTHS_UNET = {**SDXL_UNET, **_TOY_XL_WIDTHS}
# SD-1.5's training scheduler (SD-2.1-base's too: epsilon prediction, the same betas).
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_toy_tokenizer(folder: str | Path) -> Path:
    """Write a CLIP tokenizer that can encode any text: one token per byte, no merges."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def toy_clip_tokenizer() -> CLIPTokenizer:
    """The toy CLIP tokenizer (`write_toy_tokenizer`'s files), padding to CLIP's 77 tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_toy_tokenizer(tmp), model_max_length=77)


def build_toy_pipeline(seed: int = TOY_SEED) -> StableDiffusionPipeline:
    """The toy teacher pipeline; the same seed always gives the same weights."""
    tokens = toy_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TOY_UNET)
        vae = AutoencoderKL(**TOY_VAE)
        text = CLIPTextModel(CLIPTextConfig(**TOY_TEXT))
    return SD.assemble(unet, vae, DDPMScheduler(**SD_SCHEDULER), [text], [tokens])


def build_toy_xl_pipeline(seed: int = TOY_SEED) -> StableDiffusionXLPipeline:
    """The toy SDXL-topology pipeline with random weights; the same seed always gives the same weights."""
    tokenizers = [toy_clip_tokenizer(), toy_clip_tokenizer()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TOY_XL_UNET)
        vae = AutoencoderKL(**TOY_VAE)
        texts = [CLIPTextModel(CLIPTextConfig(**TOY_XL_TEXT)),
                 CLIPTextModelWithProjection(CLIPTextConfig(**TOY_XL_TEXT_2))]
    return SDXL.assemble(unet, vae, DDPMScheduler(**SD_SCHEDULER), texts, tokenizers)


def toy_teacher_folder(name: str = "toy") -> Path:
    """The pipeline folder of the trained toy teacher `name` (one of `TOY_NAMES`: `TOY_TEACHER`,
    `TOY_SDXL_TEACHER`); stops with one line when it is missing."""
    folder, family = {"toy": (TOY_TEACHER, "sd"), "toy_sdxl": (TOY_SDXL_TEACHER, "sdxl")}[name]
    if not (folder / "model_index.json").is_file():
        raise UserError(f"the trained toy teacher is missing ({folder / 'model_index.json'} not found); "
                        f"reinstall sdkd, or remake it with `python train/make_toy_teacher.py --family {family}`")
    return folder


def toy_pipeline_with(vae: AutoencoderKL, seed: int = TOY_SEED, xl: bool = False) -> DiffusionPipeline:
    """The toy pipeline of `seed` (`build_toy_pipeline`'s, or with `xl` `build_toy_xl_pipeline`'s: random U-Net,
    the toy text encoders and CLIP tokenizers) with `vae` in it: what a toy teacher's U-Net is trained on
    (train/make_toy_teacher.py)."""
    pipe = (build_toy_xl_pipeline if xl else build_toy_pipeline)(seed)
    pipe.register_modules(vae=vae)
    return pipe


# ---------------------------------------------------------------------------------------------
# SD-1.5 / SD-2.1-base widths (random weights): the real consumers (stable-diffusion.cpp, benchmarks)
# need the real architecture; weights may be random. Configs in sd_configs.py.


def _random_init(module: torch.nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Fill a meta-built module with small random weights of `dtype`: much faster than the default init."""
    module.to(dtype).to_empty(device="cpu")  # the cast on meta: no copy in another dtype is ever made
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norms
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return module


def random_unet(unet_config: dict, seed: int = TOY_SEED, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """A U-Net of `unet_config` with `_random_init`'s weights: real widths in seconds, nothing downloaded."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    return _random_init(unet, seed, dtype)


# widths -> (VAE config, text-encoder configs) around the U-Net. SD-2.1-base shares SD-1.5's VAE and
# training scheduler (epsilon prediction, scaled-linear betas); its text encoder is OpenCLIP-H. SDXL's VAE has
# SD-1.5's architecture.
RANDOM_WIDTHS = {
    "sd15": (SD15_VAE, [SD15_TEXT]),
    "sd21": (SD15_VAE, [SD21_TEXT]),
    "sdxl": (SD15_VAE, [SDXL_TEXT, SDXL_TEXT_2]),
    "toy": (TOY_VAE, [TOY_TEXT]),
    "toy_sd2": (TOY_VAE, [TOY_SD2_TEXT]),
    "toy_xl": (TOY_VAE, [TOY_XL_TEXT, TOY_XL_TEXT_2]),
}


def build_random_pipeline(unet_config: dict, widths: str = "sd15", tiny_vae: bool = False,
                          seed: int = TOY_SEED, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """A pipeline of the U-Net's family around `unet_config` with random weights of `dtype` and the VAE / text
    encoders of `widths`: "sd15" (SD-1.5: CLIP-L), "sd21" (SD-2.1-base: OpenCLIP-H; pair it with an
    SD21_BASE_UNET-derived U-Net), "sdxl" (CLIP-L and OpenCLIP-bigG; an SDXL_UNET-derived U-Net), "toy",
    "toy_sd2" (pair it with a TOY_SD2_UNET-derived U-Net) or "toy_xl" (a TOY_XL_DEPTHS_UNET-derived one)."""
    from diffusers import AutoencoderTiny

    if widths not in RANDOM_WIDTHS:
        raise ValueError(f"widths must be one of {sorted(RANDOM_WIDTHS)}, got {widths!r}")
    family = family_of(unet_config)
    vae_cfg, text_cfgs = RANDOM_WIDTHS[widths]
    with torch.device("meta"):
        vae = AutoencoderTiny() if tiny_vae else AutoencoderKL(**vae_cfg)
        texts = [family.components[name].cls(CLIPTextConfig(**cfg))
                 for name, cfg in zip(family.text_encoders, text_cfgs, strict=True)]
    for i, m in enumerate((vae, *texts), start=1):
        _random_init(m, seed + i, dtype)
    tokenizers = [toy_clip_tokenizer() for _ in texts]
    return family.assemble(random_unet(unet_config, seed, dtype), vae, DDPMScheduler(**SD_SCHEDULER), texts,
                           tokenizers)
