"""eval/bench_decoder.py at a tiny size, run as a user runs it: the report's figures are complete and consistent
(not the timings themselves)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from diffusers import AutoencoderTiny

from sdkd.eval.bench.timing import decode_macs, decoder_params

from conftest import run_script


def test_macs_and_params_of_the_default_tiny_decoder():
    vae = AutoencoderTiny()
    assert decoder_params(vae) == 1_222_531  # TAESD's decoder (sdxs.md 1.1)
    macs = decode_macs(vae, 64, torch.device("cpu"), torch.float32)
    # The last conv alone, 64 -> 3 channels, 3x3, at 64 x 64 output pixels.
    assert macs > 64 * 64 * 3 * 64 * 9
    assert decode_macs(vae, 128, torch.device("cpu"), torch.float32) == pytest.approx(4 * macs, rel=0.01)


@pytest.mark.slow
def test_benchmark_report_and_table(tmp_path):
    out = tmp_path / "bench.json"
    r = run_script([sys.executable, "eval/bench_decoder.py", "--resolution", "32", "--batches", "1,2",
                    "--repeats", "2", "--warmup", "0", "--threads", "1", "--json", str(out)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["device"], report["dtype"], report["resolution"], report["threads"]) == ("cpu", "fp32", 32, 1)
    rows = report["rows"]
    assert [(row["model"], row["batch"]) for row in rows] == [("teacher", 1), ("tiny", 1), ("teacher", 2), ("tiny", 2)]
    teacher, tiny = rows[0], rows[1]
    assert teacher["params"] == 49_490_199  # SD-1.5's VAE decoder with its post-quant conv
    assert tiny["params"] == 1_222_531
    assert 0 < tiny["gmacs_per_image"] < teacher["gmacs_per_image"]
    for row in rows:
        assert len(row["all_seconds"]) == 2 and row["seconds"] == pytest.approx(sorted(row["all_seconds"])[0] / 2
                                                                                 + sorted(row["all_seconds"])[1] / 2)
        assert row["ms_per_image"] == pytest.approx(row["seconds"] / row["batch"] * 1e3)
        same_batch = next(t for t in rows if t["model"] == "teacher" and t["batch"] == row["batch"])
        assert row["macs_ratio"] == pytest.approx(row["gmacs_per_image"] / same_batch["gmacs_per_image"])
        assert row["time_ratio"] == pytest.approx(row["seconds"] / same_batch["seconds"])
        assert row["speedup"] == pytest.approx(1 / row["time_ratio"])
    assert teacher["macs_ratio"] == 1.0 and tiny["macs_ratio"] < 0.1
    assert "| teacher" in r.stdout and "| tiny" in r.stdout and "speed-up" in r.stdout


@pytest.mark.e2e  # the command in a subprocess: full suite only (fast tier under 3 minutes)
def test_benchmark_refuses_fp16_on_cpu():
    r = run_script([sys.executable, "eval/bench_decoder.py", "--device", "cpu", "--dtype", "fp16"])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --dtype fp16 needs --device cuda")
