"""End to end: `accelerate launch train/lora.py` on the toy LoRA recipe over a bk_tiny toy student; the LoRA
file in plain diffusers and in sdkd's pipeline; resume."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from sdkd.train.formats import lora_io

from conftest import launch_trainer, run_script, same_state, save_toy_student

pytestmark = pytest.mark.e2e

COMMON = ["lora.train_text_encoder=true", "ema.enabled=true", "train.max_steps=6", "train.checkpoint_every=3",
          "train.sample_every=6", "data.num_samples=16", "log.trackers=[none]"]


def launch_lora(out, *overrides):
    return launch_trainer("train/lora.py", "configs/lora_toy.yaml", out, *overrides)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return save_toy_student(tmp_path_factory.mktemp("bk_tiny_student"), "bk_tiny")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, student_dir):
    out = tmp_path_factory.mktemp("lora_run")
    launch_lora(out, f"model={student_dir}", *COMMON)
    return out


def test_lora_run_writes_adapter_outputs(lora_run, student_dir):
    out = lora_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 7)) and all("task" in line for line in lines)
    assert (out / "samples" / "step-6.png").is_file()
    # checkpoints hold the adapter and its EMA, never a U-Net
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    ckpt = out / "checkpoint-6"
    assert (ckpt / lora_io.LORA_FILE).is_file() and (ckpt / lora_io.EMA_FILE).is_file() and not (ckpt / "unet").exists()
    meta = lora_io.read_metadata(out / lora_io.LORA_FILE)
    assert meta["sdkd.base_model"] == str(student_dir) and meta["sdkd.layout"] == "bk_tiny"
    keys = load_file(out / lora_io.LORA_FILE).keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    sdcpp = load_file(out / lora_io.SDCPP_FILE)  # bk_tiny runs in stable-diffusion.cpp
    assert any(k.startswith("lora_unet_output_blocks_") for k in sdcpp) and any(k.startswith("lora_te_") for k in sdcpp)
    assert not (out / "student").exists()
    card = (out / "README.md").read_text()  # the model card beside the LoRA files
    assert f"| base model | `{student_dir}` |" in card and "| trained | 6 steps with `train/lora.py` |" in card
    assert f"`{lora_io.LORA_FILE}`, `{lora_io.SDCPP_FILE}`" in card and "license: creativeml-openrail-m" in card
    assert "![samples](samples.png)" in card and (out / "samples.png").is_file()


def diffusers_image(pipe, seed=0):
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=4, guidance_scale=7.5, height=32, width=32, output_type="np",
                generator=[torch.Generator().manual_seed(seed)]).images[0]


def test_lora_changes_the_output_and_diffusers_matches_our_pipeline(lora_run, student_dir):
    from sdkd.eval.inference.pipeline import load_pipeline

    plain = diffusers_image(StableDiffusionPipeline.from_pretrained(student_dir, local_files_only=True))
    pipe = StableDiffusionPipeline.from_pretrained(student_dir, local_files_only=True)
    pipe.load_lora_weights(str(lora_run))  # plain diffusers: OUTPUT/pytorch_lora_weights.safetensors
    with_lora = diffusers_image(pipe)
    assert np.abs(with_lora - plain).mean() > 1e-3  # a few steps of LoRA training changed the images

    ours = load_pipeline(student_dir, lora=lora_run / lora_io.LORA_FILE)
    image = ours(["a red circle"], steps=4, guidance_scale=7.5, seed=0, height=32, width=32, output_type="np")[0]
    assert np.abs(image - with_lora).max() < 1e-4, np.abs(image - with_lora).max()


def test_lora_resume_matches_uninterrupted(lora_run, student_dir, tmp_path):
    """Resumed from checkpoint-3: its checkpoint-6 LoRA and EMA files and its final LoRA file equal the
    uninterrupted run's (same_state)."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(lora_run / "checkpoint-3", resumed / "checkpoint-3")
    result = launch_lora(resumed, f"model={student_dir}", *COMMON, "train.sample_every=0", "resume=latest")
    assert "resumed from" in result.stdout + result.stderr
    for name in (lora_io.LORA_FILE, lora_io.EMA_FILE):
        a, b = load_file(lora_run / "checkpoint-6" / name), load_file(resumed / "checkpoint-6" / name)
        assert same_state(a, b), name
    assert same_state(load_file(lora_run / lora_io.LORA_FILE), load_file(resumed / lora_io.LORA_FILE))


def test_lora_errors_are_one_line(tmp_path, toy_teacher_dir):
    result = run_script([sys.executable, "train/lora.py", "--config", "configs/lora_toy.yaml", f"output_dir={tmp_path}",
                         f"model={tmp_path / 'missing'}", "lora.target_modules=[to_q,query]"], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: model '{tmp_path / 'missing'}' not found")
    result = run_script([sys.executable, "train/lora.py", "--config", "configs/lora_toy.yaml", f"output_dir={tmp_path}",
                         f"model={toy_teacher_dir}", "lora.target_modules=[to_q,query]"], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: config key 'lora.target_modules': no module 'query' in this U-Net (layout teacher)" in result.stderr
