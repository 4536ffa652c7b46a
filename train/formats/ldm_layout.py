"""diffusers <-> original LDM single-file key names: U-Net (two numberings), VAE, text encoders.

A single file holds one flat state dict: `model.diffusion_model.*` (U-Net), `first_stage_model.*`
(VAE, AutoencoderKL or AutoencoderTiny) and the text encoders where their model family puts them
(train/models/families.py `single_file`): `cond_stage_model.transformer.text_model.*` (CLIP-L, SD-1)
or `cond_stage_model.model.*` (OpenCLIP, SD-2); SDXL's SGM layout (A1111, ComfyUI)
`conditioner.embedders.0.transformer.text_model.*` (CLIP-L) and `conditioner.embedders.1.model.*`
(OpenCLIP-bigG), its pooled-text/size embedding as `label_emb`.

A U-Net with one res block per level has two "original" numberings (see
shared/reference/export-sdcpp.md, section 1.2), and each consumer reads only its own:

- `ldm`: the packed numbering the LDM `UNetModel(num_res_blocks=L)` builds, L = layers_per_block:
  `down_blocks.i.resnets.j` -> `input_blocks.{(L+1)i+j+1}`; diffusers `from_single_file` reads it.
- `sdcpp`: the SD teacher's slots (L = 2) with the removed ones left empty: stable-diffusion.cpp
  and the tiny single files in the wild use it.

Both are one formula with a different slot stride (`L+1` or 3); the upsampler's position inside its
output block differs too (after the attention in `ldm`; `.1` for level 0 and `.2` elsewhere in
`sdcpp`, as the SD-1/2 conversion script writes it; SDXL's sd.cpp files follow the SDXL script: after the
attention). For the teachers the two coincide.

The inverse of every map is taken by inverting the forward map over the keys of a model built
from its config, so export and import cannot drift apart.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Iterable, Mapping

import torch

from sdkd.cli.errors import UserError
from sdkd.train.models import students
from sdkd.train.models.families import SDXL
from sdkd.train.models.sd_configs import SDXL_UNET

NUMBERINGS = ("ldm", "sdcpp")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDCPP_STRIDE = 3  # the SD-1/2 teacher's layers_per_block + 1

RESNET_RENAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
TOP_RENAMES = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


class UnsupportedLayout(UserError):
    """A model (or file) whose keys have no place in the LDM layout."""


# ---------------------------------------------------------------------------------------------
# U-Net


def _layers(config: Mapping) -> int:
    layers = config["layers_per_block"]
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise UnsupportedLayout(f"layers_per_block {list(layers)}: the LDM layout needs the same number of res "
                                    f"blocks on every level")
        layers = layers[0]
    return int(layers)


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET_RENAMES.get(head, head)}.{tail}"


def unet_name(key: str, config: Mapping, numbering: str) -> str:
    """LDM name (without `model.diffusion_model.`) of one diffusers U-Net state-dict key."""
    if numbering not in NUMBERINGS:
        raise ValueError(f"numbering must be one of {NUMBERINGS}, got {numbering!r}")
    layers = _layers(config)
    stride = layers + 1 if numbering == "ldm" else SDCPP_STRIDE
    if layers + 1 > stride:
        raise UnsupportedLayout(f"layers_per_block {layers}: the sdcpp numbering has room for at most "
                                f"{SDCPP_STRIDE - 1} res blocks per level")
    for old, new in TOP_RENAMES.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{stride * i + j + 1}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{stride * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        has_attn = config.get("mid_block_type") != "UNetMidBlock2D"
        return f"middle_block.{int(m[1]) * (2 if has_attn else 1)}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{stride * i + j}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        i = int(m[1])
        if numbering == "ldm" or family(config) == "sdxl":
            sub = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
        else:
            sub = 1 if i == 0 else 2
        return f"output_blocks.{stride * i + stride - 1}.{sub}.{m[2]}"
    raise UnsupportedLayout(f"U-Net key '{key}' has no place in the LDM layout (only SD-1.x/2.x- and SDXL-style "
                            f"U-Nets can be written as a single file)")


# ---------------------------------------------------------------------------------------------
# VAE


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_name(key: str, config: Mapping, tiny: bool) -> tuple[str, bool]:
    """(LDM name without `first_stage_model.`, whether a Linear weight becomes a 1x1 conv)."""
    if tiny:  # AutoencoderTiny keys are already the ones sd.cpp's TAE and taesd tools use
        return key, False
    n = len(config["block_out_channels"])
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)",
                         key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}", m[2] != "group_norm" and m[3] == "weight"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}", False
    if re.fullmatch(r"((encoder|decoder)\.conv_(in|out)|quant_conv|post_quant_conv)\..+", key):
        return key, False
    raise UnsupportedLayout(f"VAE key '{key}' has no place in the LDM layout")


# ---------------------------------------------------------------------------------------------
# Text encoder


def is_openclip(text_config: Mapping) -> bool:
    """SD-2's text encoder (OpenCLIP-H, GELU) is written in OpenCLIP names; CLIP-L (quick GELU) as is."""
    return text_config.get("hidden_act") == "gelu"


