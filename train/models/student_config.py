"""The `student` section: which blocks a block-removed student keeps of its teacher's U-Net (students.py
builds it) and, for feature KD, which of their outputs are paired (features.py).

Nothing heavy is imported here: config loading and --help stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import auto
from typing import Any, Optional

from sdkd.cli.errors import require
from sdkd.data.sources.config import Choice, Section, expected_one_of


class StudentPreset(Choice):
    """train/models/students.py's PRESETS (a test keeps them equal: that module imports diffusers), or custom."""

    bk_base = auto()
    bk_small = auto()
    bk_tiny = auto()
    sdxs = auto()
    ssd1b = auto()
    vega = auto()
    koala_1b = auto()
    koala_700m = auto()
    custom = auto()


class FeaturePairs(Choice):
    bk = auto()
    segmind = auto()
    sub_block = auto()
    custom = auto()


def _index(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _depth_entry(entry) -> bool:
    return _index(entry, 1) or (isinstance(entry, list) and all(_index(d, 1) for d in entry))


@dataclass
class BlockRemovalConfig(Section):
    """How a student's U-Net is cut from its teacher's: a preset, or `custom` with its keep_* fields."""

    preset: StudentPreset = StudentPreset.bk_small
    """Block-removal preset (bk_base, bk_small, bk_tiny, sdxs: SD-1.x/2.x teachers; ssd1b, vega, koala_1b,
    koala_700m: SDXL teachers); custom: set keep_down/keep_up instead."""
    keep_down: Optional[list[list[int]]] = None
    """custom: per teacher down block, the resnet (and attention) indices the student keeps."""
    keep_up: Optional[list[list[int]]] = None
    """custom: per teacher up block, the resnet (and attention) indices kept; the last one must be kept."""
    mid_block: bool = True
    """custom: keep the mid block."""
    deepest_stage: bool = True
    """custom: keep the deepest down block and its matching up block."""
    drop_attention: list[int] = field(default_factory=list)
    """custom: teacher levels (0 = highest resolution) where the student has no attention (sdxs: [0])."""
    mid_attention: bool = True
    """custom: false replaces the kept mid block by one resnet (diffusers' UNetMidBlock2D, as in SSD-1B and
    Vega), copied from the teacher's first mid resnet."""
    transformer_layers_per_block: Optional[list[Any]] = None
    """custom: per teacher down block, the transformer depth of each kept attention: a depth for all, or a list
    with one per kept index (entries of blocks without attention are ignored); null: the teacher's. The
    deepest entry also sets the mid block's depth, as diffusers builds it."""
    reverse_transformer_layers_per_block: Optional[list[Any]] = None
    """custom: the same per teacher up block; null: the teacher's, or, for a teacher that lists none, each up
    block at its level's depth in transformer_layers_per_block (diffusers' rule)."""
    layer_init: Any = "first"
    """Which teacher transformer layers seed a student attention shallower than its teacher source: first (the
    first k), even (k evenly spaced, first and last included), or {student attention: [teacher layer
    indices]} naming every shallower attention (train/show_student.py lists them)."""

    def check(self, at: str) -> None:
        super().check(at)
        # A section built in code (train/show_student.py) has not been through the schema's types.
        require(self.preset in StudentPreset.__members__, f"{at}.preset",
                expected_one_of(StudentPreset.__members__, self.preset))
        # Whether an explicit list fits is checked against the teacher (train/models/students.py).
        explicit = isinstance(self.layer_init, dict) and bool(self.layer_init) and all(
            isinstance(name, str) and isinstance(layers, list) and layers and all(_index(i, 0) for i in layers)
            for name, layers in self.layer_init.items())
        require(self.layer_init in ("first", "even") or explicit, f"{at}.layer_init",
                f"expected first, even, or {{student attention: [teacher layer indices >= 0]}}, "
                f"got {self.layer_init!r}")
        depths = ("transformer_layers_per_block", "reverse_transformer_layers_per_block")
        if self.preset == StudentPreset.custom:
            require(self.keep_down is not None and self.keep_up is not None, f"{at}.keep_down",
                    f"{at}.keep_down and {at}.keep_up are required when {at}.preset=custom")
            require(self.mid_block or self.mid_attention, f"{at}.mid_attention",
                    f"false replaces the mid block by one resnet, but {at}.mid_block=false removes it")
            for key in depths:
                value = getattr(self, key)
                require(value is None or (isinstance(value, list) and all(map(_depth_entry, value))),
                        f"{at}.{key}",
                        f"expected one entry per teacher block, each a depth >= 1 or a list of them, got {value}")
            return
        require(self.keep_down is None and self.keep_up is None and self.mid_block and self.deepest_stage
                and not self.drop_attention, f"{at}.preset",
                f"keep_down, keep_up, mid_block, deepest_stage and drop_attention apply only to "
                f"{at}.preset=custom; '{self.preset}' sets them itself")
        require(self.mid_attention and all(getattr(self, k) is None for k in depths), f"{at}.preset",
                f"mid_attention, transformer_layers_per_block and reverse_transformer_layers_per_block apply only "
                f"to {at}.preset=custom; '{self.preset}' sets them itself")


@dataclass
class StudentConfig(BlockRemovalConfig):
    """A block-removed student and the feature pairs of its KD."""

    feature_pairs: FeaturePairs = FeaturePairs.bk
    """Feature-KD pairs: bk (BK-SDM's block outputs), segmind (segmind's block outputs, the mid block
    included), sub_block (every student resnet and attention output with the teacher module it was copied
    from, as SSD-1B did: 26 pairs for ssd1b and vega), or custom (then set pairs)."""
    pairs: Optional[list[list[str]]] = None
    """custom: [teacher_module, student_module] names; checked by shape at start-up."""

    def check(self, at: str) -> None:
        super().check(at)
        require((self.feature_pairs == FeaturePairs.custom) == (self.pairs is not None), f"{at}.pairs",
                f"give {at}.pairs exactly when {at}.feature_pairs=custom")
        require(self.pairs is None or all(len(p) == 2 for p in self.pairs), f"{at}.pairs",
                "each pair is [teacher_module, student_module]")
