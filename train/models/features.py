"""Feature-KD pairs (which teacher module's output a student module imitates) and forward hooks.

Pair tables (teacher name, student name), derived from the removal spec by one rule:
- down blocks: student down_blocks.i <-> teacher down_blocks.i while both end at the same
  resolution. When the deepest stage is gone, the student's last down block loses its
  downsampler, so it ends one level higher than the teacher's block. `bk` (BK-SDM) then pairs the
  last attention's `proj_out` inside that block (its last resnet where the student drops the
  attention of that level); `segmind` pairs it with the teacher's `up_blocks.0`, which ends at
  that resolution.
- mid block: `segmind` only (BK-SDM never hooks it, not even for bk_base), when kept at its
  teacher resolution (deepest stage kept).
- up blocks: student up_blocks.j <-> teacher up_blocks.j (+1 without the deepest stage).
This gives BK-SDM's 8 pairs (bk_base, bk_small) and 6 (bk_tiny), segmind's 9 (sd_small = bk_base)
and 6 (sd_tiny = bk_tiny), and the same pairs for a custom spec equal to a preset. `sdxs` gets
bk_tiny's pairs: dropping the 320-channel attention changes no block output shape, so every
student down and up block is still paired (SDXS's feature KD on every Dn and Up block output).
The SDXL presets keep the deepest stage: 3 down and 3 up pairs, and with segmind the mid block where
kept (SSD-1B's and Vega's one resnet imitating the teacher's whole mid block, as SSD-1B did).
`student.feature_pairs: sub_block` pairs every student resnet and attention (Transformer2DModel) output with
the teacher module its weights were copied from (students.py's weight map), as SSD-1B did (losses-and-recipes.md,
block-removal.md section 4.3): an attention whose depth was cut still pairs its whole output with the teacher's.
A student mid block cut to one resnet pairs it with the teacher's whole mid block, whose place it takes before
the up blocks (SSD-1B's 26th pair); samplers are not paired. ssd1b and vega get SSD-1B's 26 pairs.
`student.feature_pairs: custom` takes `student.pairs` verbatim; `check_pairs` verifies shapes.

The proj_out pair assumes a cross-attention block there (SD-1.x/2.x). A hook inside an attention
gets a differentiable tensor under diffusers' non-reentrant checkpointing (tested), not under
reentrant checkpointing (losses-and-recipes.md hazard 7).

Hooks go on the unwrapped model (before DDP), once, and record only inside `capture()`, so the
recomputation that gradient checkpointing runs during backward neither overwrites nor keeps tensors.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from diffusers import Transformer2DModel, UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from sdkd.cli.errors import ConfigError
from sdkd.train.models.families import random_conditioning
from sdkd.train.models.student_config import StudentConfig
from sdkd.train.models.students import RemovalSpec, module_sources

Pair = tuple[str, str]
SUB_BLOCKS = (ResnetBlock2D, Transformer2DModel)


# ---------------------------------------------------------------------------------------------
# Pair tables


def _final_down_pair(table: str, spec: RemovalSpec, level: int) -> Pair:
    """Pair for the student's last down block when it no longer downsamples (deepest stage removed)."""
    if table == "segmind":
        return "up_blocks.0", f"down_blocks.{level}"
    # The teacher's up block for this level keeps its last resnet (index = teacher layers there), so
    # the teacher's last attention in the down block has index keep_up[1][-1] - 1.
    teacher_last = spec.keep_up[1][-1] - 1
    student_last = len(spec.keep_down[level]) - 1
    if level in spec.drop_attention:  # no student attention there: the last resnets, same shape
        return f"down_blocks.{level}.resnets.{teacher_last}", f"down_blocks.{level}.resnets.{student_last}"
    return (f"down_blocks.{level}.attentions.{teacher_last}.proj_out",
            f"down_blocks.{level}.attentions.{student_last}.proj_out")


def _sub_block_pairs(spec: RemovalSpec, teacher_config: Mapping) -> list[Pair]:
    sources = module_sources(teacher_config, spec, SUB_BLOCKS)
    if spec.mid_block and not spec.mid_attention:
        sources["mid_block.resnets.0"] = "mid_block"
    return [(teacher, student) for student, teacher in sources.items()]


def feature_pairs(student_cfg: StudentConfig, spec: RemovalSpec, teacher_config: Mapping | None = None) -> list[Pair]:
    """(teacher module, student module) names for `student.feature_pairs` (bk, segmind, sub_block or custom);
    sub_block needs the teacher's U-Net config (the block tables follow from the spec alone)."""
    table = student_cfg.feature_pairs
    if table == "custom":
        if not student_cfg.pairs:
            raise ConfigError("config key 'student.pairs': required when student.feature_pairs=custom")
        return [(str(t), str(s)) for t, s in student_cfg.pairs]
    if table == "sub_block":
        if teacher_config is None:
            raise TypeError("feature_pairs: student.feature_pairs=sub_block needs the teacher's U-Net config")
        return _sub_block_pairs(spec, teacher_config)
    if table not in ("bk", "segmind"):
        raise ConfigError(f"config key 'student.feature_pairs': expected bk, segmind, sub_block or custom, "
                          f"got '{table}'")
    shift = 0 if spec.deepest_stage else 1  # teacher up index - student up index
    levels = len(spec.keep_down) - shift
    pairs = [(f"down_blocks.{i}",) * 2 for i in range(levels - shift)]
    if not spec.deepest_stage:
        pairs.append(_final_down_pair(table, spec, levels - 1))
    if table == "segmind" and spec.mid_block and spec.deepest_stage:
        pairs.append(("mid_block", "mid_block"))
    pairs += [(f"up_blocks.{j + shift}", f"up_blocks.{j}") for j in range(levels)]
    return pairs


