"""Show a block-removed student of a teacher U-Net: parameter counts, removed modules, weight map, feature pairs.

    python train/show_student.py --teacher PATH --preset bk_small [--json]
    python train/show_student.py --teacher SDXL_PATH --preset ssd1b [--json]
    python train/show_student.py --teacher PATH --preset custom --spec student.yaml [--pairs bk|segmind|sub_block]

PATH is a model folder (unet/config.json), a U-Net folder or config.json, `toy` or `toy_sdxl`; no weights are read.
The student is train/models/students.py's (`describe`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdkd.cli.errors import ConfigError, UserError, run_cli
from sdkd.train.models.student_config import StudentConfig
from sdkd.train.models.students import PRESETS, describe


def _read_teacher_config(path: str) -> dict:
    """`toy`, `toy_sdxl`, a pipeline folder (unet/config.json), a U-Net folder (config.json) or a config.json file."""
    if path in ("toy", "toy_sdxl"):
        from sdkd.train.models.toy import TOY_UNET, TOY_XL_UNET  # imported here: it pulls in transformers

        return dict(TOY_UNET if path == "toy" else TOY_XL_UNET)
    p = Path(path)
    candidates = [p] if p.is_file() else [p / "unet" / "config.json", p / "config.json"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise UserError(f"no U-Net config at '{path}' (expected a model folder with unet/config.json, "
                        f"or a config.json file)")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Show a block-removed student of a teacher U-Net "
                                                 "(parameter counts, removed modules, weight map, feature pairs).")
    parser.add_argument("--teacher", required=True,
                        help="teacher model folder (with unet/config.json), a U-Net config.json, 'toy' or 'toy_sdxl'")
    parser.add_argument("--preset", required=True, help=f"{', '.join(PRESETS)} or custom (needs --spec)")
    parser.add_argument("--spec", help="YAML with the student section (or a whole recipe)")
    parser.add_argument("--pairs", choices=["bk", "segmind", "sub_block"],
                        help="feature pairs: block outputs (bk, segmind) or every resnet and attention output "
                             "(sub_block); default bk, or --spec's")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    teacher_config = _read_teacher_config(args.teacher)
    report = describe(teacher_config, _student_config(args.preset, args.spec, args.pairs))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report, args.teacher)


if __name__ == "__main__":
    run_cli(main)
