"""Evaluate a model, a checkpoint or every checkpoint of a run, against its teacher.

    python eval/evaluate.py RUN_OR_MODEL [--teacher PATH] [--config EVAL.yaml] [--out DIR] [--overwrite] [key=value ...]

RUN_OR_MODEL is a run folder (every checkpoint; `checkpoints=latest` only the newest), a `checkpoint-STEP`
folder, a diffusers pipeline folder, an sdkd single file, `toy` or a hub id. The teacher (default: the run's, from its
config.yaml; `--teacher none` for none) is sampled once, first. Every model samples the same prompts with the
same seeds (image i: seed + i) at the config's steps and guidance (null: each model's recorded sampling settings,
else 25 and 7.5) and resolution, and is scored: parameters,
MACs, latency; teacher agreement (noise-prediction MSE on held-out triples, sample MSE and PSNR); and FID,
KID, CLIP score and LPIPS where their weights are given (a metric without one is skipped with one line
naming the key to set). Configs: configs/eval_toy.yaml, eval_bk_sdm_coco30k.yaml, eval_sdxs_coco5k.yaml.

Writes to --out (default RUN/eval for a run; never into a folder that holds anything else, and an earlier
evaluation only with --overwrite): images/NAME/00000.png ... and images.jsonl (each image's prompt and seed),
grids/NAME.png and grid.png, report.json and report.md (one row per model or checkpoint, the teacher's
first), evaluate.yaml (the resolved config) and eval_triples.safetensors (when made here). With
`log_to_run=true` the rows also go into the run's metrics.jsonl and trackers at each checkpoint's step.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from sdkd.cli.errors import ConfigError, UserError, run_cli
from sdkd.cli.files import refuse_links
from sdkd.cli.words import counted
from sdkd.eval.evaluation.config import Checkpoints, EvaluateConfig
from sdkd.eval.inference.threads import HELP as THREADS_HELP
from sdkd.eval.metrics.config import skipped_lines
from sdkd.train.engine.config import config_help, load_config, save_config

MARKER = "evaluate.yaml"  # the resolved config; a folder holding it holds an earlier evaluation
OVERRIDES = ("overrides: after the other arguments, any key above as KEY=VALUE, dotted inside a section "
             "(steps=1 guidance_scale=1 metrics.clip_model=/models/clip); values are YAML and win over --config.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="evaluate.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0], epilog=f"{config_help(EvaluateConfig)}\n\n{OVERRIDES}")
    parser.add_argument("model", metavar="RUN_OR_MODEL",
                        help="run folder, checkpoint-STEP folder, diffusers pipeline folder, sdkd .safetensors file, "
                             "toy or a hub id")
    parser.add_argument("--teacher", help="teacher to compare with: a model path, toy or a hub id (default: the run's "
                                          "teacher; none: no teacher)")
    parser.add_argument("--config", help="YAML eval config (see configs/eval_*.yaml)")
    parser.add_argument("--out", help="output folder (default for a run: RUN/eval)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=1 num_images=100")
    return parser.parse_intermixed_args(argv)


def output_folder(args, run: Path | None) -> Path:
    """--out, checked before anything loads: empty or new, or an earlier evaluation and --overwrite (then cleared)."""
    if args.out is None and (run is None or Path(args.model).resolve() != run.resolve()):
        raise UserError("--out is required (the default, RUN/eval, applies to a run folder)")
    out = Path(args.out) if args.out is not None else run / "eval"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    refuse_links(out, "--out")
    if run is not None:  # the default --out and log_to_run write into the run folder
        refuse_links(run, "run folder")
    if held:
        if not (out / MARKER).is_file():
            raise UserError(f"--out '{out}' is not empty and holds no evaluation ({', '.join(held[:3])}"
                            f"{', ...' if len(held) > 3 else ''}): choose a new or empty folder")
        if not args.overwrite:
            raise UserError(f"--out '{out}' already holds an evaluation: choose another folder, or pass --overwrite "
                            f"to replace it")
        for path in out.iterdir():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out '{out}': cannot be written ({err.strerror or err})") from None
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides, schema=EvaluateConfig)
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return
    # After the arguments: --help and config mistakes answer at once.
    from sdkd.eval.evaluation.prompts import load_prompts
    from sdkd.eval.evaluation.report import log_to_run, write_grids, write_report
    from sdkd.eval.evaluation.runner import Evaluation
    from sdkd.eval.evaluation.targets import (
        TEACHER,
        TeacherSpec,
        default_teacher,
        read_run_config,
        resolve_targets,
        run_of,
    )
    from sdkd.eval.inference.threads import set_threads
    from sdkd.train.models.names import resolve_model

    src = Path(args.model)
    targets = resolve_targets(args.model, latest_only=cfg.checkpoints == Checkpoints.latest)
    run = run_of(src) if src.is_dir() else None
    run_cfg = read_run_config(run) if run is not None else None
    if cfg.log_to_run and run is None:
        raise ConfigError("config key 'log_to_run': the evaluated model belongs to no run folder")
    teacher = (default_teacher(args.model) if args.teacher is None else
               None if args.teacher.lower() == "none" else TeacherSpec(args.teacher))
    if teacher is not None:  # before --out is made: a teacher that cannot load stops the command with nothing written
        resolve_model(teacher.path, "--teacher" if args.teacher else "teacher", teacher.revision)
    threads = set_threads(args.threads)
    for target in targets:  # a model folder named like the teacher's row keeps its own images
        if teacher is not None and target.name == TEACHER:
            target.name = f"{TEACHER}-model"
    prompts = load_prompts(cfg, run_cfg)
    out = output_folder(args, run)
    save_config(cfg, out / MARKER)

    skipped = skipped_lines(cfg.metrics)
    if teacher is None:
        skipped.append("skipped the teacher row and teacher agreement (noise MSE, sample MSE and PSNR, LPIPS): no "
                       "teacher known for this model; pass --teacher PATH")
    for line in skipped:
        print(line, flush=True)
    resolution = cfg.resolution or (run_cfg.sample.resolution or run_cfg.data.resolution if run_cfg else None)
    print(f"evaluating {', '.join(t.name for t in targets)}"
          + (f" against teacher {teacher.path}" if teacher else "")
          + f": {counted(len(prompts), 'prompt')}, "
          + ("each model's recorded sampling settings (else 25 steps, guidance 7.5)"
             if cfg.steps is None and cfg.guidance_scale is None else
             f"{cfg.steps or 'recorded'} steps, guidance "
             f"{'recorded' if cfg.guidance_scale is None else cfg.guidance_scale}"),
          flush=True)

    evaluation = Evaluation(cfg, out, prompts, teacher, resolution, run_cfg, run)
    rows = evaluation.run_all(targets)
    with (out / "images.jsonl").open("w") as f:
        for i, prompt in enumerate(prompts):
            f.write(json.dumps({"file": f"{i:05d}.png", "prompt": prompt, "seed": cfg.seed + i}) + "\n")
    names = [row["name"] for row in rows]
    write_grids(out, names, prompts, min(cfg.grid_images, len(prompts)))
    pipe_settings = dict(steps=cfg.steps, guidance_scale=cfg.guidance_scale, sampler=str(cfg.sampler),
                         resolution=evaluation.resolution, resize=cfg.resize, seed=cfg.seed, num_images=len(prompts),
                         batch_size=cfg.batch_size, negative_prompt=cfg.negative_prompt,
                         teacher_steps=cfg.teacher_steps or cfg.steps, device=str(evaluation.device),
                         teacher_guidance_scale=cfg.teacher_guidance_scale if cfg.teacher_guidance_scale is not None
                         else cfg.guidance_scale, dtype=str(evaluation.dtype).removeprefix("torch."), ema=cfg.ema,
                         threads=threads)
    report = dict(model=str(args.model), teacher=teacher.path if teacher else None, settings=pipe_settings,
                  triples=evaluation.triple_record(), skipped=skipped, rows=rows)
    json_path, md_path = write_report(out, report)
    if cfg.log_to_run:
        log_to_run(run, run_cfg, [row for row in rows if row["name"] == TEACHER or row.get("step") is not None])
    print(md_path.read_text(), end="")
    print(f"wrote {json_path}, {md_path}, {out / 'grid.png'} and {counted(len(prompts), 'image')} per model under "
          f"{out / 'images'}"
          + (f"; logged to {run}" if cfg.log_to_run else ""), flush=True)


if __name__ == "__main__":
    run_cli(main)
