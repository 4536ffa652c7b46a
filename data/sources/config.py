"""The `data` section of every trainer's config, and what every config section is built from: `Section`,
the base of the section dataclasses and their checks, and `Choice`, the type of config values drawn from a
fixed set.

Imported by train/engine/config.py (which loads and checks whole schemas) and by the sources; it imports
neither of them, nor torch, so `--help` and config checks stay fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Iterable, Optional

from sdkd.cli.errors import require


class Choice(str, Enum):
    """A config value from a fixed set, declared as `name = auto()`: the value is the name, so OmegaConf
    (which reads and writes members by name) loads, saves and prints the plain text. A member compares
    equal to that text and str() and f-strings give it (not enum.StrEnum: Python 3.10 lacks it). Declared
    here, in the lowest layer that has config sections; train/engine/config.py's choices use it too."""

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list) -> str:
        return name

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Section:
    """A config section: a dataclass of keys, with a docstring under each, and `check`. Declared here, in the
    lowest layer that has config sections, as `Choice` is."""

    def check(self, at: str) -> None:
        """Raise ConfigError (`require`) for a value the field types cannot rule out, naming the key under `at`,
        the section's dotted path (`eval`, `distill.alpha`; '' for a schema's root, whose check is then the
        cross-section one). The loader calls it for every section of a config, a section's own sections
        first (train/engine/config.py's `check_config`). An override calls `super().check(at)` first."""


def expected_one_of(names: Iterable[str], value: object) -> str:
    """What a config error says about `value` when it is none of `names` (a Choice's members)."""
    *most, last = names
    return f"expected {', '.join(most)} or {last}, got '{value}'"


class DataSource(Choice):
    """What data.source names; data/sources/core.py registers a builder for each (a test keeps them equal)."""

    synthetic = auto()
    imagefolder = auto()
    hf = auto()
    webdataset = auto()


class Interpolation(Choice):
    """PIL's resampling filters (`Image.Resampling`) by diffusers' --image_interpolation_mode names."""

    nearest = auto()
    bilinear = auto()
    bicubic = auto()
    lanczos = auto()
    box = auto()
    hamming = auto()


class CaptionPick(Choice):
    first = auto()
    random = auto()


