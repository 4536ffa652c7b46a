"""Shared fixtures: the toy teacher on disk, and running the real entry scripts."""

from __future__ import annotations

import os
import runpy
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DURATIONS = ROOT / "test-durations.txt"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    # The fast tier (`-m "not slow"`) leaves out the end-to-end runs and the SD-1.5/SDXL-width round trips; another
    # slow test (a command in a new Python process: seconds of imports; a long sampling) carries `slow` itself.
    for item in items:
        if any(item.get_closest_marker(name) for name in ("e2e", "sd15", "sdxl")):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter):
    """Every test's seconds (setup, call and teardown together) in test-durations.txt, slowest first: what a
    CI run leaves for budgeting the suite (`--durations` prints only the slowest)."""
    seconds, outcomes = {}, {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) in ("setup", "call", "teardown"):
                seconds[report.nodeid] = seconds.get(report.nodeid, 0.0) + report.duration
                outcomes.setdefault(report.nodeid, set()).add(report.outcome)
    if not seconds:
        return
    worst = {test: next(o for o in ("failed", "skipped", "passed") if o in found) for test, found in outcomes.items()}
    lines = [f"{s:9.2f}s  {worst[test]:7}  {test}" for test, s in sorted(seconds.items(), key=lambda item: -item[1])]
    header = f"# {len(lines)} tests, {sum(seconds.values()):.0f} s in all (setup + call + teardown), slowest first\n"
    DURATIONS.write_text(header + "\n".join(lines) + "\n")
    terminalreporter.write_line(f"every test's duration: {DURATIONS.relative_to(ROOT)}")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tiny models in the test process: OpenMP threads only contend with the subprocesses that
    # end-to-end tests start (seconds per toy forward on a loaded 2-core machine).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy():
    """The trained toy teacher's parts (`load_teacher("toy")`), its frozen models frozen (test files with a
    `toy` fixture of their own use theirs)."""
    from sdkd.train.models.teacher import load_teacher

    parts = load_teacher("toy")
    for m in parts.frozen.values():
        m.requires_grad_(False).eval()
    return parts


@pytest.fixture(scope="session")
def toy_teacher_dir(tmp_path_factory) -> Path:
    """The toy teacher saved as a diffusers pipeline folder (loaded like any local teacher)."""
    from sdkd.train.models.toy import build_toy_pipeline

    folder = tmp_path_factory.mktemp("toy_teacher")
    build_toy_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def script_env(env: dict | None = None) -> dict:
    """The environment of a script the tests start: offline, unbuffered, this interpreter's folder first on PATH
    (launch.sh's `python` is the venv's, whether or not the venv was activated), `env` on top."""
    # One torch thread per script, as `accelerate launch` gives each process: with a thread per core, a script
    # on a 2-core machine shared with the test process spends most of its time waiting for descheduled threads.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    return {"OMP_NUM_THREADS": "1", **os.environ, "PATH": path, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})}


def run_script(args: list[str], cwd: Path = ROOT, timeout: int = 600, env: dict | None = None):
    """Run a command as a user would; returns the CompletedProcess (stdout+stderr captured)."""
    return subprocess.run(args, cwd=cwd, env=script_env(env), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A port no process listens on now: several processes' rendezvous, so that test runs side by side (a
    developer's and tests/stress.py's) never meet on one fixed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(args: list[str], num_processes: int = 1, **kw):
    """`accelerate launch`; several processes use --multi_gpu (gloo on a CPU-only machine)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no",
              "--mixed_precision", "no"]
    launch += (["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
               if num_processes > 1 else ["--num_processes", "1"])
    return run_script(launch + args, **kw)


def launch_trainer(script: str, config: str, out, *overrides, num_processes: int = 1, check: bool = True):
    """`accelerate launch SCRIPT --config CONFIG output_dir=OUT ...`; asserts success unless check=False."""
    result = accelerate_launch([script, "--config", config, f"output_dir={out}", *overrides],
                               num_processes=num_processes)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def save_toy_student(folder: Path, preset: str) -> Path:
    """A toy student pipeline folder: what train/kd.py leaves in OUTPUT/student."""
    from sdkd.train.formats.model_files import save_pipeline
    from sdkd.train.models.students import PRESETS, build_student
    from sdkd.train.models.toy import build_toy_pipeline

    save_pipeline(build_student(build_toy_pipeline().unet, PRESETS[preset]), "toy", folder)
    return folder


def selected(request) -> list:
    """The selected tests of the requesting fixture's module: what a module fixture that starts work in the
    background at the module's start asks before starting it."""
    return [item for item in request.session.items if item.module is request.module]


