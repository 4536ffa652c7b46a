"""Preprocessing: image augmentation without torchvision (resize, square or bucket crop, flip, to [-1, 1]),
caption choice and dropout, and the checks that reject a bad sample.

Reproduces the diffusers/BK-SDM pipeline `Resize(R, interpolation) -> CenterCrop(R) | RandomCrop(R)
-> RandomHorizontalFlip -> ToTensor -> Normalize([0.5], [0.5])` with PIL and numpy; with size buckets
(`buckets`), the crop is the bucket of nearest aspect ratio, the image resized to cover it. Randomness
comes only from the `numpy.random.Generator` passed with each image, so a sample is a pure
function of (image, generator seed): reproducible across workers, restarts and resumes.

`Preprocess` turns one decoded image and its caption fields into a training sample; every source
calls it, so all sources share the same augmentation, caption rules and skip rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from sdkd.data.sources.config import Interpolation

INTERPOLATIONS = tuple(Interpolation.__members__)


class Augmented(NamedTuple):
    pixel_values: torch.Tensor
    """float32 [3, H, W] in [-1, 1]: [3, R, R], or the bucket's size."""
    original_size: tuple[int, int]
    """(height, width) of the image before resizing (SDXL's size conditioning)."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized, possibly flipped image (SDXL's crop conditioning)."""
    target_size: tuple[int, int]
    """(height, width) of `pixel_values` (SDXL's target size conditioning)."""


def nearest_bucket(buckets: tuple[tuple[int, int], ...], height: int, width: int) -> int:
    """Index of the (height, width) bucket whose aspect ratio is nearest the image's, by log ratio (a 2:1
    and a 1:2 image are equally far from square); ties go to the earlier bucket."""
    aspect = np.log(height / width)
    return int(np.argmin([abs(np.log(h / w) - aspect) for h, w in buckets]))


@dataclass(frozen=True)
class ImageTransform:
    resolution: int
    """Side of the square output; the shorter side is resized to it first."""
    center_crop: bool = True
    """Center crop; false takes a random crop."""
    random_flip: bool = True
    """Flip horizontally with probability 0.5."""
    interpolation: str = "bilinear"
    """Resampling filter of the resize, one of `INTERPOLATIONS`."""
    buckets: tuple[tuple[int, int], ...] = ()
    """(height, width) output sizes; each image takes the one of nearest aspect ratio. (): R x R."""

    def __post_init__(self) -> None:
        if self.resolution <= 0:
            raise ValueError(f"resolution must be > 0, got {self.resolution}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got '{self.interpolation}'")

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is cropped to."""
        if not self.buckets:
            return self.resolution, self.resolution
        return self.buckets[nearest_bucket(self.buckets, height, width)]

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Augmented:
        original_size = (image.height, image.width)
        size = self.size_for(*original_size)
        image = resize_to_cover(image.convert("RGB"), size, self.interpolation)
        # Flip before cropping, as diffusers' SDXL script does: the crop offset then refers
        # to the image the model actually sees.
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top, left = self._crop_offset(image, size, rng)
        image = image.crop((left, top, left + size[1], top + size[0]))
        return Augmented(to_tensor(image), original_size, (top, left), size)

    def _crop_offset(self, image: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
        spare_h, spare_w = image.height - size[0], image.width - size[1]
        if self.center_crop:
            # torchvision's rounding, so crops match models trained with it.
            return int(round(spare_h / 2.0)), int(round(spare_w / 2.0))
        return int(rng.integers(0, spare_h + 1)), int(rng.integers(0, spare_w + 1))


def resize_shorter_side(image: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize so the shorter side is `size`, keeping the aspect ratio (torchvision's truncation)."""
    return resize_to_cover(image, (size, size), interpolation)


def resize_to_cover(image: Image.Image, size: tuple[int, int], interpolation: str = "bilinear") -> Image.Image:
    """Resize, keeping the aspect ratio, to the smallest size that covers (height, width) `size`: one side
    matches, the other is at least as long (torchvision's truncation)."""
    w, h = image.size
    if w * size[0] <= h * size[1]:  # relatively taller than the target: the widths match
        new_w, new_h = size[1], int(size[1] * h / w)
    else:
        new_w, new_h = int(size[0] * w / h), size[0]
    # PIL widens the kernel when shrinking, i.e. it antialiases (as torchvision's Resize on PIL images).
    return image.resize((new_w, new_h), Image.Resampling[interpolation.upper()])


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array)) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# Captions and the whole sample


class BadSample(Exception):
    """A sample that cannot be trained on (unreadable image, no caption, image too small).

    The message names the sample (file, row or shard key) and the reason. Sources turn it into a
    skip marker (`skip_marker`), `collate` drops and reports it, the trainer counts it.
    """


def skip_marker(err: BadSample) -> dict[str, Any]:
    """What a source yields in place of a bad sample."""
    return {"skip": str(err)}


def caption_candidates(fields: dict[str, Any], names: list[str], pick: str) -> list[str]:
    """The captions a sample may be given: `first`: those of the first field present, `random`: all
    fields' together. A field is present when it holds a string or a non-empty list of strings."""
    found = []
    for name in names:
        value = fields.get(name)
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        values = [v for v in values if isinstance(v, str)]
        if values:
            if pick == "first":
                return values
            found += values
    return found


def dropout_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Caption dropout's own stream, apart from augmentation draws, so a latent cache (which has no
    augmentation draws left to make) drops exactly the captions an uncached run drops."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index], spawn_key=(2,)))


@dataclass(frozen=True)
class Preprocess:
    """Decoded image + caption fields -> training sample, or `BadSample`."""

    transform: ImageTransform
    caption_fields: tuple[str, ...] = ("text",)
    """Field names searched for the caption, in order."""
    caption_pick: str = "first"
    """first or random (see `caption_candidates`)."""
    caption_dropout: float = 0.0
    """Probability of the empty prompt instead of the caption."""
    min_size: int = 0
    """Smallest allowed shorter side of the original image, in pixels."""

    def caption(self, fields: dict[str, Any], rng: np.random.Generator, name: str) -> str:
        """Choose the caption (raises `BadSample` when there is none); draws from `rng` only for a choice."""
        candidates = caption_candidates(fields, list(self.caption_fields), self.caption_pick)
        if not candidates:
            raise BadSample(f"{name}: no caption (fields {', '.join(self.caption_fields)})")
        return candidates[0] if len(candidates) == 1 else candidates[rng.integers(len(candidates))]

    def check_size(self, image: Image.Image, name: str) -> None:
        if min(image.size) < self.min_size:
            raise BadSample(f"{name}: image {image.width}x{image.height} is smaller than data.min_size={self.min_size}")

    def drop_caption(self, caption: str, drop_rng: np.random.Generator) -> str:
        if self.caption_dropout > 0 and drop_rng.random() < self.caption_dropout:
            return ""
        return caption

    def __call__(self, image: Image.Image, caption: str, rng: np.random.Generator,
                 drop_rng: np.random.Generator, name: str) -> dict[str, Any]:
        """`caption` comes from `self.caption` (drawn before the augmentation, from the same `rng`)."""
        self.check_size(image, name)
        pixel_values, original_size, crop_top_left, target_size = self.transform(image, rng)
        return {
            "pixel_values": pixel_values,
            "caption": self.drop_caption(caption, drop_rng),
            "original_size": original_size,
            "crop_top_left": crop_top_left,
            "target_size": target_size,
            "key": name,
        }
