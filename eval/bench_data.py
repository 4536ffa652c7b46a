"""Data benchmarks on CPU: loader throughput from 512 px JPEG shards, and the step with and without the
latent cache.

    python eval/bench_data.py [--mode loader|cache|both] [--workers 0 1 2] [--images 160] [--batch 8]
                              [--model toy|sd15|both] [--latent 16] [--repeats 5] [--warmup 2]

- **loader**: writes `--images` synthetic photos-like JPEGs (512 px shorter side, 4:3, quality 90, about
  the size of LAION-Aesthetics files) into WebDataset shards with webdataset's `ShardWriter`, then reads
  them through the real `WebDatasetSource` (resampled, shuffle buffer, 512 px center crop + flip) and a
  DataLoader with N workers, printing samples per second in all and per worker (the first batches,
  which include worker start-up, are not timed). Also the per-sample cost in one process: JPEG decode,
  then resize + crop + flip + to tensor. The number of workers a GPU needs is the step's sample rate
  divided by the per-worker rate (the rates of the recipes in losses-and-recipes.md are printed).
- **cache**: the real `Loop.optimizer_step` (KD step, as in eval/bench_kd_step.py) with the
  `BatchEncoder` (VAE encode + text encode inside the step: no cache) against the `CachedEncoder` (latent
  drawn from a cached mean/std: `data.cache`), for the toy and for SD-1.5 widths (U-Net, VAE and
  CLIP-L at random weights, `--latent` latent size, i.e. 8x pixels), interleaved, median of repeats.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sdkd.cli import limits
from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import report_file, write_text
from sdkd.data.sources.core import collate, open_image
from sdkd.data.sources.transforms import ImageTransform, Preprocess
from sdkd.data.sources.webdataset_source import WebDatasetSource

SEED = 0
# Samples per second one GPU consumes in the recipes (losses-and-recipes.md section 3, BK-SDM README):
# batch 64 for 50K iterations ~ 60 h; batch 256 (64 x 4) ~ 300 h, both on one A100.
RECIPE_RATES = {"BK-SDM-Base, batch 64, A100 (60 h / 50K steps)": 64 * 50_000 / (60 * 3600),
                "BK-SDM-Base, batch 256, A100 (300 h / 50K steps)": 256 * 50_000 / (300 * 3600)}


# ---------------------------------------------------------------------------------------------
# Loader throughput


def photo_like(seed: int, width: int = 683, height: int = 512) -> bytes:
    """A smooth random image with fine grain, JPEG quality 90: compresses like a photo (tens of KB)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    grain = rng.normal(0, 6, (height, width, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_bench_shards(folder: Path, images: int, per_shard: int = 16) -> tuple[list[str], list[int], float]:
    import webdataset as wds

    sizes = []
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as writer:
        for i in range(images):
            data = photo_like(i)
            sizes.append(len(data))
            writer.write({"__key__": f"{i:06d}", "jpg": data, "txt": f"a photo number {i}"})
    urls = sorted(str(p) for p in folder.glob("shard-*.tar"))
    counts = [per_shard] * (images // per_shard) + ([images % per_shard] if images % per_shard else [])
    return urls, counts, statistics.mean(sizes)


def bench_loader(workers_list: list[int], images: int, batch: int, resolution: int = 512) -> dict:
    result = {"images": images, "batch": batch, "resolution": resolution, "workers": {}}
    preprocess = Preprocess(ImageTransform(resolution, center_crop=True, random_flip=True), caption_fields=("txt",))
    with tempfile.TemporaryDirectory() as tmp:
        urls, counts, mean_bytes = write_bench_shards(Path(tmp), images)
        result["mean_jpeg_bytes"] = mean_bytes

        # One process, per sample: decode, then the preprocessing.
        raw = [photo_like(i) for i in range(8)]
        rng = np.random.default_rng(SEED)
        decode, prep = [], []
        for data in raw * 2:
            start = time.perf_counter()
            image = open_image(data, "bench")
            decode.append(time.perf_counter() - start)
            start = time.perf_counter()
            preprocess(image, "c", rng, rng, "bench")
            prep.append(time.perf_counter() - start)
        result["decode_ms"], result["preprocess_ms"] = 1e3 * statistics.median(decode), 1e3 * statistics.median(prep)

        for workers in workers_list:
            ds = WebDatasetSource(urls, counts, preprocess, SEED, resampled=True, shuffle_buffer=64)
            per_epoch = ds.set_batching(batch, 1, workers)
            warm = max(workers, 1) * 2  # every worker has started and filled its shuffle buffer
            timed = per_epoch - warm
            loader = DataLoader(ds, batch_size=batch, drop_last=True, collate_fn=collate, num_workers=workers)
            it = iter(loader)
            for _ in range(warm):
                next(it)
            start = time.perf_counter()
            n = 0
            for _ in range(timed):
                batch_ = next(it)
                assert not batch_["skipped"], batch_["skipped"][0]
                n += len(batch_["captions"])
            rate = n / (time.perf_counter() - start)
            result["workers"][workers] = {"samples_per_sec": rate, "per_worker": rate / max(workers, 1)}
            del it
    return result


def report_loader(r: dict) -> str:
    lines = [f"== loader: {r['images']} JPEGs {r['resolution']}x683 (mean {r['mean_jpeg_bytes'] / 1024:.0f} KiB) "
             f"in WebDataset shards -> {r['resolution']} px crop + flip, batch {r['batch']}",
             f"   one process: decode {r['decode_ms']:.1f} ms + preprocess {r['preprocess_ms']:.1f} ms per sample "
             f"= {1e3 / (r['decode_ms'] + r['preprocess_ms']):.1f} samples/s"]
    for workers, w in r["workers"].items():
        label = "in the main process" if workers == 0 else f"{workers} worker{'s' * (workers > 1)}"
        lines.append(f"   {label:>20}: {w['samples_per_sec']:7.1f} samples/s, {w['per_worker']:6.1f} per worker")
    with_workers = [w["per_worker"] for k, w in r["workers"].items() if k > 0]
    per_worker = min(with_workers) if with_workers else r["workers"][0]["per_worker"]  # the conservative figure
    for recipe, rate in RECIPE_RATES.items():
        lines.append(f"   {recipe}: {rate:.1f} samples/s -> {math.ceil(rate / per_worker)} workers "
                     f"at {per_worker:.1f} samples/s per worker (add 50% headroom)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Step with and without the latent cache


def bench_cache(name: str, latent: int, batch: int, repeats: int, warmup: int) -> dict:
    from sdkd.eval.bench.setup import build_bench
    from sdkd.train.engine.loop import Loop
    from sdkd.train.engine.step_random import StepRandom
    from sdkd.train.tasks.objective import CachedEncoder

    b = build_bench(name, latent, batch)
    mean, std = b.encoder.posterior(b.batch)
    cached = {"latent_mean": mean, "latent_std": std, **b.encoder.conditioning(b.batch).tensors()}
    loop = Loop(b.cfg, b.acc, b.task(b.encoder), dataset=None)
    loop.prepare(max_steps=warmup + repeats)
    encoders = {"without cache": (b.encoder, b.batch),
                "with cache": (CachedEncoder(b.parts, b.acc.device), cached)}
    times = {label: [] for label in encoders}
    rng = StepRandom(SEED, b.acc.device, batch)
    for i in range(warmup + repeats):
        for label, (encoder, batch_) in encoders.items():
            loop.task.encoder = encoder
            rng.manual_seed(SEED)
            start = time.perf_counter()
            loop.optimizer_step(0, itertools.repeat(batch_), rng)
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    result = {"model": name, "latent": latent, "pixels": b.cfg.data.resolution, "batch": batch, "repeats": repeats,
              "threads": torch.get_num_threads()}
    result |= {label: statistics.median(t) for label, t in times.items()}
    return result


def report_cache(r: dict) -> str:
    saved = r["without cache"] - r["with cache"]
    return (f"== cache, {r['model']}: {r['pixels']} px (latent {r['latent']}), batch {r['batch']}, median of "
            f"{r['repeats']}, {r['threads']} threads\n"
            f"   KD step without cache (VAE + text encoder in the step): {r['without cache']:8.3f} s\n"
            f"   KD step with cache (data.cache):                        {r['with cache']:8.3f} s\n"
            f"   saved {saved:.3f} s per step ({100 * saved / r['without cache']:.0f}%), "
            f"{r['without cache'] / r['with cache']:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["loader", "cache", "both"], default="both")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to try")
    parser.add_argument("--images", type=int, default=160, help="JPEGs written for the loader benchmark")
    parser.add_argument("--batch", type=int, default=8, help="loader batch size")
    parser.add_argument("--model", choices=["toy", "sd15", "both"], default="both")
    parser.add_argument("--latent", type=int, default=16, help="latent size of the cache benchmark (8x pixels)")
    parser.add_argument("--step-batch", type=int, default=None, help="step batch (default: toy 8, sd15 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    for workers in args.workers:
        limits.check_int(workers, "--workers", 0, limits.MAX_WORKERS)
    limits.check_int(args.images, "--images", 1, limits.MAX_IMAGES)
    limits.check_int(args.batch, "--batch", 1, limits.MAX_BATCH)
    limits.check_int(args.latent, "--latent", 1, limits.MAX_SIDE // 8)  # latent pixels
    if args.step_batch is not None:
        limits.check_int(args.step_batch, "--step-batch", 1, limits.MAX_BATCH)
    limits.check_int(args.repeats, "--repeats", 1, limits.MAX_STEPS)
    limits.check_int(args.warmup, "--warmup", 0, limits.MAX_STEPS)
    if args.json:
        report_file(args.json, "--json", args.overwrite)
    if args.mode in ("loader", "both"):  # the loader benchmark times what is left after every worker's start
        for workers in args.workers:
            if args.images // args.batch - 2 * max(workers, 1) < 4:
                raise UserError(f"--images {args.images} is too few for {workers} workers at batch {args.batch}: "
                                f"give at least {(4 + 2 * max(workers, 1)) * args.batch}")
    results = {}
    if args.mode in ("loader", "both"):
        results["loader"] = bench_loader(args.workers, args.images, args.batch)
        print(report_loader(results["loader"]), flush=True)
    if args.mode in ("cache", "both"):
        for name in (["toy", "sd15"] if args.model == "both" else [args.model]):
            batch = args.step_batch or {"toy": 8, "sd15": 1}[name]
            results[f"cache_{name}"] = bench_cache(name, args.latent, batch, args.repeats, args.warmup)
            print(report_cache(results[f"cache_{name}"]), flush=True)
    if args.json:
        write_text(args.json, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
