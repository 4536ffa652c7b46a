"""What a trainer hands the loop (train/engine/loop.py): a task.

A task holds the modules it trains (`TrainedModule`: each with its own optimizer settings, gradient
clipping, optional EMA, checkpointed state and the steps it updates at), the frozen models it needs,
and one `train_step` that turns a batch into loss terms, giving each module's loss to `StepContext.backward`.
The loop does everything else once for every task: data, accumulation, optimizer and LR-schedule steps,
EMA, logging, sample grids, checkpoints and resume, and the final export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from diffusers import ModelMixin

from sdkd.train.engine.checkpoints import ModelState, TensorState
from sdkd.train.engine.config import OptimConfig
from sdkd.train.engine.sampling import make_grid


def every(n: int = 1, offset: int = 0, start: int = 0) -> Callable[[int], bool]:
    """The steps a module updates at: from step `start` on, every `n`-th step, shifted by `offset`.
    every() is each step; every(2) and every(2, 1) alternate; every(start=K) waits K steps."""
    return lambda step: step >= start and (step - start) % n == offset


@dataclass
class TrainedModule:
    """One module a task trains."""

    name: str
    """Names its checkpoint folder (`unet/`, `unet_ema/`) and its logged learning rate (`lr/NAME`)."""
    module: torch.nn.Module
    """The plain module; the loop prepares (wraps) it for the processes and keeps the wrapper for its forward."""
    optim: OptimConfig
    max_grad_norm: float = 0.0
    """Clip this module's gradient norm to this before each of its updates; 0: no clipping."""
    ema_decay: float | None = None
    """Keep an EMA of the module with this maximum decay (copied into it at the end); None: no EMA."""
    state: ModelState | None = None
    """How it is checkpointed and EMA-tracked; None: the whole module, under its name (a diffusers model as
    a loadable folder, `ModelState`; any other as a safetensors file, `TensorState`)."""
    due: Callable[[int], bool] = field(default_factory=every)
    """step -> whether this module updates at that step (0-based); its LR schedule counts only those steps."""

    def __post_init__(self) -> None:
        if self.state is None:
            kind = ModelState if isinstance(self.module, ModelMixin) else TensorState
            self.state = kind(self.module, self.name)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]


class StepContext:
    """What `Task.train_step` sees of the loop: the prepared modules and where their losses go."""

    def __init__(self, step: int, wrapped: dict[str, torch.nn.Module], backward: Callable):
        self.step, self._wrapped, self._backward = step, wrapped, backward
        self.updated: set[str] = set()

    def model(self, name: str) -> torch.nn.Module:
        """The prepared module to run forward when it gets a loss this step (DDP-wrapped with several
        processes). A module that gets none this step runs as its plain module: a DDP wrapper expects a
        backward into it after each forward."""
        return self._wrapped[name]

    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Back-propagate `loss` into module `name`'s parameters (only those: a generator's loss leaves a
        discriminator's gradients alone); the loop then updates it once the step's micro-batches are in."""
        self._backward(name, loss)
        self.updated.add(name)


class Task:
    """A trainer's work, handed to `Loop`. Subclasses set `modules` (and `frozen`) and implement `train_step`."""

    modules: list[TrainedModule]
    frozen: dict[str, torch.nn.Module | None] = {}
    """Models the step uses but never trains; the loop freezes them on the device, each in `frozen_dtype`."""

    def train_step(self, ctx: StepContext, batch: dict, rng) -> dict[str, torch.Tensor]:
        """One micro-batch: the loss terms to log (`loss` among them when there is one overall loss).
        Call `ctx.backward(name, loss)` for each module due at `ctx.step` (`module.due(ctx.step)`)."""
        raise NotImplementedError

    def frozen_dtype(self, name: str, mixed: torch.dtype) -> torch.dtype:
        """The dtype frozen model `name` runs in under the mixed-precision dtype `mixed` (a model family may keep
        one in fp32: train/models/families.py). Default: `mixed`."""
        return mixed

    def sample(self, step: int, sink: "SampleSink") -> None:
        """Write this step's sample grid (main process only). Default: none."""

    def evaluate(self, step: int) -> dict[str, float]:
        """Metrics of the trained model at this step (main process only; every `eval.every` steps), logged as
        `eval/NAME` beside the losses. Default: none."""
        return {}

    def export(self, out: Path) -> list[Path]:
        """Write the trained result at the end (main process, EMA weights in): the paths, the model first."""
        raise NotImplementedError

    def next_steps(self, exported: list[Path]) -> list[tuple[str, str]]:
        """Commands to run on what `export` wrote, each with what it gives; the run's summary ends with them."""
        return []


class SampleSink:
    """Where a task's sample grids go: OUTPUT/samples/ and the trackers."""

    def __init__(self, folder: Path, step: int, log_images: Callable):
        self.folder, self.step, self._log_images = folder, step, log_images
        folder.mkdir(parents=True, exist_ok=True)

    def grid(self, rows: list, captions: list[str], row_labels: list[str], name: str | None = None) -> Path:
        """Save rows of images as one labelled grid; default name `step-STEP.png` (the run summary's newest)."""
        path = self.folder / (name or f"step-{self.step}.png")
        make_grid(rows, captions, row_labels).save(path)
        return path

    def log(self, tag: str, images: list, captions: list[str]) -> None:
        self._log_images(tag, images, self.step, captions)
