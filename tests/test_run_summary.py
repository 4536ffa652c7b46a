"""A trainer's closing summary (train/engine/loop.py `run_summary`, with the U-Net task's `next_steps`): what it wrote
where and next commands that run; its output to a pipe has no progress redraws and none of the third-party notices
sdkd silences."""

from __future__ import annotations

import shlex
import sys

import pytest
from PIL import Image

from sdkd.train.engine.config import load_config
from sdkd.train.engine.loop import run_summary
from sdkd.train.tasks.diffusion import next_steps
from sdkd.train.tasks.diffusion_config import LoraTrainConfig

from conftest import launch_trainer, run_script

SILENCED = ("The following values were not passed to `accelerate launch`", "requires torchvision",
            "should be kept in float32: []", "cannot run with `cpu` device", "Writing model shards",
            "Loading pipeline components", "Loading weights")


def assert_quiet(result) -> None:
    output = result.stdout + result.stderr
    assert "\r" not in output, output[-3000:]
    assert [text for text in SILENCED if text in output] == [], output[-3000:]


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("summary_run")
    result = launch_trainer("train/kd.py", "configs/toy.yaml", out, "train.max_steps=4", "train.sample_every=4",
                            "train.checkpoint_every=0", "log.trackers=[tensorboard]", "license=openrail++")
    return out, result


@pytest.mark.e2e
def test_summary_comes_last_and_its_sample_command_runs(kd_run, tmp_path):
    """The summary, from "trained 4 steps; wrote:" on, names the student, the newest checkpoint and the tensorboard
    command, then the next commands; the first, eval/sample.py, runs quietly and writes one image."""
    out, result = kd_run
    assert_quiet(result)
    assert "feature pairs; on 1 process\n" in result.stdout  # not "1 processes"
    lines = result.stdout.strip().splitlines()
    summary = lines[lines.index("trained 4 steps; wrote:"):]
    assert f"  model        {out / 'student'}" in summary
    assert f"  checkpoints  {out / 'checkpoint-4'} (newest of 1)" in summary
    assert f"  tensorboard  tensorboard --logdir {out / 'logs'}" in summary
    commands = summary[summary.index("next:") + 1:]
    sample = shlex.split(commands[0], comments=True)
    assert sample[:4] == ["python", "eval/sample.py", "--model", str(out / "student")]
    assert any(f"train/lora.py --config configs/lora.yaml model={out / 'student'}" in c for c in commands)

    generated = run_script([sys.executable, *sample[1:]], timeout=300)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert_quiet(generated)
    assert generated.stdout.strip().splitlines()[-1].startswith(f"wrote 1 image to {out / 'generated'}")
    assert (out / "generated" / "image-000.png").is_file()


@pytest.mark.e2e
def test_model_card_beside_the_student(kd_run):
    out, _ = kd_run
    card = (out / "student" / "README.md").read_text()
    assert "license: openrail++" in card and "| license | `openrail++` |" in card  # the config's, not the default
    assert "| teacher | `toy` |" in card and "| trained | 4 steps with `train/kd.py` |" in card
    assert "| preset | `bk_small`" in card and "| `loss.lambda_feat` | 0.01 |" in card
    assert "| `data.source` | synthetic |" in card
    assert "![samples](samples.png)" in card and "`step-4.png`" in card
    assert Image.open(out / "student" / "samples.png").size == Image.open(out / "samples" / "step-4.png").size


def test_lora_summary_samples_the_base_model_with_the_lora(tmp_path):
    cfg = load_config("configs/lora_toy.yaml", [f"output_dir={tmp_path}", "model=runs/my student"],
                      schema=LoraTrainConfig)
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.touch()
    text = run_summary(cfg, 20, [lora], next_steps(cfg, [lora]))
    assert f"  model        {lora}" in text and "\n  samples " not in text  # no grid was written
    command = shlex.split(text.splitlines()[-1], comments=True)
    assert command[:6] == ["python", "eval/sample.py", "--model", "runs/my student", "--lora", str(lora)]
