"""Block-removed student U-Nets (BK-SDM style), built from an explicit config and weight map.

A `RemovalSpec` says, per teacher block, which resnet (and attention) indices the student keeps,
whether the mid block stays, whether the deepest stage (last down block + first up block)
stays, and at which levels the student has no attention at all. Presets are named specs;
`student.preset: custom` gives one directly. From a spec and the teacher's config we derive
(1) a real `UNet2DConditionModel` config for the student, so its saved `config.json` describes
the student (segmind's in-place surgery saved the teacher's), and (2) an explicit student ->
teacher module map, used to fill every student weight with zero missing or mis-shaped keys.
`describe` gathers what train/show_student.py prints about a student.

Indexing rule for custom specs: `keep_down` / `keep_up` always have one entry per *teacher*
block (down block i, up block j). With `deepest_stage: false` the entries of the teacher's last
down block and first up block are ignored (write `[]`), so flipping `deepest_stage` on a spec
never shifts the other entries.

`drop_attention` lists teacher levels (0 = the highest resolution, i.e. down block i and up block
n-1-i) whose transformer blocks the student drops: those blocks become DownBlock2D / UpBlock2D and
keep only resnets and samplers, still copied from the teacher's by the same kept indices (the
teacher's resnets there are the only trained weights with the right shapes; nothing else could
initialise them). SDXS-512 (`sdxs`, block-removal.md section 5) is bk_tiny plus drop_attention [0]:
three levels, one resnet per level, no mid block, no attention at 320 channels. The same preset
on an SD-2.x teacher gives the SD-2.1-based variant the paper reports (319M; SDXS-0.9's
cross-attention-only 320-ch stage is another layout).

SDXL students (sdxl-and-scale.md section 1, block-removal.md section 6) also make attentions shallower:
`transformer_layers_per_block` / `reverse_transformer_layers_per_block` give, per teacher down / up block,
the depth of each kept attention (an int for all, or one per kept index), and `mid_attention: false`
replaces the mid block by one resnet (UNetMidBlock2D). SSD-1B and Segmind-Vega keep every resnet, cut
depths and replace the mid block; KOALA-1B / -700M keep one resnet per level as BK-SDM does (layers_per_block
1), cut the deepest level to 6 / 5 layers, and keep (at depth 6) / drop the mid block. Nobody published which
teacher layers seeded the shallower attentions, so `layer_init` chooses: the first k (diffengine's copy by
name), k evenly spaced, or an explicit list per student attention. A preset is made for one family: an SDXL
preset on an SD-1.x/2.x teacher, or the reverse, is refused.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping

import torch
from diffusers import Transformer2DModel, UNet2DConditionModel

from sdkd.cli.errors import ConfigError
from sdkd.train.models.student_config import BlockRemovalConfig, StudentConfig

DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
BLOCK_LISTS = ("down_blocks", "up_blocks", "mid_block")
# Config entries given per down block (a list) or for all blocks (a scalar); trimmed with the levels.
PER_LEVEL_KEYS = ("attention_head_dim", "num_attention_heads", "cross_attention_dim", "only_cross_attention")
# diffusers' own types for the student's mid block: a one-resnet UNetMidBlock2D replaces a kept one's attention.
MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
# Lists of the units a spec keeps or drops by index: a removed one is named item by item.
UNIT_LISTS = ("resnets", "attentions", "transformer_blocks")
SD, SDXL = "SD-1.x/2.x", "SDXL"
UNET_DEFAULTS = {
    name: p.default for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
    if name != "self"
}


# ---------------------------------------------------------------------------------------------
# Specs and presets


@dataclass(frozen=True)
class RemovalSpec:
    keep_down: tuple[tuple[int, ...], ...]
    """Per teacher down block: the resnet (and attention) indices the student keeps."""
    keep_up: tuple[tuple[int, ...], ...]
    """Per teacher up block: the indices kept; one more than the matching down block, last one included."""
    mid_block: bool = True
    deepest_stage: bool = True
    drop_attention: tuple[int, ...] = ()
    """Teacher levels (0 = highest resolution) whose attentions the student drops, in down and up block."""
    mid_attention: bool = True
    """False: a kept mid block becomes one resnet (UNetMidBlock2D), the teacher's first mid resnet."""
    transformer_layers_per_block: tuple | None = None
    """Per teacher down block: the depth of the kept attentions, an int or one per kept index; None: the teacher's."""
    reverse_transformer_layers_per_block: tuple | None = None
    """Per teacher up block, the same; None: the teacher's (diffusers derives them when the teacher lists none)."""
    layer_init: str | tuple = "first"
    """first, even, or ((student attention, teacher layer indices), ...): the layers seeding a shallower attention."""
    family: str | None = field(default=None, compare=False)
    """The teacher family a preset is made for (SD or SDXL); None (custom): any."""
    name: str = field(default="custom", compare=False)
    """Preset name, or custom; only used in error messages."""

    def __post_init__(self):
        # Accept lists and dicts (YAML, tests) but store tuples, so specs are hashable and comparable.
        for key in ("keep_down", "keep_up"):
            object.__setattr__(self, key, tuple(tuple(entry) for entry in getattr(self, key)))
        object.__setattr__(self, "drop_attention", tuple(self.drop_attention))
        for key in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, tuple(tuple(e) if isinstance(e, list) else e for e in getattr(self, key)))
        if isinstance(self.layer_init, Mapping):
            object.__setattr__(self, "layer_init", tuple((k, tuple(v)) for k, v in self.layer_init.items()))


