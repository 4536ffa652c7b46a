"""The toy-world ranking experiment: a student chosen by block ranking against a hand-picked preset of the same
parameter budget, after the same KD steps, by noise-prediction MSE against the teacher.

    python eval/rank_experiment.py --out docs/rank_experiment [--against bk_small] [--steps 100] [--seeds 0 1]

The toy teacher's units are ranked (train/tasks/ranking.py, as `train/show_student.py --teacher toy --rank`
does) and the least-damage custom student with at most the preset's parameters is proposed; both students are
trained by train/kd.py on configs/toy.yaml (the ranked one from OUT/ranked.yaml, that recipe with the proposal's
`student:` section), each from the teacher by its weight map. OUT/README.md holds the ranking and the table:
eval/noise_mse on the held-out triples at the last step per seed and its mean, beside each student's damage
before training.
"""

from __future__ import annotations

import argparse
import json
import shlex

from omegaconf import OmegaConf

from sdkd.cli import limits
from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import creatable, refuse_links, write_text
from sdkd.cli.words import markdown_table
from sdkd.eval.experiments.toy_runs import TOY_RECIPE, kd_run


def main(argv: list[str] | None = None) -> None:
    from sdkd.train.models.students import PRESETS, count_params, student_unet_config
    from sdkd.train.models.teacher import load_teacher
    from sdkd.train.tasks import ranking

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the runs, the recipe and the table")
    parser.add_argument("--against", default="bk_small", help="the preset whose parameters are the budget")
    parser.add_argument("--steps", type=int, default=100, help="training steps of every run (default 100)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier experiment in --out")
    args = parser.parse_args(argv)
    limits.check_int(args.steps, "--steps", 1, limits.MAX_COUNT)
    for seed in args.seeds:
        limits.check_seed(seed, "--seeds")
    parts = load_teacher("toy")
    config = dict(parts.unet.config)
    if args.against not in PRESETS or PRESETS[args.against].family not in (None, "SD-1.x/2.x"):
        raise UserError(f"--against '{args.against}': expected a preset of the toy (SD-1.x) teacher: "
                        f"{', '.join(n for n, p in PRESETS.items() if p.family == 'SD-1.x/2.x')}")
    out = creatable(args.out, "--out")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not args.overwrite:
        raise UserError(f"--out '{out}' is not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                        f"choose a new folder, or pass --overwrite to replace an earlier experiment there")
    refuse_links(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    budget = count_params(student_unet_config(config, PRESETS[args.against]))
    side = max(ranking.native_latent(config)) * parts.vae_scale_factor
    found = ranking.report(parts, list(ranking.DEFAULT_PROMPTS), 1, 3, side, budget, "params")
    recipe = out / "ranked.yaml"
    write_text(recipe, OmegaConf.to_yaml(OmegaConf.merge(OmegaConf.load(TOY_RECIPE),
                                                         {"student": found.proposal["student"]})))
    preset = next(p for p in found.presets if p["name"] == args.against)
    students = {args.against: (TOY_RECIPE, [f"student.preset={args.against}"], preset),
                "ranked": (recipe.resolve(), [], found.proposal)}
    results = {(name, seed): kd_run(out / "runs" / f"{name}-seed{seed}", args.steps, seed, overrides, path)
               for name, (path, overrides, _) in students.items() for seed in args.seeds}
    lines = [["student", "U-Net params", "removes", "damage", "noise MSE, step 0",
              *(f"seed {s}, step {args.steps}" for s in args.seeds), "mean"]]
    for name, (_, _, measured) in students.items():
        values = [results[name, s]["noise_mse"] for s in args.seeds]
        lines.append([name, f"{measured['params']:,}", ", ".join(measured["units"]),
                      ranking.shown(measured["measured"]),
                      f"{results[name, args.seeds[0]]['initial_noise_mse']:.4f}", *(f"{v:.4f}" for v in values),
                      f"{sum(values) / len(values):.4f}"])
    command = "python eval/rank_experiment.py " + shlex.join(
        ["--out", str(args.out), "--against", args.against, "--steps", str(args.steps), "--seeds",
         *map(str, args.seeds)])
    units = [["rank", "unit", "params", "damage"]] + [[str(i), r.name, f"{r.params:,}", ranking.shown(r.damage)]
                                                       for i, r in enumerate(found.rows, 1)]
    text = ["# Toy-world ranking experiment", "",
            f"The toy teacher's units ranked by damage (noise-prediction MSE of the teacher without the unit over the "
            f"teacher's mean square; 16 prompts x 3 timesteps), then `{args.against}` against the ranked student of "
            f"at most its {budget:,} U-Net parameters (`{recipe.name}`), both trained {args.steps} steps by "
            f"`configs/toy.yaml` from the teacher's weights. Noise-prediction MSE against the teacher on the "
            f"held-out triples (`eval/noise_mse`, lower is closer) before training (step 0, the same for every seed) "
            f"and at the last step. Made by:", "",
            f"    {command}", "", markdown_table(lines), "", "Units, least damage first:", "",
            markdown_table(units), ""]
    write_text(out / "README.md", "\n".join(text))
    write_text(out / "results.json", json.dumps({"ranking": found.to_json(), "runs": [
        {"student": n, "seed": s, **r} for (n, s), r in results.items()]}, indent=1))
    print(markdown_table(lines))
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    run_cli(main)
