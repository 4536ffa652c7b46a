"""Tasks own their state (train/engine/task.py, train/engine/checkpoints.py): what a task keeps of its own (a
counter, a tensor, its own generators) every checkpoint saves and a resumed run restores bit for bit, one
file per process; and a task's step can use its module's EMA weights (a teacher-as-EMA target, as in
consistency distillation), resumed or not.

Run as a script (`accelerate launch tests/test_task_state.py OUTPUT [KEY=VALUE ...]`), it trains the test
task in each launched process: what the two-process test launches.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdkd.cli.errors import UserError
from sdkd.train.engine.checkpoints import checkpoint_problem, load_task_state
from sdkd.train.engine.task import StepContext, Task, TrainedModule

from conftest import accelerate_launch, fit_task, loop_config, same_state

WIDTH = 16
STATE = "task_state-{}.safetensors"


def features(batch: dict) -> torch.Tensor:
    """A batch's images as WIDTH numbers each: 4x4 pooled, channels averaged."""
    return F.adaptive_avg_pool2d(batch["pixel_values"], 4).mean(1).flatten(1)


class ConsistencyTask(Task):
    """A small MLP learns to map a noisy input to its EMA's output on a less noisy one (teacher-as-EMA)
    and to the clean input. The task's own state all steers training: a running mean of the inputs (a
    tensor) centres them, a count of draws (an int) weights the EMA term, its generators draw the noise
    (on the run's device) and its level (on the CPU), one pair per process."""

    state_attributes = ("draws", "stats", "generators")

    def __init__(self, cfg, acc, keeps: tuple[str, ...] = state_attributes):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(WIDTH, 32), torch.nn.SiLU(), torch.nn.Linear(32, WIDTH))
        self.modules = [TrainedModule("net", self.net, cfg.optim, ema_decay=0.9)]
        self.state_attributes = keeps
        seed = cfg.train.seed + 1000 * acc.process_index
        self.draws = 0
        self.stats = {"mean": torch.zeros(WIDTH, device=acc.device), "seen": 0.0}
        self.generators = {"cpu": torch.Generator().manual_seed(seed),
                           "device": torch.Generator(acc.device).manual_seed(seed + 1)}
        self.ema_differed = 0  # steps whose EMA weights were not the trained ones (so swapping them in mattered)

    def train_step(self, ctx: StepContext, batch: dict, rng) -> dict[str, torch.Tensor]:
        x = features(batch)
        self.stats["mean"] = 0.9 * self.stats["mean"] + 0.1 * x.mean(0)
        self.stats["seen"] += 0.5 * len(x)
        x = x - self.stats["mean"]
        noise = torch.randn(x.shape, generator=self.generators["device"], device=x.device)
        level = torch.rand((), generator=self.generators["cpu"]).item()
        self.draws += int(noise.mean() > 0)
        net = self.modules[0]
        trained = [p.detach().clone() for p in self.net.parameters()]
        with net.ema_weights() as teacher:
            assert all(torch.equal(p, s) for p, s in zip(teacher.parameters(), net.ema.shadow_params))
            target = teacher(x + 0.5 * level * noise)
        assert all(torch.equal(p, t) for p, t in zip(self.net.parameters(), trained))  # the trained ones, back
        self.ema_differed += not all(torch.equal(p, s) for p, s in zip(trained, net.ema.shadow_params))
        out = ctx.model("net")(x + level * noise)
        loss = (1 + 0.1 * self.draws) * F.mse_loss(out, target) + F.mse_loss(out, x)
        ctx.backward("net", loss)
        return {"loss": loss.detach()}

    def export(self, out):
        path = out / "final.safetensors"
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path))
        return [path]


def fit(cfg, keeps=ConsistencyTask.state_attributes) -> ConsistencyTask:
    return fit_task(cfg, lambda acc: ConsistencyTask(cfg, acc, keeps))


def comparable(state: dict) -> dict:
    """A task's state with each generator as its state tensor."""
    return {k: comparable(v) if isinstance(v, dict) else v.get_state() if isinstance(v, torch.Generator) else v
            for k, v in state.items()}


def saved(path) -> tuple[dict, dict]:
    """A safetensors file's tensors and metadata."""
    with safe_open(str(path), "pt") as f:
        return load_file(path), f.metadata()


def assert_same_checkpoint(a, b, names):
    for name in names:
        assert same_state(saved(a / name), saved(b / name)), name


