"""Make the trained toy teacher that `teacher: toy` loads (train/models/toy_teacher/), with sdkd's own trainers.

    python train/make_toy_teacher.py --out train/models/toy_teacher [--work runs/toy_teacher_build]

1. the VAE: train/autoencoder.py on synthetic captioned shapes (configs/toy_vae.yaml), from random weights;
2. the U-Net: train/finetune.py with the task loss (configs/toy_teacher_unet.yaml) on a pipeline of that VAE,
   the toy text encoder and tokenizer (frozen, as `build_toy_pipeline` makes them) and a random toy U-Net;
3. the pipeline folder (safetensors only) goes to --out with `provenance.json` (the commands, seeds, steps,
   wall times, versions and the colour check below), a model card and a grid of its samples.

Both trainers run as `accelerate launch` subprocesses, one process each, as a user would run them; WORK
keeps their run folders (metrics, sample grids, checkpoints). The colour check samples --check-images
captions (data/sources/colour_check.py `check_captions`) with fixed seeds and reads back each image's foreground and
background colours (`read_colours`): how often they match the caption, against a 1 in 8 chance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sdkd.cli.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
VAE_CONFIG, UNET_CONFIG = "configs/toy_vae.yaml", "configs/toy_teacher_unet.yaml"
CHECK = dict(steps=20, guidance_scale=4.0, seed=0, caption_seed=0)
"""How the colour check samples: DPM-Solver++ steps, guidance, first image seed (image i: seed + i), and the
seed of `check_captions`' order; tests/test_toy_world.py samples the same way."""


def launch(script: str, config: str, out: Path, overrides: list[str], resume: bool) -> tuple[str, float]:
    """`accelerate launch SCRIPT --config CONFIG output_dir=OUT ...` (one process), replacing the run in OUT or
    with `resume` continuing it from its newest checkpoint -> (the command as a user types it, seconds)."""
    args = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            script, "--config", config, f"output_dir={_shown(out)}", "resume=latest" if resume else "overwrite=true",
            *overrides]
    shown = shlex.join(["accelerate", "launch", *args])
    print(f"+ {shown}", flush=True)
    start = time.perf_counter()
    if subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *args], cwd=ROOT).returncode != 0:
        raise UserError(f"{script} failed (its output is above); nothing was written to --out")
    return shown, time.perf_counter() - start


def _shown(path: Path) -> str:
    """`path` relative to the repository when inside it (commands run there), else absolute."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def check_samples(folder: Path, n: int):
    """The colour check of the pipeline in `folder`: (rates, images, captions)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from sdkd.data.sources.colour_check import check_captions, match_rates

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    captions = check_captions(n, CHECK["caption_seed"])
    generators = [torch.Generator().manual_seed(CHECK["seed"] + i) for i in range(n)]
    images = pipe(captions, num_inference_steps=CHECK["steps"], guidance_scale=CHECK["guidance_scale"],
                  height=32, width=32, generator=generators).images
    return match_rates(images, captions), images, captions


