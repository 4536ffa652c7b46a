"""Training-image augmentation without torchvision: resize, square crop, flip, to [-1, 1].

Reproduces the diffusers/BK-SDM pipeline `Resize(R, bilinear) -> CenterCrop(R) | RandomCrop(R)
-> RandomHorizontalFlip -> ToTensor -> Normalize([0.5], [0.5])` with PIL and numpy. Randomness
comes only from the `numpy.random.Generator` passed with each image, so a sample is a pure
function of (image, generator seed): reproducible across workers, restarts and resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image


class Augmented(NamedTuple):
    pixel_values: torch.Tensor
    """float32 [3, R, R] in [-1, 1]."""
    original_size: tuple[int, int]
    """(height, width) of the image before resizing (SDXL's size conditioning)."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized, possibly flipped image (SDXL's crop conditioning)."""


@dataclass(frozen=True)
class ImageTransform:
    resolution: int
    """Side of the square output; the shorter side is resized to it first."""
    center_crop: bool = True
    """Center crop; false takes a random crop."""
    random_flip: bool = True
    """Flip horizontally with probability 0.5."""

    def __post_init__(self) -> None:
        if self.resolution <= 0:
            raise ValueError(f"resolution must be > 0, got {self.resolution}")

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Augmented:
        original_size = (image.height, image.width)
        image = resize_shorter_side(image.convert("RGB"), self.resolution)
        # Flip before cropping, as diffusers' SDXL script does: the crop offset then refers
        # to the image the model actually sees.
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top, left = self._crop_offset(image, rng)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        return Augmented(to_tensor(image), original_size, (top, left))

    def _crop_offset(self, image: Image.Image, rng: np.random.Generator) -> tuple[int, int]:
        spare_h, spare_w = image.height - self.resolution, image.width - self.resolution
        if self.center_crop:
            # torchvision's rounding, so crops match models trained with it.
            return int(round(spare_h / 2.0)), int(round(spare_w / 2.0))
        return int(rng.integers(0, spare_h + 1)), int(rng.integers(0, spare_w + 1))


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, keeping the aspect ratio (torchvision's truncation)."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    # PIL widens the bilinear kernel when shrinking, i.e. it antialiases.
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array)) / 127.5 - 1.0
