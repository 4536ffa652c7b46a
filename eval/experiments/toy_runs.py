"""One train/kd.py run on the toy world, launched as a user would (`accelerate launch`), and its first (step 0)
and last in-loop noise-prediction MSE against the teacher (`eval/noise_mse` on the held-out triples,
train/losses/agreement.py)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from sdkd.cli.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
TOY_RECIPE = ROOT / "configs/toy.yaml"


def kd_run(run: Path, steps: int, seed: int, overrides: list[str], recipe: Path = TOY_RECIPE) -> dict:
    """`recipe` trained `steps` steps with `overrides` into `run` (reused when it finished before), no samples,
    checkpoints or trackers: its last eval/noise_mse, and its first (the student before training)."""
    run = run.resolve()
    if not (run / "student").is_dir():
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "train/kd.py", "--config", str(recipe),
                   f"output_dir={run}", "overwrite=true", f"train.seed={seed}", f"train.max_steps={steps}",
                   f"eval.every={steps}", "train.sample_every=0", "train.checkpoint_every=0", "log.trackers=[none]",
                   *overrides]
        print(f"training {run.name}: {shlex.join(command[3:])}", flush=True)
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            # The run's own `error:` line, not the launcher's CalledProcessError after it.
            lines = done.stderr.strip().splitlines() or ["?"]
            said = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
            raise UserError(f"run {run.name} failed: {said[-1] if said else lines[-1]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in rows if "eval/noise_mse" in r]
    return {"run": f"runs/{run.name}", "step": evals[-1]["step"], "noise_mse": evals[-1]["eval/noise_mse"],
            "initial_noise_mse": evals[0]["eval/noise_mse"]}
