"""Size buckets (data.buckets): batches that each hold images of one size.

Map-style sources tell each sample's bucket before any image is decoded (`sample_buckets`: from image
headers, the synthetic sizes, or a latent cache's manifest), and `BucketBatchSampler` deals the batches. A
streaming source (webdataset) learns a sample's bucket only once it is decoded, so `group_by_bucket` holds
samples per bucket and lets a bucket go as soon as it fills a batch.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, Iterator

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Sampler, Subset


def sample_buckets(dataset: Dataset) -> np.ndarray | None:
    """Each sample's bucket index (int array, in index order), or None for a dataset without buckets. A
    dataset with buckets has a `sample_buckets()` method; a `Subset` (data.max_train_samples) takes its rows."""
    if isinstance(dataset, Subset):
        whole = sample_buckets(dataset.dataset)
        return None if whole is None else whole[np.asarray(dataset.indices, dtype=np.int64)]
    method = getattr(type(dataset), "sample_buckets", None)
    return None if method is None else method(dataset)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of sample indices, each from one bucket, for `num_processes` processes of `batch_size` each.

    Per epoch (`set_epoch`), with numpy's generator seeded by (seed, epoch): each bucket's samples are
    shuffled and cut into global batches of `batch_size x num_processes` (a bucket's remainder sits the
    epoch out; which samples that is changes with the epoch), the global batches are shuffled, and each is
    yielded as `num_processes` consecutive batches. accelerate's `BatchSamplerShard` hands process k the k-th
    of them, so every process's batch is of the global batch's bucket and two processes of batch B see what
    one process of batch 2B sees. Resuming skips whole batches (accelerate's `skip_first_batches`)."""

    def __init__(self, buckets: np.ndarray, batch_size: int, num_processes: int = 1, seed: int = 0):
        self.buckets, self.batch_size = np.asarray(buckets), batch_size
        self.num_processes, self.seed = num_processes, seed
        self.drop_last = True  # every batch is full: BatchSamplerShard keeps them all
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        size = self.batch_size * self.num_processes
        batches = []
        for bucket in np.unique(self.buckets):
            members = rng.permutation(np.flatnonzero(self.buckets == bucket))
            batches += list(members[: len(members) // size * size].reshape(-1, size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield from (part.tolist() for part in batch.reshape(self.num_processes, self.batch_size))

    def __len__(self) -> int:
        _, counts = np.unique(self.buckets, return_counts=True)
        return int(sum(counts // (self.batch_size * self.num_processes))) * self.num_processes


def group_by_bucket(items: Iterable[dict[str, Any]], batch_size: int, key: Callable[[dict], Hashable],
                    pad: bool) -> Iterator[list[dict[str, Any]]]:
    """A stream of samples and skip markers (`{"skip": ...}`) as groups of `batch_size` items whose samples
    share a bucket (`key`); a skip marker joins the fullest pending group (or waits for the next sample).

    At the end of the stream, each part-filled group comes out completed with repeats of its own samples when
    `pad` (a trainer's stream must give every process its batches), else as it is; then the skip markers left
    without any group."""
    pending: dict[Hashable, list[dict[str, Any]]] = {}
    loose: list[dict[str, Any]] = []
    for item in items:
        if "skip" in item:
            if pending:
                fullest, group = max(pending.items(), key=lambda kv: len(kv[1]))
                group.append(item)
                if len(group) == batch_size:
                    yield pending.pop(fullest)
            else:
                loose.append(item)
                if len(loose) == batch_size:
                    yield loose
                    loose = []
            continue
        bucket = key(item)
        group = pending.setdefault(bucket, []) + [*loose, item]  # the sample last: a remainder holds one
        loose = []
        while len(group) >= batch_size:
            yield group[:batch_size]
            group = group[batch_size:]
        if group:
            pending[bucket] = group
        else:
            del pending[bucket]
    for group in pending.values():
        samples = [s for s in group if "skip" not in s]
        yield group + [samples[i % len(samples)] for i in range(batch_size - len(group))] if pad else group
    if loose:
        yield loose


def image_size(source: Any) -> tuple[int, int] | None:
    """(height, width) of an image file, its bytes or a file object as it will be decoded (upright per its
    EXIF orientation: `core.open_image`), from its header alone; None when it cannot be read (it then
    becomes a skip marker when loaded)."""
    try:
        with Image.open(source) as image:
            width, height = image.size
            # EXIF orientations 5-8 turn the image a quarter: exif_transpose swaps its sides.
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
            return height, width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # reported when it is loaded
        return None
