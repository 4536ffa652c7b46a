"""Make the trained toy teachers that `teacher: toy` and `teacher: toy_sdxl` load (train/models/toy_teacher/,
train/models/toy_sdxl_teacher/), with sdkd's own trainers.

    python train/make_toy_teacher.py [--family sd] --out train/models/toy_teacher [--work runs/toy_teacher_build]
    python train/make_toy_teacher.py --family sdxl   # the SDXL-topology one, on the SD one's trained VAE
    python train/make_toy_teacher.py --from-teacher DIR --out NEW   # only the later U-Net stages, on DIR's

A toy teacher already at --out (the committed ones are at the defaults) is replaced only with --overwrite.

1. the VAE: train/autoencoder.py on synthetic captioned shapes (configs/toy_vae.yaml), from random weights;
   or, with --vae (the default for sdxl: the committed toy teacher's), a trained toy VAE taken as it is;
2. the U-Net: train/finetune.py with the task loss (configs/toy_teacher_unet.yaml; for sdxl
   configs/toy_sdxl_teacher_unet.yaml) on a pipeline of that VAE, the toy text encoders and tokenizers (frozen,
   as `build_toy_pipeline` / `build_toy_xl_pipeline` make them) and a random toy U-Net; for sd then a second
   stage from the first's result (configs/toy_teacher_unet_v.yaml: v-prediction, which weights the noisiest
   steps, where a caption's colours are placed). --from-teacher takes the VAE and the first stage from a toy
   teacher this command made and runs the later stages only;
3. the pipeline folder (safetensors only) goes to --out with `provenance.json` (the commands, seeds, steps,
   wall times, versions and the colour check below), a model card and a grid of its samples. It carries the
   scheduler sdkd samples with (DPM-Solver++) and the colour check's steps and guidance as its recorded sampling
   settings (sdkd_sampling.json), so sdkd's tools and plain diffusers sample it as the check did.

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
from sdkd.cli.files import refuse_links, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
VAE_CONFIG = "configs/toy_vae.yaml"
MODELS = ROOT / "train" / "models"
FAMILIES = {  # --family -> its U-Net's configs (stages, each from the last's result), --out, --work and --vae
    # defaults (None: trained from random weights)
    "sd": dict(unet_configs=("configs/toy_teacher_unet.yaml", "configs/toy_teacher_unet_v.yaml"),
               out=MODELS / "toy_teacher", work=ROOT / "runs" / "toy_teacher_build", vae=None),
    "sdxl": dict(unet_configs=("configs/toy_sdxl_teacher_unet.yaml",), out=MODELS / "toy_sdxl_teacher",
                 work=ROOT / "runs" / "toy_sdxl_teacher_build", vae=MODELS / "toy_teacher" / "vae"),
}
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
    """The colour check of the pipeline in `folder`, sampled as plain diffusers samples it (its own scheduler and
    recorded settings): (rates, images, captions)."""
    import torch
    from diffusers import DiffusionPipeline

    from sdkd.data.sources.colour_check import check_captions, match_rates
    from sdkd.train.formats.model_files import read_sampling

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)  # its model_index.json's class
    pipe.set_progress_bar_config(disable=True)
    settings = read_sampling(folder)
    captions = check_captions(n, CHECK["caption_seed"])
    generators = [torch.Generator().manual_seed(CHECK["seed"] + i) for i in range(n)]
    images = pipe(captions, num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                  height=32, width=32, generator=generators).images
    return match_rates(images, captions), images, captions


CARDS = {
    "sd": """# sdkd toy teacher

A 32 px, SD-1.5-shaped pipeline (2-level AutoencoderKL, 3.2M-parameter U-Net, 32-wide CLIP text encoder)
trained by sdkd's own trainers on its synthetic captioned shapes ("a red circle on a blue background"):
what `teacher: toy` loads. The text encoder is `build_toy_pipeline`'s random one, frozen (as SD's is). The U-Net
learnt in two stages: to predict the noise (min-SNR weighted), then to predict v, which weights the noisiest
steps, where the sampler settles which colour is the shape's and which the background's.""",
    "sdxl": """# sdkd toy SDXL teacher

