"""Show a block-removed student of a teacher U-Net: parameter counts, removed modules, weight map, feature pairs.

    python train/show_student.py --teacher PATH --preset bk_small [--json]
    python train/show_student.py --teacher SDXL_PATH --preset ssd1b [--json]
    python train/show_student.py --teacher PATH --preset custom --spec student.yaml [--pairs bk|segmind|sub_block]
    python train/show_student.py --teacher MODEL --rank [--prompts FILE] [--budget-params N | --budget-macs N]

PATH is any model name (train/models/names.py: `toy`, `toy_sdxl`, a run or checkpoint folder, a diffusers folder, an
sdkd single file, a hub id), a U-Net folder or its config.json; only the U-Net's config is read.
The student is train/models/students.py's (`describe`). `--rank` loads the whole teacher and ranks its removable
units by how much removing each alone changes its noise prediction; with a budget it proposes a custom student
section (train/tasks/ranking.py, `report`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdkd.cli.errors import ConfigError, UserError, run_cli
from sdkd.cli.limits import MAX_BATCH, MAX_STEPS, check_int, check_side, read_prompt_file
from sdkd.cli.words import markdown_table
from sdkd.train.models.student_config import StudentConfig
from sdkd.train.models.students import PRESETS, describe

if TYPE_CHECKING:
    from sdkd.train.tasks.ranking import Ranking

# The default probe: 8 prompts x 1 seed x 2 timesteps at most 128 px, 16 forwards per unit (SD-1.5 at a sixteenth of
# 512 px's cost), so that ranking an SD-1.5-width teacher takes minutes on two CPU cores; --resolution for more.
RANK_SIDE = 128
RANK_PROMPTS = 8


def _unet_config_file(path: str) -> Path | dict:
    """Where PATH's U-Net config is: a config.json file or U-Net folder as given, else the model PATH names
    (train/models/names.py) -> its unet/config.json, or a single file's config (from its metadata)."""
    from sdkd.train.models.names import resolve_model

    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return p
    if (p / "config.json").is_file() and not (p / "model_index.json").is_file():
        return p / "config.json"
    ref = resolve_model(path, "--teacher")
    if ref.kind == "file":
        from sdkd.train.formats.model_files import META, read_metadata

        config = read_metadata(Path(ref.path)).get(META + "unet_config")
        if config is None:
            raise UserError(f"--teacher '{path}': no U-Net config in its metadata (not an sdkd single file)")
        return json.loads(config)
    if ref.kind == "hub" and not ref.local:  # only the config is fetched
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(ref.path, "unet/config.json"))
    folder = Path(ref.path)
    if ref.kind == "run":
        from sdkd.train.engine.checkpoints import find_latest

        latest = find_latest(folder)
        folder = folder / "student" if (folder / "student" / "unet").is_dir() or latest is None else latest
    return folder / "unet" / "config.json"


def _read_teacher_config(path: str) -> dict:
    """The U-Net config of PATH (`_unet_config_file`)."""
    found = _unet_config_file(path)
    if isinstance(found, dict):
        return found
    if not found.is_file():
        raise UserError(f"no U-Net config at '{path}' ('{found}' not found)")
    try:
        config = json.loads(found.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{found}: not a JSON config ({err})") from None
    if not isinstance(config, dict) or "block_out_channels" not in config:
        raise UserError(f"{found}: not a U-Net config (no block_out_channels)")
    return config


def _student_config(preset: str, spec_file: str | None, table: str | None) -> StudentConfig:
    """The student section: from --spec (a student section or a whole recipe), then --preset/--pairs."""
    student = StudentConfig()
    if spec_file is not None:
        if not Path(spec_file).is_file():
            raise UserError(f"spec file not found: {spec_file}")
        try:
            loaded = OmegaConf.load(spec_file)
            section = loaded.get("student", loaded)
            student = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudentConfig), section))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{spec_file}: {str(err).splitlines()[0]}") from None
    elif preset == "custom":
        raise UserError("--preset custom needs --spec FILE.yaml holding keep_down/keep_up")
    student.preset = preset
    if table is not None:
        student.feature_pairs = table
    return student


