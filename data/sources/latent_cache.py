"""Latent cache: VAE posteriors and text conditioning computed once (`train/cache_latents.py`), read by every
trainer with `data.cache=PATH` instead of images, so no VAE or text encoder runs (or is loaded) per step.

Layout of a cache folder:

- `latents-NNNNNN.safetensors`: per shard, tensors `mean` and `std` [n, C, h, w] (the VAE posterior's
  mean and standard deviation, so the latent is still sampled at train time: `(mean + std * noise) *
  scaling_factor` with the step's generator), the model family's conditioning tensors by name
  (train/models/families.py; SD-1.x/2.x: `embeds` [n, 77, D]), `original_size`, `crop_top_left` and
  `target_size` [n, 2], `index` [n] (each row's sample number in the cache); metadata `captions` and `keys`
  (JSON lists). With size buckets a shard holds one bucket's samples (its manifest entry says which).
- `empty_prompt.safetensors`: the caption-made conditioning tensors of "" (SD: `embeds` [77, D]), swapped
  in by caption dropout at train time.
- `manifest.json`: `format`, `samples`, `shards` ([{"name", "samples"}, + "bucket" with buckets]),
  `buckets` (the [height, width] sizes of data.buckets; absent without), `scaling_factor`, `latent_shape`,
  `embed_shape`, `family` and `fields` (the model family and its conditioning tensors' names; a trainer of
  another family refuses the cache), `dtype`, `teacher`, `weights` (the fingerprints of the teacher's models
  it was made with, train/formats/fingerprint.py: a trainer whose teacher's weights differ refuses the cache),
  `resolution`, `data` (the source config it was made from), `skipped`. Written last: a folder without it is
  incomplete.

Sample `i` of the cache is sample `i` of the source in index order (bad samples left out), and the
cache is a map-style dataset: the trainer shards, shuffles and resumes it exactly like the source (with
buckets, the cache tells each sample's bucket from its shard, as the source from its image sizes).
The augmentation is frozen at caching time (epoch 0's crop, flip and caption choice); caption dropout
still happens per epoch, with the same draws as an uncached run (`transforms.dropout_rng`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sdkd.cli.errors import UserError, first_line
from sdkd.cli.files import save_file
from sdkd.data.sources.transforms import dropout_rng

FORMAT = "sdkd-latent-cache"
MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What caches written before manifests named their family hold: SD-1.x/2.x's conditioning.
LEGACY_FAMILY = {"family": "sd", "fields": ["embeds"]}


# ---------------------------------------------------------------------------------------------
# Reading


def check_cache(root: Path) -> Path:
    """The manifest of the finished latent cache at `root`; one line when there is none."""
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"config key 'data.cache': {manifest_path} not found (not a finished latent cache; "
                        f"write one with train/cache_latents.py)")
    return manifest_path


class CachedLatents(Dataset):
    """Item `i`: {"latent_mean", "latent_std", the conditioning tensors by name (`fields`; SD: "embeds"),
    "caption", "original_size", "crop_top_left", "key"}."""

    def __init__(self, path: str | Path, seed: int = 0, caption_dropout: float = 0.0):
        self.root, self.seed, self.caption_dropout, self.epoch = Path(path), seed, caption_dropout, 0
        manifest_path = check_cache(self.root)
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if self.manifest.get("format") != FORMAT:
                raise ValueError("no sdkd latent-cache format tag")
            self.names = [str(s["name"]) for s in self.manifest["shards"]]
            self.family = str(self.manifest.get("family", LEGACY_FAMILY["family"]))
            self.fields = [str(name) for name in self.manifest.get("fields", LEGACY_FAMILY["fields"])]
            counts = [int(s["samples"]) for s in self.manifest["shards"]]
            self.buckets = [tuple(b) for b in self.manifest["buckets"]] if "buckets" in self.manifest else None
            self.shard_buckets = [int(s["bucket"]) for s in self.manifest["shards"]] if self.buckets else None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"config key 'data.cache': {manifest_path} is not a latent cache manifest "
                            f"({first_line(err)}); write the cache again with train/cache_latents.py") from None
        self._open: dict[int, Any] = {}
        # Where each sample is: shards hold consecutive samples, or (with buckets) each bucket's in turn.
        self.shard_of = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self.row_of = np.concatenate([np.arange(n, dtype=np.int32) for n in counts])
        for k in range(len(counts)):  # every shard opened once here: a damaged one is named before training
            handle = self._shard(k)[0]
            if self.buckets:
                index = handle.get_tensor("index").numpy()
                self.shard_of[index], self.row_of[index] = k, np.arange(len(index))

    def __getstate__(self) -> dict:  # open files stay in the process that opened them
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return len(self.shard_of)

    def sample_buckets(self) -> np.ndarray | None:
        """Each sample's bucket (an index into `buckets`), from its shard's; None for a cache made without."""
        return None if self.buckets is None else np.asarray(self.shard_buckets)[self.shard_of]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def check_teacher(self, parts, resolution: int, fingerprint: Callable[[str], str] | None = None) -> None:
        """The cache must come from this teacher's model family, VAE and text encoder width, at this resolution;
        and, given `fingerprint` (component name -> fingerprint of the teacher's weight files), its weights."""
        m = self.manifest
        if (self.family, self.fields) != (parts.family.name, list(parts.family.fields)):
            raise UserError(f"latent cache {self.root} was made for model family '{self.family}' (tensors "
                            f"{', '.join(self.fields)}), the teacher is of family '{parts.family.name}' (tensors "
                            f"{', '.join(parts.family.fields)}); write a cache with this teacher")
        if m["resolution"] != resolution:
            raise UserError(f"config key 'data.resolution': {resolution}, but the latent cache {self.root} was made "
                            f"at {m['resolution']}")
        if abs(m["scaling_factor"] - parts.vae_config["scaling_factor"]) > 1e-9:
            raise UserError(f"latent cache {self.root}: VAE scaling factor {m['scaling_factor']} differs from the "
                            f"teacher's {parts.vae_config['scaling_factor']} (made with another VAE)")
        width = getattr(parts.unet, "config", {}).get("cross_attention_dim") if parts.unet is not None else None
        if width is not None and m["embed_shape"][-1] != width:
            raise UserError(f"latent cache {self.root}: text embeddings of width {m['embed_shape'][-1]}, the teacher "
                            f"U-Net takes {width} (made with another text encoder)")
        # Caches written before weights were fingerprinted have none.
        made = (m.get("weights") or {}) if fingerprint else {}
        changed = [name for name in sorted(made) if made[name] != fingerprint(name)]
        if changed:
            raise UserError(f"latent cache {self.root} was made with other weights of the teacher's "
                            f"{' and '.join(changed)} (teacher '{m.get('teacher')}' then) than this run's teacher has "
                            f"(fingerprint {made[changed[0]]} -> {fingerprint(changed[0])}); write the "
                            f"cache again with train/cache_latents.py --overwrite")

    def _shard(self, k: int):
        if k not in self._open:
            path = self.root / self.names[k]
            try:
                handle = safe_open(str(path), framework="pt")
                meta = handle.metadata() or {}
                self._open[k] = (handle, json.loads(meta["captions"]), json.loads(meta["keys"]))
            except (OSError, SafetensorError, ValueError, KeyError, TypeError) as err:
                raise UserError(f"latent cache shard {path} is damaged or missing ({first_line(err)[:120]}); write "
                                f"the cache again with train/cache_latents.py --overwrite") from None
        return self._open[k]

    def _empty_prompt(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_empty"):
            self._empty = load_file(self.root / EMPTY_PROMPT)
        return self._empty

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        k, j = int(self.shard_of[index]), int(self.row_of[index])
        handle, captions, keys = self._shard(k)

        def get(name):
            return handle.get_slice(name)[j : j + 1][0]

        sample = {
            "latent_mean": get("mean"),
            "latent_std": get("std"),
            **{name: get(name) for name in self.fields},
            "caption": captions[j],
            "original_size": tuple(get("original_size").tolist()),
            "crop_top_left": tuple(get("crop_top_left").tolist()),
            **({"target_size": tuple(get("target_size").tolist())} if "target_size" in handle.keys() else {}),
            "key": keys[j],
        }
        if self.caption_dropout > 0 and dropout_rng(self.seed, self.epoch, index).random() < self.caption_dropout:
            for name, empty in self._empty_prompt().items():
                sample[name] = empty.to(sample[name].dtype)
            sample["caption"] = ""
        return sample


# ---------------------------------------------------------------------------------------------
# Writing


class _ShardWriter:
    """Accumulates encoded samples per bucket and writes `latents-NNNNNN.safetensors` whenever a bucket has
    `shard_size` samples."""

    def __init__(self, root: Path, shard_size: int, dtype: torch.dtype):
        self.root, self.shard_size, self.dtype = root, shard_size, dtype
        self.shards: list[dict] = []
        self._rows: dict[int | None, list[dict]] = {}

    def add(self, bucket: int | None, **row) -> None:
        rows = self._rows.setdefault(bucket, [])
        rows.append(row)
        if len(rows) == self.shard_size:
            self.flush(bucket)

    def flush(self, bucket: int | None) -> None:
        rows = self._rows.pop(bucket, [])
        if not rows:
            return
        name = f"latents-{len(self.shards):06d}.safetensors"
        tensors = {key: torch.stack([torch.as_tensor(r[key]) for r in rows]).contiguous() for key in rows[0]
                   if key not in ("caption", "key")}
        for key, t in tensors.items():  # the posterior and the conditioning; the integer sizes stay exact
            if t.is_floating_point():
                tensors[key] = t.to(self.dtype)
        meta = {"captions": json.dumps([r["caption"] for r in rows]), "keys": json.dumps([r["key"] for r in rows])}
        tmp = self.root / f".{name}.tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, self.root / name)
        self.shards.append({"name": name, "samples": len(rows), **({} if bucket is None else {"bucket": bucket})})

    def flush_all(self) -> None:
        for bucket in list(self._rows):
            self.flush(bucket)


def _one(sample: dict) -> dict:
    """The DataLoader's collate for single samples: as they are (batched by bucket afterwards)."""
    return sample


def write_cache(dataset: Dataset, encoder, out: str | Path, *, batch_size: int = 16, num_workers: int = 0,
                shard_size: int = 1000, dtype: str = "fp32", strict: bool = False, info: dict | None = None,
                buckets: tuple[tuple[int, int], ...] = (), log=print) -> dict:
    """Encode every sample of `dataset` once with `encoder` (a `BatchEncoder`: its `posterior`, `conditioning`
    and `empty_prompt`), in batches of one size (`buckets`: the source's data.buckets sizes); returns the
    manifest. Cache sample i is the i-th good sample in index order. Bad samples are left out, named and
    counted."""
    from sdkd.data.sources.buckets import group_by_bucket
    from sdkd.data.sources.core import collate

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    for old in root.glob("latents-*.safetensors"):
        old.unlink()
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    if isinstance(dataset, IterableDataset):
        dataset.set_batching(1, 1, num_workers)
    loader = DataLoader(dataset, batch_size=None, shuffle=False, collate_fn=_one, num_workers=num_workers)
    writer = _ShardWriter(root, shard_size, DTYPES[dtype])
    skipped, latent_shape, embed_shape = 0, None, None

    def good_samples():
        nonlocal skipped
        position = 0
        for sample in loader:
            if "skip" in sample:
                if strict:
                    raise UserError(f"bad sample (data.strict=true): {sample['skip']}")
                log(f"warning: skipped a sample: {sample['skip']}")
                skipped += 1
                continue
            yield {**sample, "index": position}
            position += 1

    for samples in group_by_bucket(good_samples(), batch_size, lambda s: tuple(s["target_size"]), pad=False):
        batch = collate(samples)
        mean, std = encoder.posterior(batch)
        cond = encoder.conditioning(batch)
        latent_shape, embed_shape = list(mean.shape[1:]), list(cond.hidden_states.shape[1:])
        bucket = buckets.index(samples[0]["target_size"]) if buckets else None
        for i, caption in enumerate(batch["captions"]):
            writer.add(bucket, mean=mean[i].cpu(), std=std[i].cpu(),
                       **{k: t[i].cpu() for k, t in cond.tensors().items()}, caption=caption,
                       key=batch["keys"][i], index=batch["index"][i], original_size=batch["original_size"][i],
                       crop_top_left=batch["crop_top_left"][i], target_size=batch["target_size"][i])
    writer.flush_all()
    if not writer.shards:
        raise UserError("latent cache: no sample could be read")
    save_file({k: t.cpu().to(DTYPES[dtype]).contiguous() for k, t in encoder.empty_prompt().items()},
              root / EMPTY_PROMPT)
    manifest = {
        "format": FORMAT,
        "samples": sum(s["samples"] for s in writer.shards),
        "shards": writer.shards,
        "scaling_factor": float(encoder.vae.config.scaling_factor),
        "latent_shape": latent_shape,
        "embed_shape": embed_shape,
        "family": encoder.family.name,
        "fields": list(encoder.family.fields),
        "dtype": dtype,
        **({"buckets": [list(b) for b in buckets]} if buckets else {}),
        "skipped": skipped,
        **(info or {}),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