_BK = dict(keep_down=[[0]] * 4, keep_up=[[0, 2]] * 4, family=SD)
_SEGMIND = dict(keep_down=[[0, 1]] * 3, keep_up=[[0, 1, 2]] * 3, mid_attention=False, family=SDXL)
_KOALA = dict(keep_down=[[0]] * 3, keep_up=[[0, 2]] * 3, family=SDXL)
PRESETS: dict[str, RemovalSpec] = {
    "bk_base": RemovalSpec(**_BK, name="bk_base"),
    "bk_small": RemovalSpec(**_BK, mid_block=False, name="bk_small"),
    "bk_tiny": RemovalSpec(**_BK, mid_block=False, deepest_stage=False, name="bk_tiny"),
    # SDXS-512 (arXiv 2403.16627 sec. 3.1): bk_tiny without the transformer blocks of the highest resolution.
    "sdxs": RemovalSpec(**_BK, mid_block=False, deepest_stage=False, drop_attention=[0], name="sdxs"),
    # SDXL students: every depth as sd.cpp's tables for the released weights (block-removal.md section 6);
    # level-0 entries are ignored (no attention there). KOALA's depths are inferred from its exact counts.
    "ssd1b": RemovalSpec(**_SEGMIND, transformer_layers_per_block=[1, 2, 4],
                         reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], 1], name="ssd1b"),
    "vega": RemovalSpec(**_SEGMIND, transformer_layers_per_block=[1, 1, 2],
                        reverse_transformer_layers_per_block=[2, 1, 1], name="vega"),
    "koala_1b": RemovalSpec(**_KOALA, transformer_layers_per_block=[1, 2, 6], name="koala_1b"),
    "koala_700m": RemovalSpec(**_KOALA, transformer_layers_per_block=[1, 2, 5], mid_block=False, name="koala_700m"),
}


def removal_spec(cfg: BlockRemovalConfig) -> RemovalSpec:
    """The spec named by `student.preset`, or the custom one given by its keep_* fields; with `layer_init`."""
    BlockRemovalConfig.check(cfg, "student")  # its removal keys only: a section built in code is unchecked
    if cfg.preset == "custom":
        return RemovalSpec(cfg.keep_down, cfg.keep_up, cfg.mid_block, cfg.deepest_stage, cfg.drop_attention or (),
                           cfg.mid_attention, cfg.transformer_layers_per_block,
                           cfg.reverse_transformer_layers_per_block, cfg.layer_init)
    return replace(PRESETS[cfg.preset], layer_init=cfg.layer_init)


def _fail(spec: RemovalSpec, key: str, message: str):
    origin = "" if spec.name == "custom" else (
        f" (from student.preset={spec.name}; use student.preset=custom for this teacher)")
    raise ConfigError(f"config key 'student.{key}': {message}{origin}")


# ---------------------------------------------------------------------------------------------
# Configs


def normalized(config: Mapping) -> dict:
    """Every `UNet2DConditionModel` argument, defaults filled in, lists not tuples, private keys dropped."""
    given = {k: v for k, v in dict(config).items() if k in UNET_DEFAULTS}
    return json.loads(json.dumps({**UNET_DEFAULTS, **given}))


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, list) else [value] * n