def test_task_state_and_ema_resume_bit_identical(tmp_path):
    """Six steps straight, or three, a checkpoint, and three more in a new run: the same weights, EMA and
    task state (counter, tensor, both generators); the step-3 state differs from a fresh task's, and its
    generators from the final ones."""
    whole = tmp_path / "whole"
    task = fit(loop_config(whole))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    again = fit(loop_config(resumed, "resume=latest"))

    assert_same_checkpoint(whole / "checkpoint-6", resumed / "checkpoint-6",
                           ["net.safetensors", "net_ema.safetensors", STATE.format(0)])
    assert same_state(saved(whole / "final.safetensors"), saved(resumed / "final.safetensors"))
    assert same_state(comparable(task.state_dict()), comparable(again.state_dict()))
    # EMAModel's first update copies the weights (decay 0): from step 2 on the EMA lags them.
    assert task.ema_differed == 4 and again.ema_differed == 3

    # The checkpoint held state far from a fresh task's: a resume that lost any of it would have drifted.
    final = comparable(task.state_dict())
    blank = ConsistencyTask(loop_config(tmp_path / "x"), _Process())
    fresh = comparable(blank.state_dict())
    at_3 = comparable(load_task_state(whole / "checkpoint-3" / STATE.format(0), blank.state_dict()))
    assert at_3["draws"] > 0 and at_3["stats"]["seen"] == 3.0 and isinstance(at_3["draws"], int)
    assert not torch.equal(at_3["stats"]["mean"], fresh["stats"]["mean"])
    for name in ("cpu", "device"):
        assert not torch.equal(at_3["generators"][name], fresh["generators"][name])
        assert not torch.equal(at_3["generators"][name], final["generators"][name])


class _Process:
    """What ConsistencyTask asks of an accelerator, for building one outside a run."""

    process_index, device = 0, torch.device("cpu")


def test_checkpoint_missing_or_damaged_task_state_says_so_in_one_line(tmp_path):
    out = tmp_path / "run"
    fit(loop_config(out, "train.max_steps=2", "train.checkpoint_every=2"))
    ckpt, file = out / "checkpoint-2", out / "checkpoint-2" / STATE.format(0)
    assert STATE.format(0) in json.loads((ckpt / "trainer_state.json").read_text())["files"]
    data = file.read_bytes()
    resume = loop_config(out, "train.max_steps=4", "resume=latest")

    def refused() -> str:
        with pytest.raises(UserError) as err:
            fit(resume)
        assert "\n" not in str(err.value)
        return str(err.value)

    file.unlink()
    assert checkpoint_problem(ckpt) == f"{STATE.format(0)} is missing"
    assert f"is incomplete ({STATE.format(0)} is missing)" in refused()
    file.write_bytes(data[:-8])
    assert checkpoint_problem(ckpt) == f"{STATE.format(0)} has {len(data) - 8} bytes, {len(data)} were written"
    assert "is incomplete" in refused()
    file.write_bytes(b"\0" * len(data))  # the listed size, garbage contents
    assert checkpoint_problem(ckpt) is None
    assert "cannot be loaded into this run" in refused()
    file.write_bytes(data)
    fit(resume)  # whole again: it resumes
    assert (out / "checkpoint-4").is_dir()


def test_task_state_of_another_layout_is_refused_and_a_task_without_any_writes_none(tmp_path):
    out = tmp_path / "run"
    fit(loop_config(out, "train.max_steps=2", "train.checkpoint_every=2"))
    with pytest.raises(UserError, match=r"cannot be loaded into this run: task_state-0.safetensors holds task "
                                        r"state 'draws', which this run's task does not keep$"):
        fit(loop_config(out, "train.max_steps=4", "resume=latest"), keeps=("stats", "generators"))

    none = tmp_path / "none"
    fit(loop_config(none, "train.max_steps=2", "train.checkpoint_every=2"), keeps=())
    assert not list((none / "checkpoint-2").glob("task_state-*"))  # such checkpoints stay as they were
    with pytest.raises(UserError, match=r"cannot be loaded into this run: no task_state-0.safetensors: its task "
                                        r"kept no state of its own, this run's keeps draws, stats.mean, stats.seen, "
                                        r"generators.cpu, generators.device$"):
        fit(loop_config(none, "train.max_steps=4", "resume=latest"))


@pytest.mark.slow  # two launched processes
def test_two_processes_each_resume_their_own_task_state(tmp_path):
    """Each process has its own generators and data shard, so its own state: a two-process run resumed
    from step 3 writes the uninterrupted run's checkpoint-6 (weights, EMA and each process's state file), and
    the two processes' states differ in every tensor."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"

    def launch(out, *overrides):
        result = accelerate_launch([__file__, str(out), *overrides], num_processes=2)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    launch(whole)
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    launch(resumed, "resume=latest")
    names = ["net.safetensors", "net_ema.safetensors", STATE.format(0), STATE.format(1)]
    assert_same_checkpoint(whole / "checkpoint-6", resumed / "checkpoint-6", names)
    rank0, rank1 = (saved(whole / "checkpoint-6" / STATE.format(i))[0] for i in (0, 1))
    assert rank0.keys() == rank1.keys() and not any(torch.equal(rank0[k], rank1[k]) for k in rank0)


if __name__ == "__main__":
    cfg = loop_config(*sys.argv[1:])
    fit_task(cfg, lambda acc: ConsistencyTask(cfg, acc))
