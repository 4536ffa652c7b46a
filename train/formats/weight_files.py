"""Weight files that users give by path (metric and loss networks): read safely, loaded strictly.

- `.safetensors`: read with safetensors (no code runs).
- `.pth` / `.pt` / `.bin` / `.ckpt`: `torch.load(weights_only=True, map_location="cpu")`, which refuses
  anything but tensors and plain containers (never a full pickle). A checkpoint that wraps its state
  dict as `{"state_dict": {...}}` is unwrapped.
- a folder: every such file in it, merged (e.g. a backbone file beside a file of heads).

Every mistake (no such file, unreadable file, not the network the key asks for, a tensor of the wrong
shape) is one `ConfigError` line naming the config key and the file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sdkd.cli.errors import ConfigError, first_line

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


def _fail(key: str, path: Path, problem: str) -> ConfigError:
    return ConfigError(f"config key '{key}': '{path}' {problem}")


def _read_file(file: Path, key: str) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise _fail(key, file, f"is not a readable .safetensors file ({first_line(err)})") from None
    if file.suffix not in TORCH_SUFFIXES:
        raise _fail(key, file, f"is not a weight file (expected {', '.join(WEIGHT_SUFFIXES)})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # not a plain state dict (or not a torch file): refused, never run
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\.\s|\n|$)", str(err))
        raise _fail(key, file, f"is not a state dict of tensors (torch.load with weights_only=True refused it: "
                               f"{reason[1] if reason else first_line(err)}); give a plain state dict or a "
                               f".safetensors file") from None
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many exception types
        raise _fail(key, file, f"cannot be read by torch.load ({first_line(err) if str(err) else type(err).__name__})"
                    ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise _fail(key, file, "holds no state dict (a mapping of names to tensors)")
    return dict(state)


def read_weights(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, or of every weight file in a folder; `key` is the config key that
    named `path`, for the error line."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise _fail(key, path, f"is a folder without weight files ({', '.join(WEIGHT_SUFFIXES)})")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state |= _read_file(f, key)
        return state
    if not path.is_file():
        raise _fail(key, path, "does not exist")
    return _read_file(path, key)


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], key: str, path: str | Path,
                what: str, ignore: Callable[[str], bool] = lambda name: False,
                optional: Iterable[str] = ()) -> torch.nn.Module:
    """Load `state` into `module`: every tensor of the module present with its shape (except names
    starting with an `optional` prefix, and BatchNorm's step counters), nothing else in the file unless
    `ignore(name)` says so. `what` names the network for the error line ("the FID Inception-v3")."""
    path = Path(path)
    state = {name: t for name, t in state.items() if not ignore(name)}
    expected = module.state_dict()
    optional = tuple(optional)
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(name for name in set(expected) - set(state)
                     if not name.endswith("num_batches_tracked") and not name.startswith(optional))
    if unexpected or missing:
        parts = ([f"{len(missing)} tensors missing (first: {missing[0]})"] if missing else []) + (
            [f"{len(unexpected)} unknown (first: {unexpected[0]})"] if unexpected else [])
        raise _fail(key, path, f"is not {what}: {'; '.join(parts)}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise _fail(key, path, f"is not {what}: {name} has shape {list(t.shape)}, expected "
                                   f"{list(expected[name].shape)}")
    module.load_state_dict(state, strict=False)
    return module
