"""Hugging Face source: a real parquet file (datasets' own writer), an arrow folder (save_to_disk), a
data-set folder, columns, bad rows."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from sdkd.cli.errors import UserError
from sdkd.data.sources.config import DataConfig
from sdkd.data.sources.core import build_dataset
from sdkd.data.sources.hf_source import HFImageDataset

R = 16


def png(seed: int, w: int = 30, h: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def table(n=6) -> datasets.Dataset:
    rows = {"image": [{"bytes": png(i), "path": f"img{i}.png"} for i in range(n)],
            "text": [f"caption {i}" for i in range(n)],
            "alt": [[f"a{i}", f"b{i}"] for i in range(n)]}
    rows["image"][2] = {"bytes": b"\x89PNG broken", "path": "img2.png"}
    rows["text"][3] = None
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


@pytest.fixture
def parquet(tmp_path):
    path = tmp_path / "train.parquet"
    table().to_parquet(str(path))
    return path


def hf(path, **kw):
    return build_dataset(DataConfig(source="hf", path=str(path), resolution=R, random_flip=False, **kw), seed=0)


def test_parquet_file(parquet):
    ds = hf(parquet)
    assert isinstance(ds, HFImageDataset) and len(ds) == 6
    sample = ds[0]
    assert sample["caption"] == "caption 0" and sample["pixel_values"].shape == (3, R, R)
    assert sample["original_size"] == (20, 30)
    assert ds[2]["skip"].startswith(f"{parquet} row 2 (img2.png): cannot read image")
    assert ds[3] == {"skip": f"{parquet} row 3 (img3.png): no caption (fields text, txt, caption)"}


def test_folder_of_parquet_and_save_to_disk(tmp_path, parquet):
    folder = tmp_path / "data"
    folder.mkdir()
    parquet.rename(folder / "train-00000.parquet")
    assert hf(folder)[0]["caption"] == "caption 0"
    table().save_to_disk(str(tmp_path / "arrow"))
    assert hf(tmp_path / "arrow")[1]["caption"] == "caption 1"


def test_caption_fields_and_pick(parquet):
    ds = hf(parquet, caption_column="alt;text", caption_pick="random")
    drawn = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        drawn.add(ds[0]["caption"])
    assert drawn == {"a0", "b0", "caption 0"}
    assert hf(parquet, caption_column="alt")[3]["caption"] in ("a3", "b3")  # a row without text still has alt


def test_column_errors(parquet, tmp_path):
    with pytest.raises(UserError, match="data.image_column': no column img"):
        hf(parquet, image_column="img")
    with pytest.raises(UserError, match="data.caption_column': no column prompt"):
        hf(parquet, caption_column="prompt")
    with pytest.raises(UserError, match="could not be loaded"):
        hf(tmp_path / "nothing-here")