def _levels(n: int, spec: RemovalSpec) -> tuple[range, range]:
    """Teacher down-block and up-block indices that survive (student index = position in the range)."""
    return (range(n), range(n)) if spec.deepest_stage else (range(n - 1), range(1, n))


def _check_indices(spec: RemovalSpec, key: str, block: int, kept: tuple[int, ...], count: int, what: str) -> None:
    ok = kept and all(isinstance(k, int) and 0 <= k < count for k in kept) and list(kept) == sorted(set(kept))
    if not ok:
        _fail(spec, key, f"entry {block} ({what} has {count} resnets): expected sorted distinct indices "
                         f"in 0..{count - 1}, got {list(kept)}")


def _family(config: Mapping) -> str:
    """SDXL's U-Net takes a pooled text embedding and size/crop time ids ("text_time"); SD-1.x/2.x's does not."""
    return SDXL if config.get("addition_embed_type") == "text_time" else SD


def _check_family(t: dict, spec: RemovalSpec) -> None:
    family = _family(t)
    if spec.family not in (None, family):
        fitting = [name for name, preset in PRESETS.items() if preset.family == family]
        raise ConfigError(f"config key 'student.preset': {spec.name} is a preset for {spec.family} teachers, but the "
                          f"teacher U-Net is {family}; use {', '.join(fitting)} or custom")


def _check_depth_lists(t: dict, spec: RemovalSpec) -> None:
    """Each given depth entry of a block with attention is an int or has one depth per kept index."""
    n = len(t["down_block_types"])
    down, up = _levels(n, spec)
    for key, kind, blocks, keep in (("transformer_layers_per_block", "down", down, spec.keep_down),
                                    ("reverse_transformer_layers_per_block", "up", up, spec.keep_up)):
        given = getattr(spec, key)
        if given is None:
            continue
        if len(given) != n:
            _fail(spec, key, f"expected {n} entries, one per teacher {kind} block, got {len(given)}")
        for b in blocks:
            entry = given[b]
            if _attends(t, spec, kind, b) and isinstance(entry, tuple) and len(entry) != len(keep[b]):
                _fail(spec, key, f"entry {b}: expected one depth per kept index of keep_{kind}[{b}] "
                                 f"({len(keep[b])}), got {list(entry)}")
    lists = spec.transformer_layers_per_block is not None and any(
        isinstance(spec.transformer_layers_per_block[i], tuple) for i in down if _attends(t, spec, "down", i))
    if (lists and spec.reverse_transformer_layers_per_block is None
            and t["reverse_transformer_layers_per_block"] is None):
        _fail(spec, "reverse_transformer_layers_per_block", "required when transformer_layers_per_block gives a "
                                                            "list for a block (diffusers derives up-block depths "
                                                            "only from one depth per level)")


def _check_spec(t: dict, spec: RemovalSpec) -> None:
    """Structural checks of a spec against a (normalized) teacher config."""
    _check_family(t, spec)
    n = len(t["down_block_types"])
    bad = [b for b in t["down_block_types"] if b not in DOWN_TYPES]
    bad += [b for b in t["up_block_types"] if b not in UP_TYPES]
    if bad:
        raise ConfigError(f"teacher block type '{bad[0]}' is not supported for block removal "
                          f"(supported: {', '.join(DOWN_TYPES + UP_TYPES)})")
    for key in ("keep_down", "keep_up"):
        if len(getattr(spec, key)) != n:
            _fail(spec, key, f"expected {n} entries, one per teacher {key[5:]} block (with deepest_stage false "
                             f"the entry of the removed block is ignored; write []), got {len(getattr(spec, key))}")
    if not spec.deepest_stage and n < 2:
        _fail(spec, "deepest_stage", "the teacher has a single level, which cannot be removed")
    layers = _per_block(t["layers_per_block"], n)
    down, up = _levels(n, spec)
    drop = spec.drop_attention
    if len(set(drop)) != len(drop) or not all(isinstance(i, int) and i in down for i in drop):
        _fail(spec, "drop_attention", f"expected distinct levels the student keeps, in 0..{len(down) - 1}, "
                                      f"got {list(drop)}")
    for i in drop:
        if not _has_attention(t, i):
            _fail(spec, "drop_attention", f"teacher level {i} (down_blocks.{i}, up_blocks.{n - 1 - i}) has no "
                                          f"attention to drop")
    for i in down:
        _check_indices(spec, "keep_down", i, spec.keep_down[i], layers[i], f"teacher down_blocks.{i}")
    for j in up:
        level, kept = n - 1 - j, spec.keep_up[j]
        count = layers[level] + 1
        _check_indices(spec, "keep_up", j, kept, count, f"teacher up_blocks.{j}")
        if kept[-1] != count - 1:
            _fail(spec, "keep_up", f"entry {j}: must keep index {count - 1}, the last resnet of teacher up_blocks.{j}, "
                                   f"which takes the skip from the next-higher-resolution level")
        if len(kept) != len(spec.keep_down[level]) + 1:
            _fail(spec, "keep_up", f"entry {j}: expected {len(spec.keep_down[level]) + 1} indices (an up block has one "
                                   f"resnet more than keep_down[{level}], which has {len(spec.keep_down[level])}), "
                                   f"got {len(kept)}")
    if not spec.mid_attention and (not spec.mid_block or t["mid_block_type"] not in MID_TYPES):
        _fail(spec, "mid_attention", f"false replaces the mid block by one resnet, but the student keeps no "
                                     f"{' or '.join(MID_TYPES)} (teacher mid_block_type {t['mid_block_type']}, "
                                     f"mid_block {str(spec.mid_block).lower()})")
    _check_depth_lists(t, spec)


