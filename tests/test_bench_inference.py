"""eval/bench_inference.py on the toy teacher: every figure present, ratios against the teacher."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdkd.eval.bench.timing import unet_macs

from conftest import run_script


def test_macs_of_a_one_conv_unet_are_counted():
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                                cross_attention_dim=8, mid_block_type=None)
    macs = unet_macs(unet, 64, 8, torch.device("cpu"), torch.float32)
    conv_in = 8 * 8 * 8 * 4 * 3 * 3  # H*W*Cout*Cin*k*k at latent 8x8
    assert macs > conv_in


@pytest.mark.e2e  # the command in a subprocess: full suite only (fast tier under 3 minutes)
def test_benchmark_toy_json_and_table(tmp_path):
    out = tmp_path / "bench.json"
    r = run_script([sys.executable, "eval/bench_inference.py", "--teacher", "toy", "--presets", "bk_small,bk_tiny",
                    "--resolution", "32", "--steps", "2", "--repeats", "1", "--e2e-repeats", "1", "--json", str(out)])
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [row["model"] for row in rows] == ["teacher", "bk_small", "bk_tiny"]
    # Timings of one repeat on a shared machine can only be checked for consistency: each ratio is its model's
    # number over the teacher's, the throughput the latency's inverse.
    teacher = rows[0]
    for row in rows:
        assert all(row[key] > 0 for key in ("unet_ms_per_step", "latency_ms_per_image", "peak_mem_mb")), row
        assert row["params_ratio"] == pytest.approx(row["unet_params"] / teacher["unet_params"])
        assert row["macs_ratio"] == pytest.approx(row["unet_gmacs"] / teacher["unet_gmacs"])
        assert row["unet_latency_ratio"] == pytest.approx(row["unet_ms_per_step"] / teacher["unet_ms_per_step"])
        assert row["latency_vs_macs"] == pytest.approx(row["unet_latency_ratio"] / row["macs_ratio"] - 1)
        assert row["images_per_s"] == pytest.approx(1e3 / row["latency_ms_per_image"])
    assert rows[0]["macs_ratio"] == 1.0 and rows[0]["params_ratio"] == 1.0
    assert all(row["unet_gmacs"] < rows[0]["unet_gmacs"] for row in rows[1:])
    assert all(row["unet_params"] < rows[0]["unet_params"] for row in rows[1:])
    assert "| teacher" in r.stdout and "time vs MACs" in r.stdout


@pytest.mark.slow  # a Python start for one line; the run above covers the command
def test_benchmark_bad_preset():
    r = run_script([sys.executable, "eval/bench_inference.py", "--teacher", "toy", "--presets", "bk_huge"])
    assert r.returncode == 2 and "unknown preset 'bk_huge'" in r.stderr


@pytest.mark.slow  # two toy U-Nets exported and timed in both runtimes: ~10 s
def test_benchmark_times_onnx_unets_beside_pytorch(tmp_path, capsys):
    from sdkd.eval import bench_inference

    out = tmp_path / "bench.json"
    bench_inference.main(["--teacher", "toy", "--presets", "bk_tiny", "--resolution", "32", "--steps", "2",
                          "--repeats", "2", "--e2e-repeats", "1", "--device", "cpu", "--onnx", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [row["model"] for row in rows] == ["teacher", "bk_tiny"]
    for row in rows:
        assert row["onnx_provider"] == "CPUExecutionProvider" and row["onnx_dtype"] == "float32"
        assert row["onnx_vs_pytorch"] == pytest.approx(row["onnx_ms_per_step"] / row["unet_ms_per_step"])
        assert row["onnx_ms_per_step"] > 0
    printed = capsys.readouterr().out
    assert "ONNX x PyTorch" in printed and "bk_tiny: ONNX U-Net" in printed
