"""Inference benchmark: teacher against each student, same resolution and steps, one run.

    python eval/bench_inference.py --teacher sd15 --presets bk_base,bk_small,bk_tiny \
        --resolution 256 --steps 4 --json bench.json

Per model: U-Net parameters and MACs (one forward at batch 1, counted with
torch.utils.flop_counter.FlopCounterMode; MACs = FLOPs / 2), U-Net time per sampling step (one
forward at the classifier-free-guidance batch), end-to-end latency per image (text encoding,
sampling, VAE decoding), images per second and peak memory (CUDA allocator peak on GPU; process
RSS peak on CPU). Each student is reported against the teacher: parameter, MACs and U-Net latency
ratios, and how far the latency ratio is from the MACs ratio.

`--teacher sd15` builds SD-1.5 widths with random weights (no download), `toy` the toy teacher,
or give a diffusers folder. Students are built from the teacher by the presets' weight maps;
`--model PATH` adds models (run, checkpoint-STEP or diffusers folders, sdkd single files).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdkd.cli.errors import UserError, run_cli


# ---------------------------------------------------------------------------------------------
# Measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak on GPU, sampled process RSS on CPU (bytes)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self.peak = proc.memory_info().rss

            def sample():
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
        return False


def unet_inputs(unet, batch: int, resolution: int, vae_scale: int, device, dtype):
    latent = resolution // vae_scale
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, unet.config.in_channels, latent, latent, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    return sample, t, ctx


@torch.inference_mode()
def unet_macs(unet, resolution: int, vae_scale: int, device, dtype) -> int:
    sample, t, ctx = unet_inputs(unet, 1, resolution, vae_scale, device, dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        unet(sample, t, encoder_hidden_states=ctx)
    return counter.get_total_flops() // 2


def interleaved(calls: dict[str, Callable[[], object]], device, repeats: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call: `warmup` untimed rounds, then `repeats` timed ones, one call per name per round,
    the names taken in turn, so that on a shared or throttling machine every model sees the same
    conditions and the ratios hold even when absolute times drift."""
    times = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            _sync(device)
            start = clock()
            call()
            _sync(device)
            if round_ >= warmup:
                times[name].append(clock() - start)
    return times


@torch.inference_mode()
def interleaved_step_times(unets: dict, batch: int, resolution: int, vae_scale: int, device, dtype,
                           repeats: int, cpu_time: bool = False) -> dict[str, list[float]]:
    """One U-Net forward per model per round, models taken in turn (`interleaved`), after one warm-up round.

    `cpu_time` times with the process CPU clock instead of the wall clock: on a CPU host shared
    with other jobs it counts only this process's own compute (use it with --threads 1, where no
    thread spins waiting for a descheduled sibling)."""
    clock = time.process_time if cpu_time and device.type == "cpu" else time.perf_counter
    calls = {}
    for name, unet in unets.items():
        sample, t, ctx = unet_inputs(unet, batch, resolution, vae_scale, device, dtype)
        calls[name] = functools.partial(unet, sample, t, encoder_hidden_states=ctx)
    return interleaved(calls, device, repeats, warmup=1, clock=clock)


def _weight_bytes(pipe) -> int:
    return sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
               for p in m.parameters())


def e2e_call(pipeline, args) -> Callable[[], list]:
    """One whole pipeline call as `end_to_end` times it: `args.batch` prompts, text encoding, `args.steps`
    sampling steps at `args.guidance`, VAE decoding (unless `args.no_decode`), images at `args.resolution`."""
    prompts = [f"a photo of object {i}" for i in range(args.batch)]
    return functools.partial(pipeline, prompts, seed=1, steps=args.steps, guidance_scale=args.guidance,
                             height=args.resolution, width=args.resolution,
                             output_type="latent" if args.no_decode else "pil")


def end_to_end(pipeline, args) -> dict:
    """Latency per image, images/s and peak memory of whole pipeline calls (text, steps, decode).

    Peak memory = this pipeline's weights + the most the process (CPU RSS, or the CUDA allocator)
    grew during the calls, so other models held for the benchmark do not count.
    """
    device = pipeline.device
    call = e2e_call(pipeline, args)
    call()  # warm-up
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    with PeakMemory(device) as mem:
        if before is None:
            before = mem.peak
        calls = []
        for _ in range(args.e2e_repeats):
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            calls.append(time.perf_counter() - start)
    seconds = statistics.median(calls)
    return dict(latency_ms_per_image=seconds / args.batch * 1e3, images_per_s=args.batch / seconds,
                peak_mem_mb=(_weight_bytes(pipeline.pipe) + max(mem.peak - before, 0)) / 2**20)


def add_ratios(rows: list[dict]) -> None:
    teacher = rows[0]
    for r in rows:
        r["params_ratio"] = r["unet_params"] / teacher["unet_params"]
        r["macs_ratio"] = r["unet_gmacs"] / teacher["unet_gmacs"]
        r["unet_latency_ratio"] = r["unet_ms_per_step"] / teacher["unet_ms_per_step"]
        r["latency_vs_macs"] = r["unet_latency_ratio"] / r["macs_ratio"] - 1


