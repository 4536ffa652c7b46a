"""eval/bench_data.py at its smallest: every figure of both benchmarks is there and consistent.

No timing thresholds: the figures are judged by reading the benchmark's output, not here.
"""

from __future__ import annotations

import json

from sdkd.eval import bench_data


def test_loader_and_cache_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # 12 images at batch 2: the fewest that leave 4 timed batches after the warm-up ones.
    bench_data.main(["--workers", "0", "--images", "12", "--batch", "2", "--model", "toy", "--latent", "8",
                     "--step-batch", "2", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert list(figures) == ["loader", "cache_toy"]
    loader, cache = figures["loader"], figures["cache_toy"]
    assert (loader["images"], loader["batch"], loader["resolution"]) == (12, 2, 512)
    assert loader["mean_jpeg_bytes"] > 10_000  # photo-like JPEGs: tens of KB, not a flat image's few hundred bytes
    assert loader["decode_ms"] > 0 and loader["preprocess_ms"] > 0
    assert list(loader["workers"]) == ["0"]
    assert loader["workers"]["0"]["samples_per_sec"] == loader["workers"]["0"]["per_worker"] > 0
    assert (cache["model"], cache["latent"], cache["pixels"], cache["batch"], cache["repeats"]) == ("toy", 8, 16, 2, 1)
    assert cache["without cache"] > 0 and cache["with cache"] > 0
    printed = capsys.readouterr().out
    assert "== loader: 12 JPEGs" in printed and "in the main process" in printed
    assert "== cache, toy: 16 px (latent 8), batch 2" in printed and f"wrote {out}" in printed
    # The printed figures are the JSON's, and derived from them as they say.
    d, p = loader["decode_ms"], loader["preprocess_ms"]
    assert f"decode {d:.1f} ms + preprocess {p:.1f} ms per sample = {1e3 / (d + p):.1f} samples/s" in printed
    assert f"saved {cache['without cache'] - cache['with cache']:.3f} s per step" in printed