def _print_report(r: dict, teacher_path: str) -> None:
    ratio = r["student_params"] / r["teacher_params"]
    print(f"teacher  {teacher_path}: {r['teacher_params']:,} parameters")
    print(f"student  {r['preset']}: {r['student_params']:,} parameters ({ratio:.1%} of the teacher)")
    print(f"\nremoved teacher modules ({len(r['removed'])}):")
    for name in r["removed"]:
        print(f"  {name}")
    width = max(map(len, r["weight_map"]))
    print(f"\nweight map, student <- teacher ({len(r['weight_map'])} modules; '=' same name):")
    for student, teacher in r["weight_map"].items():
        print(f"  {student:<{width}}  {'=' if student == teacher else '<- ' + teacher}")
    if r["layer_sources"]:
        rule = r["layer_init"] if isinstance(r["layer_init"], str) else "explicit"
        print(f"\nteacher layers seeding each shallower student attention (layer_init={rule}):")
        for student, source in r["layer_sources"].items():
            print(f"  {student:<{width}}  <- {source['teacher']} layers {source['layers']}")
    h, w = r["latent_hw"]
    print(f"\nfeature pairs ({r['feature_table']}), teacher -> student, output shape at latent {h}x{w}:")
    for i, p in enumerate(r["feature_pairs"], 1):
        print(f"  {i}. {p['teacher']} -> {p['student']}  {tuple(p['shape'])}")


def _print_ranking(r: Ranking, teacher_path: str) -> None:
    from sdkd.train.tasks.ranking import shown

    h, w = r.latent_hw
    p = r.probe
    print(f"teacher  {teacher_path}: {r.teacher_params:,} parameters, {r.teacher_macs / 1e9:.3f} GMACs per forward "
          f"(latent {h}x{w})")
    print(f"damage: noise-prediction MSE against the teacher over its mean square, on {p['prompts']} prompts x "
          f"{p['seeds']} seeds x {p['timesteps']} timesteps at {p['resolution']} px\n")
    rows = [["rank", "unit", "params", "% params", "MMACs", "% MACs", "damage"]]
    rows += [[str(i), x.name, f"{x.params:,}", f"{x.params / r.teacher_params:.1%}", f"{x.macs / 1e6:,.1f}",
              f"{x.macs / r.teacher_macs:.1%}", shown(x.damage)] for i, x in enumerate(r.rows, 1)]
    print(markdown_table(rows))
    for title, sets in (("additivity (measured damage of two units together against the sum of theirs)",
                         r.additivity), ("presets as sets of units", r.presets)):
        if sets:
            print(f"\n{title}:")
            for s in sets:
                size = f", {s['params']:,} parameters" if "params" in s else ""
                print(f"  {s['name']}: predicted {shown(s['predicted'])}, measured {shown(s['measured'])} "
                      f"(x{s['ratio']:.2f}){size}")
    if r.proposal:
        q = r.proposal
        print(f"\nproposal for --budget-{q['by']} {q['budget']:,}: {q['params']:,} parameters, "
              f"{q['macs'] / 1e9:.3f} GMACs; removes {', '.join(q['units'])}; damage predicted "
              f"{shown(q['predicted'])}, measured {shown(q['measured'])}")
        print("student section (a recipe takes it as is):\n")
        print(OmegaConf.to_yaml({"student": q["student"]}))


def _read_prompts(path: str) -> list[str]:
    """--prompts: cli/limits.py's prompt file, at most MAX_BATCH prompts (the probe encodes them at once)."""
    prompts = read_prompt_file(path, "--prompts")
    check_int(len(prompts), f"--prompts '{path}': its number of prompts", 1, MAX_BATCH)
    return prompts


