"""Checkpoints: `OUTPUT/checkpoint-STEP/`, written whole or not at all, rotated, resumable.

accelerate's save_state/load_state carry the optimizer, LR scheduler and RNG states; save/load
hooks store the trained model (and its EMA) through a `ModelState`: by default the whole U-Net as
diffusers folders (`unet/`, `unet_ema/`, safetensors), so a checkpoint is also a loadable model; a
LoRA run stores only its adapter (`train/lora_io.py`). A checkpoint is written into a hidden
temporary folder and renamed into place when every process has finished, so a run killed
mid-write never leaves a `checkpoint-STEP` that `latest` would pick.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdkd.train.config import UserError

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_latest(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`latest` -> newest complete checkpoint (None when there is none yet); a path must exist."""
    if resume is None:
        return None
    if resume == "latest":
        return find_latest(output_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume '{resume}': not a checkpoint folder (no {STATE_FILE})")
    return path


class ModelState:
    """How a trainer's model is made an EMA of, checkpointed and restored: here the whole U-Net.

    `model` must offer `save_pretrained(dir)` and keep its weights in `dir/diffusion_pytorch_model.safetensors`.
    Other trainers subclass this (train/lora_io.py `LoraState` keeps only the adapter).
    """

    def __init__(self, model, subfolder: str = "unet"):
        self.model, self.subfolder = model, subfolder

    def ema_parameters(self):
        """The parameters the EMA tracks (and copies into the model at the end of training)."""
        return self.model.parameters()

    def make_ema(self, decay: float):
        from diffusers.training_utils import EMAModel

        return EMAModel(self.model.parameters(), decay=decay, model_cls=type(self.model),
                        model_config=self.model.config)

    def save(self, folder: Path, ema=None) -> None:
        self.model.save_pretrained(folder / self.subfolder)
        if ema is not None:
            ema.save_pretrained(str(folder / f"{self.subfolder}_ema"))

    def load(self, folder: Path, ema=None, device=None) -> None:
        self.model.load_state_dict(load_file(folder / self.subfolder / "diffusion_pytorch_model.safetensors"),
                                   strict=True)
        if ema is not None:
            loaded = type(ema).from_pretrained(str(folder / f"{self.subfolder}_ema"), model_cls=type(self.model))
            ema.load_state_dict(loaded.state_dict())
            ema.to(device)


class Checkpointer:
    """Saves and restores the whole training state through one accelerator.

    `model` is a `ModelState`, or the unwrapped trained module (then stored whole: `ModelState(model)`).
    """

    def __init__(self, accelerator, output_dir: str | Path, total_limit: int | None,
                 model, ema=None, subfolder: str = "unet"):
        self.accelerator, self.output_dir, self.total_limit = accelerator, Path(output_dir), total_limit
        self.state = model if isinstance(model, ModelState) else ModelState(model, subfolder)
        self.ema = ema
        accelerator.register_save_state_pre_hook(self._save_models)
        accelerator.register_load_state_pre_hook(self._load_models)

    # accelerate hooks: store models ourselves, so accelerate does not pickle them as well.
    def _save_models(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            self.state.save(Path(output_dir), self.ema)
        weights.clear()

    def _load_models(self, models, input_dir):
        self.state.load(Path(input_dir), self.ema, self.accelerator.device)
        models.clear()

    def save(self, step: int, generator: torch.Generator) -> Path:
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".tmp-checkpoint-{step}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed mid-write
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        save_file({"state": generator.get_state()}, tmp / f"generator-{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        if self.total_limit is None:
            return
        for old in list_checkpoints(self.output_dir)[: -self.total_limit]:
            shutil.rmtree(old)

    def load(self, path: Path, generator: torch.Generator) -> int:
        """Restore everything saved at `path`; returns its step."""
        acc = self.accelerator
        acc.load_state(str(path))
        rng = path / f"generator-{acc.process_index}.safetensors"
        if not rng.is_file():
            raise UserError(f"resume '{path}': written by {len(list(path.glob('generator-*')))} processes, "
                            f"resumed with {acc.num_processes}")
        generator.set_state(load_file(rng)["state"])
        return json.loads((path / STATE_FILE).read_text())["step"]
