"""How close the sdkd KD step comes to the cost of its necessary parts, on CPU.

    python eval/bench_kd_step.py [--model toy|sd15|both] [--latent N] [--batch B] [--repeats R]
                                 [--warmup W] [--json FILE]

One run, on one set of models and inputs per model, measures:

- the **KD step**: the real `Loop.optimizer_step` (sdkd.train.engine.loop) on an `Accelerator(cpu=True)`
  with the prepared student, the `build_optimizer` AdamW (`optim.implementation: auto`), a constant
  LR schedule, the real `DiffusionObjective` (teacher, feature hooks, `KDLoss`) and the default
  config (bk_small, BK-SDM's feature pairs, grad clipping at 1.0, grad_accum 1). Its encoder hands
  back precomputed latents and text embeddings, which is what the latent cache provides, so VAE and
  text encoding are not in the step; they are timed on their own and printed on a separate line.
- the **parts** no KD step can do without, each timed alone on the same models and inputs:
  teacher forward under no_grad with its hooks capturing, student forward with its hooks, backward
  of the KD loss, optimizer step (the plain AdamW's `step()` + `zero_grad(set_to_none=True)`). Backward is timed
  directly on the graph the timed student forward has just built (no subtraction). These are the
  work BK-SDM's loop does too; everything else in the step (noise draw, loss terms, grad clipping,
  accelerate's wrappers, the LR schedule, Python glue) is overhead and makes step / sum(parts)
  exceed 1. Noise + loss terms and clipping are timed as well and printed beside the parts, not
  added to them, to show where that overhead goes.
- `optimizer.step()` alone for each AdamW implementation: fused, foreach, and the per-parameter
  loop that BK-SDM's script gets by default (13.8 s per step on CPU for the 482M student).
- peak memory: the process's max RSS (`ru_maxrss`) after the step and parts, and after the
  optimizer comparison (a fresh AdamW state per kernel, plus foreach's full-size temporaries).
  Models run smallest first, so each figure is that model's own peak. Everything runs on the CPU
  (`Accelerator(cpu=True)`), so there is no `torch.cuda.max_memory_allocated` figure.

Models: `toy` is the built-in toy teacher with its own VAE and text encoder on synthetic images
(real latents, 16x16 at 32 px); `sd15` is the SD-1.5 U-Net (860M) built from its config with random
weights in fp32, latents and (B, 77, 768) embeddings drawn at random, and an SD-1.5-shaped VAE and
CLIP-L text encoder (random weights) for the encoding line. Hygiene: warm-up iterations untimed,
median of R repeats, step and parts interleaved in every repeat so that drift hits both alike, the
same seed (hence noise and timesteps) in every repeat, default thread count, `time.perf_counter`.
Min/max per row and the CPU share other processes took during the timing are printed too: on a
shared machine they say whether a figure can be trusted.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from sdkd.cli import limits
from sdkd.cli.errors import run_cli
from sdkd.cli.files import report_file, write_text
from sdkd.eval.bench.setup import SEED, Bench, build_bench
from sdkd.train.engine.loop import Loop, build_optimizer
from sdkd.train.engine.step_random import StepRandom

TARGET = 1.10
PARTS = {
    "teacher_forward": "teacher forward (no_grad, hooks)",
    "student_forward": "student forward (hooks)",
    "backward": "backward of the KD loss",
    "optimizer_step": "optimizer step + zero_grad",
}
IMPLEMENTATIONS = ("fused", "foreach", "loop")
DEFAULT_BATCH = {"toy": 8, "sd15": 1}  # toy: configs/toy.yaml; sd15: 128 px, batch 1 as in the issue


def cpu_seconds() -> tuple[float, float]:
    """(all processes' busy CPU seconds from /proc/stat, this process's CPU seconds) so far."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Clock:
    """Seconds per named block, one row per iteration (a name timed twice in one iteration is summed)."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def new_row(self) -> None:
        self.rows.append({})

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        row = self.rows[-1]
        row[name] = row.get(name, 0.0) + time.perf_counter() - start

    def medians(self, warmup: int) -> dict[str, float]:
        timed = self.rows[warmup:]
        return {name: statistics.median(row[name] for row in timed) for name in timed[0]}

    def ranges(self, warmup: int) -> dict[str, tuple[float, float]]:
        """(min, max) per name: a wide range means something else shared the CPU during the run."""
        timed = self.rows[warmup:]
        return {name: (min(row[name] for row in timed), max(row[name] for row in timed)) for name in timed[0]}


# ---------------------------------------------------------------------------------------------
# Measurements


def bench_model(name: str, latent: int, batch_size: int, repeats: int, warmup: int) -> dict:
    b = build_bench(name, latent, batch_size)
    result = dict(
        model=name, latent=latent, pixels=b.cfg.data.resolution, batch=batch_size, repeats=repeats, warmup=warmup,
        threads=torch.get_num_threads(), feature_pairs=len(b.objective.student_hooks.names),
        teacher_params=sum(p.numel() for p in b.parts.unet.parameters()),
        student_params=sum(p.numel() for p in b.student.parameters()),
    )
    clock = Clock()
    # The CPU share other processes took during the timing: on a shared machine it inflates some
    # iterations (see min/max) and can tilt the ratio.
    (busy0, own0), wall0 = cpu_seconds(), time.perf_counter()
    result["auto_implementation"] = time_step_and_parts(b, clock, warmup + repeats)
    (busy1, own1), wall1 = cpu_seconds(), time.perf_counter()
    result["other_processes_cpu_share"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * os.cpu_count())
    medians = clock.medians(warmup)
    result["parts"] = {part: medians[part] for part in PARTS}
    result["sum_parts"] = sum(result["parts"].values())
    result["step"] = medians["step"]
    result["ratio"] = result["step"] / result["sum_parts"]
    result["not_in_parts"] = {key: medians[key] for key in ("noise_and_loss_terms", "clip_grad_norm")}
    result["min_max"] = clock.ranges(warmup)
    result["iterations"] = clock.rows  # every iteration's seconds, the `warmup` untimed ones first
    # Step and parts of one iteration run back to back: a burst of contention skews their ratio less.
    result["ratio_median_per_repeat"] = statistics.median(
        row["step"] / sum(row[part] for part in PARTS) for row in clock.rows[warmup:])
    result["peak_rss_step_bytes"] = peak_rss_bytes()

    b.acc.free_memory()  # accelerate keeps the step's optimizer alive otherwise: 2x the AdamW state below
    gc.collect()
    result["optimizer_step_only"] = time_implementations(b, repeats, warmup)
    result["encode"] = time_encoding(b, repeats, warmup)
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def time_step_and_parts(b: Bench, clock: Clock, iterations: int) -> str:
    """Per iteration: the real KD step, then the same step taken apart. Returns auto's AdamW kernel."""
    loop = Loop(b.cfg, b.acc, b.task(lambda batch, rng: (b.latents, b.cond)), dataset=None)  # what the cache hands over
    loop.prepare(max_steps=iterations)
    unet = loop.modules["unet"]
    group = unet.optimizer.param_groups[0]
    implementation = "fused" if group["fused"] else "foreach" if group["foreach"] else "loop"
    batches = itertools.repeat({})  # the encoder above ignores the batch
    rng = StepRandom(SEED, b.acc.device, b.cfg.train.batch_size)
    for _ in range(iterations):
        clock.new_row()
        rng.manual_seed(SEED)
        with clock("step"):
            loop.optimizer_step(0, batches, rng)
        rng.manual_seed(SEED)
        take_apart(b, unet.wrapped, unet.optimizer.optimizer, b.params, rng, clock)
    return implementation


