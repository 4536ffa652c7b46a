"""Block-removed students: exact sizes of the BK-SDM presets, weight copy, configs, spec errors, and the
CLI that shows them (train/show_student.py)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdkd.cli.errors import ConfigError, run_cli
from sdkd.train.models.sd_configs import SD15_UNET, SD21_BASE_UNET, SD21_UNET, SDXL_UNET
from sdkd.train.models.student_config import StudentConfig
from sdkd.train.models.students import (
    PRESETS,
    SD,
    SDXL,
    RemovalSpec,
    build_student,
    count_params,
    layer_sources,
    removal_spec,
    removed_modules,
    student_unet_config,
    weight_map,
)
from sdkd.train.models.toy import build_toy_pipeline
from sdkd.train.show_student import main

from conftest import ROOT, run_script

# SDXL's topology (levels, resnets, depths [1, 2, 10], mid depth 10, text_time) at tiny widths, for real weights.
SDXL_TINY = {**SDXL_UNET, "sample_size": 16, "block_out_channels": [32, 64, 64], "attention_head_dim": [1, 2, 2],
             "norm_num_groups": 8, "cross_attention_dim": 32, "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 80}  # 6 time ids x 8 + a pooled embedding of 32


@pytest.fixture(scope="module")
def teacher():
    return build_toy_pipeline().unet


@pytest.fixture(scope="module")
def sdxl_teacher():
    torch.manual_seed(0)
    return UNet2DConditionModel(**SDXL_TINY)


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
        **{f"up_blocks.{j}.{kind}.1": f"up_blocks.{j}.{kind}.2"
           for j in (1, 2, 3) for kind in ("resnets", "attentions")},
    }
    tiny = weight_map(SD15_UNET, PRESETS["bk_tiny"])
    for j in (0, 1, 2):
        assert tiny[f"up_blocks.{j}.resnets.0"] == f"up_blocks.{j + 1}.resnets.0"
        assert tiny[f"up_blocks.{j}.attentions.1"] == f"up_blocks.{j + 1}.attentions.2"
    assert tiny["up_blocks.1.upsamplers"] == "up_blocks.2.upsamplers" and "up_blocks.2.upsamplers" not in tiny
    assert "down_blocks.2.downsamplers" not in tiny
    assert tiny["down_blocks.1.downsamplers"] == "down_blocks.1.downsamplers"
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


def assert_copied_through_the_map(teacher, student, spec):
    """Every student tensor equals (a copy of) the teacher tensor its longest map prefix names; every entry used."""
    mapping = weight_map(teacher.config, spec)
    teacher_state = teacher.state_dict()
    used = set()
    for key, tensor in student.state_dict().items():
        prefix = max((p for p in mapping if key.startswith(p + ".")), key=len)
        teacher_tensor = teacher_state[mapping[prefix] + key[len(prefix):]]
        assert torch.equal(tensor, teacher_tensor), key
        assert tensor.data_ptr() != teacher_tensor.data_ptr(), f"{key} shares the teacher's storage"
        used.add(prefix)
    assert used == set(mapping)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_build_student_copies_every_weight_through_the_map(teacher, sdxl_teacher, preset):
    spec = PRESETS[preset]
    teacher = {SD: teacher, SDXL: sdxl_teacher}[spec.family]
    student = build_student(teacher, spec)
    derived = student_unet_config(teacher.config, spec)
    assert {k: v for k, v in json.loads(json.dumps(dict(student.config))).items() if k in derived} == derived
    assert_copied_through_the_map(teacher, student, spec)
    assert sum(p.numel() for p in student.parameters()) == count_params(student.config)


def test_student_keeps_teacher_dtype_and_trains(teacher):
    """The student of a frozen bf16 teacher is bf16, every parameter requires gradients, and it runs in float."""
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
    three_level_sd = {k: v for k, v in SDXL_LIKE.items() if not k.startswith(("addition", "projection_class"))}
    with pytest.raises(ConfigError, match=r"expected 3 entries.*got 4.*student\.preset=bk_base"):
        student_unet_config(three_level_sd, PRESETS["bk_base"])


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
    assert err.startswith(f"error: --teacher '{tmp_path / 'nope'}' not found") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_custom_spec_and_errors(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text("student:\n  keep_down: [[0], [0], [0], []]\n  keep_up: [[], [0, 2], [0, 2], [0, 2]]\n"
                    "  mid_block: false\n  deepest_stage: false\n")
    code, out, _ = run_main(["--teacher", "toy", "--preset", "custom", "--spec", str(spec), "--pairs", "segmind"],
                            capsys)
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
    from sdkd.train.models.student_config import StudentPreset

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


# ---------------------------------------------------------------------------------------------
# SDXL students (student.preset=ssd1b, vega, koala_1b, koala_700m): sdxl-and-scale.md section 1


def transformer_layers_and_resnets(config) -> tuple[int, int]:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    kinds = [type(m) for m in model.modules()]
    return kinds.count(BasicTransformerBlock), kinds.count(ResnetBlock2D)


@pytest.mark.parametrize("preset, params, layers, resnets", [  # the reference's table 1.1
    (None, 2_567_463_684, 70, 17),
    ("ssd1b", 1_331_334_404, 34, 16),
    ("vega", 745_225_604, 15, 16),
    ("koala_1b", 1_161_184_324, 30, 11),
    ("koala_700m", 782_822_724, 21, 9),
])
def test_sdxl_presets_have_the_published_sizes(preset, params, layers, resnets):
    config = SDXL_UNET if preset is None else student_unet_config(SDXL_UNET, PRESETS[preset])
    assert count_params(config) == params
    assert transformer_layers_and_resnets(config) == (layers, resnets)


def test_sdxl_preset_configs_are_the_published_ones():
    ssd1b, vega = (student_unet_config(SDXL_UNET, PRESETS[p]) for p in ("ssd1b", "vega"))
    # segmind/SSD-1B's shipped reverse list, verbatim (onediff issue #570); its mid block is one resnet.
    assert ssd1b["reverse_transformer_layers_per_block"] == [[4, 4, 10], [2, 1, 1], 1]
    assert (ssd1b["mid_block_type"], ssd1b["layers_per_block"]) == ("UNetMidBlock2D", 2)
    assert (vega["transformer_layers_per_block"], vega["reverse_transformer_layers_per_block"]) == (
        [1, 1, 2], [2, 1, 1])
    koala_1b, koala_700m = (student_unet_config(SDXL_UNET, PRESETS[p]) for p in ("koala_1b", "koala_700m"))
    assert (koala_1b["layers_per_block"], koala_1b["transformer_layers_per_block"]) == (1, [1, 2, 6])
    assert koala_1b["mid_block_type"] == "UNetMidBlock2DCrossAttn" and koala_700m["mid_block_type"] is None
    for config in (ssd1b, vega, koala_1b, koala_700m):
        assert {k: config[k] for k in ("cross_attention_dim", "addition_embed_type", "sample_size")} == \
            {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "sample_size": 128}


def removed_transformer_layers_and_resnets(preset: str) -> tuple[int, int]:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    removed = removed_modules(SDXL_UNET, PRESETS[preset])
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(SDXL_UNET)
    gone = [type(m) for name, m in teacher.named_modules()
            if any(name == r or name.startswith(r + ".") for r in removed)]
    return gone.count(BasicTransformerBlock), gone.count(ResnetBlock2D)


@pytest.mark.slow  # SDXL widths (seconds each): full suite only, the fast tier stays under 3 minutes
def test_sdxl_removed_modules():
    # sdxl-and-scale.md 1.1: SSD-1B removes 36 of 70 transformer layers and 1 of 17 resnets, Vega 55 and 1.
    assert removed_transformer_layers_and_resnets("ssd1b") == (36, 1)
    assert removed_transformer_layers_and_resnets("vega") == (55, 1)
    removed = removed_modules(SDXL_UNET, PRESETS["ssd1b"])
    assert {"mid_block.attentions.0", "mid_block.resnets.1",
            "up_blocks.1.attentions.1.transformer_blocks.1"} <= set(removed)
    assert "down_blocks.2.attentions.0.transformer_blocks.4" in removed
    assert "down_blocks.2.attentions.0.transformer_blocks.3" not in removed
    koala = removed_modules(SDXL_UNET, PRESETS["koala_700m"])
    assert {"mid_block", "down_blocks.2.attentions.1", "up_blocks.0.attentions.1",
            "down_blocks.0.resnets.1"} <= set(koala)


def test_sdxl_weight_maps():
    ssd1b = weight_map(SDXL_UNET, PRESETS["ssd1b"])
    assert ssd1b["mid_block.resnets.0"] == "mid_block.resnets.0" and "mid_block" not in ssd1b
    assert ssd1b["down_blocks.2.attentions.1.transformer_blocks.3"] == "down_blocks.2.attentions.1.transformer_blocks.3"
    assert "add_embedding" in ssd1b and "up_blocks.0.attentions.2.transformer_blocks.0" not in ssd1b  # 10 of 10
    koala = weight_map(SDXL_UNET, PRESETS["koala_1b"])
    assert koala["up_blocks.0.attentions.1"] == "up_blocks.0.attentions.2"
    assert koala["up_blocks.0.attentions.1.transformer_blocks.5"] == "up_blocks.0.attentions.2.transformer_blocks.5"
    assert koala["mid_block.attentions.0.transformer_blocks.5"] == "mid_block.attentions.0.transformer_blocks.5"


def test_sdxl_student_runs_with_its_added_conditions(sdxl_teacher):
    student = build_student(sdxl_teacher, PRESETS["ssd1b"])
    added = dict(text_embeds=torch.randn(1, 32), time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]))
    out = student(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 5, 32), added_cond_kwargs=added).sample
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Which teacher layers seed a shallower attention (student.layer_init)


def seeded(spec, name):
    return layer_sources(SDXL_UNET, spec)[name][1]


def test_layer_init_rules():
    first = PRESETS["ssd1b"]
    assert seeded(first, "down_blocks.2.attentions.0") == [0, 1, 2, 3]
    even = removal_spec(StudentConfig(preset="ssd1b", layer_init="even"))
    assert even.name == "ssd1b" and even.family == SDXL
    assert seeded(even, "down_blocks.2.attentions.0") == [0, 3, 6, 9]
    assert seeded(even, "up_blocks.1.attentions.1") == [0]  # 2 -> 1
    koala = removal_spec(StudentConfig(preset="koala_1b", layer_init="even"))
    assert seeded(koala, "mid_block.attentions.0") == [0, 2, 4, 5, 7, 9]  # 10 -> 6
    assert weight_map(SDXL_UNET, even)["down_blocks.2.attentions.0.transformer_blocks.1"] == \
        "down_blocks.2.attentions.0.transformer_blocks.3"
    # Attentions as deep as their source copy all layers in order and are not listed.
    assert "up_blocks.0.attentions.2" not in layer_sources(SDXL_UNET, even)


SSD1B_SHALLOWER = ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "up_blocks.0.attentions.0",
                   "up_blocks.0.attentions.1", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]


def explicit_ssd1b(**changes) -> dict:
    # furusu/SSD-1B-anime's estimate for 10 -> 4 (block-removal.md section 6); the last layer for 2 -> 1.
    layers = {name: [0, 1, 2, 6] if "blocks.1." not in name else [1] for name in SSD1B_SHALLOWER}
    return {**layers, **changes}


def test_explicit_layer_init_copies_those_layers(sdxl_teacher):
    spec = removal_spec(StudentConfig(preset="ssd1b", layer_init=explicit_ssd1b()))
    student = build_student(sdxl_teacher, spec)
    assert_copied_through_the_map(sdxl_teacher, student, spec)
    down, teacher_down = student.down_blocks[2].attentions[1], sdxl_teacher.down_blocks[2].attentions[1]
    assert torch.equal(down.transformer_blocks[3].attn1.to_q.weight,
                       teacher_down.transformer_blocks[6].attn1.to_q.weight)
    assert not torch.equal(down.transformer_blocks[3].attn1.to_q.weight,
                           teacher_down.transformer_blocks[3].attn1.to_q.weight)
    assert torch.equal(down.proj_out.weight, teacher_down.proj_out.weight)
    up, teacher_up = student.up_blocks[1].attentions[2], sdxl_teacher.up_blocks[1].attentions[2]
    assert torch.equal(up.transformer_blocks[0].ff.net[2].weight, teacher_up.transformer_blocks[1].ff.net[2].weight)
    # Even spacing, the same way.
    even = removal_spec(StudentConfig(preset="ssd1b", layer_init="even"))
    student = build_student(sdxl_teacher, even)
    assert_copied_through_the_map(sdxl_teacher, student, even)
    assert torch.equal(student.up_blocks[0].attentions[0].transformer_blocks[2].norm1.weight,
                       sdxl_teacher.up_blocks[0].attentions[0].transformer_blocks[6].norm1.weight)


@pytest.mark.parametrize("layer_init, message", [
    (explicit_ssd1b(**{"down_blocks.2.attentions.0": [0, 1, 2]}),
     r"student\.layer_init'.*down_blocks\.2\.attentions\.0 has 4 transformer layers.*got \[0, 1, 2\]"),
    (explicit_ssd1b(**{"up_blocks.0.attentions.0": [0, 1, 2, 10]}),
     r"student\.layer_init'.*in 0\.\.9, got \[0, 1, 2, 10\]"),
    (explicit_ssd1b(**{"up_blocks.1.attentions.1": [2]}), r"in 0\.\.1, got \[2\]"),
    (explicit_ssd1b(**{"down_blocks.2.attentions.0": [3, 2, 1, 0]}), r"sorted distinct"),
    (explicit_ssd1b(**{"mid_block.attentions.0": [0]}),
     r"'mid_block\.attentions\.0' is not an attention of the student"),
    ({"down_blocks.2.attentions.0": [0, 1, 2, 6]},
     r"student\.layer_init'.*names every student attention shallower"
     r".*missing down_blocks\.2\.attentions\.1 \(4 of 10\)"),
])
def test_explicit_layer_init_that_does_not_fit_names_the_key(layer_init, message):
    spec = removal_spec(StudentConfig(preset="ssd1b", layer_init=layer_init))
    with pytest.raises(ConfigError, match=message):
        weight_map(SDXL_UNET, spec)


@pytest.mark.parametrize("layer_init", ["last", [0, 1, 2], {"up_blocks.0.attentions.0": []},
                                        {"up_blocks.0.attentions.0": [-1]}, {}])
def test_layer_init_of_no_known_form_is_refused(layer_init):
    with pytest.raises(ConfigError, match=r"^config key 'student\.layer_init': expected first, even, or"):
        removal_spec(StudentConfig(preset="vega", layer_init=layer_init))


# ---------------------------------------------------------------------------------------------
# Custom specs with depths and mid-block replacement; refusals


SDXL_ALL = dict(keep_down=[[0, 1]] * 3, keep_up=[[0, 1, 2]] * 3)


def test_custom_specs_equal_to_sdxl_presets():
    ssd1b = custom(**SDXL_ALL, mid_attention=False, transformer_layers_per_block=[1, 2, 4],
                   reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], 1])
    assert ssd1b == PRESETS["ssd1b"]
    assert student_unet_config(SDXL_UNET, ssd1b) == student_unet_config(SDXL_UNET, PRESETS["ssd1b"])
    assert weight_map(SDXL_UNET, ssd1b) == weight_map(SDXL_UNET, PRESETS["ssd1b"])
    # Per-layer lists, as the published SSD-1B config writes them: the same U-Net.
    listed = custom(**SDXL_ALL, mid_attention=False, transformer_layers_per_block=[[1, 1], [2, 2], [4, 4]],
                    reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]])
    assert count_params(student_unet_config(SDXL_UNET, listed)) == 1_331_334_404
    koala = custom(keep_down=[[0]] * 3, keep_up=[[0, 2]] * 3, transformer_layers_per_block=[1, 2, 5], mid_block=False)
    assert student_unet_config(SDXL_UNET, koala) == student_unet_config(SDXL_UNET, PRESETS["koala_700m"])


def test_mid_attention_false_on_an_sd_teacher(teacher):
    # Any cross-attention mid block can become its first resnet, not only SDXL's.
    spec = custom(keep_down=K, keep_up=U, mid_attention=False)
    student = build_student(teacher, spec)
    assert type(student.mid_block).__name__ == "UNetMidBlock2D" and len(student.mid_block.resnets) == 1
    assert torch.equal(student.mid_block.resnets[0].conv2.weight, teacher.mid_block.resnets[0].conv2.weight)
    assert "mid_block.attentions.0" in removed_modules(teacher.config, spec)


@pytest.mark.parametrize("spec, message", [
    (dict(SDXL_ALL, transformer_layers_per_block=[1, 2, 11]),
     r"^config key 'student\.transformer_layers_per_block': student down_blocks\.2\.attentions\.0 would have 11 "
     r"transformer layers, more than its source, teacher down_blocks\.2\.attentions\.0, has \(10\)$"),
    (dict(SDXL_ALL, reverse_transformer_layers_per_block=[[4, 4, 10], [2, 3, 1], 1]),
     r"student\.reverse_transformer_layers_per_block'.*up_blocks\.1\.attentions\.1 would have 3"),
    (dict(SDXL_ALL, transformer_layers_per_block=[1, [2, 2], [4, 4]]),
     r"student\.reverse_transformer_layers_per_block': required when transformer_layers_per_block gives a list"),
    (dict(SDXL_ALL, transformer_layers_per_block=[1, 2]), r"transformer_layers_per_block'.*expected 3 entries"),
    (dict(SDXL_ALL, transformer_layers_per_block=[1, [2], 4]),
     r"transformer_layers_per_block'.*entry 1: expected one depth per kept index of keep_down\[1\] \(2\), got \[2\]"),
    (dict(SDXL_ALL, transformer_layers_per_block=[1, 0, 4]), r"transformer_layers_per_block'.*depth >= 1"),
    (dict(SDXL_ALL, reverse_transformer_layers_per_block=[[4, 4, 10], "two", 1]),
     r"reverse_transformer_layers_per_block'.*depth >= 1"),
    (dict(SDXL_ALL, mid_block=False, mid_attention=False), r"student\.mid_attention'.*mid_block=false removes it"),
])
def test_invalid_depths_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        student_unet_config(SDXL_UNET, custom(**spec))


def test_the_mid_block_takes_the_deepest_levels_depth():
    # diffusers builds a cross-attention mid block at the depth of the deepest down level's first attention.
    shallow = custom(**SDXL_ALL, transformer_layers_per_block=[1, 2, 4])
    assert layer_sources(SDXL_UNET, shallow)["mid_block.attentions.0"] == ("mid_block.attentions.0", [0, 1, 2, 3])
    # SDXL_LIKE's mid has 2 layers (the first of [2, 3]); keeping down layer 1 (3 layers) would need 3 there.
    with pytest.raises(ConfigError, match=r"transformer_layers_per_block'.*student mid_block\.attentions\.0 would have "
                                          r"3 transformer layers.*\(2\) \(a mid block takes the depth"):
        student_unet_config(SDXL_LIKE, custom(keep_down=[[0], [0], [1]], keep_up=[[1, 2], [0, 2], [0, 2]]))


def test_mid_attention_needs_a_mid_block_to_replace():
    with pytest.raises(ConfigError, match=r"student\.mid_attention'.*teacher mid_block_type None"):
        student_unet_config({**SDXL_UNET, "mid_block_type": None}, custom(**SDXL_ALL, mid_attention=False))


def test_recipe_keys_reach_the_spec_and_the_saved_config(tmp_path):
    from sdkd.train.engine.config import load_config as load
    from sdkd.train.engine.config import save_config
    from sdkd.train.tasks.diffusion_config import KDConfig

    def load_config(path, overrides=()):
        return load(path, overrides, schema=KDConfig)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("teacher: toy\noutput_dir: runs/x\nstudent:\n  preset: ssd1b\n  layer_init:\n"
                      "    down_blocks.2.attentions.0: [0, 1, 2, 6]\n")
    cfg = load_config(recipe)
    assert removal_spec(cfg.student).layer_init == (("down_blocks.2.attentions.0", (0, 1, 2, 6)),)
    save_config(cfg, tmp_path / "run" / "config.yaml")  # what a run records
    assert load_config(tmp_path / "run" / "config.yaml").student.layer_init == {
        "down_blocks.2.attentions.0": [0, 1, 2, 6]}
    assert load_config(recipe, ["student.layer_init=even"]).student.layer_init == "even"
    for overrides, key in [(["student.layer_init=last"], "layer_init"),
                           (["student.preset=custom", "student.keep_down=[[0]]", "student.keep_up=[[0, 1]]",
                             "student.reverse_transformer_layers_per_block=[[1, 0]]"],
                            "reverse_transformer_layers_per_block")]:
        with pytest.raises(ConfigError, match=rf"^config key 'student\.{key}': [^\n]*$"):
            load_config(recipe, overrides)


def test_presets_set_depths_and_mid_attention_themselves():
    with pytest.raises(ConfigError, match=r"student\.preset'.*mid_attention, transformer_layers_per_block and "
                                          r"reverse_transformer_layers_per_block apply only to student\.preset=custom"):
        removal_spec(StudentConfig(preset="ssd1b", transformer_layers_per_block=[1, 2, 3]))


@pytest.mark.parametrize("config, preset, message", [
    (SD15_UNET, "ssd1b", r"^config key 'student\.preset': ssd1b is a preset for SDXL teachers, but the teacher U-Net "
                         r"is SD-1\.x/2\.x; use bk_base, bk_small, bk_tiny, sdxs or custom$"),
    (SDXL_UNET, "bk_small", r"^config key 'student\.preset': bk_small is a preset for SD-1\.x/2\.x teachers, but the "
                            r"teacher U-Net is SDXL; use ssd1b, vega, koala_1b, koala_700m or custom$"),
    (SD21_BASE_UNET, "koala_700m", r"koala_700m is a preset for SDXL teachers"),
])
def test_a_preset_for_another_family_is_refused(config, preset, message):
    with pytest.raises(ConfigError, match=message):
        student_unet_config(config, PRESETS[preset])


def test_cli_shows_the_toy_sdxl_recipes_student(capsys):
    # `toy_sdxl`: the toy SDXL topology (the teacher train/kd.py reports for configs/toy_sdxl.yaml: 3,000,964
    # parameters -> 1,437,860), the recipe's KOALA-700M-shaped student of it.
    spec = str(ROOT / "configs" / "toy_sdxl.yaml")
    code, out, _ = run_main(["--teacher", "toy_sdxl", "--preset", "custom", "--spec", spec, "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and (report["teacher_params"], report["student_params"]) == (3_000_964, 1_437_860)
    config = report["student_config"]
    assert (config["addition_embed_type"], config["mid_block_type"], config["transformer_layers_per_block"]) == (
        "text_time", None, [1, 1, 1])


@pytest.mark.slow  # SDXL widths (seconds each): full suite only, the fast tier stays under 3 minutes
def test_cli_shows_sdxl_presets(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **SDXL_UNET}))
    layer_init = tmp_path / "even.yaml"
    layer_init.write_text("student:\n  layer_init: even\n  feature_pairs: segmind\n")
    code, out, _ = run_main(["--teacher", str(config), "--preset", "vega", "--spec", str(layer_init), "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and (report["teacher_params"], report["student_params"]) == (2_567_463_684, 745_225_604)
    assert report["layer_init"] == "even" and report["spec"]["layer_init"] == "even"
    assert report["layer_sources"]["up_blocks.0.attentions.1"] == dict(teacher="up_blocks.0.attentions.1",
                                                                       layers=[0, 9])
    assert report["weight_map"]["up_blocks.0.attentions.1.transformer_blocks.1"] == \
        "up_blocks.0.attentions.1.transformer_blocks.9"
    assert report["student_config"]["mid_block_type"] == "UNetMidBlock2D"
    assert [(p["teacher"], p["shape"]) for p in report["feature_pairs"]][3] == ("mid_block", [1280, 32, 32])
    code, out, _ = run_main(["--teacher", str(config), "--preset", "koala_700m"], capsys)
    assert code == 0 and "student  koala_700m: 782,822,724 parameters (30.5% of the teacher)" in out
    assert "teacher layers seeding each shallower student attention (layer_init=first):" in out
    assert "up_blocks.0.attentions.1" in out and "<- up_blocks.0.attentions.2 layers [0, 1, 2, 3, 4]" in out
    code, out, err = run_main(["--teacher", str(config), "--preset", "bk_tiny"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: config key 'student.preset': bk_tiny is a preset for SD-1.x/2.x teachers")


@pytest.mark.slow  # SDXL widths (seconds each): full suite only, the fast tier stays under 3 minutes
def test_cli_lists_sub_block_pairs(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **SDXL_UNET}))
    code, out, _ = run_main(["--teacher", str(config), "--preset", "ssd1b", "--pairs", "sub_block"], capsys)
    assert code == 0 and "feature pairs (sub_block), teacher -> student, output shape at latent 128x128:" in out
    listed = [line.strip() for line in out.split("feature pairs (sub_block)")[1].strip().splitlines()[1:]]
    assert len(listed) == 26  # SSD-1B's sub-block terms
    assert "26. mid_block -> mid_block.resnets.0  (1280, 32, 32)" in listed
    assert "6. down_blocks.1.resnets.1 -> down_blocks.1.resnets.1  (640, 64, 64)" in listed


# One student per family in the fast tier (the fast tier is at its time budget); the others in the full suite.
@pytest.mark.parametrize("preset", [p if p in ("bk_tiny", "vega") else pytest.param(p, marks=pytest.mark.slow)
                                    for p in PRESETS])
def test_gradient_checkpointing_recomputes_and_keeps_loss_and_gradients(teacher, sdxl_teacher, preset):
    """Every preset's student, as the U-Net trainers switch it on (`train.gradient_checkpointing`): backward
    runs down_blocks.0's first resnet a second time; the loss equals the one without checkpointing and every
    gradient is close to its (rtol 1e-5)."""
    spec = PRESETS[preset]
    teacher = {SD: teacher, SDXL: sdxl_teacher}[spec.family]
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    hidden = torch.randn(2, 5, teacher.config.cross_attention_dim, generator=g)
    added = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)}} if spec.family is SDXL else {}
    results = []
    for checkpointing in (False, True):
        student = build_student(teacher, spec).train()
        if checkpointing:
            student.enable_gradient_checkpointing()
        assert student.is_gradient_checkpointing == checkpointing
        calls = []
        student.down_blocks[0].resnets[0].conv1.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        loss = student(sample, torch.tensor([10, 700]), hidden, **added).sample.square().mean()
        loss.backward()
        assert len(calls) == 1 + checkpointing  # recomputed in backward only when checkpointing
        results.append((loss.detach(), {n: p.grad for n, p in student.named_parameters()}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-7, msg=name)