@dataclass
class DataConfig(Section):
    source: DataSource = DataSource.synthetic
    """synthetic (built-in captioned shapes), imagefolder (images + metadata.jsonl, metadata.csv or a caption
    file beside each image: 0001.png + 0001.txt, subfolders too),
    hf (a Hugging Face data set: hub name or local parquet/arrow path) or webdataset (tar shards)."""
    path: Optional[str] = None
    """imagefolder: the folder; hf: hub name, local folder or .parquet/.arrow file; webdataset: a
    folder of shards with manifest.json, brace-expanded names (shard-{000000..000099}.tar) or a glob."""
    split: str = "train"
    """hf: the split to read."""
    manifest: Optional[str] = None
    """webdataset: manifest.json with per-shard sample counts (data/make_shards.py writes it); null:
    manifest.json beside the shards."""
    image_column: Optional[str] = None
    """Field naming or holding the image; null: the source's default (imagefolder file_name, hf image,
    webdataset jpg;jpeg;png;webp). Several candidates as 'a;b': the first present one is used."""
    caption_column: str = "text;txt;caption"
    """Field(s) holding the caption, several as 'a;b;c' (a webdataset field is a file extension or a key
    of the sample's .json; in an image folder without metadata, the extension of the caption file beside each
    image). A field may hold a list of captions. See caption_pick."""
    caption_pick: CaptionPick = CaptionPick.first
    """first: the first caption field present (one of its captions at random if it holds a list);
    random: one at random from all captions of all fields present. Drawn per sample and epoch."""
    caption_dropout: float = 0.0
    """Probability of replacing the caption with the empty prompt (for classifier-free guidance)."""
    resolution: int = 512
    """Training image size in pixels (shorter side resized, then cropped square); with data.buckets, the
    pixel budget: buckets hold about resolution x resolution pixels."""
    buckets: Any = "none"
    """Aspect-ratio buckets: none (every image square, data.resolution), auto (sides multiples of
    data.bucket_step, at most resolution^2 pixels, aspect up to data.bucket_max_aspect), or a list of
    [height, width] sizes in pixels. Each image goes to the bucket of nearest aspect ratio, is resized to cover
    it and cropped (data.center_crop); every batch holds one bucket; SDXL's time ids get each sample's size."""
    bucket_step: Optional[int] = None
    """buckets=auto: bucket sides are multiples of this many pixels (a multiple of 8; 64 suits SD and SDXL
    U-Nets). null: 64, or resolution/8 below 512 px (toy resolutions), at least 8."""
    bucket_max_aspect: float = 2.0
    """buckets=auto: longest over shortest side of the most elongated bucket (>= 1)."""
    interpolation: Interpolation = Interpolation.bilinear
    """Resampling filter of the resize to data.resolution (PIL's; diffusers' --image_interpolation_mode)."""
    center_crop: bool = True
    """Center crop; false takes a random crop."""
    random_flip: bool = True
    """Flip horizontally with probability 0.5."""
    min_size: int = 0
    """Skip images whose shorter side is below this many pixels (0: keep all)."""
    strict: bool = False
    """Stop the run at the first bad sample (unreadable image, missing caption, image below min_size)
    instead of skipping it (skips are counted as data_skipped in metrics.jsonl and named in a warning)."""
    max_bad_in_a_row: int = 1000
    """Stop the run when this many samples in a row are bad (or a whole epoch has no usable one): a source
    that gives nothing usable stops with its last reasons instead of skipping forever."""
    num_samples: int = 256
    """synthetic: number of samples in the set."""
    synthetic_sizes: list[list[int]] = field(default_factory=list)
    """synthetic: [height, width] of the drawn images, taken in turn by sample index (several aspect ratios
    for data.buckets); empty: squares of data.resolution."""
    max_train_samples: Optional[int] = None
    """Train on the first this many samples only (diffusers': for debugging or quicker training); webdataset:
    epochs of this many samples (over all processes) from the usual stream. null: all."""
    resampled: bool = True
    """webdataset: every process and worker draws shards with replacement (an endless stream cut into
    epochs of manifest-many samples); false: shards split by process then by worker, each read once
    per epoch (needs at least processes x workers shards)."""
    shuffle_buffer: int = 1000
    """webdataset: samples held in the shuffle buffer of each worker (0: no sample shuffle)."""
    cache: Optional[str] = None
    """Folder of precomputed latents and text embeddings (train/cache_latents.py writes it); trainers then
    read it instead of `source` and load no VAE or text encoder for the step."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.source == DataSource.synthetic or self.cache is not None or self.path is not None, f"{at}.path",
                f"required when {at}.source={self.source}")
        require(self.resolution >= 8 and self.resolution % 8 == 0, f"{at}.resolution", "must be a multiple of 8")
        require(bool(self.caption_column.strip(";")), f"{at}.caption_column", "at least one field name")
        require(0.0 <= self.caption_dropout <= 1.0, f"{at}.caption_dropout", "must be in [0, 1]")
        require(self.min_size >= 0, f"{at}.min_size", "must be >= 0")
        require(self.max_bad_in_a_row > 0, f"{at}.max_bad_in_a_row", "must be > 0")
        require(self.num_samples > 0, f"{at}.num_samples", "must be > 0")
        require(self.max_train_samples is None or self.max_train_samples > 0, f"{at}.max_train_samples",
                "must be > 0 or null")
        require(self.shuffle_buffer >= 0, f"{at}.shuffle_buffer", "must be >= 0")
        require(all(_is_size(s) for s in self.synthetic_sizes), f"{at}.synthetic_sizes",
                f"expected [height, width] pairs of positive integers, got {self.synthetic_sizes}")
        require(self.bucket_step is None or (self.bucket_step > 0 and self.bucket_step % 8 == 0),
                f"{at}.bucket_step", f"must be a positive multiple of 8 or null, got {self.bucket_step}")
        require(self.bucket_max_aspect >= 1.0, f"{at}.bucket_max_aspect",
                f"must be >= 1 (longest over shortest side), got {self.bucket_max_aspect}")
        if isinstance(self.buckets, str):
            require(self.buckets in ("none", "auto"), f"{at}.buckets",
                    f"expected none, auto or a list of [height, width], got '{self.buckets}'")
        else:
            sizes = self.buckets if isinstance(self.buckets, list) else None
            require(bool(sizes) and all(_is_size(s) for s in sizes), f"{at}.buckets",
                    f"expected none, auto or a non-empty list of [height, width] in pixels, got {self.buckets}")
            require(all(side % 8 == 0 for s in sizes for side in s), f"{at}.buckets",
                    f"bucket sides must be multiples of 8 (the VAE's factor), got {sizes}")
            require(len({tuple(s) for s in sizes}) == len(sizes), f"{at}.buckets", f"a size is repeated in {sizes}")

    def bucket_sizes(self) -> tuple[tuple[int, int], ...]:
        """The (height, width) buckets of data.buckets, sorted; () for none. auto: for each width a multiple of
        the step, the tallest multiple-of-step height within the resolution^2 budget, both orientations, aspect
        within bucket_max_aspect (kohya sd-scripts' `make_bucket_resolutions`, bounded by aspect, not side)."""
        if self.buckets == "none":
            return ()
        if self.buckets != "auto":
            return tuple(sorted((int(h), int(w)) for h, w in self.buckets))
        step = self.bucket_step or max(8, min(64, self.resolution // 8 // 8 * 8))
        budget = self.resolution * self.resolution
        square = max(step, math.isqrt(budget) // step * step)
        sizes = {(square, square)}
        for width in range(step, budget // step + 1, step):
            height = budget // width // step * step
            if height >= step and max(width, height) <= self.bucket_max_aspect * min(width, height):
                sizes |= {(height, width), (width, height)}
        return tuple(sorted(sizes))


def _is_size(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