def _check_flags(args) -> None:
    """Which flags go together: one line, exit 2, before anything is loaded."""
    if args.rank == (args.preset is not None):
        raise UserError("give --preset NAME (show one student) or --rank (rank the teacher's units), not both")
    rank_only = [f for f in ("prompts", "budget_params", "budget_macs", "seeds", "timesteps", "resolution")
                 if getattr(args, f) is not None]
    if not args.rank and rank_only:
        raise UserError(f"--{rank_only[0].replace('_', '-')} needs --rank")
    shown_only = [f for f in ("spec", "pairs") if getattr(args, f) is not None]
    if args.rank and shown_only:
        raise UserError(f"--{shown_only[0]} shows one student: it does not go with --rank")
    if args.budget_params is not None and args.budget_macs is not None:
        raise UserError("--budget-params and --budget-macs: give one budget")
    for flag, value, low, high in (("--budget-params", args.budget_params, 1, 2**62),
                                   ("--budget-macs", args.budget_macs, 1, 2**62),
                                   ("--seeds", args.seeds, 1, MAX_BATCH),
                                   ("--timesteps", args.timesteps, 1, MAX_STEPS)):
        if value is not None:
            check_int(value, flag, low, high)
    if args.resolution is not None:
        check_side(args.resolution, "--resolution")


def _rank(args) -> Ranking:
    from sdkd.train.formats.model_files import load_parts
    from sdkd.train.tasks.ranking import DEFAULT_PROMPTS, native_latent, report

    prompts = _read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS[:RANK_PROMPTS])
    parts = load_parts(args.teacher)
    side = max(native_latent(dict(parts.unet.config))) * parts.vae_scale_factor
    resolution = args.resolution or min(side, RANK_SIDE)
    by = "params" if args.budget_params is not None else "macs" if args.budget_macs is not None else None
    budget = args.budget_params if by == "params" else args.budget_macs
    return report(parts, prompts, args.seeds or 1, args.timesteps or 2, resolution, budget, by)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Show a block-removed student of a teacher U-Net "
                                                 "(parameter counts, removed modules, weight map, feature pairs).")
    parser.add_argument("--teacher", required=True,
                        help="teacher: any model (toy, toy_sdxl, run, checkpoint, diffusers folder, sdkd file, hub "
                             "id), a U-Net folder or its config.json")
    parser.add_argument("--preset", help=f"{', '.join(PRESETS)} or custom (needs --spec)")
    parser.add_argument("--spec", help="YAML with the student section (or a whole recipe)")
    parser.add_argument("--pairs", choices=["bk", "segmind", "sub_block"],
                        help="feature pairs: block outputs (bk, segmind) or every resnet and attention output "
                             "(sub_block); default bk, or --spec's")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    rank = parser.add_argument_group("ranking (--rank: loads the whole teacher)")
    rank.add_argument("--rank", action="store_true",
                      help="rank every removable unit by how much removing it alone changes the noise prediction")
    rank.add_argument("--prompts", help=f"probe prompts, one a line (default: {RANK_PROMPTS} of the toy world's "
                                        f"held-out captions)")
    rank.add_argument("--budget-params", type=int, help="propose a custom student of at most N U-Net parameters")
    rank.add_argument("--budget-macs", type=int, help="propose a custom student of at most N MACs per forward "
                                                      "(batch 1, the teacher's native size)")
    rank.add_argument("--seeds", type=int, help="noise seeds per prompt (default 1)")
    rank.add_argument("--timesteps", type=int, help="timesteps per prompt and seed, spread over the schedule "
                                                    "(default 2)")
    rank.add_argument("--resolution", type=int, help=f"probe image size in px (default: the teacher's native size, "
                                                     f"at most {RANK_SIDE})")
    args = parser.parse_args(argv)
    _check_flags(args)
    if args.rank:
        ranking = _rank(args)
        if args.json:
            print(json.dumps(ranking.to_json(), indent=1))
        else:
            _print_ranking(ranking, args.teacher)
        return
    teacher_config = _read_teacher_config(args.teacher)
    report = describe(teacher_config, _student_config(args.preset, args.spec, args.pairs))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report, args.teacher)


if __name__ == "__main__":
    run_cli(main)