def _has_attention(t: dict, level: int) -> bool:
    n = len(t["down_block_types"])
    return any(b.startswith("CrossAttn") for b in (t["down_block_types"][level], t["up_block_types"][n - 1 - level]))


def _attends(t: dict, spec: RemovalSpec, kind: str, block: int) -> bool:
    """Whether teacher `kind` block `block` has attention that the student keeps."""
    n = len(t["down_block_types"])
    level = block if kind == "down" else n - 1 - block
    return t[f"{kind}_block_types"][block].startswith("CrossAttn") and level not in spec.drop_attention


def _select(entry, kept: tuple[int, ...]):
    """A per-layer list (SDXL-style transformer depths) follows the kept layers; a scalar stays."""
    return [entry[k] for k in kept] if isinstance(entry, list) else entry


def _depths(t: dict, spec: RemovalSpec, kind: str, blocks: range, teacher: list) -> list:
    """The student's depth entries of its `kind` blocks: the spec's where it sets them for a block with
    attention, else the teacher's for the kept layers."""
    given = getattr(spec, "transformer_layers_per_block" if kind == "down" else "reverse_transformer_layers_per_block")
    keep = spec.keep_down if kind == "down" else spec.keep_up
    return [_select(teacher[b], keep[b]) if given is None or not _attends(t, spec, kind, b)
            else list(given[b]) if isinstance(given[b], tuple) else given[b] for b in blocks]


def _derive(t: dict, spec: RemovalSpec) -> dict:
    n = len(t["down_block_types"])
    down, up = _levels(n, spec)
    s = json.loads(json.dumps(t))
    s["down_block_types"] = [t["down_block_types"][i] if i not in spec.drop_attention else "DownBlock2D"
                             for i in down]
    s["up_block_types"] = [t["up_block_types"][j] if n - 1 - j not in spec.drop_attention else "UpBlock2D"
                           for j in up]
    s["block_out_channels"] = [t["block_out_channels"][i] for i in down]
    for key in PER_LEVEL_KEYS:
        if isinstance(t[key], list):
            s[key] = [t[key][i] for i in down]
    layers = [len(spec.keep_down[i]) for i in down]
    s["layers_per_block"] = layers[0] if len(set(layers)) == 1 else layers
    depths = _per_block(t["transformer_layers_per_block"], n)
    if isinstance(t["transformer_layers_per_block"], list) or spec.transformer_layers_per_block is not None:
        s["transformer_layers_per_block"] = _depths(t, spec, "down", down, depths)
    reverse = t["reverse_transformer_layers_per_block"]
    if reverse is not None or spec.reverse_transformer_layers_per_block is not None:
        # A teacher without the list has diffusers' derived one: its down depths per level, reversed.
        s["reverse_transformer_layers_per_block"] = _depths(t, spec, "up", up, reverse or depths[::-1])
    if not spec.mid_block:
        s["mid_block_type"] = None
    elif not spec.mid_attention:
        s["mid_block_type"] = "UNetMidBlock2D"
    return s