def text_prefix(slot: str, text_config: Mapping) -> str:
    """The key prefix of a text encoder at `slot` (its family's `single_file` entry): the slot itself where it
    ends in its naming (`.transformer`: CLIP names, `.model`: OpenCLIP names), else the naming `is_openclip`
    picks."""
    if slot.endswith((".transformer", ".model")):
        return slot + "."
    return slot + (".model." if is_openclip(text_config) else ".transformer.")


def _oriented(name: str, t: torch.Tensor) -> torch.Tensor:
    # OpenCLIP's text_projection multiplies from the right: the transpose of the Linear weight (its own inverse).
    return t.T if name.endswith(".text_projection") else t


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def text_name(key: str, prefix: str) -> tuple[str, int | None]:
    """(full file name, index in a q,k,v concatenation or None) of a text-encoder key under `prefix`
    (`text_prefix`). `key` may lack `text_model.` (transformers 5's CLIPTextModel)."""
    if not key.startswith(("text_model.", "text_projection.")):
        key = "text_model." + key
    if not prefix.endswith(".model."):
        return prefix + key, None
    if key == "text_projection.weight":
        return prefix + "text_projection", None
    rest = key[len("text_model."):]
    if rest == "embeddings.token_embedding.weight":
        return prefix + "token_embedding.weight", None
    if rest == "embeddings.position_embedding.weight":
        return prefix + "positional_embedding", None
    if rest.startswith("final_layer_norm."):
        return prefix + "ln_final." + rest[len("final_layer_norm."):], None
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", rest):
        return f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", "qkv".index(m[2])
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest):
        if m[2] in _OPENCLIP_LAYER:
            return f"{prefix}transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}", None
    raise UnsupportedLayout(f"text-encoder key '{key}' has no place in the OpenCLIP layout")


# ---------------------------------------------------------------------------------------------
# Whole files


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    # sd.cpp reads raw storage bytes and safetensors refuses views: always a fresh, packed CPU tensor.
    return t.detach().to("cpu").contiguous()


