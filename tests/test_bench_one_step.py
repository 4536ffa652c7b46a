"""eval/bench_one_step.py on the toy teacher at 32 px, run as a user runs it: both models reported with consistent
figures (not the timings themselves), the paper's rows on a CUDA report, bad inputs as one-line errors."""

from __future__ import annotations

import json
import sys
from statistics import median
from types import SimpleNamespace

import pytest
from diffusers import AutoencoderTiny

from sdkd.cli.errors import UserError
from sdkd.eval.bench_one_step import PAPER, header, main, table, tiny_decoder
from sdkd.train.models.toy import TOY_VAE

from conftest import run_script

RATIOS = dict(images_per_s_speedup="images_per_s", unet_params="unet_params", unet_macs="unet_gmacs",
              unet_ms_per_forward="unet_ms_per_forward", unet_ms_per_image="unet_ms_per_image",
              decoder_ms_per_image="decoder_ms_per_image", latency_ms_per_image="latency_ms_per_image")


@pytest.mark.slow
def test_toy_report_json_and_table(tmp_path):
    out = tmp_path / "bench.json"
    r = run_script([sys.executable, "eval/bench_one_step.py", "--teacher", "toy", "--resolution", "32",
                    "--teacher-steps", "3", "--repeats", "2", "--e2e-repeats", "1", "--threads", "1",
                    "--cpu-time", "--json", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    s = report["settings"]
    assert (s["device"], s["resolution"], s["teacher_steps"], s["threads"], s["batch"]) == ("cpu", 32, 3, 1, 1)
    assert s["timer"] == "process CPU time"
    teacher, student = report["models"]
    assert (teacher["model"], teacher["steps"], teacher["guidance"], teacher["unet_batch"]) == ("teacher", 3, 7.5, 2)
    assert (student["model"], student["steps"], student["guidance"], student["unet_batch"]) == ("student", 1, None, 1)
    assert (teacher["decoder"], student["decoder"]) == ("AutoencoderKL", "AutoencoderTiny")
    assert student["source"] == "preset sdxs built from the teacher"
    assert student["decoder_source"] == "random AutoencoderTiny (the VAE's layout)"  # the toy VAE upsamples 2x
    for row in (teacher, student):
        for key in ("unet_params", "unet_gmacs", "unet_ms_per_forward", "unet_ms_per_step", "unet_ms_per_image",
                    "decoder_params", "decoder_gmacs_per_image", "decoder_ms_per_image", "latency_ms_per_image",
                    "images_per_s"):
            assert row[key] > 0, (row["model"], key)
        assert row["images_per_s"] == pytest.approx(1e3 / row["latency_ms_per_image"])
        assert row["latency_ms_per_image"] == pytest.approx(median(row["seconds"]["end_to_end"]) * 1e3)
        assert row["unet_ms_per_image"] == pytest.approx(row["steps"] * row["unet_ms_per_step"])
        assert row["unet_ms_per_forward"] == pytest.approx(median(row["seconds"]["unet"]) * 1e3)
        assert row["decoder_ms_per_image"] == pytest.approx(median(row["seconds"]["decoder"]) * 1e3)
        assert len(row["seconds"]["unet"]) == 2 and len(row["seconds"]["end_to_end"]) == 1
    assert "unet_step" in teacher["seconds"] and "unet_step" not in student["seconds"]  # CFG doubles its batch
    assert student["unet_params"] < teacher["unet_params"] and student["unet_gmacs"] < teacher["unet_gmacs"]
    for ratio, key in RATIOS.items():
        assert report["ratios"][ratio] == pytest.approx(student[key] / teacher[key]), ratio
    assert report["paper"] is None  # the paper's GPU figures are only printed beside a CUDA run
    assert "| teacher" in r.stdout and "| student" in r.stdout and "images/s (speed-up)" in r.stdout
    assert "paper" not in r.stdout and "timing" not in r.stdout and "timing" in r.stderr  # progress on stderr

    # A CUDA report puts the paper's figures beside, and says when the run's settings differ from its.
    report["paper"] = PAPER
    text = table(report)
    assert "| paper SDXS-512" in text and "| 6.3" in text and "| 1.7" in text and "~100" in text
    assert "this run is not at 512 px, fp16, batch 1" in header(report)


@pytest.mark.e2e  # the command in a subprocess: full suite only (fast tier under 3 minutes)
def test_missing_folder_is_one_line(tmp_path):
    r = run_script([sys.executable, "eval/bench_one_step.py", "--teacher", "toy", "--student", str(tmp_path / "nope")])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --student '{tmp_path / 'nope'}' not found"]
    with pytest.raises(UserError, match="--tiny-decoder '.*nope' not found"):
        main(["--teacher", "toy", "--tiny-decoder", str(tmp_path / "nope")])


def test_tiny_decoder_refuses_a_kl_vae_and_a_wrong_layout(tmp_path):
    from diffusers import AutoencoderKL

    student = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(out_channels=4)), vae_scale_factor=8)
    AutoencoderKL(**TOY_VAE).save_pretrained(tmp_path / "kl")
    with pytest.raises(UserError, match="holds an AutoencoderKL, not an AutoencoderTiny"):
        tiny_decoder(str(tmp_path / "kl"), student)
    AutoencoderTiny(encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8], num_encoder_blocks=[1, 1],
                    num_decoder_blocks=[1, 1]).save_pretrained(tmp_path / "tiny2x")
    with pytest.raises(UserError, match="decodes 4-channel latents 2x; the student makes 4-channel latents for a 8x"):
        tiny_decoder(str(tmp_path / "tiny2x"), student)
    vae, origin = tiny_decoder(None, SimpleNamespace(vae=AutoencoderKL(**TOY_VAE)))
    assert isinstance(vae, AutoencoderTiny) and vae.config.decoder_block_out_channels == [64, 64]
