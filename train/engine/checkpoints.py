"""Checkpoints: `OUTPUT/checkpoint-STEP/`, written whole or not at all, rotated, resumable.

accelerate's save_state/load_state carry the optimizer, LR scheduler and RNG states; save/load
hooks store the trained model (and its EMA) through a `ModelState`: by default the whole U-Net as
diffusers folders (`unet/`, `unet_ema/`, safetensors), so a checkpoint is also a loadable model; a
LoRA run stores only its adapter (`train/formats/lora_io.py`). What the task keeps of its own
(`Task.state_dict`: counters, tensors, generators) each process saves as `task_state-RANK.safetensors`.

A checkpoint is complete by its contents, not its name: `trainer_state.json`, written last, lists
every file with its size, and only a folder whose files all match is used. A checkpoint is written
into a hidden temporary folder and renamed into place; one it replaces (a step saved again) and
ones rotated out are first renamed to hidden names, so a kill at any point leaves every
`checkpoint-STEP` either complete or gone, and the next start puts a replaced one back.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from sdkd.cli.errors import UserError, first_line
from sdkd.cli.files import follow_umask, save_file
from sdkd.cli.words import counted

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
_REPLACED, _DELETING, _TMP = ".replaced-", ".deleting-", ".tmp-"
TASK_STATE = "task_state-{}.safetensors"
"""A process's task state (`save_task_state`), by process index."""


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when every file its state lists is there whole."""
    try:
        files = json.loads((path / STATE_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"no {STATE_FILE} (not a checkpoint, or its write was interrupted)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is unreadable"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def saved_step(path: Path) -> int | None:
    """The step a checkpoint was saved at, or None when its state is missing or unreadable."""
    try:
        return int(json.loads((path / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _named_checkpoints(root: Path) -> list[Path]:
    """`checkpoint-STEP` folders, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in _named_checkpoints(Path(output_dir)) if checkpoint_problem(p) is None]


