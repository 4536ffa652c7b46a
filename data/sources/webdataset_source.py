"""WebDataset tar shards as a training source (webdataset's own shard lists, splitters and shuffle).

    data.source=webdataset data.path=SHARDS [data.manifest=manifest.json] [data.resampled=true]
    [data.shuffle_buffer=1000] [data.image_column=jpg;jpeg;png;webp] [data.caption_column=text;txt;caption]

`SHARDS` is a folder holding `manifest.json` and the shards it lists, brace-expanded names
(`/data/laion-{000000..000099}.tar`, also remote `pipe:`/`https://` URLs with `data.manifest` set), or a
local glob (`/data/laion/*.tar`). A sample is the shard members sharing a key (img2dataset layout:
`KEY.jpg`, `KEY.txt`, `KEY.json`); a caption field is a member's extension or a key of `KEY.json`.

The manifest (written by `data/make_shards.py`) gives each shard's sample count, from which the trainer
takes its epoch: every process reads `batches_per_epoch` batches per epoch. `data.max_train_samples` caps
the epoch at that many samples (over all processes), as `num_train_examples` does in diffusers' LCM script;
which samples those are varies with the epoch, as the stream does.

- `resampled=true` (default, as in diffusers' LCM script): every process and DataLoader worker draws
  shards with replacement (`wds.ResampledShards`), an endless stream cut with `with_epoch` into epochs
  of about manifest-many samples over all processes. Any number of shards works.
- `resampled=false`: the shard list is split by process (`wds.split_by_node`) and then by worker
  (`wds.split_by_worker`), so processes read disjoint shards and each sample once per epoch (the epoch
  ends for all processes after the batches of the process holding the fewest samples).

With data.buckets, each DataLoader worker holds its samples by size until a size fills a batch (buckets.py
`group_by_bucket`; at the end of its stream a part-filled batch is completed with repeats of its samples), so
every batch holds one size.

Shard order and the shuffle buffer are seeded by (train.seed, epoch, process, worker), augmentation by
(seed, epoch, sample key). Resume is approximate: a resumed run starts the interrupted epoch's stream
afresh, reseeded by the batch it resumes at, so epoch boundaries and step counts are kept but not
the exact samples of the rest of that epoch.
"""

from __future__ import annotations

import glob
import json
import math
import random
import zlib
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.shardlists import expand_urls
from webdataset.utils import make_seed, pytorch_worker_info

from sdkd.cli.errors import UserError
from sdkd.data.sources.buckets import group_by_bucket
from sdkd.data.sources.config import DataConfig
from sdkd.data.sources.core import open_image
from sdkd.data.sources.transforms import BadSample, Preprocess, dropout_rng, skip_marker

IMAGE_FIELDS = "jpg;jpeg;png;webp"
MANIFEST = "manifest.json"


def resolve_shards(path: str, manifest: str | None = None) -> tuple[list[str], list[int], dict]:
    """(shard urls, their sample counts, the manifest) for `data.path` and `data.manifest`."""
    folder = Path(path)
    if folder.is_dir():
        manifest_path = Path(manifest) if manifest else folder / MANIFEST
        data = read_manifest(manifest_path)
        urls = [str(folder / s["name"]) for s in data["shards"]]
    else:
        if any(c in path for c in "*?[") and "{" not in path:
            urls = sorted(glob.glob(path))
        else:
            urls = expand_urls(path)
        if not urls:
            raise UserError(f"config key 'data.path': no shards match '{path}'")
        if manifest is None and ("://" in urls[0] or urls[0].startswith("pipe:")):
            raise UserError(f"config key 'data.manifest': required for remote shards ('{path}')")
        data = read_manifest(Path(manifest) if manifest else Path(urls[0]).parent / MANIFEST)
    counts = {s["name"]: int(s["samples"]) for s in data["shards"]}
    missing = [u for u in urls if Path(u).name not in counts]
    if missing:
        raise UserError(f"shard {missing[0]} is not in the manifest ({len(missing)} of {len(urls)} shards missing)")
    return urls, [counts[Path(u).name] for u in urls], data


