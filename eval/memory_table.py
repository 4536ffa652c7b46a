"""Peak GPU memory per process of KD training at batch 1, per distribution strategy, computed on the meta device.

    python eval/memory_table.py [--models ssd1b,vega,bk_small] [--json FILE]

For each student (SSD-1B and Vega from SDXL at 1024 px, bk_small from SD-1.5 at 512 px), optimizer (AdamW,
8-bit AdamW) and strategy (DDP, FSDP full shard, FSDP + CPU offload, DeepSpeed ZeRO-2 and ZeRO-3): GiB per process
on 1, 2, 4 and 8 processes, and the smallest of a 24, 48 and 80 GiB GPU that holds it. The terms and what they
leave out: eval/bench/memory.py. Nothing is allocated: the models are built on the meta device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import report_file, write_text
from sdkd.cli.words import markdown_table
from sdkd.eval.bench.memory import MODELS, PROCESSES, rows

STRATEGY_NAMES = {"ddp": "DDP", "fsdp": "FSDP", "fsdp_offload": "FSDP + CPU offload", "zero2": "ZeRO-2",
                  "zero3": "ZeRO-3"}


def table(found: list[dict]) -> str:
    """One line per model, optimizer and strategy; a cell is `GiB (smallest card)`, `-` where no card holds it."""
    lines = [["student", "optimizer", "strategy", *(f"{n} GPU{'s' * (n > 1)}" for n in PROCESSES)]]
    for r in found:
        cells = [f"{r['gib_per_process'][n]:.1f} ({r['smallest_card_gib'][n] or '-'})"
                 if n in r["gib_per_process"] else "" for n in PROCESSES]
        optimizer = "8-bit AdamW" if r["optimizer"] == "adamw_8bit" else "AdamW"
        lines.append([f"{r['model']} {r['resolution']} px", optimizer,
                      STRATEGY_NAMES[r["strategy"]], *cells])
    return markdown_table(lines)


def sizes_lines(found: list[dict]) -> list[str]:
    seen = {r["model"]: r for r in found}
    return [f"{m}: student {r['student_params'] / 1e6:,.0f}M params, teacher {r['teacher_params'] / 1e6:,.0f}M, "
            f"largest FSDP unit {r['wrap_unit_params'] / 1e6:.1f}M, activations {r['activation_gib']:.2f} GiB; "
            f"without the latent cache add {r['encoders_fp16_gib']:.2f} GiB (VAE and text encoders, fp16)"
            for m, r in seen.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    if args.json:
        report_file(args.json, "--json", args.overwrite)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise UserError(f"--models: unknown model '{unknown[0] if unknown else ''}' (expected {', '.join(MODELS)})")
    found = rows(models)
    print(table(found))
    print()
    print("\n".join(sizes_lines(found)))
    if args.json:
        write_text(args.json, json.dumps(found, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
