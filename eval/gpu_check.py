"""One command that checks sdkd on a CUDA GPU and writes every figure to one JSON file.

    python eval/gpu_check.py --out DIR [--tiny]

On one CUDA GPU (under 8 minutes): the inference benchmark at 512 px in fp16 for the bk_tiny and SDXS layouts
cut from the SD-1.5-width teacher (random weights), each with the full (KL) and the tiny decoder, with and
without torch.compile; the KD step (bk_small, 512 px, batch 1) in bf16 with and without the latent cache; a
20-step train/kd.py run of the toy recipe under DeepSpeed ZeRO-2 in one process (skipped, with the reason
recorded, where DeepSpeed is not installed); peak memory for each. Writes DIR/gpu_check.json.

`--tiny` (automatic without a CUDA GPU) takes the same paths on the toy teacher at toy sizes in fp32 on the CPU,
torch.compile with the eager backend: seconds. The measurements: eval/bench/gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import creatable, refuse_links, report_file, write_text
from sdkd.eval.bench.gpu_check import FULL, TINY, deepspeed_zero2, inference, kd_step
from sdkd.eval.inference.pipeline import resolve_device_dtype


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json (and the ZeRO-2 run)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (automatic without a CUDA GPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier check's gpu_check.json in --out")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out '{args.out}' is a file, not a folder")
    refuse_links(args.out, "--out")
    if args.out.is_dir():
        report_file(args.out / "gpu_check.json", "--out", args.overwrite)
    else:
        creatable(args.out, "--out")
    tiny = args.tiny or not torch.cuda.is_available()
    mode = TINY if tiny else FULL
    device, dtype = resolve_device_dtype("auto", "auto")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = dict(tiny=tiny, mode=asdict(mode), device=str(device),
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else platform.processor() or platform.machine(),
                  torch=torch.__version__, inference_dtype=str(dtype).removeprefix("torch."))
    print("inference benchmark...", flush=True)
    report["inference"] = inference(mode, device, dtype)
    print("KD step, with and without the latent cache...", flush=True)
    report["kd_step"] = kd_step(mode, device)
    print("DeepSpeed ZeRO-2 KD run...", flush=True)
    report["deepspeed_zero2"] = deepspeed_zero2(mode, device, args.out)
    report["seconds"] = time.perf_counter() - start
    path = args.out / "gpu_check.json"
    write_text(path, json.dumps(report, indent=1) + "\n")
    print(f"wrote {path} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    run_cli(main)