def _resnet_channels(c: dict) -> dict[str, tuple[int, int]]:
    """(input channels incl. skip, output channels) of every resnet and of the mid block, from a config."""
    out = c["block_out_channels"]
    n = len(out)
    layers = _per_block(c["layers_per_block"], n)
    io = {}
    for i in range(n):
        for k in range(layers[i]):
            io[f"down_blocks.{i}.resnets.{k}"] = (out[max(i - 1, 0)] if k == 0 else out[i], out[i])
    rev, rev_layers = out[::-1], layers[::-1]
    for j in range(n):
        prev, skip, count = rev[max(j - 1, 0)], rev[min(j + 1, n - 1)], rev_layers[j] + 1
        for k in range(count):
            main = prev if k == 0 else rev[j]
            io[f"up_blocks.{j}.resnets.{k}"] = (main + (skip if k == count - 1 else rev[j]), rev[j])
    if c["mid_block_type"]:
        io["mid_block"] = (out[-1], out[-1])
    return io


def _check_channels(t: dict, s: dict, spec: RemovalSpec) -> None:
    """Each mapped student resnet must take the same channels as its teacher source, or no weight fits."""
    io_t, io_s = _resnet_channels(t), _resnet_channels(s)
    for student, teacher in _block_map(t, spec).items():
        if student in io_s and io_s[student] != io_t[teacher]:
            key = "keep_up" if student.startswith("up") else "keep_down"
            _fail(spec, key, f"student {student} takes {io_s[student][0]} input channels but its source, teacher "
                             f"{teacher}, takes {io_t[teacher][0]} (keep index 0 where a block changes channels)")


@functools.lru_cache(maxsize=16)
def _attention_depths(config_json: str) -> tuple[tuple[str, int], ...]:
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(json.loads(config_json))
    return tuple((name, len(m.transformer_blocks)) for name, m in model.named_modules()
                 if isinstance(m, Transformer2DModel))


def attention_depths(config: Mapping) -> dict[str, int]:
    """Transformer layers of every attention module of a (normalized) U-Net config, as diffusers builds it."""
    return dict(_attention_depths(json.dumps(config, sort_keys=True)))


def _check_depths(t: dict, s: dict, spec: RemovalSpec) -> None:
    """No student attention is deeper than its teacher source: each of its layers needs a teacher layer."""
    mapping, teacher = _block_map(t, spec), attention_depths(t)
    for name, depth in attention_depths(s).items():
        source = _source_key(name, mapping)
        if depth > teacher[source]:
            key = "reverse_transformer_layers_per_block" if name.startswith("up") else "transformer_layers_per_block"
            why = (" (a mid block takes the depth of the deepest down level's first attention, as diffusers builds "
                   "it)" if name.startswith("mid") else "")
            _fail(spec, key, f"student {name} would have {depth} transformer layers, more than its source, teacher "
                             f"{source}, has ({teacher[source]}){why}")


def student_unet_config(teacher_config: Mapping, spec: RemovalSpec) -> dict:
    """The student's complete `UNet2DConditionModel` config; every other setting inherited from the teacher."""
    t = normalized(teacher_config)
    _check_spec(t, spec)
    s = _derive(t, spec)
    _check_channels(t, s, spec)
    _check_depths(t, s, spec)
    return s