def to_ldm(unet: Mapping[str, torch.Tensor], unet_config: Mapping, numbering: str,
           vae: Mapping[str, torch.Tensor] | None = None, vae_config: Mapping | None = None, vae_tiny: bool = False,
           texts: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping]] | None = None) -> dict[str, torch.Tensor]:
    """One flat LDM state dict from diffusers state dicts (the parts given); `texts`: slot (`text_prefix`) ->
    (a text encoder's state dict, its config)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in unet.items():
        out[UNET_PREFIX + unet_name(key, unet_config, numbering)] = _contiguous(t)
    for key, t in (vae or {}).items():
        name, conv = vae_name(key, vae_config, vae_tiny)
        out[VAE_PREFIX + name] = _contiguous(t.reshape(*t.shape, 1, 1) if conv and t.dim() == 2 else t)
    for slot, (text, text_config) in (texts or {}).items():
        prefix = text_prefix(slot, text_config)
        parts: dict[str, dict[int, torch.Tensor]] = {}
        for key, t in text.items():
            if key.endswith("position_ids"):
                continue
            name, part = text_name(key, prefix)
            if part is None:
                out[name] = _contiguous(_oriented(name, t))
            else:
                parts.setdefault(name, {})[part] = t
        for name, qkv in parts.items():
            out[name] = _contiguous(torch.cat([qkv[0], qkv[1], qkv[2]], dim=0))
    assert len(set(out)) == len(out)
    return out


def _take(flat: Mapping[str, torch.Tensor], names: dict[str, tuple[str, int | None]],
          shapes: Mapping[str, torch.Size], what: str, source: str) -> dict[str, torch.Tensor]:
    state, missing, wrong = {}, [], []
    for key, (name, part) in names.items():
        if name not in flat:
            missing.append(name)
            continue
        t = _oriented(name, flat[name])
        if part is not None:
            t = t.chunk(3, dim=0)[part]
        if t.numel() != shapes[key].numel():
            wrong.append(f"{name} {tuple(t.shape)} (expected {tuple(shapes[key])})")
            continue
        state[key] = t.reshape(shapes[key])
    if missing or wrong:
        if missing:
            detail = f"{len(missing)} missing, e.g. {missing[0]}"
        else:
            detail = f"{len(wrong)} of the wrong shape, e.g. {wrong[0]}"
        raise UnsupportedLayout(f"{source}: the {what} tensors do not match the layout its config describes "
                                f"({detail}); the file is damaged or was not written by sdkd export")
    return state


def unet_from_ldm(flat, config, numbering, shapes, source="file"):
    names = {k: (UNET_PREFIX + unet_name(k, config, numbering), None) for k in shapes}
    return _take(flat, names, shapes, "U-Net", source)


def vae_from_ldm(flat, config, tiny, shapes, source="file"):
    names = {k: (VAE_PREFIX + vae_name(k, config, tiny)[0], None) for k in shapes}
    return _take(flat, names, shapes, "VAE", source)


def text_from_ldm(flat, slot, text_config, shapes, source="file"):
    prefix = text_prefix(slot, text_config)
    names = {k: text_name(k, prefix) for k in shapes if not k.endswith("position_ids")}
    return _take(flat, names, shapes, "text-encoder", source)


def unet_names(keys: Iterable[str], config: Mapping, numbering: str) -> dict[str, str]:
    """diffusers key -> full LDM key, for a list of U-Net keys."""
    return {k: UNET_PREFIX + unet_name(k, config, numbering) for k in keys}


# ---------------------------------------------------------------------------------------------
# Layouts and stable-diffusion.cpp support


def _depths(config: Mapping, layers: int) -> tuple:
    """Per down block, per up block, and of the mid block: the depth of each attention, by diffusers' rules for
    `transformer_layers_per_block` (an int, or one entry per block: an int or one per layer) and its reverse."""
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    down = config.get("transformer_layers_per_block", 1)
    down = [down] * len(down_types) if isinstance(down, int) else list(down)
    up = config.get("reverse_transformer_layers_per_block") or list(reversed(down))

    def per_layer(depth, kinds, n):
        return tuple(tuple(d if isinstance(d, (list, tuple)) else [d] * n) if kind.startswith("CrossAttn") else ()
                     for d, kind in zip(depth, kinds))

    mid = down[-1] if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn" else 0
    return per_layer(down, down_types, layers), per_layer(up, up_types, layers + 1), mid


def _structure(config: Mapping) -> tuple:
    config = {**students.UNET_DEFAULTS, **config}  # a key left out is diffusers' default
    layers = _layers(config)
    keys = ("down_block_types", "up_block_types", "mid_block_type", "only_cross_attention")
    return (layers, _depths(config, layers), *(json.dumps(config[k]) for k in keys))


@functools.cache
def _sdxl_layouts() -> dict[tuple, str]:
    """Structure -> name: the SDXL teacher's and every SDXL preset's (at any widths)."""
    configs = {"teacher": SDXL_UNET} | {name: students.student_unet_config(SDXL_UNET, spec)
                                        for name, spec in students.PRESETS.items() if spec.family == students.SDXL}
    return {_structure(config): name for name, config in configs.items()}


def unet_layout(config: Mapping) -> str:
    """Structural name of a U-Net: teacher, bk_base, bk_small, bk_tiny, sdxs (SDXS-512), sdxs09 (SD-1.x/2.x);
    teacher, ssd1b, vega, koala_1b, koala_700m (SDXL: block types and every attention's depth); or custom."""
    try:
        layers = _layers(config)
    except UnsupportedLayout:
        return "custom"
    if family(config) == "sdxl":
        return _sdxl_layouts().get(_structure(config), "custom")
    down = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
    only_cross = config.get("only_cross_attention", False)
    only_cross = only_cross if isinstance(only_cross, list) else [only_cross] * len(down)
    if len(down) == 4 and down == [True, True, True, False] and up == [False, True, True, True] and not any(only_cross):
        return {(2, True): "teacher", (1, True): "bk_base", (1, False): "bk_small"}.get((layers, mid), "custom")
    if len(down) == 3 and layers == 1 and not mid:
        if down == [True] * 3 and up == [True] * 3:
            return "sdxs09" if list(only_cross) == [True, False, False] else (
                "bk_tiny" if not any(only_cross) else "custom")
        if down == [False, True, True] and up == [True, True, False] and not any(only_cross):
            return "sdxs"
    return "custom"


SDCPP_LAYOUTS = {  # layout -> (families sd.cpp has a model for, VAE kind it loads)
    "teacher": ({"sd1", "sd2", "sdxl"}, "kl"),
    "bk_tiny": ({"sd1", "sd2"}, "kl"),
    "sdxs": ({"sd1"}, "tiny"),
    "sdxs09": ({"sd2"}, "tiny"),
    "ssd1b": ({"sdxl"}, "kl"),
    "vega": ({"sdxl"}, "kl"),
}
SDCPP_WORKING = ("the SD-1.x/2.x teacher layout, bk_tiny (SD-1.x and SD-2.x), the SDXS-512 layout "
                 "(SD-1.x, tiny VAE), the SDXS-0.9 layout (SD-2.x, tiny VAE), and SDXL's teacher, ssd1b and vega")


def family(unet_config: Mapping) -> str:
    """sd1 (conv projection, 8 heads), sd2 (linear projection, 64-dim heads) or sdxl (size/crop ids, two text
    encoders): what sd.cpp hard-codes."""
    if SDXL.claims(unet_config):
        return "sdxl"
    return "sd2" if unet_config.get("use_linear_projection") else "sd1"


def sdcpp_runs(unet_config: Mapping) -> bool:
    """Whether stable-diffusion.cpp has a model for this U-Net (whatever the VAE)."""
    layout = unet_layout(unet_config)
    return layout in SDCPP_LAYOUTS and family(unet_config) in SDCPP_LAYOUTS[layout][0]


def check_sdcpp(unet_config: Mapping, vae_tiny: bool) -> list[str]:
    """Raise UnsupportedLayout when sd.cpp has no model for this U-Net (+VAE); return warnings otherwise."""
    layout, fam = unet_layout(unet_config), family(unet_config)
    if not sdcpp_runs(unet_config):
        what = {"bk_base": "4 levels with 1 res block and a mid block", "bk_small": "4 levels with 1 res block and "
                "no mid block"}.get(layout, "this block layout")
        if fam == "sdxl":  # sd.cpp builds SDXL U-Nets from fixed tables: the teacher's, SSD-1B's and Vega's
            what = "its transformer depths (it hard-codes those of SDXL, SSD-1B and Vega only)"
        name = f"'{layout}' ({fam.upper()})" if layout != "custom" else "this custom layout"
        raise UnsupportedLayout(f"stable-diffusion.cpp cannot run {name}: it has no model for {what}. "
                                f"Layouts that work there: {SDCPP_WORKING}. Export with --target ldm for "
                                f"diffusers and other LDM tools instead")
    want_tiny = SDCPP_LAYOUTS[layout][1] == "tiny"
    if want_tiny != vae_tiny:
        need = "an AutoencoderTiny (TAESD) VAE" if want_tiny else "an AutoencoderKL VAE"
        raise UnsupportedLayout(f"stable-diffusion.cpp runs the '{layout}' layout only with {need}; pass "
                                f"--vae FOLDER with one, or export with --target ldm")
    warnings = []
    widths = list(unet_config["block_out_channels"])
    if widths[:3] != [320, 640, 1280] or unet_config.get("in_channels", 4) != 4:
        warnings.append(f"block_out_channels {widths}: stable-diffusion.cpp builds before master-8xx hard-code "
                        f"320 model channels and will not load this file")
    return warnings