def table(rows: list[dict]) -> str:
    head = ["model", "U-Net params", "GMACs", "U-Net ms/step", "ms/image", "img/s", "peak MB",
            "params x", "MACs x", "U-Net time x", "time vs MACs"]
    lines = [head]
    for r in rows:
        lines.append([r["model"], f"{r['unet_params'] / 1e6:.1f}M", f"{r['unet_gmacs']:.1f}",
                      f"{r['unet_ms_per_step']:.1f}", f"{r['latency_ms_per_image']:.1f}", f"{r['images_per_s']:.2f}",
                      f"{r['peak_mem_mb']:.0f}", f"{r['params_ratio']:.3f}", f"{r['macs_ratio']:.3f}",
                      f"{r['unet_latency_ratio']:.3f}", f"{r['latency_vs_macs']:+.1%}"])
    return markdown_table(lines)


def markdown_table(lines: list[list[str]]) -> str:
    """A Markdown table with padded columns; `lines[0]` is the header."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in lines[1:]])


# ---------------------------------------------------------------------------------------------
# Models


def teacher_pipe(teacher: str):
    """`--teacher`: "sd15" (SD-1.5 widths, random weights), "toy" (the trained toy teacher) or a model path."""
    from sdkd.train.sd_configs import SD15_UNET
    from sdkd.train.teacher import load_pipeline
    from sdkd.train.toy import build_random_pipeline

    if teacher == "sd15":
        return build_random_pipeline(SD15_UNET, widths="sd15")
    if teacher == "toy":  # the trained toy teacher, as `teacher: toy` loads it
        return load_pipeline("toy", what="teacher")
    from sdkd.train.model_files import load_source

    return load_source(teacher).pipe


def models(args):
    """(base pipeline with the teacher's VAE/text encoder, {name: U-Net}, {name: pipeline} of --model)."""
    from sdkd.train.students import PRESETS, build_student

    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise UserError(f"--presets: unknown preset '{unknown[0]}' (expected {', '.join(PRESETS)})")
    base = teacher_pipe(args.teacher)
    unets = {"teacher": base.unet}
    for preset in presets:
        unets[preset] = build_student(base.unet, PRESETS[preset])
    from sdkd.train.model_files import load_source

    extra = {Path(path).name: load_source(path).pipe for path in args.model or []}
    return base, unets, extra


def prepare_for_speed(pipe, device, dtype, compile_: bool):
    """Move a pipeline to `device` / `dtype`, SDPA attention, channels_last U-Net on CUDA, optional torch.compile."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        if module.dtype != dtype:
            module.to(dtype=dtype)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
    if compile_:
        pipe.unet = torch.compile(pipe.unet)


def run(args) -> list[dict]:
    """All U-Nets are held at once (SD-1.5 fp32: teacher + three students ~9 GB) so that their
    per-step timings can be interleaved; end-to-end runs then go one model at a time."""
    from sdkd.eval.pipeline import Pipeline, resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, unets, extra = models(args)
    for name, unet in unets.items():
        base.unet = unet
        prepare_for_speed(base, device, dtype, args.compile)
        unets[name] = base.unet
    for name, pipe in extra.items():
        prepare_for_speed(pipe, device, dtype, args.compile)
        unets[name] = pipe.unet
    vae_scale = base.vae_scale_factor
    cfg_batch = args.batch * (2 if args.guidance > 1 and args.steps > 1 else 1)
    macs = {name: unet_macs(u, args.resolution, vae_scale, device, dtype) for name, u in unets.items()}
    print(f"timing {len(unets)} U-Nets, interleaved ({args.repeats} rounds)...", flush=True)
    steps = interleaved_step_times(unets, cfg_batch, args.resolution, vae_scale, device, dtype, args.repeats,
                                   cpu_time=args.cpu_time)
    rows = []
    for name, unet in unets.items():
        pipe = extra.get(name, base)
        pipe.unet = unet
        row = dict(model=name, unet_params=sum(p.numel() for p in unet.parameters()), unet_gmacs=macs[name] / 1e9,
                   unet_ms_per_step=min(steps[name]) * 1e3,
                   unet_ms_per_step_median=statistics.median(steps[name]) * 1e3)
        row.update(end_to_end(Pipeline(pipe, device, dtype), args))
        row.update(unet_timer="process CPU time" if args.cpu_time and device.type == "cpu" else "wall clock",
                   device=str(device), dtype=str(dtype).removeprefix("torch."), resolution=args.resolution,
                   steps=args.steps, batch=args.batch, guidance=args.guidance)
        rows.append(row)
        print(f"{name}: U-Net {row['unet_ms_per_step']:.1f} ms/step, {row['unet_gmacs']:.1f} GMACs, "
              f"{row['latency_ms_per_image']:.0f} ms/image", flush=True)
    add_ratios(rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark teacher and students: latency, U-Net time per step, "
                                                 "images/s, peak memory, parameters, MACs.")
    parser.add_argument("--teacher", default="sd15", help="sd15 (random SD-1.5 widths), toy, or a diffusers folder")
    parser.add_argument("--presets", default="bk_base,bk_small,bk_tiny", help="comma-separated student presets")
    parser.add_argument("--model", action="append",
                        help="also benchmark a model (run, checkpoint, diffusers folder, sdkd file)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (1 = one-step mode, no guidance)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=1, help="images per pipeline call")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of U-Net forwards (the minimum per model is used)")
    parser.add_argument("--e2e-repeats", type=int, default=2, help="timed end-to-end calls per model (median)")
    parser.add_argument("--no-decode", action="store_true", help="end-to-end without the VAE decode")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--cpu-time", action="store_true",
                        help="CPU only: time U-Net steps with the process CPU clock (robust on a shared host; "
                             "use with --threads 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each U-Net")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.repeats < 1 or args.e2e_repeats < 1:
        raise UserError("--steps, --batch, --repeats and --e2e-repeats must be at least 1")
    rows = run(args)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
