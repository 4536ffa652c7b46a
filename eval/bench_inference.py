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

`--onnx` also exports each U-Net as train/export.py --format onnx does (fp32) and times it in onnxruntime
(its CUDA provider on CUDA where onnxruntime-gpu is installed, else the CPU one) in the same interleaved
rounds as the PyTorch U-Nets: per model its ONNX time per step and the ratio to PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import report_file, write_text
from sdkd.cli.words import markdown_table
from sdkd.eval.bench.timing import (
    end_to_end,
    interleaved_step_times,
    prepare_for_speed,
    teacher_pipe,
    unet_macs,
)

ONNX = " (onnx)"  # an ONNX U-Net's name among the timed calls: its model's name and this


def add_ratios(rows: list[dict]) -> None:
    teacher = rows[0]
    for r in rows:
        r["params_ratio"] = r["unet_params"] / teacher["unet_params"]
        r["macs_ratio"] = r["unet_gmacs"] / teacher["unet_gmacs"]
        r["unet_latency_ratio"] = r["unet_ms_per_step"] / teacher["unet_ms_per_step"]
        r["latency_vs_macs"] = r["unet_latency_ratio"] / r["macs_ratio"] - 1


def table(rows: list[dict]) -> str:
    onnx = "onnx_ms_per_step" in rows[0]
    head = ["model", "U-Net params", "GMACs", "U-Net ms/step", "ms/image", "img/s", "peak MB",
            "params x", "MACs x", "U-Net time x", "time vs MACs"] + (["ONNX ms/step", "ONNX x PyTorch"] if onnx else [])
    lines = [head]
    for r in rows:
        lines.append([r["model"], f"{r['unet_params'] / 1e6:.1f}M", f"{r['unet_gmacs']:.1f}",
                      f"{r['unet_ms_per_step']:.1f}", f"{r['latency_ms_per_image']:.1f}", f"{r['images_per_s']:.2f}",
                      f"{r['peak_mem_mb']:.0f}", f"{r['params_ratio']:.3f}", f"{r['macs_ratio']:.3f}",
                      f"{r['unet_latency_ratio']:.3f}", f"{r['latency_vs_macs']:+.1%}"]
                     + ([f"{r['onnx_ms_per_step']:.1f}", f"{r['onnx_vs_pytorch']:.3f}"] if onnx else []))
    return markdown_table(lines)


# ---------------------------------------------------------------------------------------------
# Models


def models(args):
    """(base pipeline with the teacher's VAE/text encoder, {name: U-Net}, {name: pipeline} of --model)."""
    from sdkd.train.models.students import PRESETS, build_student

    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise UserError(f"--presets: unknown preset '{unknown[0]}' (expected {', '.join(PRESETS)})")
    base = teacher_pipe(args.teacher)
    unets = {"teacher": base.unet}
    for preset in presets:
        unets[preset] = build_student(base.unet, PRESETS[preset])
    from sdkd.train.formats.model_files import load_source

    extra = {Path(path).name: load_source(path).pipe for path in args.model or []}
    return base, unets, extra


def run(args, scratch: str) -> list[dict]:
    """All U-Nets are held at once (SD-1.5 fp32: teacher + three students ~9 GB) so that their
    per-step timings can be interleaved; end-to-end runs then go one model at a time. `scratch`: a folder
    for the ONNX exports of --onnx."""
    from sdkd.eval.inference.pipeline import Pipeline, resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, unets, extra = models(args)
    vae_scale = base.vae_scale_factor
    cfg_batch = args.batch * (2 if args.guidance > 1 and args.steps > 1 else 1)
    onnx_calls, provider = {}, None
    if args.onnx:  # exported now, while every U-Net is still on the CPU in fp32
        from sdkd.eval.bench.onnx_runtime import onnx_step_calls

        print(f"exporting {len(unets) + len(extra)} U-Nets to ONNX...", flush=True)
        every = unets | {name: pipe.unet for name, pipe in extra.items()}
        onnx_calls, provider = onnx_step_calls(every, scratch, cfg_batch, args.resolution, vae_scale, device,
                                               args.threads)
    for name, unet in unets.items():
        base.unet = unet
        prepare_for_speed(base, device, dtype, args.compile)
        unets[name] = base.unet
    for name, pipe in extra.items():
        prepare_for_speed(pipe, device, dtype, args.compile)
        unets[name] = pipe.unet
    macs = {name: unet_macs(u, args.resolution, vae_scale, device, dtype) for name, u in unets.items()}
    print(f"timing {len(unets) + len(onnx_calls)} U-Nets, interleaved ({args.repeats} rounds)...", flush=True)
    steps = interleaved_step_times(unets, cfg_batch, args.resolution, vae_scale, device, dtype, args.repeats,
                                   cpu_time=args.cpu_time,
                                   extra={name + ONNX: call for name, call in onnx_calls.items()})
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
        if onnx_calls:  # fp32 whatever --dtype is: fp16 ONNX U-Nets are left to onnxruntime's converters
            onnx_ms = min(steps[name + ONNX]) * 1e3
            row.update(onnx_ms_per_step=onnx_ms, onnx_vs_pytorch=onnx_ms / row["unet_ms_per_step"],
                       onnx_provider=provider, onnx_dtype="float32")
            print(f"{name}: ONNX U-Net {onnx_ms:.1f} ms/step in onnxruntime ({provider}), "
                  f"{row['onnx_vs_pytorch']:.2f}x PyTorch's", flush=True)
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
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved rounds of U-Net forwards (the minimum per model is used)")
    parser.add_argument("--e2e-repeats", type=int, default=2, help="timed end-to-end calls per model (median)")
    parser.add_argument("--no-decode", action="store_true", help="end-to-end without the VAE decode")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--cpu-time", action="store_true",
                        help="CPU only: time U-Net steps with the process CPU clock (robust on a shared host; "
                             "use with --threads 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each U-Net")
    parser.add_argument("--onnx", action="store_true",
                        help="also time each U-Net exported to ONNX (fp32) in onnxruntime, beside PyTorch")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    if args.json:
        report_file(args.json, "--json", args.overwrite)
    if args.steps < 1 or args.batch < 1 or args.repeats < 1 or args.e2e_repeats < 1:
        raise UserError("--steps, --batch, --repeats and --e2e-repeats must be at least 1")
    if args.onnx:  # before any model is built
        from sdkd.train.formats.onnx_export import require

        for module in ("onnx", "onnxruntime"):
            require(module, "--onnx")
    with tempfile.TemporaryDirectory(prefix="sdkd-bench-") as scratch:
        rows = run(args, scratch)
    print()
    print(table(rows))
    if args.json:
        write_text(args.json, json.dumps(rows, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
