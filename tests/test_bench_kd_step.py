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


def test_toy_benchmark_reports_every_figure(tmp_path):
    out = tmp_path / "out.json"
    result = run_script([sys.executable, "eval/bench_kd_step.py", "--model", "toy", "--repeats", "2", "--warmup", "1",
                         "--json", str(out)], timeout=600)  # generous: seconds alone, minutes on a loaded machine
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    figures = json.loads(out.read_text())["models"]
    assert list(figures) == ["toy"]
    toy = figures["toy"]
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
