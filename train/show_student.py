"""Show a block-removed student of a teacher U-Net: parameter counts, removed modules, weight map, feature pairs.

    python train/show_student.py --teacher PATH --preset bk_small [--json]
    python train/show_student.py --teacher SDXL_PATH --preset ssd1b [--json]
    python train/show_student.py --teacher PATH --preset custom --spec student.yaml [--pairs bk|segmind|sub_block]

PATH is any model name (train/models/names.py: `toy`, `toy_sdxl`, a run or checkpoint folder, a diffusers folder, an
sdkd single file, a hub id), a U-Net folder or its config.json; only the U-Net's config is read.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Show a block-removed student of a teacher U-Net "
                                                 "(parameter counts, removed modules, weight map, feature pairs).")
    parser.add_argument("--teacher", required=True,
                        help="teacher: any model (toy, toy_sdxl, run, checkpoint, diffusers folder, sdkd file, hub "
                             "id), a U-Net folder or its config.json")
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
