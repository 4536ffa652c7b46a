"""Image folders with a caption file beside each image (kohya's and the diffusers examples' `0001.png` +
`0001.txt`), read by data.source=imagefolder (subfolders too, size buckets from the image headers) and by
data/make_shards.py; metadata.jsonl still wins when present."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from sdkd.cli.errors import UserError
from sdkd.data.make_shards import make_shards
from sdkd.data.sources.buckets import BucketBatchSampler, sample_buckets
from sdkd.data.sources.config import DataConfig
from sdkd.data.sources.core import build_dataset, collate

from conftest import run_script

# file -> (width, height); captions beside them below.
IMAGES = {"a.png": (40, 40), "b.jpg": (48, 32), "sub/deeper/c.png": (32, 48), "sub/d.webp": (64, 24),
          "nocap.png": (40, 40), "empty.png": (40, 40), ".hidden/h.png": (40, 40), "sub/e.png": (30, 45)}
CAPTIONS = {"a.txt": "a red circle\n", "b.caption": "  a blue square ", "sub/deeper/c.txt": "a nested one",
            "sub/d.txt": "a panorama", "sub/e.txt": "a portrait", "empty.txt": " \n",
            ".hidden/h.txt": "left out", "notes.txt": "not a caption: no image beside it"}
GOOD = {"a.png": "a red circle", "b.jpg": "a blue square", "sub/deeper/c.png": "a nested one",
        "sub/d.webp": "a panorama", "sub/e.png": "a portrait"}


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pics"
    for i, (name, size) in enumerate(IMAGES.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        noise(*size, i).save(root / name)
    for name, text in CAPTIONS.items():
        (root / name).write_text(text)
    return root


def read_all(cfg: DataConfig):
    ds = build_dataset(cfg, seed=0)
    return ds, collate([ds[i] for i in range(len(ds))])


def test_captions_beside_images_nested_and_bad_ones_skipped_by_name(folder):
    ds, batch = read_all(DataConfig(source="imagefolder", path=str(folder), resolution=16))
    assert len(ds) == 7  # every image but the hidden one; notes.txt is no image
    assert dict(zip(batch["keys"], batch["captions"])) == {str(folder / k): v for k, v in GOOD.items()}
    assert sorted(batch["skipped"]) == [
        f"{folder / 'empty.png'}: empty caption file empty.txt",
        f"{folder / 'nocap.png'}: no caption file nocap.text or nocap.txt or nocap.caption",
    ]
    assert tuple(batch["pixel_values"].shape) == (5, 3, 16, 16)


def test_caption_column_names_the_caption_files_extension(folder):
    (folder / "a.caption").write_text("from a.caption")
    _, batch = read_all(DataConfig(source="imagefolder", path=str(folder), resolution=16, caption_column="caption"))
    assert dict(zip(batch["keys"], batch["captions"])) == {str(folder / "a.png"): "from a.caption",
                                                           str(folder / "b.jpg"): "a blue square"}
    _, batch = read_all(DataConfig(source="imagefolder", path=str(folder), resolution=16,
                                   caption_column="txt;caption", caption_pick="random"))
    assert batch["captions"][batch["keys"].index(str(folder / "a.png"))] in ("a red circle", "from a.caption")


def test_buckets_come_from_the_image_headers(folder):
    buckets = ((24, 40), (32, 32), (40, 24))  # auto at resolution 32, as (height, width)
    cfg = DataConfig(source="imagefolder", path=str(folder), resolution=32, buckets="auto", random_flip=False)
    assert cfg.bucket_sizes() == buckets
    ds = build_dataset(cfg, seed=0)
    names = ["a.png", "b.jpg", "empty.png", "nocap.png", "sub/d.webp", "sub/deeper/c.png", "sub/e.png"]  # sorted
    by_name = dict(zip(names, sample_buckets(ds).tolist()))
    assert by_name == {"a.png": 1, "b.jpg": 0, "empty.png": 1, "nocap.png": 1, "sub/d.webp": 0,
                       "sub/deeper/c.png": 2, "sub/e.png": 2}
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(sample_buckets(ds), 1, seed=3), collate_fn=collate)
    seen = {b["keys"][0]: (tuple(b["pixel_values"].shape[-2:]), tuple(b["target_size"][0].tolist()))
            for b in loader if b["keys"]}
    assert seen == {str(folder / n): (buckets[by_name[n]],) * 2 for n in GOOD}


def test_metadata_jsonl_takes_precedence(folder):
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/e.png", "text": "from the metadata"}))
    ds, batch = read_all(DataConfig(source="imagefolder", path=str(folder), resolution=16))
    assert len(ds) == 1 and batch["captions"] == ["from the metadata"]


def test_folder_without_metadata_or_any_caption_file_is_one_user_error(tmp_path):
    noise(20, 20, 0).save(tmp_path / "a.png")
    (tmp_path / "a.md").write_text("a caption under an extension no caption field names")
    with pytest.raises(UserError, match=r"metadata.jsonl: not found, and no image has a caption file beside it "
                                        r"\(.text, .txt, .caption"):
        build_dataset(DataConfig(source="imagefolder", path=str(tmp_path), resolution=16), seed=0)


def test_make_shards_reads_a_caption_file_folder(folder, tmp_path):
    out, logged = tmp_path / "shards", []
    manifest = make_shards(str(folder), out, shard_size=2, log=logged.append)
    assert manifest["samples"] == 5 and manifest["skipped"] == 2
    assert any("nocap.png: no caption file" in m for m in logged)
    assert any("empty.png: empty caption file" in m for m in logged)
    ds = build_dataset(DataConfig(source="webdataset", path=str(out), resolution=16, resampled=False,
                                  shuffle_buffer=0), seed=0)
    ds.set_batching(5, 1, 0)
    batch = collate(list(ds))
    assert sorted(batch["captions"]) == sorted(GOOD.values()) and not batch["skipped"]
    sizes = {IMAGES[n][::-1] for n in GOOD}
    assert {tuple(s) for s in batch["original_size"].tolist()} == sizes


def test_make_shards_command_on_one_captioned_image_says_one(tmp_path, capsys):
    from sdkd.data.make_shards import main

    noise(20, 20, 0).save(tmp_path / "only.png")
    (tmp_path / "only.txt").write_text("the one image")
    main([str(tmp_path), str(tmp_path / "shards")])
    assert f"wrote 1 sample in 1 shard to {tmp_path / 'shards'} (0 skipped)" in capsys.readouterr().out


@pytest.mark.slow
def test_kd_trains_on_a_caption_file_folder_in_size_buckets(folder, tmp_path):
    """train/kd.py on the folder, batch 1 in size buckets: the 5 captioned images train, an epoch (7 batches, 2
    of them a bad sample only) makes 5 steps, and the 2 bad samples are named on stderr and counted (step 6 is in
    the second epoch, so the whole first one was read)."""
    out = tmp_path / "run"
    result = run_script([sys.executable, "train/kd.py", "--config", "configs/toy.yaml", f"output_dir={out}",
                         "data.source=imagefolder", f"data.path={folder}", "data.buckets=auto",
                         "train.batch_size=1", "train.max_steps=6", "train.checkpoint_every=0", "train.sample_every=0",
                         "log.trackers=[none]"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data: 7 samples per epoch from data.source=imagefolder" in result.stdout
    skipped = re.findall(r"warning: process 0 skipped a sample: (.*)", result.stderr)
    assert set(skipped) == {f"{folder / 'empty.png'}: empty caption file empty.txt",
                            f"{folder / 'nocap.png'}: no caption file nocap.text or nocap.txt or nocap.caption"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[4]["epoch"] == 1.0 and sum(line["data_skipped"] for line in lines) == len(skipped)