def count_params(unet_config: Mapping) -> int:
    """Parameters of a U-Net config, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(dict(unet_config))
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Weight map


def _block_map(t: dict, spec: RemovalSpec) -> dict[str, str]:
    """Student block module -> teacher block module: resnets/attentions by kept index, samplers, mid."""
    n = len(t["down_block_types"])
    down, up = _levels(n, spec)
    last = len(down) - 1
    m = {}
    for i in down:  # down blocks keep their index
        attn = _attends(t, spec, "down", i)
        for p, k in enumerate(spec.keep_down[i]):
            m[f"down_blocks.{i}.resnets.{p}"] = f"down_blocks.{i}.resnets.{k}"
            if attn:
                m[f"down_blocks.{i}.attentions.{p}"] = f"down_blocks.{i}.attentions.{k}"
        if i < last:  # the student's final down block has no downsampler
            m[f"down_blocks.{i}.downsamplers"] = f"down_blocks.{i}.downsamplers"
    if spec.mid_block and t["mid_block_type"]:
        m.update({"mid_block": "mid_block"} if spec.mid_attention else {"mid_block.resnets.0": "mid_block.resnets.0"})
    for js, j in enumerate(up):
        attn = _attends(t, spec, "up", j)
        for p, k in enumerate(spec.keep_up[j]):
            m[f"up_blocks.{js}.resnets.{p}"] = f"up_blocks.{j}.resnets.{k}"
            if attn:
                m[f"up_blocks.{js}.attentions.{p}"] = f"up_blocks.{j}.attentions.{k}"
        if js < last:
            m[f"up_blocks.{js}.upsamplers"] = f"up_blocks.{j}.upsamplers"
    return m


def _layers(rule, depth: int, teacher_depth: int) -> list[int]:
    if rule == "first":
        return list(range(depth))
    # even: first and last included; the spacing is >= 1, so rounding keeps the indices distinct.
    return [round(p * (teacher_depth - 1) / (depth - 1)) for p in range(depth)] if depth > 1 else [0]


def layer_sources(teacher_config: Mapping, spec: RemovalSpec) -> dict[str, tuple[str, list[int]]]:
    """Student attention shallower than its teacher source -> (that source, the teacher layers seeding its
    layers in order), by `spec.layer_init`; an explicit one must name each such attention with a fitting list."""
    t = normalized(teacher_config)
    s = student_unet_config(t, spec)
    mapping, teacher, student = _block_map(t, spec), attention_depths(t), attention_depths(s)
    explicit = {} if isinstance(spec.layer_init, str) else {k: list(v) for k, v in spec.layer_init}
    unknown = [name for name in explicit if name not in student]
    if unknown:
        raise ConfigError(f"config key 'student.layer_init': '{unknown[0]}' is not an attention of the student "
                          f"(its attentions: {_listed(list(student))})")
    sources, missing = {}, []
    for name, depth in student.items():
        source = _source_key(name, mapping)
        full = teacher[source]
        layers = explicit.get(name)
        if layers is None and explicit and depth < full:
            missing.append(f"{name} ({depth} of {full})")
        elif layers is not None and (len(layers) != depth or layers != sorted(set(layers)) or layers[0] < 0
                                         or layers[-1] >= full):
            raise ConfigError(f"config key 'student.layer_init': {name} has {depth} transformer layers, seeded from "
                              f"teacher {source}'s {full}: expected {depth} sorted distinct indices in 0..{full - 1}, "
                              f"got {layers}")
        elif depth < full:
            sources[name] = (source, layers or _layers(spec.layer_init, depth, full))
    if missing:
        raise ConfigError(f"config key 'student.layer_init': an explicit list names every student attention shallower "
                          f"than its teacher source; missing {_listed(missing)}")
    return sources


def weight_map(teacher_config: Mapping, spec: RemovalSpec) -> dict[str, str]:
    """Student module prefix -> teacher module prefix, covering every student weight.

    Modules outside the blocks (conv_in, time embedding, conv_norm_out, conv_out, ...) map to
    themselves; they are listed from the student's own state dict, so optional embeddings are included.
    Each layer of a shallower attention maps to the teacher layer `layer_sources` chooses.
    """
    t = normalized(teacher_config)
    with torch.device("meta"):
        skeleton = UNet2DConditionModel.from_config(student_unet_config(t, spec))
    tops = list(dict.fromkeys(key.split(".")[0] for key in skeleton.state_dict()))
    first_block = min(tops.index(b) for b in BLOCK_LISTS if b in tops)
    outside = [name for name in tops if name not in BLOCK_LISTS]
    stem = [name for name in outside if tops.index(name) < first_block]
    head = [name for name in outside if name not in stem]
    layers = {f"{name}.transformer_blocks.{p}": f"{source}.transformer_blocks.{k}"
              for name, (source, kept) in layer_sources(t, spec).items() for p, k in enumerate(kept)}
    return {**{k: k for k in stem}, **_block_map(t, spec), **layers, **{k: k for k in head}}


def module_sources(teacher_config: Mapping, spec: RemovalSpec, kinds: tuple[type, ...]) -> dict[str, str]:
    """Student module -> the teacher module its weights were copied from (through `weight_map`), for every
    student module of one of `kinds`, in the student's module order."""
    t = normalized(teacher_config)
    mapping = weight_map(t, spec)
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(student_unet_config(t, spec))
    return {name: _source_key(name, mapping) for name, module in student.named_modules() if isinstance(module, kinds)}


