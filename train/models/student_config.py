"""The `student` section: which blocks a block-removed student keeps of its teacher's U-Net (students.py
builds it) and, for feature KD, which of their outputs are paired (features.py).

Nothing heavy is imported here: config loading and --help stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import auto
from typing import Optional

from sdkd.cli.errors import require
from sdkd.data.sources.config import Choice, Section, expected_one_of


class StudentPreset(Choice):
    """train/models/students.py's PRESETS (a test keeps them equal: that module imports diffusers), or custom."""

    bk_base = auto()
    bk_small = auto()
    bk_tiny = auto()
    sdxs = auto()
    custom = auto()


class FeaturePairs(Choice):
    bk = auto()
    segmind = auto()
    custom = auto()


@dataclass
class BlockRemovalConfig(Section):
    """How a student's U-Net is cut from its teacher's: a preset, or `custom` with its keep_* fields."""

    preset: StudentPreset = StudentPreset.bk_small
    """Block-removal preset; custom: set keep_down/keep_up instead."""
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

    def check(self, at: str) -> None:
        super().check(at)
        # A section built in code (train/show_student.py) has not been through the schema's types.
        require(self.preset in StudentPreset.__members__, f"{at}.preset",
                expected_one_of(StudentPreset.__members__, self.preset))
        if self.preset == StudentPreset.custom:
            require(self.keep_down is not None and self.keep_up is not None, f"{at}.keep_down",
                    f"{at}.keep_down and {at}.keep_up are required when {at}.preset=custom")
            return
        require(self.keep_down is None and self.keep_up is None and self.mid_block and self.deepest_stage
                and not self.drop_attention, f"{at}.preset",
                f"keep_down, keep_up, mid_block, deepest_stage and drop_attention apply only to "
                f"{at}.preset=custom; '{self.preset}' sets them itself")


@dataclass
class StudentConfig(BlockRemovalConfig):
    """A block-removed student and the feature pairs of its KD."""

    feature_pairs: FeaturePairs = FeaturePairs.bk
    """Feature-KD pair table: bk (BK-SDM's), segmind (segmind's), or custom (then set pairs)."""
    pairs: Optional[list[list[str]]] = None
    """custom: [teacher_module, student_module] names; checked by shape at start-up."""

    def check(self, at: str) -> None:
        super().check(at)
        require((self.feature_pairs == FeaturePairs.custom) == (self.pairs is not None), f"{at}.pairs",
                f"give {at}.pairs exactly when {at}.feature_pairs=custom")
        require(self.pairs is None or all(len(p) == 2 for p in self.pairs), f"{at}.pairs",
                "each pair is [teacher_module, student_module]")