def take_apart(b: Bench, student, optimizer, params, rng: StepRandom, clock: Clock) -> None:
    """One KD step in the objective's order, each necessary part in its own clock block."""
    objective = b.objective
    with clock("noise_and_loss_terms"):  # the objective's own draws: same noise and timesteps
        noisy, timesteps, target = objective.draw(b.latents, rng)
    with clock("student_forward"), objective.student_hooks.capture():
        pred = student(noisy, timesteps, **b.cond.unet_kwargs()).sample
    with clock("teacher_forward"), torch.no_grad(), b.acc.autocast(), objective.teacher_hooks.capture():
        teacher_pred = objective.teacher(noisy, timesteps, **b.cond.unet_kwargs()).sample
    with clock("noise_and_loss_terms"):
        loss = objective.loss(pred, target, teacher_pred, objective.student_hooks.features,
                              objective.teacher_hooks.features)["loss"]
    with clock("backward"):
        loss.backward()
    with clock("clip_grad_norm"):
        b.acc.clip_grad_norm_(params, b.cfg.train.max_grad_norm)
    with clock("optimizer_step"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def time_implementations(b: Bench, repeats: int, warmup: int) -> dict[str, float]:
    """`optimizer.step()` alone for each AdamW kernel, one at a time, on one set of gradients."""
    params = b.params
    b.objective(b.student, b.latents, b.cond, StepRandom(SEED, b.acc.device, len(b.latents)))["loss"].backward()
    seconds = {}
    for implementation in IMPLEMENTATIONS:
        optimizer = build_optimizer(params, replace(b.cfg.optim, implementation=implementation))
        clock = Clock()
        for _ in range(warmup + repeats):  # the first step also allocates the AdamW state
            clock.new_row()
            with clock("step"):
                optimizer.step()
        seconds[implementation] = clock.medians(warmup)["step"]
        del optimizer
        gc.collect()
    for p in params:
        p.grad = None
    return seconds


def time_encoding(b: Bench, repeats: int, warmup: int) -> dict[str, float]:
    """What the latent cache takes out of every step: VAE encode of the images, text encode of the captions."""
    vae = b.encoder.vae
    pixels = b.batch["pixel_values"].to(vae.device)
    generator = torch.Generator(vae.device)
    clock = Clock()
    for _ in range(warmup + repeats):
        clock.new_row()
        generator.manual_seed(SEED)
        with clock("vae"), torch.no_grad():
            vae.encode(pixels).latent_dist.sample(generator=generator)
        with clock("text"):
            b.encoder.conditioning(b.batch)
    return clock.medians(warmup)


# ---------------------------------------------------------------------------------------------
# Report


def report(r: dict) -> str:
    gib = 2 ** 30
    auto = r["auto_implementation"]
    spread = r["min_max"]
    rows = [(label if key != "optimizer_step" else f"{label} ({auto})", r["parts"][key], *spread[key])
            for key, label in PARTS.items()]
    rows += [("sum of parts", r["sum_parts"], None, None),
             ("KD step (Loop.optimizer_step)", r["step"], *spread["step"])]
    extra, opt, enc = r["not_in_parts"], r["optimizer_step_only"], r["encode"]
    lines = [
        f"== {r['model']}: teacher {r['teacher_params']:,} params -> student bk_small {r['student_params']:,}; "
        f"{r['feature_pairs']} feature pairs; latent {r['latent']}x{r['latent']} ({r['pixels']} px), "
        f"batch {r['batch']}; median of {r['repeats']} after {r['warmup']} warm-up; {r['threads']} threads",
        f"{'seconds':<44}{'median':>10}{'min':>10}{'max':>10}",
        *(f"{label:<44}{median:>10.4f}" + ("" if low is None else f"{low:>10.4f}{high:>10.4f}")
          for label, median, low, high in rows),
        f"in the step, not a part: noise + loss terms {extra['noise_and_loss_terms']:.4f} s, "
        f"clip_grad_norm_ {extra['clip_grad_norm']:.4f} s",
        "optimizer.step() alone: " + " | ".join(f"{k} {v:.4f} s" for k, v in opt.items()),
        f"outside the step, removed by the latent cache: VAE encode {enc['vae']:.4f} s, "
        f"text encode {enc['text']:.4f} s",
        f"peak RSS {r['peak_rss_step_bytes'] / gib:.2f} GiB after step and parts, "
        f"{r['peak_rss_bytes'] / gib:.2f} GiB after the optimizer comparison",
        f"other processes used {100 * r['other_processes_cpu_share']:.0f}% of the {os.cpu_count()} CPUs while "
        f"step and parts ran; median of per-repeat ratios {r['ratio_median_per_repeat']:.2f}",
        f"ratio step/sum(parts) = {r['ratio']:.2f} (target <= {TARGET:.2f})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["toy", "sd15", "both"], default="both")
    parser.add_argument("--latent", type=int, default=16, help="latent height and width")
    parser.add_argument("--batch", type=int, help="batch size (default: toy 8, sd15 1)")
    parser.add_argument("--repeats", type=int, default=11, help="timed iterations; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    limits.check_int(args.latent, "--latent", 1, limits.MAX_SIDE // 8)  # latent pixels
    if args.batch is not None:
        limits.check_int(args.batch, "--batch", 1, limits.MAX_BATCH)
    limits.check_int(args.repeats, "--repeats", 1, limits.MAX_STEPS)
    limits.check_int(args.warmup, "--warmup", 0, limits.MAX_STEPS)
    if args.json:
        report_file(args.json, "--json", args.overwrite)

    names = ["toy", "sd15"] if args.model == "both" else [args.model]  # smallest first: ru_maxrss only grows
    results = {}
    for name in names:
        results[name] = bench_model(name, args.latent, args.batch or DEFAULT_BATCH[name], args.repeats, args.warmup)
        print(report(results[name]), flush=True)
    if args.json:
        write_text(args.json, json.dumps({"command": sys.argv, "torch": torch.__version__, "models": results},
                                         indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
