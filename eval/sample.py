"""Generate images with sdkd's inference pipeline.

    python eval/sample.py --model PATH --prompt "a red fox" [--prompt ...] [--steps 25] --seed 0 --out DIR

PATH is a run folder (its final `student/`), a `checkpoint-STEP` folder (its `unet/`, or `unet_ema/`
with --ema), a diffusers pipeline folder, an sdkd single file (python train/export.py), `toy` or a hub id
(train/models/names.py). Steps and
guidance default to the model's recorded sampling settings (an export's sdkd_sampling.json, a run's `sample`
section; else 25 and 7.5), as printed. `--steps 1` is the one-step mode (guidance off). Image i is seeded
`seed + i` whatever the batch size. Nothing is written before the model has loaded. On CPU, --threads (default:
the CPUs this process may use, eval/inference/threads.py).
DIR/samples.json records everything that shaped the images: the resolved model, LoRA, tiny VAE,
steps, guidance, scheduler, size, seeds, dtype, device and the sdkd version.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

from sdkd.cli import limits
from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import check_writable, refuse_links, write_text
from sdkd.cli.words import counted
from sdkd.eval.inference.threads import HELP as THREADS_HELP


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate images from a student (run, checkpoint, diffusers folder "
                                                 "or sdkd file).")
    parser.add_argument("--model", required=True, help="run folder, checkpoint-STEP folder, diffusers pipeline folder, "
                                                       "sdkd .safetensors file, toy or a hub id")
    parser.add_argument("--ema", action="store_true", help="the EMA weights of a checkpoint (or a run's newest one)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--negative-prompt", help="one negative prompt for every image")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--steps", type=int, help="sampling steps; 1 = one-step mode (guidance off); default: the "
                        "model's recorded sampling settings, else 25")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's "
                        "recorded sampling settings, else 7.5; 0 with --steps 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="images per pipeline call (default: all)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    parser.add_argument("--tiny-vae", help="AutoencoderTiny folder to decode with")
    parser.add_argument("--lora", help="LoRA weights (diffusers/peft .safetensors)")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--out", required=True, help="folder for the PNGs (and samples.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace the samples already in --out")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load .bin (pickle) weights where there are no safetensors; pickle can run code")
    args = parser.parse_args(argv)
    out = Path(args.out)
    # Checked before the model loads (seconds to minutes), and nothing of an earlier run is replaced unasked.
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a folder")
    if out.is_dir() and (any(out.glob("image-*.png")) or (out / "samples.json").exists()) and not args.overwrite:
        raise UserError(f"--out '{out}' already holds samples; choose another folder or pass --overwrite")
    refuse_links(out, "--out")
    limits.check_int(args.num_images, "--num-images", 1, limits.MAX_IMAGES)
    for prompt in args.prompt:
        limits.check_prompt(prompt, "--prompt")
    if args.negative_prompt is not None:
        limits.check_prompt(args.negative_prompt, "--negative-prompt")
    limits.check_seed(args.seed, "--seed", len(args.prompt) * args.num_images)
    for flag, value, check in (("--steps", args.steps, limits.check_steps),
                               ("--guidance", args.guidance, limits.check_guidance),
                               ("--height", args.height, limits.check_side),
                               ("--width", args.width, limits.check_side)):
        if value is not None:
            check(value, flag)
    if args.batch_size is not None:
        limits.check_int(args.batch_size, "--batch-size", 1, limits.MAX_BATCH)
    limits.check_float(args.lora_scale, "--lora-scale", -limits.MAX_LORA_SCALE, limits.MAX_LORA_SCALE)
    check_writable(out, "--out")  # created only once there are images to write

    from sdkd.eval.inference.pipeline import load_pipeline, save_images  # after argparse: --help stays fast
    from sdkd.eval.inference.threads import set_threads

    threads = set_threads(args.threads)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, tiny_vae=args.tiny_vae,
                         compile=args.compile, lora=args.lora, lora_scale=args.lora_scale, ema=args.ema,
                         allow_pickle=args.allow_pickle)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    settings = pipe.settings(args.steps, args.guidance, args.height, args.width)
    given = [flag for flag, value in (("--steps", args.steps), ("--guidance", args.guidance)) if value is not None]
    why = pipe.describe_defaults() if len(given) < 2 else ""
    print(f"sampling {settings['steps']} steps, guidance {settings['guidance_scale']:g} ("
          + "; ".join(filter(None, [" and ".join(given) + " as given" if given else "", why and f"defaults: {why}"]))
          + ")", flush=True)
    start = time.perf_counter()
    images = pipe(prompts, negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance,
                  seed=args.seed, batch_size=args.batch_size, height=args.height, width=args.width)
    seconds = time.perf_counter() - start
    paths = save_images(images, args.out)
    record = [dict(file=p.name, prompt=pr, seed=args.seed + i) for i, (p, pr) in enumerate(zip(paths, prompts))]
    write_text(paths[0].parent / "samples.json", json.dumps(dict(
        **pipe.loaded, **settings, recorded_sampling=pipe.sampling, negative_prompt=args.negative_prompt,
        batch_size=args.batch_size or len(prompts), threads=threads,
        device=str(pipe.device), dtype=str(pipe.dtype).removeprefix("torch."), sdkd_version=version("sdkd"),
        seconds=seconds, images=record), indent=1))
    print(f"wrote {counted(len(paths), 'image')} to {args.out} ({seconds:.2f} s)")


if __name__ == "__main__":
    run_cli(main)
