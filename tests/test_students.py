"""Block-removed students: exact sizes of the BK-SDM presets, weight copy, configs, spec errors, and the
CLI that shows them (train/show_student.py)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import ROOT, run_script
from sdkd.train.engine.config import StudentConfig
from sdkd.cli.errors import ConfigError, run_cli
from sdkd.train.show_student import main
from sdkd.train.models.students import (PRESETS, RemovalSpec, build_student, count_params, removal_spec, removed_modules,
                                 student_unet_config, weight_map)
from sdkd.train.models.sd_configs import SD15_UNET, SD21_BASE_UNET, SD21_UNET
from sdkd.train.models.toy import build_toy_pipeline



@pytest.fixture(scope="module")
def teacher():
    return build_toy_pipeline().unet


def custom(**kw) -> RemovalSpec:
    return removal_spec(StudentConfig(preset="custom", **kw))


# ---------------------------------------------------------------------------------------------
# Configs and sizes


@pytest.mark.parametrize("config, preset, expected", [
    (SD15_UNET, None, 859_520_964),
    (SD15_UNET, "bk_base", 579_384_964),
    (SD15_UNET, "bk_small", 482_346_884),
    (SD15_UNET, "bk_tiny", 323_384_964),
    (SD21_BASE_UNET, None, 865_910_724),
    (SD21_BASE_UNET, "bk_base", 583_480_964),
    (SD21_BASE_UNET, "bk_small", 485_787_524),
    (SD21_BASE_UNET, "bk_tiny", 326_825_604),
    (SD21_UNET, "bk_tiny", 326_825_604),  # sample_size / upcast_attention add no parameters
])
def test_parameter_counts_match_bk_sdm(config, preset, expected):
    unet_config = config if preset is None else student_unet_config(config, PRESETS[preset])
    assert count_params(unet_config) == expected


def test_bk_tiny_config_drops_the_deepest_stage_and_inherits_v2_settings():
    config = student_unet_config(SD21_UNET, PRESETS["bk_tiny"])
    assert config["block_out_channels"] == [320, 640, 1280]
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert config["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    assert config["attention_head_dim"] == [5, 10, 20]
    assert config["layers_per_block"] == 1 and config["mid_block_type"] is None
    assert (config["cross_attention_dim"], config["use_linear_projection"]) == (1024, True)
    assert (config["sample_size"], config["upcast_attention"]) == (96, True)
    assert student_unet_config(SD15_UNET, PRESETS["bk_base"])["mid_block_type"] == "UNetMidBlock2DCrossAttn"


def test_weight_maps_are_bk_sdms_tables():
    remapped = {s: t for s, t in weight_map(SD15_UNET, PRESETS["bk_base"]).items() if s != t}
    assert remapped == {
        "up_blocks.0.resnets.1": "up_blocks.0.resnets.2",
        **{f"up_blocks.{j}.{kind}.1": f"up_blocks.{j}.{kind}.2" for j in (1, 2, 3) for kind in ("resnets", "attentions")},
    }
    tiny = weight_map(SD15_UNET, PRESETS["bk_tiny"])
    for j in (0, 1, 2):
        assert tiny[f"up_blocks.{j}.resnets.0"] == f"up_blocks.{j + 1}.resnets.0"
        assert tiny[f"up_blocks.{j}.attentions.1"] == f"up_blocks.{j + 1}.attentions.2"
    assert tiny["up_blocks.1.upsamplers"] == "up_blocks.2.upsamplers" and "up_blocks.2.upsamplers" not in tiny
    assert "down_blocks.2.downsamplers" not in tiny and tiny["down_blocks.1.downsamplers"] == "down_blocks.1.downsamplers"
    assert {"conv_in", "time_embedding", "conv_norm_out", "conv_out"} <= set(tiny)


def test_removed_modules():
    common = [f"down_blocks.{i}.{kind}.1" for i in range(3) for kind in ("resnets", "attentions")]
    common += ["down_blocks.3.resnets.1", "up_blocks.0.resnets.1"]
    common += [f"up_blocks.{j}.{kind}.1" for j in (1, 2, 3) for kind in ("resnets", "attentions")]
    assert sorted(removed_modules(SD15_UNET, PRESETS["bk_base"])) == sorted(common)
    assert sorted(removed_modules(SD15_UNET, PRESETS["bk_small"])) == sorted(common + ["mid_block"])
    tiny = [m for m in common if not m.startswith(("down_blocks.3", "up_blocks.0"))]
    tiny += ["down_blocks.3", "mid_block", "up_blocks.0", "down_blocks.2.downsamplers"]
    assert sorted(removed_modules(SD15_UNET, PRESETS["bk_tiny"])) == sorted(tiny)


# ---------------------------------------------------------------------------------------------
# Weight copy


@pytest.mark.parametrize("preset", list(PRESETS))
def test_build_student_copies_every_weight_through_the_map(teacher, preset):
    spec = PRESETS[preset]
    student = build_student(teacher, spec)
    derived = student_unet_config(teacher.config, spec)
    assert {k: v for k, v in json.loads(json.dumps(dict(student.config))).items() if k in derived} == derived
    mapping = weight_map(teacher.config, spec)
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    copied = 0
    for prefix, source in mapping.items():
        keys = [k for k in student_state if k.startswith(prefix + ".")]
        assert keys, prefix
        for key in keys:
            teacher_tensor = teacher_state[source + key[len(prefix):]]
            assert torch.equal(student_state[key], teacher_tensor), key
            assert student_state[key].data_ptr() != teacher_tensor.data_ptr(), f"{key} shares the teacher's storage"
            copied += 1
    assert copied == len(student_state)
    assert sum(p.numel() for p in student.parameters()) == count_params(student.config)


def test_student_keeps_teacher_dtype_and_trains(teacher):
    teacher = copy.deepcopy(teacher).to(torch.bfloat16).requires_grad_(False)
    student = build_student(teacher, PRESETS["bk_small"])
    assert student.dtype == torch.bfloat16
    assert all(p.requires_grad for p in student.parameters())
    out = student.float()(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 5, 32)).sample
    assert out.shape == (1, 4, 16, 16)


def test_saved_student_reloads_with_its_own_config(teacher, tmp_path):
    student = build_student(teacher, PRESETS["bk_tiny"])
    student.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layers_per_block"] == 1 and saved["mid_block_type"] is None
    assert len(saved["down_block_types"]) == 3
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    for key, tensor in student.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


def test_custom_spec_with_other_indices_copies_those_weights(teacher):
    # keep resnet 1 where a block does not change channels; per-block layers_per_block.
    spec = custom(keep_down=[[0, 1], [0], [0], [1]], keep_up=[[1, 2], [0, 2], [0, 2], [0, 1, 2]])
    config = student_unet_config(teacher.config, spec)
    assert config["layers_per_block"] == [2, 1, 1, 1]
    student = build_student(teacher, spec)
    assert torch.equal(student.down_blocks[3].resnets[0].conv1.weight, teacher.down_blocks[3].resnets[1].conv1.weight)
    assert torch.equal(student.up_blocks[0].resnets[0].conv1.weight, teacher.up_blocks[0].resnets[1].conv1.weight)
    assert len(student.up_blocks[3].resnets) == 3


SDXL_LIKE = dict(
    sample_size=16, block_out_channels=[32, 64, 64], layers_per_block=2, norm_num_groups=8,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[[1, 1], [1, 2], [2, 3]],
    reverse_transformer_layers_per_block=[[3, 2, 1], [2, 1, 1], [1, 1, 1]],
    attention_head_dim=[2, 4, 8], cross_attention_dim=32, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
)


def test_sdxl_like_teacher_keeps_per_layer_transformer_depths():
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**SDXL_LIKE)
    spec = custom(keep_down=[[0], [0], [1]], keep_up=[[1, 2], [0, 2], [0, 2]], mid_block=False)
    config = student_unet_config(teacher.config, spec)
    assert config["transformer_layers_per_block"] == [[1], [1], [3]]
    assert config["reverse_transformer_layers_per_block"] == [[2, 1], [2, 1], [1, 1]]
    student = build_student(teacher, spec)
    assert len(student.down_blocks[2].attentions[0].transformer_blocks) == 3
    assert "add_embedding" in weight_map(teacher.config, spec)


# ---------------------------------------------------------------------------------------------
# Specs


def test_custom_specs_equal_to_presets_give_the_preset_configs():
    small = custom(keep_down=[[0]] * 4, keep_up=[[0, 2]] * 4, mid_block=False)
    assert small == PRESETS["bk_small"]
    assert student_unet_config(SD15_UNET, small) == student_unet_config(SD15_UNET, PRESETS["bk_small"])
    # Entries of the removed deepest blocks are ignored.
    tiny = custom(keep_down=[[0], [0], [0], []], keep_up=[[], [0, 2], [0, 2], [0, 2]], mid_block=False,
                  deepest_stage=False)
    assert student_unet_config(SD15_UNET, tiny) == student_unet_config(SD15_UNET, PRESETS["bk_tiny"])
    assert weight_map(SD15_UNET, tiny) == weight_map(SD15_UNET, PRESETS["bk_tiny"])


K, U = [[0]] * 4, [[0, 2]] * 4


@pytest.mark.parametrize("spec, message", [
    (dict(keep_down=[[0]] * 3, keep_up=U), r"student\.keep_down'.*expected 4 entries"),
    (dict(keep_down=K, keep_up=U[:3], deepest_stage=False), r"student\.keep_up'.*expected 4 entries.*ignored"),
    (dict(keep_down=[[0], [2], [0], [0]], keep_up=U), r"student\.keep_down'.*entry 1 .*indices in 0\.\.1, got \[2\]"),
    (dict(keep_down=[[1, 0], [0], [0], [0]], keep_up=U), r"student\.keep_down'.*entry 0 .*sorted"),
    (dict(keep_down=[[0], [], [0], [0]], keep_up=U), r"student\.keep_down'.*entry 1 .*got \[\]"),
    (dict(keep_down=K, keep_up=[[0, 2], [0, 1], [0, 2], [0, 2]]), r"student\.keep_up'.*entry 1: must keep index 2"),
    (dict(keep_down=K, keep_up=[[0, 2], [0, 1, 2], [0, 2], [0, 2]]), r"student\.keep_up'.*entry 1: expected 2 indices"),
    (dict(keep_down=K, keep_up=[[0, 3]] * 4), r"student\.keep_up'.*0\.\.2, got \[0, 3\]"),
    (dict(keep_down=[[0], [1], [0], [0]], keep_up=U), r"student\.keep_down'.*down_blocks\.1\.resnets\.1.*channels"),
    (dict(keep_down=K, keep_up=[[0, 2], [0, 2], [1, 2], [0, 2]]), r"student\.keep_up'.*up_blocks\.2\.resnets\.1"),
    (dict(keep_up=U), r"student\.keep_down'.*required"),
])
def test_invalid_custom_specs_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        student_unet_config(SD15_UNET, custom(**spec))


def test_preset_errors():
    with pytest.raises(ConfigError, match=r"student\.preset'.*got 'bk_huge'"):
        removal_spec(StudentConfig(preset="bk_huge"))
    with pytest.raises(ConfigError, match=r"student\.preset'.*only to student\.preset=custom"):
        removal_spec(StudentConfig(preset="bk_base", mid_block=False))
    # A preset on a teacher of another shape says so.
    with pytest.raises(ConfigError, match=r"expected 3 entries.*got 4.*student\.preset=bk_base"):
        student_unet_config(SDXL_LIKE, PRESETS["bk_base"])


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.slow
def test_cli_json_reports_exact_counts(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **SD15_UNET}))
    result = run_script([sys.executable, str(ROOT / "train/show_student.py"), "--teacher", str(config),
                         "--preset", "bk_small", "--json"], timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["teacher_params"], report["student_params"]) == (859_520_964, 482_346_884)
    assert "mid_block" in report["removed"]
    assert report["weight_map"]["up_blocks.3.attentions.1"] == "up_blocks.3.attentions.2"
    assert [(p["teacher"], p["shape"]) for p in report["feature_pairs"]][4] == ("up_blocks.0", [1280, 16, 16])


def run_main(args, capsys) -> tuple[int, str, str]:
    """The CLI in-process, through run_cli as the script runs it: (exit code, stdout, stderr)."""
    try:
        run_cli(lambda: main(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_path_is_one_line_exit_2(tmp_path, capsys):
    code, out, err = run_main(["--teacher", str(tmp_path / "nope"), "--preset", "bk_small"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: no U-Net config at") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_custom_spec_and_errors(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text("student:\n  keep_down: [[0], [0], [0], []]\n  keep_up: [[], [0, 2], [0, 2], [0, 2]]\n"
                    "  mid_block: false\n  deepest_stage: false\n")
    code, out, _ = run_main(["--teacher", "toy", "--preset", "custom", "--spec", str(spec), "--pairs", "segmind"], capsys)
    assert code == 0 and "3. up_blocks.0 -> down_blocks.2" in out
    typo = tmp_path / "typo.yaml"
    typo.write_text("keep_dwn: [[0]]\n")
    for args, message in [
        (["--preset", "custom", "--spec", str(typo)], f"error: {typo}: Key 'keep_dwn' not in 'StudentConfig'"),
        (["--preset", "bk_huge"], "error: config key 'student.preset'"),
        (["--preset", "custom"], "error: --preset custom needs --spec"),
        (["--preset", "custom", "--spec", str(tmp_path / "missing.yaml")], "error: spec file not found"),
    ]:
        code, _, err = run_main(["--teacher", "toy", *args], capsys)
        assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1


def test_config_knows_exactly_the_presets_students_builds():
    # config.py names them without importing diffusers (launch.sh checks configs with it alone).
    from sdkd.train.engine.config import StudentPreset

    assert [*PRESETS, "custom"] == list(StudentPreset.__members__)


# ---------------------------------------------------------------------------------------------
# SDXS-512 (student.preset=sdxs): block-removal.md section 5


# IDKiro/sdxs-512-dreamshaper unet/config.json, the keys that shape the U-Net [stated in the reference].
SDXS_512_DS = dict(block_out_channels=[320, 640, 1280], layers_per_block=1, mid_block_type=None,
                   down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                   cross_attention_dim=768, attention_head_dim=8, in_channels=4)


@pytest.mark.parametrize("config, expected", [
    (SD15_UNET, 315_746_244),       # SDXS-512-DS (DreamShaper-8, an SD-1.5 model)
    (SD21_BASE_UNET, 318_695_364),  # the paper's SD-2.1-base SDXS-512, "319M" in its Table 3
    (SD21_UNET, 318_695_364),
])
def test_sdxs_preset_is_the_sdxs_512_unet(config, expected):
    from sdkd.train.formats.ldm_layout import unet_layout
    from sdkd.train.models.sd_configs import SDXS_TYPES

    student = student_unet_config(config, PRESETS["sdxs"])
    assert count_params(student) == expected
    assert student == {**student_unet_config(config, PRESETS["bk_tiny"]), **SDXS_TYPES}
    assert unet_layout(student) == "sdxs"
    if config is SD15_UNET:
        assert {k: student[k] for k in SDXS_512_DS} == SDXS_512_DS
    else:  # SD-2.x settings carried over, per level where the teacher has lists
        assert (student["cross_attention_dim"], student["attention_head_dim"], student["use_linear_projection"]) == \
            (1024, [5, 10, 20], True)


def test_sdxs_weight_map_is_bk_tinys_without_the_320_channel_attention():
    tiny, sdxs = weight_map(SD15_UNET, PRESETS["bk_tiny"]), weight_map(SD15_UNET, PRESETS["sdxs"])
    # Resnets, samplers, stem and head of the attention-free level still come from the teacher's.
    assert sdxs == {s: t for s, t in tiny.items()
                    if not s.startswith(("down_blocks.0.attentions.", "up_blocks.2.attentions."))}
    assert sdxs["up_blocks.2.resnets.1"] == "up_blocks.3.resnets.2"
    assert sdxs["down_blocks.0.downsamplers"] == "down_blocks.0.downsamplers"
    assert sorted(removed_modules(SD15_UNET, PRESETS["sdxs"])) == sorted(
        removed_modules(SD15_UNET, PRESETS["bk_tiny"])
        + ["down_blocks.0.attentions.0", "up_blocks.3.attentions.0", "up_blocks.3.attentions.2"])


def test_sdxs_student_of_the_toy_teacher(teacher):
    student = build_student(teacher, PRESETS["sdxs"])
    assert not hasattr(student.down_blocks[0], "attentions") and not hasattr(student.up_blocks[2], "attentions")
    assert torch.equal(student.up_blocks[2].resnets[1].conv1.weight, teacher.up_blocks[3].resnets[2].conv1.weight)
    out = student(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 5, 32)).sample
    assert out.shape == (1, 4, 16, 16)


def test_custom_spec_equal_to_sdxs():
    spec = custom(keep_down=[[0], [0], [0], []], keep_up=[[], [0, 2], [0, 2], [0, 2]], mid_block=False,
                  deepest_stage=False, drop_attention=[0])
    assert student_unet_config(SD15_UNET, spec) == student_unet_config(SD15_UNET, PRESETS["sdxs"])
    assert weight_map(SD15_UNET, spec) == weight_map(SD15_UNET, PRESETS["sdxs"])
    # Dropping attention keeps the deepest stage's own rules: here a 4-level student without level-1 attention.
    config = student_unet_config(SD15_UNET, custom(keep_down=K, keep_up=U, drop_attention=[1]))
    assert config["down_block_types"][1] == "DownBlock2D" and config["up_block_types"][2] == "UpBlock2D"


TINY = dict(keep_down=[[0], [0], [0], []], keep_up=[[], [0, 2], [0, 2], [0, 2]], mid_block=False,
            deepest_stage=False)


@pytest.mark.parametrize("spec, message", [
    (dict(TINY, drop_attention=[3]), r"student\.drop_attention'.*levels the student keeps, in 0\.\.2, got \[3\]"),
    (dict(TINY, drop_attention=[0, 0]), r"student\.drop_attention'.*distinct"),
    (dict(keep_down=K, keep_up=U, drop_attention=[3]), r"teacher level 3 .*no attention to drop"),
])
def test_invalid_drop_attention_names_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        student_unet_config(SD15_UNET, custom(**spec))


def test_sdxs_preset_sets_drop_attention_itself():
    with pytest.raises(ConfigError, match=r"student\.preset'.*drop_attention apply only to student\.preset=custom"):
        removal_spec(StudentConfig(preset="sdxs", drop_attention=[1]))


def test_cli_shows_sdxs_for_the_toy_and_an_sd15_config(tmp_path, capsys):
    code, out, _ = run_main(["--teacher", "toy", "--preset", "sdxs"], capsys)
    assert code == 0 and "student  sdxs: 1,406,884 parameters" in out
    assert "up_blocks.2.resnets.1       <- up_blocks.3.resnets.2" in out and "  up_blocks.3.attentions.0\n" in out
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **SD15_UNET}))
    code, out, _ = run_main(["--teacher", str(config), "--preset", "sdxs", "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and (report["teacher_params"], report["student_params"]) == (859_520_964, 315_746_244)
    assert report["spec"]["drop_attention"] == [0] and report["student_config"]["down_block_types"][0] == "DownBlock2D"
    assert [(p["student"], p["shape"]) for p in report["feature_pairs"]][2] == (
        "down_blocks.2.attentions.0.proj_out", [1280, 16, 16])
