"""eval/bench_kd_step.py on the toy, run as a user runs it: every figure is there and consistent.

No timing thresholds: the ratio is judged by reading the benchmark's output, not here.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import run_script

PARTS = ("teacher_forward", "student_forward", "backward", "optimizer_step")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.e2e  # the command in a subprocess: full suite only (fast tier under 3 minutes)
def test_toy_benchmark_reports_every_figure(tmp_path):
    out = tmp_path / "out.json"
    # The smallest inputs that take every path: batch 2 of 8x8 latents (16 px) instead of 8 of 16x16, one warm-up
    # and one timed iteration. Measured on a loaded 2-core machine: 81 s with the defaults and --repeats 2, 9 s so.
    # One thread whatever the caller's OMP_NUM_THREADS (run_script's default yields to it): the JSON must say 1.
    # The timeout is generous: seconds alone, minutes on a loaded machine.
    result = run_script([sys.executable, "eval/bench_kd_step.py", "--model", "toy", "--repeats", "1", "--warmup", "1",
                         "--batch", "2", "--latent", "8", "--json", str(out)],
                        timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    figures = json.loads(out.read_text())["models"]
    assert list(figures) == ["toy"]
    toy = figures["toy"]
    assert (toy["batch"], toy["latent"], toy["pixels"], toy["threads"]) == (2, 8, 16, 1)
    assert len(toy["iterations"]) == 2  # the warm-up one is kept in the JSON, left out of the medians
    assert set(toy["parts"]) == set(PARTS)
    for name in PARTS:
        assert positive(toy["parts"][name]), name
    for key in ("step", "sum_parts", "ratio", "peak_rss_step_bytes", "peak_rss_bytes"):
        assert positive(toy[key]), key
    for group in ("not_in_parts", "optimizer_step_only", "encode"):
        assert toy[group] and all(positive(v) for v in toy[group].values()), group
    assert set(toy["optimizer_step_only"]) == {"fused", "foreach", "loop"}
    assert toy["auto_implementation"] == "fused"  # CPU has the fused AdamW kernel: auto must take it
    assert toy["sum_parts"] == pytest.approx(sum(toy["parts"].values()), rel=1e-12)
    assert toy["ratio"] == pytest.approx(toy["step"] / toy["sum_parts"], rel=1e-12)
    assert f"ratio step/sum(parts) = {toy['ratio']:.2f} (target <= 1.10)" in result.stdout
