"""Fingerprints of model weights, which every cache is keyed by (not by the path the weights were read from).

A cache (ODE pairs, evaluation triples, a latent cache) records the fingerprint of the weights it was made with
and is reused only while they are the same: new weights at the same path (a teacher re-exported, a folder
replaced) make a stale cache, which is made again or refused naming what changed.

- `module_fingerprint`: the tensors of loaded models (names, dtypes, shapes, bytes), wherever they came from
  (a folder, a single file, the hub).
- `files_fingerprint`: the weight files under folders or files on disk, for models a run does not load (a
  trainer reading a latent cache never loads the VAE or text encoders the cache was made with).

Both hash every byte (sha256): a few seconds for an SD-1.5 teacher, and a file's digest is computed once per
process.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from sdkd.train.formats.weight_files import WEIGHT_SUFFIXES

DIGITS = 16  # hex digits kept: enough to tell weights apart, short enough to read in a message


def module_fingerprint(*modules: torch.nn.Module) -> str:
    """sha256 over each module's named parameters and buffers in order: name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:DIGITS]


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """A file's sha256; the key's size, time and inode tell a rewritten file from the one already hashed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _file_digest(os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def weight_files(path: str | os.PathLike) -> list[Path]:
    """`path` itself when it is a file, else the weight files directly in the folder (every variant), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) \
        if path.is_dir() else []


def files_fingerprint(*paths: str | os.PathLike) -> str:
    """sha256 over the weight files of each path (a file, or a model's folder): their names within it and
    their bytes. A path with no weight file counts as empty."""
    h = hashlib.sha256()
    for i, path in enumerate(paths):
        for file in weight_files(path):
            h.update(f"{i}:{file.name}:{file_digest(file)}\n".encode())
    return h.hexdigest()[:DIGITS]


def teacher_fingerprint(unet: torch.nn.Module, parts) -> str:
    """The fingerprint of what a teacher's samples and predictions depend on: its U-Net and text encoders
    (`parts`: a `PipelineParts` or a diffusers pipeline, by its family's component names)."""
    from sdkd.train.models.families import family_of

    encoders = [parts.components[name] for name in family_of(unet.config).text_encoders]
    return module_fingerprint(unet, *(e for e in encoders if e is not None))


def what_changed(old: dict, new: dict) -> str:
    """What differs between two records of what made a cache, briefly (long lists by name only)."""
    keys = [k for k in new if old.get(k) != new[k]]
    shown = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in keys if not isinstance(new[k], (list, tuple))]
    return ", ".join(shown + [k for k in keys if isinstance(new[k], (list, tuple))]) or "unreadable"


def component_fingerprint(parts, name: str) -> str:
    """The fingerprint of the weight files of `parts`' component `name` (a `PipelineParts`; loaded or not: a run
    from a latent cache checks the cache against the encoders it does not load); without a local folder (a hub
    id not on disk), of the source's name."""
    return files_fingerprint(parts.folder / name) if parts.folder is not None else text_fingerprint(parts.source)


def text_fingerprint(text: str) -> str:
    """For weights known only by a name (a hub id and revision that is not on disk): the name's hash."""
    return hashlib.sha256(text.encode()).hexdigest()[:DIGITS]