def read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: not found (shards need a manifest with per-shard sample counts: write them with "
                        f"data/make_shards.py, or set data.manifest)")
    try:
        data = json.loads(path.read_text())
        assert all(isinstance(s["name"], str) and int(s["samples"]) >= 0 for s in data["shards"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AssertionError):
        raise UserError(f"{path}: not a shard manifest "
                        f"(expected {{\"shards\": [{{\"name\": ..., \"samples\": N}}, ...]}})") from None
    return data


class WebDatasetSource(IterableDataset):
    """Tar shards -> preprocessed samples (or skip markers), for a DataLoader with `batch_size` set and
    `drop_last=True`. Call `set_batching` once and `set_epoch` before each epoch's `iter(loader)`."""

    def __init__(self, urls: list[str], counts: list[int], preprocess: Preprocess, seed: int = 0,
                 resampled: bool = True, shuffle_buffer: int = 1000, image_fields: str = IMAGE_FIELDS,
                 max_bad_in_a_row: int = 1000, max_samples: int | None = None):
        super().__init__()
        self.urls, self.counts, self.preprocess, self.seed = list(urls), list(counts), preprocess, seed
        self.resampled, self.shuffle_buffer, self.max_bad_in_a_row = resampled, shuffle_buffer, max_bad_in_a_row
        self.image_fields = [f for f in image_fields.split(";") if f]
        self.max_samples = max_samples
        self.epoch, self.resume_batch = 0, 0
        self.reported: set[str] = set()  # shards whose read error was reported (by this process or worker)
        self.batch_size, self.world_size, self.num_workers = 1, 1, 1

    @classmethod
    def from_config(cls, cfg: DataConfig, preprocess: Preprocess, seed: int) -> "WebDatasetSource":
        urls, counts, _ = resolve_shards(cfg.path, cfg.manifest)
        return cls(urls, counts, preprocess, seed, cfg.resampled, cfg.shuffle_buffer, cfg.image_column or IMAGE_FIELDS,
                   cfg.max_bad_in_a_row, cfg.max_train_samples)

    def __len__(self) -> int:
        """Samples per epoch over all processes: the manifest's count, at most `max_samples`."""
        total = sum(self.counts)
        return total if self.max_samples is None else min(total, self.max_samples)

    # -----------------------------------------------------------------------------------------
    # Epoch accounting

    def set_batching(self, batch_size: int, world_size: int, num_workers: int) -> int:
        """Fix the batching the stream is read with; returns the batches each process reads per epoch."""
        self.batch_size, self.world_size, self.num_workers = batch_size, world_size, max(num_workers, 1)
        return self.batches_per_epoch()

    def batches_per_epoch(self) -> int:
        b, world, workers = self.batch_size, self.world_size, self.num_workers
        if self.resampled:
            return len(self) // (b * world)
        # The same split as split_by_node then split_by_worker; each worker's DataLoader drops its last
        # partial batch.
        per_rank = []
        for rank in range(world):
            mine = self.counts[rank::world]
            per_rank.append(sum(sum(mine[w::workers]) // b for w in range(workers)))
        # max_samples cuts the epoch short: the trainer reads only this many batches of each process's stream.
        return min(min(per_rank), len(self) // (b * world))

    def set_epoch(self, epoch: int, resume_batch: int = 0) -> None:
        """Select the epoch's stream; `resume_batch` > 0 reseeds it for a run resumed mid-epoch."""
        self.epoch, self.resume_batch = epoch, resume_batch

    # -----------------------------------------------------------------------------------------
    # Reading

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.preprocess.transform.buckets:
            return self._samples()
        # Each worker batches its own stream: hold its samples by size until a size fills a batch.
        groups = group_by_bucket(self._samples(), self.batch_size, lambda s: tuple(s["pixel_values"].shape), pad=True)
        return chain.from_iterable(groups)

    def _samples(self) -> Iterator[dict[str, Any]]:
        rank, _, worker, _ = pytorch_worker_info()
        epoch_seed = make_seed(self.seed, self.epoch, self.resume_batch)
        stream_seed = make_seed(epoch_seed, rank, worker)
        if self.resampled:
            # ResampledShards seeds itself from (rank, worker) and `seed` when deterministic.
            stages = [wds.ResampledShards(self.urls, seed=epoch_seed, deterministic=True)]
        else:
            stages = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker,
                      wds.shuffle(len(self.urls), initial=len(self.urls), rng=random.Random(stream_seed))]
        errors = _ReadErrors(self.max_bad_in_a_row, self.reported)
        stages += [wds.tarfile_to_samples(handler=errors.handler), errors.reading]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                      rng=random.Random(make_seed(stream_seed, 1))))
        pipeline = wds.DataPipeline(*stages)
        if self.resampled:
            per_worker = math.ceil(self.batches_per_epoch() / self.num_workers) * self.batch_size
            pipeline = pipeline.with_epoch(per_worker)
        try:
            for raw in pipeline:
                yield from errors.markers()  # shards (or members) that could not be read, named
                yield self.sample(raw)
        except _Unreadable:
            errors.give_up()  # the skip markers below make the trainer stop the run, naming them
        yield from errors.markers()

    def sample(self, raw: dict[str, Any]) -> dict[str, Any]:
        """One tar sample (`__key__`, `__url__`, member bytes by extension) -> preprocessed sample or skip marker."""
        name = f"{Path(str(raw.get('__url__', '?'))).name}/{raw.get('__key__')}"
        index = zlib.crc32(name.encode())
        rng = np.random.default_rng([self.seed, self.epoch, index])
        try:
            caption = self.preprocess.caption(_caption_fields(raw, self.preprocess.caption_fields), rng, name)
            field = next((f for f in self.image_fields if f in raw), None)
            if field is None:
                raise BadSample(f"{name}: no image (members {', '.join(k for k in raw if not k.startswith('__'))})")
            image = open_image(raw[field], name)
            return self.preprocess(image, caption, rng, dropout_rng(self.seed, self.epoch, index), name)
        except BadSample as err:
            return skip_marker(err)


def _caption_fields(raw: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """Caption fields from members (`KEY.txt` -> "txt") and from the keys of `KEY.json`."""
    meta = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError):
            meta = {}
    found = {}
    for field in fields:
        if field in raw and field != "json":
            try:
                found[field] = raw[field].decode("utf-8").strip()
            except (AttributeError, UnicodeDecodeError):
                continue
        elif isinstance(meta, dict) and field in meta:
            found[field] = meta[field]
    return found


class _Unreadable(Exception):
    """Nothing but read errors, `max_bad_in_a_row` of them: a resampled stream of broken shards would
    otherwise retry them forever without yielding a sample."""


class _ReadErrors:
    """A webdataset handler that keeps going and remembers what could not be read, for skip markers. A
    shard's first error is reported; its repeats are not (a resampled stream draws a bad shard again and
    again, and as many markers would crowd the good shards' samples out of the epoch's batches), unless the
    stream gives up: `max_bad_in_a_row` errors with no sample read between them (counted as the shards are
    read, before the shuffle buffer), when every error becomes a marker for the trainer to stop on."""

    def __init__(self, max_bad_in_a_row: int, reported: set[str]):
        self.max_bad_in_a_row, self.reported = max_bad_in_a_row, reported
        self.new: list[str] = []
        self.repeats: list[str] = []
        self.in_a_row = 0

    def handler(self, exn: Exception) -> bool:
        where = next((a for a in reversed(exn.args) if isinstance(a, str) and ("/" in a or "." in a)), None)
        shard = Path(where).name if where else "shard"
        line = f"{shard}: cannot read ({type(exn).__name__}: {exn.args[0] if exn.args else exn})"
        (self.repeats if shard in self.reported else self.new).append(line)
        self.reported.add(shard)
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad_in_a_row:
            raise _Unreadable
        return True

    def reading(self, raws: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """A pipeline stage right after the tar reader: a sample read ends the errors in a row."""
        for raw in raws:
            self.in_a_row = 0
            self.repeats.clear()
            yield raw

    def markers(self) -> Iterator[dict[str, str]]:
        while self.new:
            yield {"skip": self.new.pop(0)}

    def give_up(self) -> None:
        self.new += self.repeats
        self.repeats = []