def write_card(out: Path, provenance: dict) -> None:
    rates = provenance["colour_check"]
    resumed = (" (resumed after an interruption: the minutes count the resumed part only; a resumed run ends "
               "as an uninterrupted one would)") if provenance["resumed"] else ""
    (out / "README.md").write_text(f"""---
library_name: diffusers
tags: [sdkd, toy]
---
# sdkd toy teacher

A 32 px, SD-1.5-shaped pipeline (2-level AutoencoderKL, 3.2M-parameter U-Net, 32-wide CLIP text encoder)
trained by sdkd's own trainers on its synthetic captioned shapes ("a red circle on a blue background"):
what `teacher: toy` loads. The text encoder is `build_toy_pipeline`'s random one, frozen (as SD's is).

Made with `{provenance['command']}` in {provenance['wall_seconds'] / 60:.0f} minutes on a
{provenance['machine']['cpu_count']}-core CPU{resumed}; `provenance.json` has each trainer's command, seed and steps.

Colour check ({rates['n']} captions, {CHECK['steps']} DPM-Solver++ steps, guidance {CHECK['guidance_scale']}):
foreground colour matches the caption in {rates['fg']:.0%}, background in {rates['bg']:.0%}, both in
{rates['both']:.0%} of the images (chance: {rates['chance']:.1%}).

![samples](samples.png)
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "train" / "models" / "toy_teacher",
                        help="the pipeline folder to write (default: train/models/toy_teacher, what `toy` loads)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "toy_teacher_build",
                        help="the trainers' run folders (default: runs/toy_teacher_build)")
    parser.add_argument("--vae-steps", type=int, help="override configs/toy_vae.yaml's train.max_steps")
    parser.add_argument("--unet-steps", type=int, help="override configs/toy_teacher_unet.yaml's train.max_steps")
    parser.add_argument("--check-images", type=int, default=48, help="captions in the colour check (at most 56)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the trainers' runs in --work from their newest checkpoints "
                             "(after an interruption)")
    args = parser.parse_args()
    if not 0 < args.check_images <= 56:
        raise UserError("--check-images: must be in 1..56 (one caption per ordered pair of the 8 colours)")
    out, work = args.out.resolve(), args.work.resolve()
    if out.is_dir() and any(out.iterdir()) and not (out / "provenance.json").is_file():
        raise UserError(f"--out '{out}' holds something other than a toy teacher (no provenance.json); "
                        f"choose a new or empty folder")
    start = time.perf_counter()

    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL
    from omegaconf import OmegaConf

    from sdkd.train.engine.sampling import make_grid
    from sdkd.train.models.families import SD
    from sdkd.train.models.toy import TOY_SEED, toy_pipeline_with

    # 1. the VAE, from random weights
    vae_run = work / "vae"
    vae_cmd, vae_seconds = launch("train/autoencoder.py", VAE_CONFIG, vae_run,
                                  [f"train.max_steps={args.vae_steps}"] if args.vae_steps else [], args.resume)
    # 2. the U-Net, from random weights, on the trained VAE and the toy text encoder
    init = work / "init"
    pipe = toy_pipeline_with(AutoencoderKL.from_pretrained(vae_run / "vae"), TOY_SEED)
    pipe.save_pretrained(init, safe_serialization=True)
    unet_run = work / "unet"
    unet_cmd, unet_seconds = launch("train/finetune.py", UNET_CONFIG, unet_run, [f"model={_shown(init)}"] + (
        [f"train.max_steps={args.unet_steps}"] if args.unet_steps else []), args.resume)

    # 3. the pipeline folder: the trained parts only, then the check, the grid, the card, the provenance
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("model_index.json", *sorted(SD.components)):  # the run's model card is replaced by ours
        src = unet_run / "student" / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, out / name)
    rates, images, captions = check_samples(out, args.check_images)
    print(f"colour check: foreground {rates['fg']:.0%}, background {rates['bg']:.0%}, both {rates['both']:.0%} "
          f"of {rates['n']} images (chance {rates['chance']:.1%})", flush=True)
    make_grid([images[:8]], captions[:8]).save(out / "samples.png")

    common = ("train.seed", "train.max_steps", "train.batch_size", "optim.lr", "optim.lr_scheduler",
              "data.num_samples", "data.resolution")

    def trained(run: Path, command: str, seconds: float, keys: tuple[str, ...]) -> dict:
        cfg = OmegaConf.load(run / "config.yaml")
        return {"command": command, "wall_seconds": round(seconds),
                **{k: OmegaConf.select(cfg, k) for k in common + keys}}

    command = shlex.join(["python", "train/make_toy_teacher.py", *sys.argv[1:]])
    provenance = {
        "command": command,
        "wall_seconds": round(time.perf_counter() - start),
        "resumed": args.resume,  # a resumed make's wall times count only what ran after the interruption
        "vae": {**trained(vae_run, vae_cmd, vae_seconds, ("autoencoder.l1_weight", "autoencoder.mse_weight",
                                                          "autoencoder.kl_weight")),
                "scaling_factor": json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]},
        "unet": trained(unet_run, unet_cmd, unet_seconds, ("loss.snr_gamma", "loss.noise_offset", "ema.enabled",
                                                           "ema.decay", "data.caption_dropout")),
        "init": f"build_toy_pipeline(seed={TOY_SEED}): the U-Net's random initial weights, the text encoder and "
                "tokenizer (frozen: never trained); the VAE's initial weights are drawn from its train.seed",
        "colour_check": {**rates, **CHECK, "captions": "data/sources/colour_check.py check_captions"},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    write_card(out, provenance)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB) in {provenance['wall_seconds'] / 60:.1f} minutes", flush=True)


if __name__ == "__main__":
    run_cli(main)
