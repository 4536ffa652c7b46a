"""Decoder benchmark: the tiny decoder (AutoencoderTiny, TAESD layout) against the SD-1.5 VAE decoder, one run.

    python eval/bench_decoder.py --resolution 512 --batches 1,8 [--device cuda --dtype fp16] [--json bench.json]

Both decode the same random latents (resolution / 8, 4 channels): the tiny one as the pipeline calls it
(`vae.decode(latents)`), the KL one with its post-quant conv (`vae.decode(latents / scaling_factor)`).
Per model and batch: decode time (median of `--repeats` calls after `--warmup` calls, the models taken in
turn each round so a shared machine slows both alike), time per image, parameters of the decoder, MACs
per image (one decode at batch 1 under torch.utils.flop_counter.FlopCounterMode; MACs = FLOPs / 2), and
the ratios tiny / teacher (MACs, time) with the speed-up teacher / tiny. Weights are random (no
download): the default AutoencoderTiny and an AutoencoderKL of SD-1.5's config, or `--tiny` / `--vae`
folders.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

import torch

from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import report_file, write_text
from sdkd.eval.bench.timing import decode, decode_macs, decoder_params, interleaved, latents_for

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def decoders(tiny: str | None, vae: str | None) -> dict[str, torch.nn.Module]:
    """{"teacher": the KL VAE, "tiny": the AutoencoderTiny}: random SD-1.5 / TAESD ones, or from folders."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from sdkd.train.models.sd_configs import SD15_VAE

    torch.manual_seed(0)
    teacher = AutoencoderKL.from_pretrained(vae, subfolder=_sub(vae)) if vae else AutoencoderKL(
        **SD15_VAE, scaling_factor=0.18215)
    small = AutoencoderTiny.from_pretrained(tiny, subfolder=_sub(tiny)) if tiny else AutoencoderTiny()
    return {"teacher": teacher, "tiny": small}


def _sub(folder: str) -> str | None:
    """A pipeline folder's vae/, else the folder itself."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"'{folder}' is not a folder (expected a diffusers VAE or pipeline folder)")
    return "vae" if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file() else None


@torch.inference_mode()
def interleaved_times(models: dict, batch: int, resolution: int, device, dtype, repeats: int,
                      warmup: int) -> dict[str, list[float]]:
    """Seconds per decode call, `warmup` untimed rounds then `repeats` timed ones, the models in turn."""
    calls = {name: functools.partial(decode, vae, latents_for(vae, batch, resolution, device, dtype))
             for name, vae in models.items()}
    return interleaved(calls, device, repeats, warmup)


def run(args) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("--dtype fp16 needs --device cuda (fp16 convolutions are not fast on CPU); use fp32 or bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {name: vae.to(device, dtype).eval() for name, vae in decoders(args.tiny, args.vae).items()}
    macs = {name: decode_macs(vae, args.resolution, device, dtype) for name, vae in models.items()}
    params = {name: decoder_params(vae) for name, vae in models.items()}
    rows = []
    for batch in args.batches:
        times = interleaved_times(models, batch, args.resolution, device, dtype, args.repeats, args.warmup)
        seconds = {name: statistics.median(t) for name, t in times.items()}
        for name in models:
            rows.append(dict(model=name, batch=batch, params=params[name], gmacs_per_image=macs[name] / 1e9,
                             seconds=seconds[name], ms_per_image=seconds[name] / batch * 1e3,
                             all_seconds=times[name], macs_ratio=macs[name] / macs["teacher"],
                             time_ratio=seconds[name] / seconds["teacher"],
                             speedup=seconds["teacher"] / seconds[name]))
        print(f"batch {batch}: teacher {seconds['teacher']:.3f} s, tiny {seconds['tiny']:.3f} s", flush=True)
    return dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
                "cpu", dtype=args.dtype, threads=torch.get_num_threads(), resolution=args.resolution,
                repeats=args.repeats, warmup=args.warmup, torch=torch.__version__, rows=rows)


def table(report: dict) -> str:
    head = ["decoder", "batch", "params", "GMACs/image", "s/batch", "ms/image", "MACs x", "time x", "speed-up"]
    lines = [head]
    for r in report["rows"]:
        lines.append([r["model"], str(r["batch"]), f"{r['params'] / 1e6:.2f}M", f"{r['gmacs_per_image']:.1f}",
                      f"{r['seconds']:.3f}", f"{r['ms_per_image']:.1f}", f"{r['macs_ratio']:.4f}",
                      f"{r['time_ratio']:.4f}", f"{r['speedup']:.1f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in lines[1:]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Decode time and MACs: tiny decoder vs the SD-1.5 VAE decoder.")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (latents: / 8)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed decode calls per model and batch (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--tiny", help="AutoencoderTiny folder (default: a random default-config one)")
    parser.add_argument("--vae", help="AutoencoderKL or pipeline folder (default: random, SD-1.5's config)")
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    if args.json:
        report_file(args.json, "--json", args.overwrite)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise UserError(f"--batches: comma-separated integers, got '{args.batches}'") from None
    if args.resolution < 8 or args.resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if min(args.batches) < 1 or args.repeats < 1 or args.warmup < 0:
        raise UserError("--batches and --repeats must be at least 1, --warmup at least 0")
    report = run(args)
    print(f"\n{report['device_name']}, {report['dtype']}, {report['threads']} threads, {report['resolution']} px, "
          f"median of {report['repeats']} after {report['warmup']} warm-up")
    print(table(report))
    if args.json:
        write_text(args.json, json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
