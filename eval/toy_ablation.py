"""The toy-world KD ablation: students of the trained toy teacher with the task loss only, + output KD and
+ feature KD, for each preset and seed, judged by their noise-prediction error against the teacher on the
held-out triples (train/losses/agreement.py) after the same number of steps.

    python eval/toy_ablation.py --out docs/toy_ablation [--steps 200] [--seeds 0 1] [--presets bk_small bk_tiny]

Each run is train/kd.py on configs/toy.yaml (students initialised from the teacher by the weight map),
launched as a user would; OUT/runs/ keeps them. Writes OUT/README.md (the table: eval/noise_mse at the
last step per seed, its mean, and the ratio to task-only) and OUT/samples.png (per preset, the teacher's
row above each variant's row, seed 0).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from sdkd.cli import limits
from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import creatable, refuse_links, write_text
from sdkd.eval.experiments.toy_runs import TOY_RECIPE, kd_run

VARIANTS = {  # name -> (lambda_task, lambda_out, lambda_feat)
    "task only": (1.0, 0.0, 0.0),
    "+ output KD": (1.0, 1.0, 0.0),
    "+ feature KD": (1.0, 1.0, 1.0),
}


def run_name(preset: str, variant: str, seed: int) -> str:
    return f"{preset}-{variant.replace('+ ', '').replace(' ', '_')}-seed{seed}"


def train(out: Path, preset: str, variant: str, seed: int, steps: int) -> dict:
    """One kd.py run (reused when it finished before); its last eval/noise_mse."""
    task, output, feat = VARIANTS[variant]
    return kd_run(out / "runs" / run_name(preset, variant, seed), steps, seed,
                  [f"student.preset={preset}", f"loss.lambda_task={task}", f"loss.lambda_out={output}",
                   f"loss.lambda_feat={feat}"])


def table(results: dict, presets: list[str], seeds: list[int]) -> list[str]:
    head = ["preset", "variant", *(f"seed {s}" for s in seeds), "mean", "vs task only"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset in presets:
        base = sum(results[preset, "task only", s]["noise_mse"] for s in seeds) / len(seeds)
        for variant in VARIANTS:
            values = [results[preset, variant, s]["noise_mse"] for s in seeds]
            mean = sum(values) / len(values)
            lines.append(f"| {preset} | {variant} | " + " | ".join(f"{v:.4f}" for v in values)
                         + f" | {mean:.4f} | {mean / base:.2f}x |")
    return lines


def picture(out: Path, presets: list[str], seed: int) -> Path:
    """Per preset, the teacher's row then each variant's row, on the toy config's sample prompts."""
    import torch

    from sdkd.train.engine.config import load_config
    from sdkd.train.engine.sampling import make_grid, sample_images
    from sdkd.train.models.teacher import load_pipeline, load_teacher
    from sdkd.train.tasks.diffusion_config import KDConfig

    cfg = load_config(TOY_RECIPE, ["output_dir=unused"], schema=KDConfig)
    s = cfg.sample
    teacher = load_teacher("toy")
    draw = lambda unet: sample_images(unet, teacher, s.prompts, s.seed, s.steps, s.guidance_scale,  # noqa: E731
                                      cfg.data.resolution)
    torch.manual_seed(0)
    rows, labels = [draw(teacher.unet)], ["teacher"]
    for preset in presets:
        for variant in VARIANTS:
            student = load_pipeline(str(out / "runs" / run_name(preset, variant, seed) / "student")).unet
            rows.append(draw(student))
            labels.append(f"{preset} {variant}")
    path = out / "samples.png"
    make_grid(rows, s.prompts, labels).save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the runs, the table and the picture")
    parser.add_argument("--steps", type=int, default=200, help="training steps of every run (default 200)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--presets", nargs="+", default=["bk_small", "bk_tiny"])
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier ablation in --out")
    args = parser.parse_args(argv)
    limits.check_int(args.steps, "--steps", 1, limits.MAX_COUNT)
    for seed in args.seeds:
        limits.check_seed(seed, "--seeds")
    out = creatable(args.out, "--out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not args.overwrite:
        raise UserError(f"--out '{out}' is not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                        f"choose a new folder, or pass --overwrite to replace an earlier ablation there")
    refuse_links(out, "--out")
    results = {(p, v, s): train(out, p, v, s, args.steps)
               for p in args.presets for v in VARIANTS for s in args.seeds}
    grid = picture(out, args.presets, args.seeds[0])
    command = "python eval/toy_ablation.py " + shlex.join(
        ["--out", str(out), "--steps", str(args.steps), "--seeds", *map(str, args.seeds),
         "--presets", *args.presets])
    text = ["# Toy-world KD ablation", "",
            f"Students of the trained toy teacher (`configs/toy.yaml`), {args.steps} steps each, initialised from "
            "the teacher by the weight map. Noise-prediction MSE against the teacher on the held-out triples "
            "(`eval/noise_mse`, lower is closer) at the last step. Made by:", "", f"    {command}", "",
            *table(results, args.presets, args.seeds), "", f"![teacher and students]({grid.name})", "",
            f"Rows of `{grid.name}`: the teacher, then each preset and variant (seed {args.seeds[0]}).", ""]
    write_text(out / "README.md", "\n".join(text))
    write_text(out / "results.json", json.dumps([{"preset": p, "variant": v, "seed": s, **r}
                                                  for (p, v, s), r in results.items()], indent=1))
    print("\n".join(table(results, args.presets, args.seeds)))
    print(f"wrote {out / 'README.md'}, {grid}")


if __name__ == "__main__":
    run_cli(main)