def find_latest(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`latest` -> the newest checkpoint (None when there is none yet), which must be complete;
    `latest_complete` -> the newest complete one, naming each newer broken one passed over;
    a path must be a complete checkpoint."""
    if resume is None:
        return None
    if resume in ("latest", "latest_complete"):
        named = _named_checkpoints(Path(output_dir))
        for path in reversed(named):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            if resume == "latest":
                raise UserError(f"resume=latest: the newest checkpoint '{path}' is incomplete ({problem}); "
                                f"remove it, or set resume=latest_complete to use the newest complete one")
            print(f"warning: resume=latest_complete: passing over '{path}' ({problem})", file=sys.stderr)
        return None
    path = Path(resume)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"resume '{resume}': not a complete checkpoint ({problem})")
    return path


def _unreadable_state(path: Path, pattern: str = "*") -> str | None:
    """The first of accelerate's pickled state files in checkpoint `path` (matching `pattern`) that its loader
    refuses, by name."""
    from accelerate.utils import load

    for file in sorted(f for f in path.glob(pattern) if f.suffix in (".bin", ".pkl", ".pt", ".pth")):
        try:
            load(file, map_location="cpu")
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError):
            return file.name
    return None


def recover(output_dir: Path) -> None:
    """Undo what a kill left half-done: put back a checkpoint that was being replaced when its
    replacement never arrived, and finish removing rotated-out and half-written ones."""
    if not output_dir.is_dir():
        return
    for path in output_dir.iterdir():
        if path.name.startswith(_REPLACED):
            final = output_dir / path.name.removeprefix(_REPLACED)
            if final.exists():
                shutil.rmtree(path)
            else:
                path.rename(final)
        elif path.name.startswith((_DELETING, _TMP)):
            shutil.rmtree(path)


class ModelState:
    """How a trained diffusers model is made an EMA of, checkpointed and restored: whole, as a diffusers
    folder (`SUBFOLDER/`, `SUBFOLDER_ema/`), so a checkpoint is also a loadable model.

    `model` must offer `save_pretrained(dir)` and keep its weights in `dir/diffusion_pytorch_model.safetensors`.
    `TensorState` keeps any other module; train/formats/lora_io.py `LoraState` keeps only an adapter.
    """

    shardable = True
    """Whether it saves and loads the whole module, which under FSDP is gathered to save (`save(state_dict=)`)."""

    def __init__(self, model, subfolder: str = "unet"):
        self.model, self.subfolder = model, subfolder

    def ema_parameters(self):
        """The parameters the EMA tracks (and copies into the model at the end of training)."""
        return self.model.parameters()

    def make_ema(self, decay: float):
        from diffusers.training_utils import EMAModel

        return EMAModel(self.model.parameters(), decay=decay, model_cls=type(self.model),
                        model_config=self.model.config)

    def save(self, folder: Path, ema=None, state_dict: dict | None = None) -> None:
        """`state_dict`: the weights to write in place of the model's own (under FSDP, gathered from its shards)."""
        if state_dict is None:
            self.model.save_pretrained(folder / self.subfolder)
        else:
            self.model.save_config(folder / self.subfolder)
            save_file({k: v.contiguous() for k, v in state_dict.items()},
                      str(folder / self.subfolder / "diffusion_pytorch_model.safetensors"))
        if ema is not None:
            ema.save_pretrained(str(folder / f"{self.subfolder}_ema"))

    def load(self, folder: Path, ema=None, device=None, with_weights: bool = True) -> None:
        """`with_weights=False`: the EMA alone (under FSDP accelerate loads the weights from its sharded files)."""
        if with_weights:
            self.model.load_state_dict(load_file(folder / self.subfolder / "diffusion_pytorch_model.safetensors"),
                                       strict=True)
        if ema is not None:
            loaded = type(ema).from_pretrained(str(folder / f"{self.subfolder}_ema"), model_cls=type(self.model))
            ema.load_state_dict(loaded.state_dict())
            ema.to(device)


class TensorState(ModelState):
    """Any module (a discriminator, a small decoder): its state dict in `SUBFOLDER.safetensors`, its EMA
    in `SUBFOLDER_ema.safetensors`."""

    def named_ema_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The EMA's parameters by the names its file stores them under."""
        return list(self.model.named_parameters())

    def ema_parameters(self):
        return [p for _, p in self.named_ema_parameters()]

    def make_ema(self, decay: float):
        from diffusers.training_utils import EMAModel

        return EMAModel(self.ema_parameters(), decay=decay)

    def save(self, folder: Path, ema=None, state_dict: dict | None = None) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in (state_dict or self.model.state_dict()).items()}
        save_file(state, str(folder / f"{self.subfolder}.safetensors"))
        if ema is not None:
            save_ema(ema, self.named_ema_parameters(), folder / f"{self.subfolder}_ema.safetensors")

    def load(self, folder: Path, ema=None, device=None, with_weights: bool = True) -> None:
        if with_weights:
            self.model.load_state_dict(load_file(folder / f"{self.subfolder}.safetensors"), strict=True)
        if ema is not None:
            load_ema(ema, self.named_ema_parameters(), folder / f"{self.subfolder}_ema.safetensors", device)


