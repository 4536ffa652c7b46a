"""A family's student presets against their teacher, side by side in one run: U-Net parameters, MACs at the
teacher's native resolution, CPU time per U-Net forward.

    python eval/bench_students.py --family sdxl --threads 1 --cpu-time --json bench_sdxl.json

The teacher is SDXL base (`--family sdxl`, presets ssd1b, vega, koala_1b, koala_700m) or SD-1.5 (`sd`: bk_base,
bk_small, bk_tiny, sdxs) at real widths with random weights, nothing downloaded; `--widths toy` takes the toy
teachers (SDXL's at SDXL's transformer depths). Parameters and MACs (one forward at batch 1, FlopCounterMode,
MACs = FLOPs / 2) are counted on the meta device at `--macs-resolution` (default the teacher's native size:
1024 px for SDXL). CPU time per forward (batch 1, fp32) is measured at `--resolution`: the models are called in
turn in each round and the fastest round counts; every student shares the teacher's weights, so the run holds
one teacher's memory (SDXL: 10.3 GB). A 1024-px SDXL teacher forward takes about 80 s of one core, a whole
run about 15 CPU minutes; 512 px (about 4 minutes) is the default.
`--cpu-time` (with `--threads 1`) counts the process's CPU time, so other jobs on a shared host do not inflate
the long teacher calls. Prints a table, then the JSON (also written to `--json`).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import report_file, write_text
from sdkd.cli.words import markdown_table
from sdkd.eval.bench.students import FAMILIES, VAE_SCALE, family_presets, rows, teacher_config


def _gmacs(value: float) -> str:
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"  # toy widths: well under one GMAC


def table(found: list[dict], macs_resolution: int, resolution: int) -> str:
    head = ["model", "U-Net params", "params x", f"GMACs @{macs_resolution} px", "MACs x",
            f"CPU s/forward @{resolution} px", "CPU time x"]
    lines = [head] + [[r["model"], f"{r['unet_params']:,}", f"{r['params_ratio']:.3f}", _gmacs(r["unet_gmacs"]),
                       f"{r['macs_ratio']:.3f}", f"{r['cpu_ms'] / 1e3:.3f}", f"{r['cpu_ratio']:.3f}"] for r in found]
    return markdown_table(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Student presets against their teacher U-Net: parameters, MACs, "
                                                 "CPU time per forward, side by side in one run.")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sdxl",
                        help="sdxl: SDXL base and its presets; sd: SD-1.5 and its presets")
    parser.add_argument("--widths", choices=["real", "toy"], default="real",
                        help="real (random weights, nothing downloaded) or toy widths")
    parser.add_argument("--presets", help="comma-separated student presets (default: every preset of the family)")
    parser.add_argument("--macs-resolution", type=int,
                        help="image size of the MAC count (default: the teacher's native size)")
    parser.add_argument("--resolution", type=int, default=512, help="image size of the timed forwards")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after one warm-up round (the fastest "
                                                               "counts)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process CPU clock (robust on a shared host; use with --threads 1)")
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    if args.json:
        report_file(args.json, "--json", args.overwrite)

    presets = family_presets(args.family) if args.presets is None else [p for p in args.presets.split(",") if p]
    wrong = [p for p in presets if p not in family_presets(args.family)]
    if wrong or not presets:
        raise UserError(f"--presets: '{wrong[0] if wrong else args.presets}' is not a preset of family "
                        f"{args.family} (expected {', '.join(family_presets(args.family))})")
    for flag in ("macs_resolution", "resolution"):
        value = getattr(args, flag)
        if value is not None and (value < VAE_SCALE or value % VAE_SCALE):
            raise UserError(f"--{flag.replace('_', '-')}: must be a positive multiple of {VAE_SCALE}, got {value}")
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--repeats and --threads must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    macs_resolution = args.macs_resolution or teacher_config(args.family, args.widths)["sample_size"] * VAE_SCALE
    timer = "process CPU time" if args.cpu_time else "wall clock"
    print(f"{args.family} teacher and {', '.join(presets)} at {args.widths} widths; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {timer}, {platform.machine()}", flush=True)
    found = rows(args.family, args.widths, presets, macs_resolution, args.resolution, args.repeats, args.cpu_time)
    report = dict(family=args.family, widths=args.widths, macs_resolution=macs_resolution,
                  resolution=args.resolution, repeats=args.repeats, torch=torch.__version__,
                  threads=torch.get_num_threads(), timer=timer, dtype="float32", rows=found)
    print()
    print(table(found, macs_resolution, args.resolution))
    print()
    print(json.dumps(report, indent=1))
    if args.json:
        write_text(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    run_cli(main)
