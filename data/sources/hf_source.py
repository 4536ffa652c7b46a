"""Hugging Face `datasets` as a training source: a hub name, a local data-set folder (parquet, arrow,
imagefolder, or a `save_to_disk` folder), or one .parquet / .arrow file.

    data.source=hf data.path=PATH_OR_NAME data.split=train data.image_column=image data.caption_column=text

Images are decoded here, not by `datasets` (the image column is cast to `Image(decode=False)`), so an
unreadable image becomes a skipped sample named by its row (and file, when the row has a path)
instead of an exception deep inside `datasets`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdkd.cli.errors import UserError
from sdkd.data.sources.buckets import image_size
from sdkd.data.sources.core import CaptionedImageDataset, CorruptImageError, open_image
from sdkd.data.sources.transforms import Preprocess

_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def load_hf(path: str, split: str):
    """`path` -> one split of a `datasets.Dataset`; failures become a one-line `UserError`."""
    import datasets

    local = Path(path)
    try:
        if local.is_file():
            if local.suffix not in _FILE_BUILDERS:
                raise UserError(f"data.path '{path}': expected a .parquet or .arrow file, or a folder")
            return datasets.load_dataset(_FILE_BUILDERS[local.suffix], data_files={split: str(local)}, split=split)
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(local))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if local.is_dir():
            return datasets.load_dataset(str(local), split=split)
        return datasets.load_dataset(path, split=split)
    except UserError:
        raise
    except (KeyError, ValueError, FileNotFoundError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"data.path '{path}' (split '{split}') could not be loaded: {first}") from None


class HFImageDataset(CaptionedImageDataset):
    """One split of a `datasets` data set with an image column and caption column(s)."""

    def __init__(self, path: str, split: str, preprocess: Preprocess, seed: int = 0, image_column: str = "image"):
        import datasets

        super().__init__(preprocess, seed)
        self.path = path
        data = load_hf(path, split)
        columns = list(data.column_names)
        candidates = [c for c in image_column.split(";") if c]
        found = [c for c in candidates if c in columns]
        if not found:
            raise UserError(f"config key 'data.image_column': no column {', '.join(candidates)} in {path}; "
                            f"columns are {columns}")
        self.image_column = found[0]
        self.caption_columns = [c for c in preprocess.caption_fields if c in columns]
        if not self.caption_columns:
            raise UserError(f"config key 'data.caption_column': no column {', '.join(preprocess.caption_fields)} "
                            f"in {path}; columns are {columns}")
        if isinstance(data.features[self.image_column], datasets.Image):
            data = data.cast_column(self.image_column, datasets.Image(decode=False))
        self.data = data.select_columns([self.image_column, *self.caption_columns])
        if len(self.data) == 0:
            raise UserError(f"data.path '{path}': split '{split}' has no rows")

    def __len__(self) -> int:
        return len(self.data)

    def load(self, index: int, rng: np.random.Generator) -> tuple[Image.Image, str, str]:
        row = self.data[index]
        value = row[self.image_column]
        name = f"{self.path} row {index}"
        if isinstance(value, dict) and value.get("path"):
            name += f" ({value['path']})"
        caption = self.preprocess.caption(row, rng, name)
        return decode_image(value, name), caption, name

    def image_size(self, index: int) -> tuple[int, int] | None:
        value = self.data[index][self.image_column]
        if isinstance(value, Image.Image):
            return value.height, value.width
        if isinstance(value, dict):
            value = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
        return image_size(value) if value is not None else None


def decode_image(value: Any, name: str) -> Image.Image:
    """An undecoded `datasets.Image` value ({"bytes", "path"}), a file path or a PIL image -> RGB-ready PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):
        return open_image(Path(value))
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        return open_image(Path(value["path"]))
    if isinstance(value, dict) and value.get("bytes") is not None:
        return open_image(value["bytes"], name)
    raise CorruptImageError(f"{name}: no image (got {type(value).__name__})")
