"""What a trainer hands the loop (train/engine/loop.py): a task.

A task holds the modules it trains (`TrainedModule`: each with its own optimizer settings, gradient
clipping, optional EMA, checkpointed state and the steps it updates at), the frozen models it needs,
and one `train_step` that turns a batch into loss terms, giving each module's loss to `StepContext.backward`.
The loop does everything else once for every task: data, accumulation, optimizer and LR-schedule steps,
EMA, logging, sample grids, checkpoints and resume, and the final export.

What a task keeps of its own beyond its modules (counters, tensors, its own generators) it names in
`state_attributes`, or gives as `state_dict` / `load_state_dict` (torchtitan's Stateful): every checkpoint
saves it and a resumed run restores it (train/engine/checkpoints.py). A module's EMA weights are at hand in
`TrainedModule.ema_weights()` (a teacher-as-EMA target).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

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
    ema: object = field(default=None, init=False, repr=False)
    """Its EMA (a diffusers `EMAModel` over `state.ema_parameters()`), made by the loop when `ema_decay` is set
    and restored with the rest on resume; None before the loop prepares the module, or without an EMA."""

    def __post_init__(self) -> None:
        if self.state is None:
            kind = ModelState if isinstance(self.module, ModelMixin) else TensorState
            self.state = kind(self.module, self.name)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @contextmanager
    def ema_weights(self) -> Iterator[torch.nn.Module]:
        """The plain module with its EMA weights in, without gradients; on leaving, the trained weights are
        back, bit for bit (diffusers' EMAModel store / copy_to / restore: they wait in host memory). For a
        teacher that is the student's EMA (consistency distillation), or sampling from the EMA. Back-propagate
        outside the block: inside it the parameters hold other values than the ones a graph built outside saw."""
        if self.ema is None:
            raise RuntimeError(f"module '{self.name}' has no EMA (ema_decay is None, or the loop has not "
                               f"prepared it yet)")
        params = list(self.state.ema_parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            with torch.no_grad():
                yield self.module
        finally:
            self.ema.restore(params)


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
    """Models the step uses but never trains; the loop freezes them on the device, each in `frozen_dtype`. Named
    as their model family's components (`vae`, a text encoder's name), a frozen teacher U-Net `teacher`."""
    family = None
    """The model family of the frozen models (train/models/families.py), which gives each the dtype it runs in
    under mixed precision; None: every frozen model takes the mixed-precision dtype."""
    state_attributes: tuple[str, ...] = ()
    """The task's own attributes that checkpoints keep beside its modules (`state_dict`): say, a counter, a
    tensor, the task's own `torch.Generator`."""

    def state_dict(self) -> dict:
        """The task's own state, which every checkpoint saves and a resumed run gives back to `load_state_dict`
        before its first step: tensors, `torch.Generator`s (CPU or device), numbers, strings, None and dicts of
        these, by string keys without '.'. Each process saves its own (a generator per process stays its
        process's). Default: the attributes named in `state_attributes`."""
        return {name: getattr(self, name) for name in self.state_attributes}

    def load_state_dict(self, state: dict) -> None:
        """Take back what `state_dict` gave at the checkpoint: the same keys, each tensor on the device of the
        one `state_dict` gives now, each generator that one, set to its saved state. Default: sets the
        attributes back."""
        for name, value in state.items():
            setattr(self, name, value)

    eval_every: int = 0
    """The loop calls `evaluate` every this many steps, at step 0 of a new run and at the last step: the
    trainer's `eval.every` (train/engine/config.py's EvalConfig); 0: never."""

    def train_step(self, ctx: StepContext, batch: dict, rng) -> dict[str, torch.Tensor]:
        """One micro-batch: the loss terms to log (`loss` among them when there is one overall loss).
        Call `ctx.backward(name, loss)` for each module due at `ctx.step` (`module.due(ctx.step)`)."""
        raise NotImplementedError

    def frozen_dtype(self, name: str, mixed: torch.dtype) -> torch.dtype:
        """The dtype frozen model `name` runs in under the mixed-precision dtype `mixed`: its family's rule (a
        family may keep a VAE in fp32)."""
        if self.family is None:
            return mixed
        return self.family.dtype("unet" if name == "teacher" else name, mixed)

    def sample(self, step: int, sink: "SampleSink") -> None:
        """Write this step's sample grid (main process only). Default: none."""

    def evaluate(self, step: int) -> dict[str, float]:
        """Metrics of the trained model at this step (main process only; every `eval_every` steps), logged as
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