def _prefixes(keys) -> set[str]:
    """The names of the modules holding these state-dict keys, and of every module above them."""
    return {".".join(parts[:cut]) for parts in (k.split(".") for k in keys) for cut in range(1, len(parts))}


def removed_modules(teacher_config: Mapping, spec: RemovalSpec) -> list[str]:
    """Teacher modules no student weight is copied from, each named once at the largest such module (a
    resnet, attention or transformer layer by its index)."""
    t = normalized(teacher_config)
    mapping = weight_map(t, spec)
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(t)
        student = UNet2DConditionModel.from_config(student_unet_config(t, spec))
    used = _prefixes(_source_key(key, mapping) for key in student.state_dict())
    held = _prefixes(teacher.state_dict())
    removed = []
    for name, module in teacher.named_modules():
        parent, _, last = name.rpartition(".")
        if name not in held or name in used or (parent and parent not in used):
            continue  # no weights, copied from, or inside a removed module
        removed += [f"{name}.{c}" for c, _ in module.named_children()] if last in UNIT_LISTS else [name]
    return removed


def _source_key(key: str, mapping: Mapping[str, str]) -> str | None:
    """Teacher state-dict key (or module) of a student key (or module), through the longest matching prefix."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in mapping:
            return mapping[prefix] + key[len(prefix):]
    return None


def _listed(items: list[str], limit: int = 10) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def build_student(teacher_unet: UNet2DConditionModel, spec: RemovalSpec,
                  share: bool = False) -> UNet2DConditionModel:
    """A new student U-Net, every weight copied from the teacher through `weight_map`; `share`: the teacher's own
    tensors, not copies (benchmarks hold several students in their teacher's memory; never train one)."""
    config = student_unet_config(teacher_unet.config, spec)
    mapping = weight_map(teacher_unet.config, spec)
    # Built on meta, then given the copied tensors: no time spent on a random init that is overwritten.
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(config)
    teacher_state = teacher_unet.state_dict()
    state, missing, mismatched = {}, [], []
    for key, empty in student.state_dict().items():
        source = _source_key(key, mapping)
        if source not in teacher_state:
            missing.append(f"{key} <- {source}")
        elif teacher_state[source].shape != empty.shape:
            mismatched.append(f"{key} {tuple(empty.shape)} <- {source} {tuple(teacher_state[source].shape)}")
        else:
            state[key] = teacher_state[source] if share else teacher_state[source].clone()
    if missing or mismatched:
        raise ConfigError(f"weight copy from the teacher failed: {len(missing)} student keys have no teacher source "
                          f"({_listed(missing)}); {len(mismatched)} differ in shape ({_listed(mismatched)})")
    # assign=True takes dtype and device from the teacher's tensors; requires_grad stays the student's.
    student.load_state_dict(state, strict=True, assign=True)
    on_meta = [name for name, t in [*student.named_parameters(), *student.named_buffers()] if t.is_meta]
    assert not on_meta, f"student tensors left uninitialised: {_listed(on_meta)}"
    return student


# ---------------------------------------------------------------------------------------------
# Report


def describe(teacher_config: Mapping, student: StudentConfig) -> dict:
    """Everything train/show_student.py reports about a student of a teacher config, as plain data."""
    from sdkd.train.models.features import check_pairs, feature_pairs  # here: features imports this module

    spec = removal_spec(student)
    config = student_unet_config(teacher_config, spec)
    pairs = feature_pairs(student, spec, teacher_config)
    size = config["sample_size"] or 64  # SD-1.x/2.x configs always set it; 64 is their 512-px latent
    latent_hw = tuple(size) if isinstance(size, list) else (size, size)
    shapes = check_pairs(teacher_config, config, pairs, latent_hw)
    return dict(
        preset=student.preset,
        spec={k: v for k, v in asdict(spec).items() if k != "name"},
        teacher_params=count_params(teacher_config),
        student_params=count_params(config),
        removed=removed_modules(teacher_config, spec),
        weight_map=weight_map(teacher_config, spec),
        layer_init=student.layer_init,
        layer_sources={name: dict(teacher=source, layers=layers)
                       for name, (source, layers) in layer_sources(teacher_config, spec).items()},
        feature_table=student.feature_pairs,
        latent_hw=list(latent_hw),
        feature_pairs=[dict(teacher=t, student=s, shape=list(shape)) for (t, s), (shape, _) in zip(pairs, shapes)],
        student_config=config,
    )
