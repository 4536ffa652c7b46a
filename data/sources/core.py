"""Captioned-image datasets, a registry of sources, and the batch collate function.

Map-style sources (synthetic, imagefolder, hf, and the latent cache) are `Dataset`s whose item `i` is
`{"pixel_values": [3, H, W] in [-1, 1], "caption": str, "original_size": (h, w), "crop_top_left": (top, left),
"target_size": (H, W), "key": name}` (H = W = R, or the size bucket's: buckets.py), or a skip marker
`{"skip": "name: reason"}` for a bad sample (see `transforms.BadSample`).
All per-sample randomness (augmentation, caption choice) comes from `np.random.default_rng([seed, epoch,
index])`, so a resumed run that calls `set_epoch` sees exactly the samples the interrupted one would have.
The webdataset source (`webdataset_source.py`) is an `IterableDataset` yielding the same items.

New sources register a builder `(DataConfig, seed) -> Dataset` with `@register_source("name")`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import Dataset, IterableDataset, Subset

from sdkd.cli.errors import UserError
from sdkd.data.sources.buckets import image_size
from sdkd.data.sources.config import DataConfig
from sdkd.data.sources.transforms import BadSample, ImageTransform, Preprocess, dropout_rng, nearest_bucket, skip_marker

# ---------------------------------------------------------------------------------------------
# Shared behaviour


class CaptionedImageDataset(Dataset):
    """Base class: subclasses give `__len__` and `load(index, rng) -> (image, caption, name)`, choosing
    the caption with `self.preprocess.caption` and raising `BadSample` for a sample to skip."""

    def __init__(self, preprocess: Preprocess | ImageTransform, seed: int):
        self.preprocess = preprocess if isinstance(preprocess, Preprocess) else Preprocess(preprocess)
        self.seed = seed
        self.epoch = 0

    @property
    def transform(self) -> ImageTransform:
        return self.preprocess.transform

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation. DataLoader workers copy the dataset when an iterator
        starts, so call this before `iter(loader)` and do not use persistent workers."""
        self.epoch = epoch

    def load(self, index: int, rng: np.random.Generator) -> tuple[Image.Image, str, str]:
        raise NotImplementedError

    def image_size(self, index: int) -> tuple[int, int] | None:
        """(height, width) of sample `index`'s image as `load` decodes it, read without decoding it (None:
        unreadable, the sample is skipped when loaded)."""
        raise NotImplementedError

    def sample_buckets(self) -> np.ndarray | None:
        """Each sample's size bucket (buckets.py), from its image size; None without data.buckets."""
        buckets = self.transform.buckets
        if not buckets:
            return None
        sizes = (self.image_size(i) for i in range(len(self)))
        return np.array([nearest_bucket(buckets, *size) if size else 0 for size in sizes], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        try:
            image, caption, name = self.load(index, rng)
            return self.preprocess(image, caption, rng, dropout_rng(self.seed, self.epoch, index), name)
        except BadSample as err:
            return skip_marker(err)


class FirstSamples(Subset):
    """The first `n` samples of a map-style dataset (data.max_train_samples), always the same ones. Other
    attributes are the dataset's, so the trainer's `set_epoch` and a latent cache's `check_teacher` reach it."""

    def __init__(self, dataset: Dataset, n: int):
        super().__init__(dataset, range(min(n, len(dataset))))

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet while unpickling (in a spawned DataLoader worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> a batch: tensors stacked ("pixel_values" [B,3,R,R], or a cache's latents), pairs as
    LongTensor [B, 2] ("original_size", "crop_top_left"), "captions" and "keys" as lists, and "skipped":
    the reasons of the skip markers dropped from the batch (a batch may hold fewer than B samples, or none)."""
    kept = [s for s in samples if "skip" not in s]
    batch: dict[str, Any] = {
        "skipped": [s["skip"] for s in samples if "skip" in s],
        "captions": [s["caption"] for s in kept],
        "keys": [s.get("key") for s in kept],
    }
    for name in (kept[0] if kept else {}):
        if name in ("caption", "key"):
            continue
        values = [s[name] for s in kept]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        else:
            batch[name] = torch.tensor(values, dtype=torch.long)
    return batch


# ---------------------------------------------------------------------------------------------
# Image folder: images + metadata.jsonl (the HF `imagefolder` layout) or a caption file beside each image


class CorruptImageError(BadSample, OSError):
    """An image file that exists but cannot be decoded; the message names the file."""


class ImageFolder(CaptionedImageDataset):
    """A folder with `metadata.jsonl` lines like `{"file_name": "0001.png", "text": "a caption"}`, or a
    `metadata.csv` with the same columns (the Hugging Face `imagefolder` layout); without either, the images
    in it and its subfolders with a caption file beside each (kohya's and the webdataset layout: `0001.png` +
    `0001.txt`; a caption field names the file's extension, so the default fields read .text, .txt, .caption).

    A caption field may also hold a list of captions; one is drawn per sample and epoch. Layout
    mistakes (malformed lines, a missing image column, missing files, no caption field on any line, no
    caption file at all) raise `UserError` here, at start-up, naming the file and line. A line without a
    caption, an image without a caption file or with an empty one, and an image that cannot be decoded or is
    too small are bad samples, skipped when read.
    """

    def __init__(
        self,
        path: str | Path,
        preprocess: Preprocess | ImageTransform,
        seed: int = 0,
        image_column: str = "file_name",
        caption_column: str | None = None,
    ):
        super().__init__(preprocess, seed)
        if caption_column is not None:  # a shorthand for tests and scripts
            self.preprocess = Preprocess(self.preprocess.transform, tuple(caption_column.split(";")),
                                         self.preprocess.caption_pick, self.preprocess.caption_dropout,
                                         self.preprocess.min_size)
        self.root = Path(path)
        fields = self.preprocess.caption_fields
        records = (_read_metadata(self.root, image_column, fields) if _metadata_file(self.root)
                   else [[name, None] for name in _captioned_images(self.root, fields)])
        self._records = _PackedJson(records)

    def __len__(self) -> int:
        return len(self._records)

    def captions(self, index: int) -> tuple[Path, dict[str, Any]]:
        """Sample `index`'s image file and caption fields (in the caption-file layout read from the files
        beside the image now, so a caption edited mid-run is taken); raises `BadSample` without any."""
        file_name, captions = self._records[index]
        path = self.root / file_name
        return path, read_caption_files(path, self.preprocess.caption_fields) if captions is None else captions

    def load(self, index: int, rng: np.random.Generator) -> tuple[Image.Image, str, str]:
        path, captions = self.captions(index)
        caption = self.preprocess.caption(captions, rng, str(path))
        return open_image(path), caption, str(path)

    def image_size(self, index: int) -> tuple[int, int] | None:
        return image_size(self.root / self._records[index][0])


def is_image_folder(root: Path, caption_fields: tuple[str, ...]) -> bool:
    """Whether `root` is an image folder of either layout (not, say, a folder of parquet files)."""
    return root.is_dir() and (_metadata_file(root) is not None or bool(_captioned_images(root, caption_fields, False)))


def _metadata_file(root: Path) -> Path | None:
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    return next((meta for meta in (root / "metadata.jsonl", root / "metadata.csv") if meta.is_file()), None)


def _captioned_images(root: Path, caption_fields: tuple[str, ...], required: bool = True) -> list[str]:
    """The images under `root` (subfolders too, hidden ones left out), sorted, as paths relative to it; [] when
    none has a caption file beside it (a `UserError` if `required`)."""
    extensions = {ext for ext, plugin in Image.registered_extensions().items() if plugin in Image.OPEN}
    files = {p.relative_to(root) for p in root.rglob("*")}
    files = {p for p in files if not any(part.startswith(".") for part in p.parts) and (root / p).is_file()}
    images = sorted(p for p in files if p.suffix.lower() in extensions)
    if any(_caption_file(p, field) in files for p in images for field in caption_fields):
        return [p.as_posix() for p in images]
    if required:
        raise UserError(f"{root / 'metadata.jsonl'}: not found, and no image has a caption file beside it "
                        f"({', '.join('.' + f for f in caption_fields)}, the fields of data.caption_column): an "
                        f"image folder needs metadata.jsonl, metadata.csv or a caption file beside each image")
    return []


def _caption_file(image: Path, field: str) -> Path:
    return image.with_name(f"{image.stem}.{field}")


def read_caption_files(image: Path, caption_fields: tuple[str, ...]) -> dict[str, str]:
    """{field: caption} from the files beside `image` named by the fields (`0001.png` -> `0001.txt` for txt),
    stripped. An empty file gives no caption (kohya's trainer refuses one too; data.caption_dropout is the way
    to the empty prompt); `BadSample` when no field gives one."""
    found, empty = {}, []
    for field in caption_fields:
        path = _caption_file(image, field)
        try:
            text = path.read_text(encoding="utf-8-sig").strip()
        except FileNotFoundError:
            continue
        except UnicodeDecodeError as err:
            raise BadSample(f"{path}: caption file is not UTF-8 text ({err.reason} at byte {err.start})") from None
        except OSError as err:
            raise BadSample(f"{path}: cannot read caption file ({type(err).__name__}: {err})") from None
        if text:
            found[field] = text
        else:
            empty.append(path.name)
    if not found:
        names = ", ".join(empty) if empty else " or ".join(_caption_file(image, f).name for f in caption_fields)
        raise BadSample(f"{image}: {'empty caption file' if empty else 'no caption file'} {names}")
    return found


def _read_metadata(root: Path, image_column: str, caption_fields: tuple[str, ...]) -> list[list]:
    """`metadata.jsonl` or `metadata.csv` -> [[file_name, {caption field: value}], ...], checked line by line."""
    meta = _metadata_file(root)
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{meta}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if meta.suffix == ".csv":
        # An empty cell is a missing value; the header is line 1.
        rows = [(f"{meta}, line {n}", {k: v for k, v in row.items() if v not in ("", None)})
                for n, row in enumerate(csv.DictReader(text.splitlines()), start=2)]
    else:
        rows = [(f"{meta}, line {n}", _json_line(line, f"{meta}, line {n}"))
                for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    records = [_check_row(row, where, root, image_column, caption_fields) for where, row in rows]
    if not records:
        raise UserError(f"{meta}: no samples")
    if not any(captions for _, captions in records):
        raise UserError(f"{meta}: no line has a caption field {', '.join(caption_fields)} (data.caption_column)")
    return records


def _json_line(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _check_row(row: dict, where: str, root: Path, image_column: str, caption_fields: tuple[str, ...]) -> list:
    if image_column not in row:
        raise UserError(f"{where}: no '{image_column}' field (data.image_column); fields are {sorted(row)}")
    file_name = row[image_column]
    if not isinstance(file_name, str) or not (root / file_name).is_file():
        raise UserError(f"{where}: image file not found: {root / str(file_name)}")
    captions = {f: row[f] for f in caption_fields if row.get(f) is not None}
    for field, value in captions.items():
        if not _is_caption(value):
            raise UserError(f"{where}: '{field}' must be a string or a non-empty list of strings")
    return [file_name, captions]


def _is_caption(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) for v in value)
    return isinstance(value, str)


def open_image(source: Path | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file or its bytes fully (closing the file), upright per its EXIF orientation.
    Raises `CorruptImageError` naming `name` (default: the path)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except Exception as err:  # PIL raises many types; the caller needs the file name
        raise CorruptImageError(f"{name or source}: cannot read image ({type(err).__name__}: {err})") from err


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
    `transform.resolution` (or at `sizes[index % len(sizes)]`, (height, width) pairs), so only the flip
    varies with the epoch. The shape always covers the centre pixel and never reaches the corners."""

    def __init__(self, num_samples: int, transform: ImageTransform, seed: int = 0,
                 sizes: tuple[tuple[int, int], ...] = ()):
        super().__init__(transform, seed)
        self.num_samples, self.sizes = num_samples, tuple(tuple(s) for s in sizes)

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int, rng: np.random.Generator) -> tuple[Image.Image, str, str]:
        # A stream of its own (spawn_key) so content never correlates with augmentation draws.
        content = np.random.default_rng(np.random.SeedSequence([self.seed, index], spawn_key=(1,)))
        shape = SHAPES[content.integers(len(SHAPES))]
        fg, bg = (list(COLOURS)[i] for i in content.choice(len(COLOURS), size=2, replace=False))
        image = draw_shape(shape, COLOURS[fg], COLOURS[bg], self.image_size(index), content)
        return image, f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background", f"synthetic/{index}"

    def image_size(self, index: int) -> tuple[int, int]:
        return self.sizes[index % len(self.sizes)] if self.sizes else (self.transform.resolution,) * 2


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


RGB = tuple[int, int, int]


def draw_shape(shape: str, fg: RGB, bg: RGB, size: int | tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One shape of radius 0.25-0.4 * the shorter side, centred within 0.1 * each side of the middle, on a
    `size` square or (height, width) image."""
    height, width = (size, size) if isinstance(size, int) else size
    image = Image.new("RGB", (width, height), bg)
    cx, cy = (0.5 + rng.uniform(-0.1, 0.1, size=2)) * (width, height)
    r = rng.uniform(0.25, 0.4) * min(width, height)
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
    """The dataset `cfg.source` names, preprocessed per `cfg`, seeded with `seed`; with `cfg.cache` set,
    the latent cache instead (see `latent_cache.py`). `cfg.max_train_samples` keeps the first samples of a
    map-style dataset; the webdataset source shortens its epochs to it itself."""
    if cfg.cache is not None:
        from sdkd.data.sources.latent_cache import CachedLatents

        dataset = CachedLatents(cfg.cache, seed, cfg.caption_dropout)
        made = tuple(dataset.buckets or ())
        if made != cfg.bucket_sizes():
            raise UserError(f"config key 'data.buckets': {cfg.buckets} gives sizes {list(cfg.bucket_sizes()) or 'none'}"
                            f", but the latent cache {cfg.cache} was made with {list(made) or 'none'}")
    elif cfg.source in SOURCES:
        dataset = SOURCES[cfg.source](cfg, seed)
    else:
        raise UserError(f"config key 'data.source': unknown source '{cfg.source}' (known: {', '.join(SOURCES)})")
    if cfg.max_train_samples is None or isinstance(dataset, IterableDataset):
        return dataset
    return FirstSamples(dataset, cfg.max_train_samples)


def preprocess_from(cfg: DataConfig) -> Preprocess:
    return Preprocess(ImageTransform(cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.interpolation,
                                     cfg.bucket_sizes()),
                      tuple(f for f in cfg.caption_column.split(";") if f), cfg.caption_pick, cfg.caption_dropout,
                      cfg.min_size)


def check_source(cfg: DataConfig) -> None:
    """What can be checked of `cfg` without reading any data (a trainer does before it creates its output folder):
    a path where the source needs one, and an image folder's existence. A latent cache stands in for the source."""
    if cfg.cache is not None:
        from sdkd.data.sources.latent_cache import check_cache

        check_cache(Path(cfg.cache))
        return
    if cfg.source != "synthetic":
        _require_path(cfg)
    if cfg.source == "imagefolder" and not Path(cfg.path).is_dir():
        raise UserError(f"image folder not found: {cfg.path}")


def _require_path(cfg: DataConfig) -> str:
    if cfg.path is None:
        raise UserError(f"config key 'data.path': required when data.source={cfg.source}")
    return cfg.path


@register_source("synthetic")
def _build_synthetic(cfg: DataConfig, seed: int) -> Dataset:
    if cfg.num_samples <= 0:
        raise UserError("config key 'data.num_samples': must be > 0")
    return SyntheticCaptions(cfg.num_samples, preprocess_from(cfg), seed, tuple(map(tuple, cfg.synthetic_sizes)))


@register_source("imagefolder")
def _build_imagefolder(cfg: DataConfig, seed: int) -> Dataset:
    return ImageFolder(_require_path(cfg), preprocess_from(cfg), seed, cfg.image_column or "file_name")


@register_source("hf")
def _build_hf(cfg: DataConfig, seed: int) -> Dataset:
    from sdkd.data.sources.hf_source import HFImageDataset

    return HFImageDataset(_require_path(cfg), cfg.split, preprocess_from(cfg), seed, cfg.image_column or "image")


@register_source("webdataset")
def _build_webdataset(cfg: DataConfig, seed: int) -> Dataset:
    from sdkd.data.sources.webdataset_source import WebDatasetSource

    return WebDatasetSource.from_config(cfg, preprocess_from(cfg), seed)
