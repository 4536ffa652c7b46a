"""End to end: `accelerate launch train/finetune.py` on the toy portrait recipe, as a user runs it."""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from conftest import launch_trainer, run_script, same_state, save_toy_student, selected

pytestmark = pytest.mark.e2e


def launch_finetune(out, *overrides):
    return launch_trainer("train/finetune.py", "configs/portrait_toy.yaml", out, *overrides)


@pytest.fixture(scope="module", autouse=True)
def shipped_run(request, tmp_path_factory):
    """The toy recipe as shipped (shortened), launched in the background at the module's start when its test is
    selected: the resume test launches its two runs meanwhile."""
    if not any(item.name == "test_portrait_toy_as_shipped" for item in selected(request)):
        yield None
        return
    out = tmp_path_factory.mktemp("shipped")
    with ThreadPoolExecutor(1) as pool:  # on leaving: waits for the run, whatever the tests did
        yield out, pool.submit(launch_finetune, out, "train.max_steps=4", "train.checkpoint_every=0",
                               "train.sample_every=0")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return save_toy_student(tmp_path_factory.mktemp("student"), "bk_small")


def test_finetune_continued_kd_resume_matches_uninterrupted(tmp_path, student_dir):
    # A distilled student fine-tuned with the task loss plus continued output and feature KD from its teacher,
    # min-SNR weighting, EMA, accumulation and a cosine schedule: all part of the resumed state.
    # The teacher its student folder was saved with (save_toy_student: the shipped toy's parts and scheduler).
    common = [f"model={student_dir}", "teacher=toy", "loss.lambda_out=1.0", "loss.lambda_feat=0.5",
              "student.preset=bk_small", "train.max_steps=6", "train.checkpoint_every=3", "train.sample_every=6",
              "train.batch_size=2", "data.num_samples=16", "optim.lr_scheduler=cosine", "optim.warmup_steps=1",
              "log.trackers=[none]"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = launch_finetune(full, *common)
    assert "continued KD from" in result.stdout

    lines = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 7))
    assert all({"task", "out", "feat", "loss"} <= line.keys() for line in lines)
    assert (full / "samples" / "step-6.png").is_file() and (full / "samples" / "teacher.png").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(full / "student", local_files_only=True)
    assert pipe.unet.config.mid_block_type is None  # still the bk_small student
    final_ema = load_file(full / "checkpoint-6" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, final_ema[k]) for k, v in pipe.unet.state_dict().items())  # EMA weights exported
    card = (full / "student" / "README.md").read_text()  # the model card: base model, recipe, steps, license, grid
    assert f"| base model | `{student_dir}` |" in card and "| trained | 6 steps with `train/finetune.py` |" in card
    assert "license: creativeml-openrail-m" in card and "![samples](samples.png)" in card
    assert (full / "student" / "samples.png").is_file() and f"model        {full / 'student'}" in result.stdout

    # Resumed from checkpoint-3: its checkpoint-6 U-Net and EMA U-Net equal the uninterrupted run's (same_state).
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    result = launch_finetune(resumed, *common, "resume=latest")
    assert "resumed from" in result.stdout + result.stderr
    for sub in ("unet", "unet_ema"):
        a = load_file(full / "checkpoint-6" / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / "checkpoint-6" / sub / "diffusion_pytorch_model.safetensors")
        assert same_state(a, b), sub


def test_portrait_toy_as_shipped(shipped_run):
    # The toy recipe itself (the toy pipeline, task loss with min-SNR, EMA), shortened.
    out, launched = shipped_run
    launched.result()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and set(lines[0]) >= {"task", "loss"} and "out" not in lines[0]
    assert (out / "checkpoint-4" / "unet").is_dir() and (out / "student" / "model_index.json").is_file()
    assert "model: toy" in (out / "config.yaml").read_text()


def test_finetune_config_errors_are_one_line(tmp_path):
    result = run_script([sys.executable, "train/finetune.py", "--config", "configs/portrait_toy.yaml",
                         f"output_dir={tmp_path}", "loss.lambda_out=1.0"], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: config key 'loss.lambda_out': continued KD needs a "
                                                      "teacher: set teacher, or set this to 0")