def loop_config(out, *overrides):
    """A small run of the shared loop on synthetic data: 6 steps of batch 2, a checkpoint every 3, a log line
    every step, no sample grids or trackers."""
    from sdkd.train.engine.config import load_config
    from sdkd.train.tasks.diffusion_config import KDConfig

    return load_config(None, ["teacher=toy", f"output_dir={out}", "data.resolution=16", "data.num_samples=8",
                              "train.batch_size=2", "train.max_steps=6", "train.checkpoint_every=3",
                              "train.sample_every=0", "train.log_every=1", "log.trackers=[none]", *overrides],
                       schema=KDConfig)


def fit_task(cfg, make_task):
    """`Loop.fit` in this process with the task `make_task(accelerator)` gives, on a fresh accelerator; returns
    the task."""
    from accelerate.state import AcceleratorState, GradientState

    from sdkd.data.sources.core import build_dataset
    from sdkd.train.engine.loop import Loop, make_accelerator

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        acc = make_accelerator(cfg)
        task = make_task(acc)
        Loop(cfg, acc, task, build_dataset(cfg.data, cfg.train.seed)).fit()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return task


def same_state(a, b) -> bool:
    """Bit-identical nested state (tensors with their dtypes, dicts, lists, tuples, plain values): what a resumed
    run must end with."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def unet_calls(monkeypatch) -> list[dict]:
    """What every U-Net forward of the test is called with: its sample's shape, timestep and conditioning, on the
    CPU."""
    import torch
    from diffusers import UNet2DConditionModel

    calls = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        calls.append(dict(shape=tuple(sample.shape), hidden=encoder_hidden_states.detach().float().cpu(),
                          timestep=torch.as_tensor(timestep).detach().float().cpu(),
                          **{name: t.detach().float().cpu() for name, t in added.items()}))
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    return calls


def size_ids(height: int, width: int) -> list[float]:
    return [height, width, 0, 0, height, width]  # original size, crop top-left, target size


def sampled(calls: list[dict]) -> list[dict]:
    """The `unet_calls` with size ids: cost counting's forwards take random conditioning, the rest the pipeline's."""
    import torch

    return [c for c in calls if "time_ids" in c and torch.equal(c["time_ids"], c["time_ids"].round())]


def reset_process_state() -> None:
    """What an in-process run leaves behind that the next one must not see: accelerate's singletons and
    the run-folder locks this process holds."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    from sdkd.train.engine import run_folder

    held = getattr(run_folder, "_held", {})
    for fd in held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    held.clear()


def run_in_process(script: str, argv: list[str]) -> int:
    """`python SCRIPT ARGV` in this process; returns its exit code. An exception that escapes the script
    is printed as the interpreter would (a traceback, exit code 1)."""
    import torch

    old_argv, threads = sys.argv, torch.get_num_threads()  # sampling scripts set the thread count (--threads)
    sys.argv = [str(ROOT / script), *argv]
    reset_process_state()
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        return 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001  # what `python SCRIPT` would do with it
        traceback.print_exc()
        return 1
    finally:
        sys.argv = old_argv
        torch.set_num_threads(threads)
        reset_process_state()
