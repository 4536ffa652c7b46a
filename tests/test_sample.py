"""eval/sample.py and load_pipeline on what training leaves: run folders, checkpoints (--ema), and
what samples.json records."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

from sdkd.cli.errors import UserError
from sdkd.eval.inference.pipeline import load_pipeline

from conftest import run_script, save_toy_student


def _shifted(unet_dir, out, delta: float) -> None:
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(delta)
    unet.save_pretrained(out)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished toy run: config.yaml, student/ and checkpoint-5 whose unet/ and unet_ema/ differ from it."""
    run = tmp_path_factory.mktemp("sample") / "run"
    save_toy_student(run / "student", "bk_tiny")
    _shifted(run / "student" / "unet", run / "checkpoint-5" / "unet", 0.01)
    _shifted(run / "student" / "unet", run / "checkpoint-5" / "unet_ema", -0.01)
    (run / "checkpoint-5" / "trainer_state.json").write_text('{"step": 5, "files": {}}')  # a complete checkpoint
    (run / "config.yaml").write_text(f"teacher: toy\noutput_dir: {run}\nstudent:\n  preset: bk_tiny\n")
    return run


def _conv_in(pipe) -> torch.Tensor:
    return pipe.unet.conv_in.weight.detach()


def test_run_and_checkpoint_folders_load_their_weights(run):
    student = UNet2DConditionModel.from_pretrained(run / "student" / "unet").conv_in.weight.detach()
    cases = {  # (model, ema) -> (expected conv_in offset from student/, U-Net folder)
        (run, False): (0.0, run / "student" / "unet"),
        (run, True): (-0.01, run / "checkpoint-5" / "unet_ema"),  # the newest checkpoint's EMA
        (run / "checkpoint-5", False): (0.01, run / "checkpoint-5" / "unet"),
        (run / "checkpoint-5", True): (-0.01, run / "checkpoint-5" / "unet_ema"),
    }
    for (model, ema), (offset, unet_dir) in cases.items():
        pipe = load_pipeline(model, ema=ema)
        torch.testing.assert_close(_conv_in(pipe), student + offset, msg=f"{model} ema={ema}")
        assert pipe.loaded["unet"] == str(unet_dir) and pipe.loaded["ema"] == ema
        assert pipe.loaded["parts"] == str(run / "student")  # VAE and text encoder from the run's student


def test_checkpoint_of_a_run_without_student_takes_the_teacher(run, tmp_path):
    (tmp_path / "checkpoint-5").symlink_to(run / "checkpoint-5", target_is_directory=True)
    (tmp_path / "config.yaml").write_text("teacher: toy\nstudent:\n  preset: bk_tiny\n")
    pipe = load_pipeline(tmp_path / "checkpoint-5")
    assert pipe.loaded["parts"] == "toy" and pipe.loaded["source"] == "checkpoint `checkpoint-5` (unet)"
    assert pipe(["a fox"], steps=2, output_type="np")[0].shape == (32, 32, 3)


@pytest.mark.slow
def test_sample_cli_ema_and_samples_json(run, tmp_path):
    outs = {}
    for ema in (False, True):
        out = tmp_path / f"ema-{ema}"
        r = run_script([sys.executable, "eval/sample.py", "--model", str(run / "checkpoint-5"), "--prompt", "a fox",
                        "--prompt", "a car", "--steps", "2", "--seed", "3", "--negative-prompt", "blurry",
                        "--out", str(out)] + (["--ema"] if ema else []))
        assert r.returncode == 0, r.stderr
        outs[ema] = out
    pixels = {ema: np.stack([np.asarray(Image.open(out / f"image-00{i}.png")) for i in (0, 1)])
              for ema, out in outs.items()}
    assert not np.array_equal(pixels[False], pixels[True])  # unet/ and unet_ema/ differ, so do the images
    record = json.loads((outs[True] / "samples.json").read_text())
    assert record["model"] == str(run / "checkpoint-5") and record["ema"] is True
    assert record["unet"] == str(run / "checkpoint-5" / "unet_ema") and "unet_ema" in record["source"]
    assert record["parts"] == str(run / "student")
    assert record["guidance_scale"] == 7.5 and record["steps"] == 2  # the default actually used, not null
    assert record["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert record["scheduler"]["algorithm_type"] == "dpmsolver++"
    assert (record["height"], record["width"]) == (32, 32)
    assert record["negative_prompt"] == "blurry" and record["dtype"] == "float32" and record["device"] == "cpu"
    assert record["lora"] is None and record["lora_scale"] is None and record["tiny_vae"] is None
    assert record["sdkd_version"]
    assert record["images"] == [{"file": "image-000.png", "prompt": "a fox", "seed": 3},
                                {"file": "image-001.png", "prompt": "a car", "seed": 4}]


@pytest.mark.slow
def test_bad_models_say_what_was_expected(run, tmp_path):
    r = run_script([sys.executable, "eval/sample.py", "--model", str(tmp_path / "nope"), "--prompt", "x",
                    "--out", str(tmp_path / "o")])
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "nope") in last and "run folder" in last, r.stderr
    (tmp_path / "notes.txt").write_text("x")
    cases = [
        (tmp_path, "is not a run folder"),
        (tmp_path / "notes.txt", "not a .safetensors file"),
    ]
    for model, expected in cases:
        with pytest.raises(UserError, match=expected):
            load_pipeline(model)
    with pytest.raises(UserError, match="--ema needs a run folder or a checkpoint"):
        load_pipeline(run / "student", ema=True)
    # a LoRA run holds only the adapter: the error names the base model to load it with
    lora_run = tmp_path / "lora_run"
    lora_run.mkdir()
    (lora_run / "config.yaml").write_text("model: runs/toy/student\n")
    save_file({"x": torch.zeros(1)}, str(lora_run / "pytorch_lora_weights.safetensors"),
              metadata={"sdkd.base_model": "runs/toy/student"})
    with pytest.raises(UserError, match="holds a LoRA adapter.*--model runs/toy/student --lora"):
        load_pipeline(lora_run)
