"""KD works on the toy world: students of the trained toy teacher, initialised from it and trained for the
same steps and seed, end closer to the teacher (noise-prediction MSE on the held-out triples,
train/losses/agreement.py) with task + output KD + feature KD than with the task loss alone.

Measured with configs/toy.yaml, 200 steps, seeds 0 / 1 (eval/toy_ablation.py, docs/toy_ablation/): bk_tiny task
only 0.0291 / 0.0323, full KD 0.0188 / 0.0191 (0.65x / 0.59x); bk_small 0.0326 / 0.0327 against 0.0220 / 0.0257
(0.67x / 0.79x). The test runs bk_tiny, seed 0 (0.65x): 0.0045 below the 0.8x line, where the seeds differ by 0.003
(task only) and 0.0003 (full KD).

The toy SDXL teacher (configs/toy_sdxl.yaml as it is: `teacher: toy_sdxl`, a KOALA-700M-shaped student, feature KD
at 0.1), 200 steps, seeds 0 / 1: task only 0.0453 / 0.0542, full KD 0.0341 / 0.0359 (0.75x / 0.66x); feature KD at
0.3: 0.0416 / 0.0323, at 1.0: 0.0426 / 0.0346 (its feature term is 8x the task term there); output KD alone 0.0437
(seed 0). One seed's ratio moves by 0.1-0.3 with the seed, so the test sums seeds 0 and 1: 0.70x, 0.1 below the
0.8x line."""

from __future__ import annotations

import json

import pytest

from conftest import launch_trainer

STEPS = 200


def final_noise_mse(out) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "eval/noise_mse" in r and r["step"] == STEPS][-1]["eval/noise_mse"]


def task_only_and_full_kd(out, config: str, *overrides, seed: int = 0,
                          kd: tuple[str, ...] = ("loss.lambda_out=1", "loss.lambda_feat=1")) -> tuple[float, float]:
    """The final noise-prediction MSE to the teacher of two students of `config`, same steps and seed: trained with
    the task loss alone, and with task + output KD + feature KD (weights `kd`; none: the config's)."""
    common = [f"train.seed={seed}", f"train.max_steps={STEPS}", f"eval.every={STEPS}", "train.sample_every=0",
              "train.checkpoint_every=0", "log.trackers=[none]", "loss.lambda_task=1", *overrides]
    launch_trainer("train/kd.py", config, out / f"task{seed}", *common, "loss.lambda_out=0", "loss.lambda_feat=0")
    launch_trainer("train/kd.py", config, out / f"kd{seed}", *common, *kd)
    return final_noise_mse(out / f"task{seed}"), final_noise_mse(out / f"kd{seed}")


@pytest.mark.e2e
def test_full_kd_beats_the_task_loss_alone(tmp_path):
    task, kd = task_only_and_full_kd(tmp_path, "configs/toy.yaml", "student.preset=bk_tiny")
    assert kd < 0.8 * task, f"full KD {kd:.5f} vs task only {task:.5f} ({kd / task:.2f}x)"


@pytest.mark.e2e
def test_full_kd_beats_the_task_loss_alone_on_the_toy_sdxl_teacher(tmp_path):
    runs = [task_only_and_full_kd(tmp_path, "configs/toy_sdxl.yaml", seed=seed, kd=()) for seed in (0, 1)]
    task, kd = sum(r[0] for r in runs), sum(r[1] for r in runs)
    assert kd < 0.8 * task, f"full KD {kd:.5f} vs task only {task:.5f} ({kd / task:.2f}x), seeds 0 and 1: {runs}"