A 32 px pipeline of SDXL's topology (3-level U-Net of 3.0M parameters, no attention at the highest level, two
transformer layers at the lowest, size/crop time ids; two 16-wide CLIP text encoders, the second pooled) whose
U-Net sdkd's own fine-tune trainer trained on its synthetic captioned shapes ("a red circle on a blue
background"): what `teacher: toy_sdxl` loads. The text encoders are `build_toy_xl_pipeline`'s random ones,
frozen (as SDXL's are); the VAE is the toy teacher's (train/models/toy_teacher/vae), reused as trained.""",
}


def write_card(out: Path, provenance: dict) -> None:
    rates = provenance["colour_check"]
    resumed = (" (resumed after an interruption: the minutes count the resumed part only; a resumed run ends "
               "as an uninterrupted one would)") if provenance["resumed"] else ""
    (out / "README.md").write_text(f"""---
library_name: diffusers
tags: [sdkd, toy]
---
{CARDS[provenance["family"]]}

Made with `{provenance['command']}` in {provenance['wall_seconds'] / 60:.0f} minutes on a
{provenance['machine']['cpu_count']}-core CPU{resumed}; `provenance.json` has each trainer's command, seed and steps.

Colour check ({rates['n']} captions, {CHECK['steps']} DPM-Solver++ steps, guidance {CHECK['guidance_scale']}):
foreground colour matches the caption in {rates['fg']:.0%}, background in {rates['bg']:.0%}, both in
{rates['both']:.0%} of the images (chance: {rates['chance']:.1%}).

![samples](samples.png)
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd",
                        help="sd: the SD-1.5-shaped toy teacher (`toy`); sdxl: the SDXL-topology one (`toy_sdxl`)")
    parser.add_argument("--out", type=Path, help="the pipeline folder to write (default: train/models/toy_teacher "
                        "for sd, train/models/toy_sdxl_teacher for sdxl: what `toy` / `toy_sdxl` load)")
    parser.add_argument("--work", type=Path, help="the trainers' run folders (default: runs/toy_teacher_build, "
                        "runs/toy_sdxl_teacher_build)")
    parser.add_argument("--vae", type=Path, help="a trained toy VAE folder to use instead of training one "
                        "(default for sdxl: train/models/toy_teacher/vae; sd trains its own)")
    parser.add_argument("--vae-steps", type=int, help="override configs/toy_vae.yaml's train.max_steps")
    parser.add_argument("--unet-steps", type=int, help="override each U-Net stage's train.max_steps")
    parser.add_argument("--from-teacher", type=Path, help="a toy teacher this command made, whose VAE and first "
                        "U-Net stage are taken as trained: only the later stages run (sd)")
    parser.add_argument("--check-images", type=int, default=48, help="captions in the colour check (at most 56)")
    parser.add_argument("--overwrite", action="store_true", help="replace the toy teacher already at --out")
    parser.add_argument("--resume", action="store_true",
                        help="continue the trainers' runs in --work from their newest checkpoints "
                             "(after an interruption)")
    args = parser.parse_args()
    if not 0 < args.check_images <= 56:
        raise UserError("--check-images: must be in 1..56 (one caption per ordered pair of the 8 colours)")
    defaults = FAMILIES[args.family]
    out, work = (args.out or defaults["out"]).resolve(), (args.work or defaults["work"]).resolve()
    given_vae = args.vae or defaults["vae"]
    if given_vae is not None and not (given_vae / "config.json").is_file():
        raise UserError(f"--vae '{given_vae}': no config.json (expected a diffusers AutoencoderKL folder)")
    if given_vae is not None and args.vae_steps:
        raise UserError("--vae-steps: no VAE is trained with --vae (or --family sdxl, which reuses the toy one)")
    stages = defaults["unet_configs"]
    if args.from_teacher is not None:
        if len(stages) == 1:
            raise UserError(f"--from-teacher: --family {args.family} trains its U-Net in one stage; nothing is left")
        if args.vae is not None or args.vae_steps:
            raise UserError("--from-teacher: takes the teacher's VAE; leave out --vae and --vae-steps")
        if not (args.from_teacher / "provenance.json").is_file():
            raise UserError(f"--from-teacher '{args.from_teacher}': no provenance.json (not a toy teacher this "
                            f"command made)")
        given_vae = args.from_teacher / "vae"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a folder for the pipeline")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "provenance.json").is_file():
            raise UserError(f"--out '{out}' holds something other than a toy teacher (no provenance.json); "
                            f"choose a new or empty folder")
        if not args.overwrite:
            raise UserError(f"--out '{out}' holds a toy teacher: pass --overwrite to replace it")
        if given_vae is not None and given_vae.resolve().is_relative_to(out):
            raise UserError(f"--vae '{given_vae}' is inside --out '{out}', which is replaced: copy the VAE elsewhere "
                            f"first")
    refuse_links(out, "--out")
    start = time.perf_counter()

    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL
    from omegaconf import OmegaConf

    from sdkd.train.engine.sampling import make_grid
    from sdkd.train.formats.model_files import write_sampling
    from sdkd.train.models.families import SD, SDXL
    from sdkd.train.models.toy import TOY_SEED, toy_pipeline_with

    common = ("train.seed", "train.max_steps", "train.batch_size", "optim.lr", "optim.lr_scheduler",
              "data.num_samples", "data.resolution")

    def trained(run: Path, command: str, seconds: float, keys: tuple[str, ...]) -> dict:
        cfg = OmegaConf.load(run / "config.yaml")
        return {"command": command, "wall_seconds": round(seconds),
                **{k: OmegaConf.select(cfg, k) for k in common + keys}}

    xl = args.family == "sdxl"
    # 1. the VAE, from random weights (or the trained one given)
    vae_folder = given_vae
    if given_vae is None:
        vae_run = work / "vae"
        vae_cmd, vae_seconds = launch("train/autoencoder.py", VAE_CONFIG, vae_run,
                                      [f"train.max_steps={args.vae_steps}"] if args.vae_steps else [], args.resume)
        vae_folder = vae_run / "vae"
    # 2. the U-Net, from random weights, on the trained VAE and the toy text encoders, in stages (each from the
    # last's result); with --from-teacher from that teacher's first stage
    unet_keys = ("loss.prediction_type", "loss.snr_gamma", "loss.noise_offset", "ema.enabled", "ema.decay",
                 "data.caption_dropout")
    if args.from_teacher is None:
        model = work / "init"
        save_pretrained(toy_pipeline_with(AutoencoderKL.from_pretrained(vae_folder), TOY_SEED, xl=xl), model,
                        safe_serialization=True)
        unet_records, first = [], 0
    else:
        made = json.loads((args.from_teacher / "provenance.json").read_text())["unet"]
        model, first = args.from_teacher, 1
        unet_records = [{"reused": _shown(args.from_teacher), "made": made[0] if isinstance(made, list) else made}]
    for stage, config in enumerate(stages[first:], first):
        unet_run = work / ("unet" if stage == 0 else f"unet{stage + 1}")
        command, seconds = launch("train/finetune.py", config, unet_run, [f"model={_shown(model)}"] + (
            [f"train.max_steps={args.unet_steps}"] if args.unet_steps else []), args.resume)
        unet_records.append(trained(unet_run, command, seconds, unet_keys))
        model = unet_run / "student"

    if given_vae is not None:  # reused as trained: where from, and how that folder's provenance says it was made
        made = vae_folder.resolve().parent / "provenance.json"
        made = json.loads(made.read_text())["vae"] if made.is_file() else None
        vae = {"reused": _shown(vae_folder), **({"made": made.get("made", made)} if made else {})}
        init_vae = f"the VAE is {_shown(vae_folder)}, reused as trained"
    else:
        vae = trained(vae_run, vae_cmd, vae_seconds, ("autoencoder.l1_weight", "autoencoder.mse_weight",
                                                      "autoencoder.kl_weight"))
        init_vae = "the VAE's initial weights are drawn from its train.seed"

    # 3. the pipeline folder: the trained parts only, then the check, the grid, the card, the provenance
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    components = (SDXL if xl else SD).components
    for name in ("model_index.json", *sorted(components)):  # the run's model card is replaced by ours
        src = unet_run / "student" / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, out / name)
    # The run's student already carries sdkd's sampling scheduler (save_pipeline); the check's settings are its own.
    write_sampling(out, {k: CHECK[k] for k in ("steps", "guidance_scale")})
    rates, images, captions = check_samples(out, args.check_images)
    print(f"colour check: foreground {rates['fg']:.0%}, background {rates['bg']:.0%}, both {rates['both']:.0%} "
          f"of {rates['n']} images (chance {rates['chance']:.1%})", flush=True)
    make_grid([images[:8]], captions[:8]).save(out / "samples.png")

    builder = "build_toy_xl_pipeline" if xl else "build_toy_pipeline"
    command = shlex.join(["python", "train/make_toy_teacher.py", *sys.argv[1:]])
    provenance = {
        "command": command,
        "family": args.family,
        "wall_seconds": round(time.perf_counter() - start),
        "resumed": args.resume,  # a resumed make's wall times count only what ran after the interruption
        "vae": {**vae, "scaling_factor": json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]},
        "unet": unet_records,
        "init": f"{builder}(seed={TOY_SEED}): the U-Net's random initial weights, the text encoders and "
                f"tokenizers (frozen: never trained); {init_vae}",
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