# ---------------------------------------------------------------------------------------------
# Hooks


def _block_names(modules: Mapping[str, nn.Module]) -> list[str]:
    blocks = [n for n in modules if re.fullmatch(r"(down|up)_blocks\.\d+|mid_block", n)]
    return blocks or [n for n in modules if n and "." not in n]


class FeatureHooks:
    """Forward hooks recording the outputs of named modules while `capture()` is active.

        hooks = FeatureHooks(unet, ["down_blocks.0", "up_blocks.3"])
        with hooks.capture():
            unet(...)
        feats = hooks.features  # in `names` order, kept until the next capture()

    A module's first output in a capture is kept (tuple outputs -> element 0); later calls, such as
    the recomputation in backward under gradient checkpointing, are ignored. No casting here.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            # Under a wrapper every name gains a `module.` prefix (BK-SDM's DDP bug); hook the inner model.
            raise TypeError("FeatureHooks needs the unwrapped model (e.g. accelerator.unwrap_model(model))")
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ConfigError(f"feature pair module '{unknown[0]}' does not exist in the {type(model).__name__} "
                              f"(its blocks: {', '.join(_block_names(modules)[:12])})")
        self.names = list(names)
        self._captured: dict[str, torch.Tensor] | None = None
        self._active = False
        self._handles = [modules[n].register_forward_hook(self._recorder(n)) for n in dict.fromkeys(self.names)]

    def _recorder(self, name: str):
        def hook(module, args, output):
            if self._active and name not in self._captured:
                self._captured[name] = output[0] if isinstance(output, tuple) else output
        return hook

    @contextmanager
    def capture(self) -> Iterator[None]:
        if self._active:
            raise RuntimeError("FeatureHooks.capture() is already active")
        self._captured, self._active = {}, True
        try:
            yield
        finally:
            self._active = False

    @property
    def features(self) -> list[torch.Tensor]:
        """The captured outputs of the last `capture()`, in `names` order."""
        if self._captured is None:
            raise RuntimeError("no features captured: run the model inside `with hooks.capture():`")
        silent = [n for n in dict.fromkeys(self.names) if n not in self._captured]
        if silent:
            raise RuntimeError(f"hooked module(s) did not run during capture(): {', '.join(silent)} "
                               f"(was the hooked model itself called inside the capture block?)")
        return [self._captured[n] for n in self.names]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---------------------------------------------------------------------------------------------
# Start-up shape check


def _config_of(model_or_config) -> dict:
    return dict(model_or_config.config if hasattr(model_or_config, "config") else model_or_config)


def _meta_inputs(config: dict, hw: tuple[int, int]) -> tuple[tuple, dict]:
    """Batch-1 dummy U-Net inputs on the meta device, the conditioning as its config asks for
    (train/models/families.py)."""
    meta = dict(device="meta")
    args = (torch.empty(1, config.get("in_channels", 4), *hw, **meta), torch.zeros(1, **meta))
    return args, random_conditioning(config, 1, device="meta").unet_kwargs()


def _feature_shapes(role: str, model_or_config, names: list[str], hw: tuple[int, int]) -> list[torch.Size]:
    """Output shapes (batch dim dropped) of the named modules, from a forward on the meta device."""
    config = _config_of(model_or_config)
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    try:
        hooks = FeatureHooks(model, names)
    except ConfigError as err:
        raise ConfigError(f"{role} {err}") from None
    args, kwargs = _meta_inputs(config, hw)
    with torch.no_grad(), hooks.capture():
        model(*args, **kwargs)
    return [f.shape[1:] for f in hooks.features]


def check_pairs(teacher, student, pairs: Sequence[Pair], latent_hw: int | tuple[int, int]
                ) -> list[tuple[torch.Size, torch.Size]]:
    """Check that every pair's teacher and student outputs have the same shape; returns the shapes.

    `teacher` / `student` are U-Nets or their configs. The forward runs on meta copies built from the
    configs: no compute and no memory even at full size, so `latent_hw` is the real latent size.
    """
    if not pairs:
        return []
    hw = (latent_hw, latent_hw) if isinstance(latent_hw, int) else tuple(latent_hw)
    teacher_shapes = _feature_shapes("teacher", teacher, [t for t, _ in pairs], hw)
    student_shapes = _feature_shapes("student", student, [s for _, s in pairs], hw)
    for i, ((t, s), ts, ss) in enumerate(zip(pairs, teacher_shapes, student_shapes), 1):
        if ts != ss:
            raise ConfigError(f"feature pair {i} (teacher {t} -> student {s}): "
                              f"shapes {tuple(ts)} vs {tuple(ss)} differ")
    return list(zip(teacher_shapes, student_shapes))
