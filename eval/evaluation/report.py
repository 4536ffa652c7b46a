"""An evaluation's written results: report.json and report.md (one row per model or checkpoint), the image
grids, and the rows logged into the evaluated run's metrics.jsonl and trackers (`log_to_run`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from sdkd.cli.words import counted
from sdkd.train.engine.sampling import make_grid

# Row keys shown in report.md, in order: (key, column header, format of a value).
SETTINGS = ("step", "steps", "guidance_scale")  # a row's sampling settings: columns, never logged as metrics
COLUMNS = [
    ("step", "step", "{:d}"),
    ("unet_params", "U-Net params", "{:,}"),
    ("unet_macs", "U-Net GMACs", lambda v: f"{v / 1e9:.3f}"),
    ("sec_per_image", "s/image", "{:.3f}"),
    ("unet_sec_per_image", "U-Net s/image", "{:.3f}"),
    ("noise_mse", "noise MSE", "{:.4g}"),
    ("sample_mse", "sample MSE", "{:.4g}"),
    ("sample_psnr", "PSNR dB", "{:.2f}"),
    ("fg_colour", "fg colour", "{:.0%}"),
    ("bg_colour", "bg colour", "{:.0%}"),
    ("lpips", "LPIPS", "{:.4f}"),
    ("fid", "FID", "{:.2f}"),
    ("kid", "KID", "{:.4f}"),
    ("clip_score", "CLIP", "{:.2f}"),
    ("steps", "steps", "{:d}"),  # the sampling settings last: the metrics stay where they were
    ("guidance_scale", "guidance", "{:g}"),
]


def _cell(value, fmt) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return fmt(value) if callable(fmt) else fmt.format(value)


def markdown(report: dict) -> str:
    """report.md: a short header saying what was sampled, then one table row per model."""
    s, rows = report["settings"], report["rows"]
    teacher = f"teacher `{report['teacher']}`" if report.get("teacher") else "no teacher"
    sampling = (f"{counted(s['num_images'], 'image')} per model (prompts and seeds in `images.jsonl`), steps and "
                f"guidance as in the table, {s['sampler']}, {s['resolution']} px"
                + (f" resized to {s['resize']}" if s.get("resize") else "") + f", batch {s['batch_size']}, "
                f"{s['device']} {s['dtype']}")
    columns = [(key, head, fmt) for key, head, fmt in COLUMNS if any(row.get(key) is not None for row in rows)]
    lines = [f"# Evaluation of `{report['model']}`", "", f"{teacher}; {sampling}.", "",
             "| model | " + " | ".join(head for _, head, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    lines += ["| " + " | ".join([row["name"], *(_cell(row.get(key), fmt) for key, _, fmt in columns)]) + " |"
              for row in rows]
    lines.append("")
    if report.get("triples"):
        t = report["triples"]
        lines += [f"noise MSE: U-Net output against the teacher's on {len(t['prompts'])} prompts x {t['timesteps']} "
                  f"timesteps of held-out triples (seed {t['seed']}); sample MSE and PSNR: images against the "
                  f"teacher's from the same initial noise, in [0, 1]; MACs: one U-Net forward at batch 1.", ""]
    if any(row.get("fg_colour") is not None for row in rows):
        lines += ["fg / bg colour: how often the foreground and background colours read from an image "
                  "(data/sources/colour_check.py) are the ones its synthetic caption names (chance 12.5%).", ""]
    if report.get("skipped"):
        lines += ["Skipped:", "", *(f"- {line}" for line in report["skipped"]), ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    """OUT/report.json and OUT/report.md."""
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    return out / "report.json", out / "report.md"


def write_grids(out: Path, names: list[str], prompts: list[str], count: int) -> list[Path]:
    """OUT/grids/NAME.png (one model's first `count` images under their prompts) and OUT/grid.png (every model's,
    a row each, the teacher first)."""
    if count == 0:
        return []
    rows = [[Image.open(out / "images" / name / f"{i:05d}.png").convert("RGB") for i in range(count)]
            for name in names]
    (out / "grids").mkdir(exist_ok=True)
    paths = []
    for name, row in zip(names, rows):
        paths.append(out / "grids" / f"{name}.png")
        make_grid([row], prompts[:count], [name]).save(paths[-1])
    make_grid(rows, prompts[:count], names).save(out / "grid.png")
    return [out / "grid.png", *paths]


def logged_values(row: dict, prefix: str) -> dict[str, float]:
    """A report row's numbers as tracker values `PREFIX/KEY`."""
    return {f"{prefix}/{k}": v for k, v in row.items()
            if k not in SETTINGS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_to_run(run: Path, run_cfg, rows: list[dict]) -> None:
    """Each checkpoint's row into the run's metrics.jsonl and trackers (its config.yaml's log.trackers) at the
    checkpoint's step as eval/KEY; the teacher's at step 0 as eval/teacher/KEY. Rows without a step are left out."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from sdkd.train.engine import tracking

    trackers = [str(t) for t in run_cfg.log.trackers]
    acc = Accelerator(cpu=True, log_with=tracking.tracker_list(trackers, run),
                      project_config=ProjectConfiguration(project_dir=str(run), logging_dir=str(run / "logs")))
    init = tracking.init_kwargs(trackers, run)
    if "wandb" in init:
        init["wandb"] |= {"name": "evaluate", "job_type": "eval"}
    acc.init_trackers(str(run_cfg.log.project), init_kwargs=init)
    for row in rows:
        if row["name"] == "teacher":
            acc.log(logged_values(row, "eval/teacher"), step=0)
        elif row.get("step") is not None:
            acc.log(logged_values(row, "eval"), step=row["step"])
    acc.end_training()
