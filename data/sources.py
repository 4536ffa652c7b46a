"""Captioned-image datasets, a registry of sources, and the batch collate function.

Every source is a map-style `Dataset` whose item `i` is
`{"pixel_values": [3, R, R] in [-1, 1], "caption": str, "original_size": (h, w), "crop_top_left": (top, left)}`.
All per-sample randomness (augmentation, caption choice) comes from
`np.random.default_rng([seed, epoch, index])`, so a resumed run that calls `set_epoch` sees
exactly the samples the interrupted one would have.

New sources register a builder `(DataConfig, seed) -> Dataset` with `@register_source("name")`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import Dataset

from sdkd.data.transforms import ImageTransform
from sdkd.train.config import DataConfig, UserError

# ---------------------------------------------------------------------------------------------
# Shared behaviour


class CaptionedImageDataset(Dataset):
    """Base class: subclasses give `__len__` and `load(index, rng) -> (image, caption)`."""

    def __init__(self, transform: ImageTransform, seed: int):
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation. DataLoader workers copy the dataset when an iterator
        starts, so call this before `iter(loader)` and do not use persistent workers."""
        self.epoch = epoch

    def load(self, index: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, caption = self.load(index, rng)
        pixel_values, original_size, crop_top_left = self.transform(image, rng)
        return {
            "pixel_values": pixel_values,
            "caption": caption,
            "original_size": original_size,
            "crop_top_left": crop_top_left,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> {"pixel_values": [B,3,R,R], "captions": list[str], "original_size" and
    "crop_top_left": LongTensor [B, 2]}."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------------
# Image folder: images + metadata.jsonl (the HF `imagefolder` layout)


class CorruptImageError(OSError):
    """An image file that exists but cannot be decoded; the message names the file."""


class ImageFolder(CaptionedImageDataset):
    """A folder with `metadata.jsonl` lines like `{"file_name": "0001.png", "text": "a caption"}`.

    The caption field may also hold a list of captions; one is drawn per sample and epoch.
    Layout mistakes (missing files, malformed lines, missing fields) raise `UserError` here, at
    start-up, naming the file and line.
    """

    def __init__(
        self,
        path: str | Path,
        transform: ImageTransform,
        seed: int = 0,
        image_column: str = "file_name",
        caption_column: str = "text",
    ):
        super().__init__(transform, seed)
        self.root = Path(path)
        self._records = _PackedJson(_read_metadata(self.root, image_column, caption_column))

    def __len__(self) -> int:
        return len(self._records)

    def load(self, index: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
        file_name, caption = self._records[index]
        if isinstance(caption, list):
            caption = caption[rng.integers(len(caption))]
        return open_image(self.root / file_name), caption


def _read_metadata(root: Path, image_column: str, caption_column: str) -> list[list]:
    """`metadata.jsonl` -> [[file_name, caption or captions], ...], checked line by line."""
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise UserError(f"{meta}: not found (an image folder needs metadata.jsonl)")
    try:
        lines = meta.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{meta}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            records.append(_parse_line(line, f"{meta}, line {number}", root, image_column, caption_column))
    if not records:
        raise UserError(f"{meta}: no samples")
    return records


def _parse_line(line: str, where: str, root: Path, image_column: str, caption_column: str) -> list:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for column, key in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
        if column not in row:
            raise UserError(f"{where}: no '{column}' field ({key}); fields are {sorted(row)}")
    file_name, caption = row[image_column], row[caption_column]
    if not isinstance(file_name, str) or not (root / file_name).is_file():
        raise UserError(f"{where}: image file not found: {root / str(file_name)}")
    if not _is_caption(caption):
        raise UserError(f"{where}: '{caption_column}' must be a string or a non-empty list of strings")
    return [file_name, caption]


def _is_caption(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) for v in value)
    return isinstance(value, str)


def open_image(path: Path) -> Image.Image:
    """Decode an image fully (closing the file), upright per its EXIF orientation."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except Exception as err:  # PIL raises many types; the caller needs the file name
        raise CorruptImageError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err


class _PackedJson:
    """A read-only list of JSON values stored as one byte buffer.

    A list of Python objects in a forked DataLoader worker is copied page by page as reading it
    touches reference counts (pytorch/pytorch#13246); a numpy buffer is shared for good.
    """

    def __init__(self, values: list):
        encoded = [json.dumps(v, ensure_ascii=False).encode() for v in values]
        self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Any:
        start, end = self._offsets[index], self._offsets[index + 1]
        return json.loads(self._buffer[start:end].tobytes())


# ---------------------------------------------------------------------------------------------
# Synthetic captioned shapes: the default, file-free toy set

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 200),
    "yellow": (240, 220, 40),
    "purple": (130, 50, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


class SyntheticCaptions(CaptionedImageDataset):
    """`num_samples` images of one coloured shape on a coloured background, captioned
    "a red circle on a blue background". Content depends only on (seed, index); drawn at
    `transform.resolution`, so only the flip varies with the epoch. The shape always covers
    the centre pixel and never reaches the corners."""

    def __init__(self, num_samples: int, transform: ImageTransform, seed: int = 0):
        super().__init__(transform, seed)
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
        # A stream of its own (spawn_key) so content never correlates with augmentation draws.
        content = np.random.default_rng(np.random.SeedSequence([self.seed, index], spawn_key=(1,)))
        shape = SHAPES[content.integers(len(SHAPES))]
        fg, bg = (list(COLOURS)[i] for i in content.choice(len(COLOURS), size=2, replace=False))
        image = draw_shape(shape, COLOURS[fg], COLOURS[bg], self.transform.resolution, content)
        return image, f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


RGB = tuple[int, int, int]


def draw_shape(shape: str, fg: RGB, bg: RGB, size: int, rng: np.random.Generator) -> Image.Image:
    """One shape of radius 0.25-0.4 * size, centred within 0.1 * size of the middle."""
    image = Image.new("RGB", (size, size), bg)
    cx, cy = (0.5 + rng.uniform(-0.1, 0.1, size=2)) * size
    r = rng.uniform(0.25, 0.4) * size
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fg)
    else:  # equilateral, pointing up; its inscribed radius r/2 still covers the centre
        angles = np.deg2rad([-90, 30, 150])
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=fg)
    return image


# ---------------------------------------------------------------------------------------------
# Registry

SourceBuilder = Callable[[DataConfig, int], Dataset]
SOURCES: dict[str, SourceBuilder] = {}


def register_source(name: str) -> Callable[[SourceBuilder], SourceBuilder]:
    def add(builder: SourceBuilder) -> SourceBuilder:
        SOURCES[name] = builder
        return builder

    return add


def build_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The dataset `cfg.source` names, augmented per `cfg`, seeded with `seed`."""
    if cfg.source not in SOURCES:
        raise UserError(f"config key 'data.source': unknown source '{cfg.source}' (known: {', '.join(SOURCES)})")
    return SOURCES[cfg.source](cfg, seed)


def _transform(cfg: DataConfig) -> ImageTransform:
    return ImageTransform(cfg.resolution, cfg.center_crop, cfg.random_flip)


@register_source("synthetic")
def _build_synthetic(cfg: DataConfig, seed: int) -> Dataset:
    if cfg.num_samples <= 0:
        raise UserError("config key 'data.num_samples': must be > 0")
    return SyntheticCaptions(cfg.num_samples, _transform(cfg), seed)


@register_source("imagefolder")
def _build_imagefolder(cfg: DataConfig, seed: int) -> Dataset:
    if cfg.path is None:
        raise UserError("config key 'data.path': required when data.source=imagefolder")
    return ImageFolder(cfg.path, _transform(cfg), seed, cfg.image_column, cfg.caption_column)
