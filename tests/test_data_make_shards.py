"""data/make_shards.py: image folder (with planted bad files) and a parquet data set -> WebDataset shards
and a manifest, read back by the webdataset source; the CLI as a user runs it."""

from __future__ import annotations

import json
import sys
import tarfile

import datasets
import numpy as np
import pytest
from PIL import Image

from sdkd.cli.errors import UserError
from sdkd.data.make_shards import make_shards
from sdkd.data.sources.config import DataConfig
from sdkd.data.sources.core import build_dataset, collate

from conftest import run_script


def noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path):
    """7 good images (PNG and JPEG, various sizes) plus a truncated JPEG, a text file named .png and a line
    without a caption."""
    root = tmp_path / "folder"
    root.mkdir()
    rows = []
    for i in range(7):
        name = f"{i}.png" if i % 2 else f"{i}.jpg"
        noise(60 + 10 * i, 50, i).save(root / name)
        rows.append({"file_name": name, "text": f"caption {i}"})
    noise(64, 64, 9).save(root / "trunc.jpg")
    (root / "trunc.jpg").write_bytes((root / "trunc.jpg").read_bytes()[:200])
    (root / "text.png").write_text("hello")
    noise(40, 40, 10).save(root / "nocap.png")
    rows += [{"file_name": "trunc.jpg", "text": "t"}, {"file_name": "text.png", "text": "x"},
             {"file_name": "nocap.png"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_image_folder_to_shards(folder, tmp_path):
    out = tmp_path / "shards"
    logged = []
    manifest = make_shards(str(folder), out, shard_size=3, log=logged.append)
    assert manifest["samples"] == 7 and manifest["skipped"] == 3
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert any("trunc.jpg" in m for m in logged) and any("text.png" in m for m in logged)
    assert any("nocap.png" in m and "no caption" in m for m in logged)
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["000000000.jpg", "000000000.json", "000000000.txt"] and "000000001.png" in names
    # The original bytes are kept when not resizing.
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert tar.extractfile("000000001.png").read() == (folder / "1.png").read_bytes()

    ds = build_dataset(DataConfig(source="webdataset", path=str(out), resolution=16, resampled=False,
                                  shuffle_buffer=0), seed=0)
    ds.set_batching(7, 1, 0)
    batch = collate(list(ds))
    assert sorted(batch["captions"]) == [f"caption {i}" for i in range(7)] and not batch["skipped"]
    assert sorted(tuple(s) for s in batch["original_size"].tolist()) == sorted((50, 60 + 10 * i) for i in range(7))


@pytest.mark.slow
def test_resize_and_cli(folder, tmp_path):
    out = tmp_path / "shards"
    result = run_script([sys.executable, "data/make_shards.py", str(folder), str(out), "--resize", "32",
                         "--shard-size", "4", "--workers", "2"])
    assert result.returncode == 0, result.stderr
    assert "wrote 7 samples in 2 shards" in result.stdout and "trunc.jpg" in result.stderr
    assert ("next: accelerate launch train/kd.py --config configs/tiny.yaml data.source=webdataset data.path="
            in result.stdout)
    with tarfile.open(out / "shard-000000.tar") as tar:
        image = Image.open(tar.extractfile("000000001.jpg"))
        meta = json.load(tar.extractfile("000000001.json"))
    assert min(image.size) == 32 and meta["original_width"] == 70 and meta["text"] == "caption 1"
    again = run_script([sys.executable, "data/make_shards.py", str(folder), str(out)])
    assert again.returncode == 2 and again.stderr.strip() == f"error: {out}: already holds shards; use an empty folder"


def test_parquet_to_shards(tmp_path):
    images = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        noise(30, 20, i).save(path)
        images.append(str(path))
    data = datasets.Dataset.from_dict({"image": images, "caption": [f"c{i}" for i in range(5)]})
    data.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "d.parquet"))
    manifest = make_shards(str(tmp_path / "d.parquet"), tmp_path / "shards", shard_size=2, log=lambda m: None)
    assert manifest["samples"] == 5 and [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    with tarfile.open(tmp_path / "shards" / "shard-000002.tar") as tar:
        assert tar.extractfile("000000004.txt").read() == b"c4"


def test_nothing_readable(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    (root / "a.png").write_text("x")
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(UserError, match="no sample could be written"):
        make_shards(str(root), tmp_path / "out", log=lambda m: None)
