"""WebDataset source: shards written by webdataset's own ShardWriter/TarWriter, manifest resolution,
epoch accounting, splitting by process and worker, resampling, bad samples, caption fields."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from sdkd.cli.errors import UserError
from sdkd.data.sources.config import DataConfig
from sdkd.data.sources.core import build_dataset, collate
from sdkd.data.sources.webdataset_source import WebDatasetSource, resolve_shards

R = 16


def jpeg(seed: int, w: int = 40, h: int = 30) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_shards(folder, n_shards=4, per_shard=6, make=None, manifest=True):
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as writer:
        for i in range(n_shards * per_shard):
            writer.write(make(i) if make else {"__key__": f"k{i:04d}", "jpg": jpeg(i), "txt": f"caption {i}"})
    if manifest:
        shards = [{"name": f"shard-{k:06d}.tar", "samples": per_shard} for k in range(n_shards)]
        (folder / "manifest.json").write_text(json.dumps({"samples": n_shards * per_shard, "shards": shards}))
    return folder


def source(folder, **kw) -> WebDatasetSource:
    return build_dataset(DataConfig(source="webdataset", path=str(folder), resolution=R, **kw), seed=0)


def read_epoch(ds, batch_size=2, workers=0, epoch=0, world=1):
    per_epoch = ds.set_batching(batch_size, world, workers)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=batch_size, drop_last=True, collate_fn=collate, num_workers=workers)
    batches = list(loader)
    return per_epoch, batches


def keys(batches):
    return [k for b in batches for k in b["keys"]]


def test_shards_by_folder_brace_and_glob(tmp_path):
    write_shards(tmp_path)
    by_folder = resolve_shards(str(tmp_path))
    by_brace = resolve_shards(str(tmp_path / "shard-{000000..000003}.tar"))
    by_glob = resolve_shards(str(tmp_path / "*.tar"))
    assert by_folder[:2] == by_brace[:2] == by_glob[:2]
    assert by_folder[1] == [6, 6, 6, 6]
    assert resolve_shards(str(tmp_path / "shard-{000001..000002}.tar"))[1] == [6, 6]


def test_manifest_errors(tmp_path):
    write_shards(tmp_path, manifest=False)
    with pytest.raises(UserError, match="manifest.json: not found"):
        source(tmp_path)
    (tmp_path / "manifest.json").write_text('{"shards": [{"name": "shard-000000.tar", "samples": 6}]}')
    with pytest.raises(UserError, match="shard-000001.tar is not in the manifest"):
        source(tmp_path / "*.tar")
    with pytest.raises(UserError, match="no shards match"):
        source(tmp_path / "nope-*.tar")


def test_one_pass_reads_every_sample_once_in_shuffled_order(tmp_path):
    write_shards(tmp_path)
    ds = source(tmp_path, resampled=False, shuffle_buffer=8)
    per_epoch, batches = read_epoch(ds, batch_size=3)
    assert per_epoch == 8 == len(batches) and len(ds) == 24
    seen = keys(batches)
    assert sorted(seen) == [f"shard-{i // 6:06d}.tar/k{i:04d}" for i in range(24)]
    assert seen != sorted(seen)
    sample = batches[0]
    assert sample["pixel_values"].shape == (3, 3, R, R) and sample["original_size"].tolist()[0] == [30, 40]
    assert all(c.startswith("caption ") for c in sample["captions"])
    # Same epoch: same order and augmentation; next epoch: another order.
    again = read_epoch(ds, batch_size=3)[1]
    assert keys(again) == seen and all((a["pixel_values"] == b["pixel_values"]).all() for a, b in zip(batches, again))
    assert keys(read_epoch(ds, batch_size=3, epoch=1)[1]) != seen


def test_split_by_node_and_worker_is_disjoint(tmp_path, monkeypatch):
    write_shards(tmp_path)
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = source(tmp_path, resampled=False, shuffle_buffer=0)
        per_epoch, batches = read_epoch(ds, batch_size=2, workers=2, world=2)
        assert per_epoch == 6 == len(batches)  # 12 samples per rank, 1 shard per worker: 3 batches each
        per_rank.append(set(keys(batches)))
    assert not per_rank[0] & per_rank[1] and len(per_rank[0] | per_rank[1]) == 24
    assert {k.split("/")[0] for k in per_rank[0]} == {"shard-000000.tar", "shard-000002.tar"}


def test_uneven_split_takes_the_smallest_rank(tmp_path):
    write_shards(tmp_path, n_shards=3)
    ds = source(tmp_path, resampled=False)
    assert ds.set_batching(2, 2, 1) == 3  # rank 0: 12 samples, rank 1: 6 samples -> 3 batches
    assert ds.set_batching(2, 4, 1) == 0  # a rank without shards


def test_resampled_epoch_length_and_seeded_streams(tmp_path):
    write_shards(tmp_path)
    ds = source(tmp_path, resampled=True, shuffle_buffer=4)
    per_epoch, batches = read_epoch(ds, batch_size=4, workers=2)
    assert per_epoch == 6 and len(batches) == 6
    assert keys(read_epoch(ds, batch_size=4, workers=2)[1]) == keys(batches)  # deterministic per epoch
    assert keys(read_epoch(ds, batch_size=4, workers=2, epoch=1)[1]) != keys(batches)
    ds.set_epoch(0, resume_batch=3)  # a resumed run: the same epoch, reseeded
    assert [k for b in DataLoader(ds, batch_size=4, collate_fn=collate) for k in b["keys"]] != keys(batches)


def test_a_resumed_epoch_is_another_stream_of_the_same_epoch(tmp_path):
    """set_epoch(epoch, resume_batch): the same epoch read twice gives the same keys in the same order; resumed at
    batch 3 (reseeded) it gives another order."""
    write_shards(tmp_path)
    ds = source(tmp_path, resampled=True, shuffle_buffer=4)

    def stream(resume_batch: int) -> list[str]:
        ds.set_epoch(0, resume_batch)
        return [k for b in DataLoader(ds, batch_size=4, collate_fn=collate) for k in b["keys"]]

    assert stream(0) == stream(0) and stream(3) != stream(0)


@pytest.mark.parametrize("resampled", [True, False])
def test_max_train_samples_shortens_the_epoch(tmp_path, resampled):
    write_shards(tmp_path)
    ds = source(tmp_path, resampled=resampled, max_train_samples=10)
    assert len(ds) == 10
    assert ds.set_batching(2, 1, 1) == 5 and ds.set_batching(2, 2, 1) == 2  # 10 samples over 1 or 2 processes
    per_epoch, batches = read_epoch(ds, batch_size=2)
    assert per_epoch == 5  # the trainer reads this many batches per epoch
    if resampled:
        assert len(batches) == 5  # with_epoch cuts the endless stream there too


def test_bad_samples_become_named_skips(tmp_path):
    def make(i):
        sample = {"__key__": f"k{i:04d}", "jpg": jpeg(i), "txt": f"caption {i}"}
        if i == 1:
            sample["jpg"] = sample["jpg"][:50]  # truncated JPEG
        if i == 2:
            del sample["txt"]  # no caption
        if i == 3:
            sample["jpg"] = jpeg(i, 6, 6)  # below min_size
        if i == 4:
            sample = {"__key__": "k0004", "png": b"this is text", "txt": "x"}  # text named .png
        return sample

    write_shards(tmp_path, n_shards=1, per_shard=8, make=make)
    ds = source(tmp_path, resampled=False, shuffle_buffer=0, min_size=8)
    _, batches = read_epoch(ds, batch_size=8)
    (batch,) = batches
    assert len(batch["captions"]) == 4
    reasons = sorted(batch["skipped"])
    assert len(reasons) == 4
    assert reasons[0].startswith("shard-000000.tar/k0001: cannot read image")
    assert reasons[1] == "shard-000000.tar/k0002: no caption (fields text, txt, caption)"
    assert reasons[2] == "shard-000000.tar/k0003: image 6x6 is smaller than data.min_size=8"
    assert reasons[3].startswith("shard-000000.tar/k0004: cannot read image")


def test_caption_fields_from_members_and_json(tmp_path):
    def make(i):
        return {"__key__": f"k{i}", "jpg": jpeg(i),
                "json": json.dumps({"caption": f"json {i}", "alt": [f"a{i}", f"b{i}"]}), "txt": f"txt {i}"}

    write_shards(tmp_path, n_shards=1, per_shard=4, make=make)
    first = read_epoch(source(tmp_path, resampled=False, shuffle_buffer=0), batch_size=4)[1][0]["captions"]
    assert first == [f"txt {i}" for i in range(4)]  # text;txt;caption: txt comes first
    by_json = read_epoch(source(tmp_path, resampled=False, shuffle_buffer=0, caption_column="caption"), batch_size=4)
    assert by_json[1][0]["captions"] == [f"json {i}" for i in range(4)]
    pooled = set()
    ds = source(tmp_path, resampled=False, shuffle_buffer=0, caption_column="alt;txt", caption_pick="random")
    for epoch in range(8):
        pooled |= set(read_epoch(ds, batch_size=4, epoch=epoch)[1][0]["captions"])
    assert {"a0", "b0", "txt 0"} <= pooled


def test_corrupt_shard_is_counted_not_fatal(tmp_path):
    write_shards(tmp_path, n_shards=2)
    data = (tmp_path / "shard-000001.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(data[: len(data) // 3])
    _, batches = read_epoch(source(tmp_path, resampled=False, shuffle_buffer=0), batch_size=1)
    assert len(keys(batches)) >= 6 and any("shard-000001.tar" in r for b in batches for r in b["skipped"])


def test_a_resampled_stream_of_unreadable_shards_ends_with_named_skips(tmp_path):
    """Resampled, a source of one unreadable shard ends (max_bad_in_a_row=5) with no sample, its skips naming the
    shard."""
    import signal

    write_shards(tmp_path, n_shards=1)
    (tmp_path / "shard-000000.tar").write_bytes(b"not a tar file at all" * 10)
    signal.alarm(120)  # a regression hangs here: fail instead of stalling the suite
    try:
        _, batches = read_epoch(source(tmp_path, max_bad_in_a_row=5), batch_size=2)
    finally:
        signal.alarm(0)
    reasons = [r for b in batches for r in b["skipped"]]
    assert not keys(batches) and len(reasons) >= 4  # 5 skips, the last partial batch dropped
    assert all("shard-000000.tar: cannot read" in r for r in reasons)


def test_one_truncated_shard_of_four_is_named_once_and_the_others_fill_the_epoch(tmp_path):
    """Resampled (the default) with its default shuffle buffer, which draws the bad shard again and again
    before its first sample comes out: the bad shard is named once, and the epoch's batches hold the good
    shards' samples."""
    write_shards(tmp_path, n_shards=4, per_shard=8)
    data = (tmp_path / "shard-000002.tar").read_bytes()
    (tmp_path / "shard-000002.tar").write_bytes(data[:700])  # not even its first sample is whole
    ds = source(tmp_path)
    per_epoch, batches = read_epoch(ds, batch_size=4)
    reasons = [r for b in batches for r in b["skipped"]]
    assert len(batches) == per_epoch == 8
    assert len(reasons) == 1 and reasons[0].startswith("shard-000002.tar: cannot read"), reasons
    assert len(keys(batches)) == 8 * 4 - 1 and not any(k in {f"k{i:04d}" for i in range(16, 24)}
                                                       for k in keys(batches))
    _, again = read_epoch(ds, batch_size=4, epoch=1)  # warned once: the next epoch is all good samples
    assert not [r for b in again for r in b["skipped"]] and len(keys(again)) == 8 * 4
