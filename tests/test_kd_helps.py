"""KD works on the toy world: students of the trained toy teacher, initialised from it and trained for the
same steps and seed, end closer to the teacher (noise-prediction MSE on the held-out triples,
train/losses/agreement.py) with task + output KD + feature KD than with the task loss alone.

Measured with configs/toy.yaml, 200 steps, seeds 0 / 1 (eval/toy_ablation.py, docs/toy_ablation/): bk_tiny task
only 0.0291 / 0.0323, full KD 0.0188 / 0.0191 (0.65x / 0.59x); bk_small 0.0326 / 0.0327 against 0.0220 / 0.0257
(0.67x / 0.79x). The test runs bk_tiny, seed 0 (0.65x): 0.0045 below the 0.8x line, where the seeds differ by 0.003
(task only) and 0.0003 (full KD)."""

from __future__ import annotations

import json

import pytest

from conftest import launch_trainer

STEPS = 200


def final_noise_mse(out) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "eval/noise_mse" in r and r["step"] == STEPS][-1]["eval/noise_mse"]


@pytest.mark.e2e
def test_full_kd_beats_the_task_loss_alone(tmp_path):
    common = ["student.preset=bk_tiny", "train.seed=0", f"train.max_steps={STEPS}", f"eval.every={STEPS}",
              "train.sample_every=0", "train.checkpoint_every=0", "log.trackers=[none]", "loss.lambda_task=1"]
    launch_trainer("train/kd.py", "configs/toy.yaml", tmp_path / "task", *common, "loss.lambda_out=0",
                   "loss.lambda_feat=0")
    launch_trainer("train/kd.py", "configs/toy.yaml", tmp_path / "kd", *common, "loss.lambda_out=1",
                   "loss.lambda_feat=1")
    task, kd = final_noise_mse(tmp_path / "task"), final_noise_mse(tmp_path / "kd")
    assert kd < 0.8 * task, f"full KD {kd:.5f} vs task only {task:.5f} ({kd / task:.2f}x)"