def save_ema(ema, named: list[tuple[str, torch.nn.Parameter]], path: Path) -> None:
    """An EMAModel over `named` parameters as safetensors: the averages by parameter name, the rest of
    its state (decay, step count) as JSON metadata."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file({name: t.detach().cpu().contiguous() for (name, _), t in zip(named, shadow)}, str(path),
              metadata={"ema": json.dumps(state)})


def load_ema(ema, named: list[tuple[str, torch.nn.Parameter]], path: Path, device) -> None:
    with safe_open(str(path), "pt") as f:
        state = json.loads(f.metadata()["ema"])
    tensors = load_file(path)
    state["shadow_params"] = [tensors[name] for name, _ in named]
    ema.load_state_dict(state)
    ema.to(device)


def _leaves(state: dict, prefix: str = ""):
    """(dotted key, value) of each leaf of a nested state dict."""
    for key, value in state.items():
        if not isinstance(key, str) or not key or "." in key:
            raise TypeError(f"task state key {prefix}{key!r}: keys are non-empty strings without '.'")
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def save_task_state(state: dict, path: Path) -> None:
    """A task's state (`Task.state_dict`) as safetensors: tensors, and generators' states as uint8 tensors,
    by dotted key; numbers, strings and None as JSON metadata. Never pickled."""
    tensors, plain = {}, {}
    for key, value in _leaves(state):
        if isinstance(value, torch.Generator):
            value = value.get_state()
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
        elif value is None or isinstance(value, (bool, int, float, str)):
            plain[key] = value
        else:
            raise TypeError(f"task state '{key}': a {type(value).__name__}; a task keeps tensors, generators, "
                            f"numbers, strings, None and dicts of these")
    save_file(tensors, str(path), metadata={"plain": json.dumps(plain)})


def load_task_state(path: Path, like: dict) -> dict:
    """What `save_task_state` wrote to `path`, in the layout of `like` (the task's state now): the same keys,
    each tensor on the device of the one in `like`, each generator of `like` set to its saved state (in
    place). A missing file holds no state."""
    tensors, plain = {}, {}
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            plain = json.loads((f.metadata() or {})["plain"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    wanted = dict(_leaves(like))
    if wanted and not path.is_file():
        raise ValueError(f"no {path.name}: its task kept no state of its own, this run's keeps "
                         f"{', '.join(wanted)}")
    saved = set(tensors) | set(plain)
    for key, value in wanted.items():
        if key not in (tensors if isinstance(value, (torch.Tensor, torch.Generator)) else plain):
            raise ValueError(f"{path.name} holds no task state '{key}'")
    if saved - set(wanted):
        raise ValueError(f"{path.name} holds task state '{sorted(saved - set(wanted))[0]}', which this run's "
                         f"task does not keep")

    def rebuild(node: dict, prefix: str) -> dict:
        out = {}
        for key, value in node.items():
            name = prefix + key
            if isinstance(value, dict):
                out[key] = rebuild(value, name + ".")
            elif isinstance(value, torch.Generator):
                value.set_state(tensors[name])
                out[key] = value
            elif isinstance(value, torch.Tensor):
                out[key] = tensors[name].to(value.device)
            else:
                out[key] = plain[name]
        return out

    return rebuild(like, "")


class Checkpointer:
    """Saves and restores the whole training state through one accelerator.

    `models`: each trained module's `ModelState` with its EMA (or None), in the order the loop prepared
    them (accelerate stores their optimizers and LR schedules in that order). `task`: what keeps state of
    its own (torchtitan's Stateful: `state_dict()` / `load_state_dict(state)`, train/engine/task.py); each
    process saves its own, so per-process state (a generator per process) stays its process's.

    A checkpoint resumes in another number of processes when the global batch (`samples_per_step`) is the
    same and the task keeps no per-process state: the step's generator is the same on every process
    (StepRandom), and under FSDP accelerate's sharded files load into any number of shards. `schedules`:
    the prepared LR schedules, which step once per process per optimizer step (rescaled on such a resume).
    `streamed`: the data is a stream each process reads its own part of (WebDataset), which another number
    of processes would split otherwise."""

    def __init__(self, accelerator, output_dir: str | Path, total_limit: int | None, models: list[tuple],
                 task=None, schedules: list | None = None, samples_per_step: int | None = None,
                 streamed: bool = False):
        from sdkd.train.engine.sharding import is_fsdp

        self.accelerator, self.output_dir, self.total_limit = accelerator, Path(output_dir), total_limit
        self.models, self.task, self.schedules = models, task, schedules or []
        self.samples_per_step, self.streamed, self.fsdp = samples_per_step, streamed, is_fsdp(accelerator)
        if accelerator.is_main_process:
            recover(self.output_dir)
        accelerator.wait_for_everyone()
        accelerator.register_save_state_pre_hook(self._save_models)
        accelerator.register_load_state_pre_hook(self._load_models)

    # accelerate hooks: store models ourselves, so accelerate does not pickle them as well. Under FSDP
    # accelerate has written (and loads) the sharded weights itself; every process gathers them and the
    # EMA's averages to write them whole.
    def _save_models(self, models, weights, output_dir):
        from sdkd.train.engine.sharding import full_state_dict, whole_ema

        main = self.accelerator.is_main_process
        for state, ema in self.models:
            if not self.fsdp:
                if main:
                    state.save(Path(output_dir), ema)
                continue
            state_dict = full_state_dict(state.model)  # every process: the gathers are collective
            with whole_ema(ema):
                if main:
                    state.save(Path(output_dir), ema, state_dict=state_dict)
        weights.clear()

    def _load_models(self, models, input_dir):
        from sdkd.train.engine.sharding import reshard_ema

        for state, ema in self.models:
            if not self.fsdp:
                state.load(Path(input_dir), ema, self.accelerator.device)
                continue
            state.load(Path(input_dir), ema, self.accelerator.device, with_weights=False)
            if ema is not None:
                reshard_ema(ema, list(state.ema_parameters()))
        models.clear()

    def save(self, step: int, generator: torch.Generator) -> Path:
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f"{_TMP}checkpoint-{step}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed mid-write
        acc.wait_for_everyone()
        # What accelerate and the models' save_pretrained write (all processes' files) follows the umask.
        with follow_umask(tmp) if acc.is_main_process else nullcontext():
            acc.save_state(str(tmp))
            save_file({"state": generator.get_state()}, tmp / f"generator-{acc.process_index}.safetensors")
            state = self.task.state_dict() if self.task is not None else {}
            if state:  # a task with none writes no file: its checkpoints stay as they were
                save_task_state(state, tmp / TASK_STATE.format(acc.process_index))
            acc.wait_for_everyone()
        if acc.is_main_process:
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / STATE_FILE).write_text(json.dumps({
                "step": step, "files": files, "processes": acc.num_processes, "fsdp": self.fsdp,
                "samples_per_step": self.samples_per_step}))
            replaced = self.output_dir / f"{_REPLACED}{final.name}"
            if final.exists():
                final.rename(replaced)  # `recover` puts it back if we are killed before the next rename
            tmp.rename(final)
            if replaced.exists():
                shutil.rmtree(replaced)
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        if self.total_limit is None:
            return
        for old in list_checkpoints(self.output_dir)[: -self.total_limit]:
            # Renamed first: a kill mid-removal leaves a hidden folder, never a partial checkpoint-STEP.
            doomed = old.rename(self.output_dir / f"{_DELETING}{old.name}")
            shutil.rmtree(doomed)

    def _check_resumable(self, path: Path) -> int:
        """The number of processes that wrote `path`; a one-line stop when this run cannot continue it."""
        acc = self.accelerator
        saved = json.loads((path / STATE_FILE).read_text())
        processes = saved.get("processes", len(list(path.glob("generator-*"))))
        if saved.get("fsdp", False) != self.fsdp:
            how = lambda fsdp: "under FSDP" if fsdp else "without FSDP"  # noqa: E731
            raise UserError(f"resume '{path}': saved {how(saved.get('fsdp', False))}, resumed {how(self.fsdp)}; "
                            f"launch it with the strategy that saved it")
        if processes == acc.num_processes:
            return processes
        written = f"written by {counted(processes, 'process')}, resumed with {acc.num_processes}"
        if saved.get("samples_per_step") != self.samples_per_step:
            raise UserError(f"resume '{path}': {written}, and a global batch of {self.samples_per_step} samples "
                            f"per step instead of {saved.get('samples_per_step')}; set train.batch_size so that "
                            f"batch_size x grad_accum x processes stays the same")
        if self.streamed:
            raise UserError(f"resume '{path}': {written}; a streamed data source (webdataset) splits its shards by "
                            f"process, so another number of processes would read other samples")
        if self.task is not None and self.task.state_dict():
            raise UserError(f"resume '{path}': {written}; this trainer keeps state per process, which cannot "
                            f"move to another number of processes")
        return processes

    def load(self, path: Path, generator: torch.Generator) -> int:
        """Restore everything saved at `path`; returns its step."""
        acc = self.accelerator
        processes = self._check_resumable(path)
        # Every process's step generator is the same (StepRandom): another number of processes takes the first's.
        rng = path / f"generator-{acc.process_index if processes == acc.num_processes else 0}.safetensors"
        # accelerate passes over random states it cannot read (a log line at info level): a resumed run would
        # then go on from other random streams than the run it continues. They are small: read here first.
        damaged = _unreadable_state(path, f"random_states_{acc.process_index}.pkl")
        if damaged:
            raise UserError(f"resume '{path}': {damaged} is damaged or not written by sdkd (unreadable random "
                            f"states)")
        try:
            acc.load_state(str(path))
            generator.set_state(load_file(rng)["state"])
            if self.task is not None:
                state = load_task_state(path / TASK_STATE.format(acc.process_index), self.task.state_dict())
                self.task.load_state_dict(state)
            for schedule in self.schedules:  # it stepped once per process of the run that saved it
                schedule.scheduler.last_epoch = schedule.scheduler.last_epoch * acc.num_processes // processes
        except (pickle.UnpicklingError, EOFError) as err:
            # accelerate's optimizer, scheduler and random states: read with torch.load(weights_only=True), which
            # refuses what is not plain tensors and containers (nothing runs); its message names no file.
            raise UserError(f"resume '{path}': {_unreadable_state(path) or 'a state file'} is damaged or not "
                            f"written by sdkd ({first_line(err)[:120]})") from None
        except (RuntimeError, OSError, ValueError, KeyError, SafetensorError) as err:
            # A layout other than this run's (size mismatch) or damaged contents of the right size.
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            # torch's state-dict errors put the first mismatch on their second line.
            detail = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
            raise UserError(f"resume '{path}': cannot be loaded into this run: {detail}") from None
        return saved_step(path)
