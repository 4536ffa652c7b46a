"""Feature-KD pair tables, forward hooks (capture window, checkpointing, wrappers) and the shape check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from sdkd.cli.errors import ConfigError
from sdkd.train.models.features import FeatureHooks, check_pairs, feature_pairs
from sdkd.train.models.sd_configs import SD15_UNET, SD21_BASE_UNET, SD21_UNET, SDXL_UNET
from sdkd.train.models.student_config import StudentConfig
from sdkd.train.models.students import PRESETS, SD, build_student, removal_spec, student_unet_config
from sdkd.train.models.toy import build_toy_pipeline

from test_students import SDXL_LIKE, SDXL_TINY

DOWN = [(f"down_blocks.{i}",) * 2 for i in range(4)]
UP = [(f"up_blocks.{j}",) * 2 for j in range(4)]
SHIFTED_UP = [(f"up_blocks.{j + 1}", f"up_blocks.{j}") for j in range(3)]
TABLES = {  # block-removal.md section 4
    ("bk_base", "bk"): DOWN + UP,
    ("bk_small", "bk"): DOWN + UP,
    ("bk_tiny", "bk"): DOWN[:2] + [("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out")]
    + SHIFTED_UP,
    ("bk_base", "segmind"): DOWN + [("mid_block", "mid_block")] + UP,
    ("bk_small", "segmind"): DOWN + UP,
    ("bk_tiny", "segmind"): DOWN[:2] + [("up_blocks.0", "down_blocks.2")] + SHIFTED_UP,
    # SDXS: bk_tiny's pairs (no output shape changes without the 320-ch attention), every Dn and Up block paired.
    ("sdxs", "bk"): DOWN[:2] + [("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out")]
    + SHIFTED_UP,
    ("sdxs", "segmind"): DOWN[:2] + [("up_blocks.0", "down_blocks.2")] + SHIFTED_UP,
}
TOY_LATENT = 16


def pairs_for(preset: str, table: str = "bk") -> list[tuple[str, str]]:
    cfg = StudentConfig(preset=preset, feature_pairs=table)
    return feature_pairs(cfg, removal_spec(cfg))


@pytest.fixture(scope="module")
def teacher():
    return build_toy_pipeline().unet.eval()


@pytest.fixture(scope="module")
def students(teacher):
    return {name: build_student(teacher, spec) for name, spec in PRESETS.items() if spec.family == SD}


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, TOY_LATENT, TOY_LATENT, generator=g), torch.tensor([500]),
            torch.randn(1, 7, 32, generator=g))


# ---------------------------------------------------------------------------------------------
# Pair tables


@pytest.mark.parametrize("preset, table", list(TABLES))
def test_pair_tables(preset, table):
    assert pairs_for(preset, table) == TABLES[(preset, table)]


def test_custom_specs_equal_to_presets_get_the_preset_pairs():
    for table in ("bk", "segmind"):
        cfg = StudentConfig(preset="custom", keep_down=[[0]] * 4, keep_up=[[0, 2]] * 4, mid_block=False,
                            deepest_stage=False, feature_pairs=table)
        assert feature_pairs(cfg, removal_spec(cfg)) == TABLES[("bk_tiny", table)]


def test_custom_pairs_are_taken_verbatim():
    cfg = StudentConfig(feature_pairs="custom", pairs=[["mid_block", "up_blocks.0"]])
    assert feature_pairs(cfg, PRESETS["bk_small"]) == [("mid_block", "up_blocks.0")]
    with pytest.raises(ConfigError, match=r"student\.pairs"):
        feature_pairs(StudentConfig(feature_pairs="custom"), PRESETS["bk_small"])


SD_DOWN = [(320, 32, 32), (640, 16, 16), (1280, 8, 8), (1280, 8, 8)]
SD_UP = [(1280, 16, 16), (1280, 32, 32), (640, 64, 64), (320, 64, 64)]


@pytest.mark.parametrize("unet, preset, table, latent, shapes", [
    (SD15_UNET, "bk_base", "bk", 64, SD_DOWN + SD_UP),
    (SD15_UNET, "bk_base", "segmind", 64, SD_DOWN + [(1280, 8, 8)] + SD_UP),
    (SD15_UNET, "bk_tiny", "bk", 64, SD_DOWN[:2] + [(1280, 16, 16)] + SD_UP[1:]),
    (SD15_UNET, "bk_tiny", "segmind", 64, SD_DOWN[:2] + [(1280, 16, 16)] + SD_UP[1:]),
    # SD-2.x: proj_out is a Linear on tokens, (HW, C).
    (SD21_BASE_UNET, "bk_tiny", "bk", 64, SD_DOWN[:2] + [(256, 1280)] + SD_UP[1:]),
    # 768 px: latent 96, every side x1.5.
    (SD21_UNET, "bk_small", "bk", 96, [(c, h * 3 // 2, w * 3 // 2) for c, h, w in SD_DOWN + SD_UP]),
])
def test_check_pairs_gives_the_reference_shapes_at_full_size(unet, preset, table, latent, shapes):
    student = student_unet_config(unet, PRESETS[preset])
    found = check_pairs(unet, student, pairs_for(preset, table), latent)
    assert [tuple(t) for t, _ in found] == shapes


def test_check_pairs_rejects_mismatched_and_unknown_pairs(teacher, students):
    with pytest.raises(ConfigError) as err:
        check_pairs(teacher, students["bk_tiny"],
                    [("down_blocks.0", "down_blocks.0"), ("down_blocks.2", "down_blocks.2")], TOY_LATENT)
    assert str(err.value) == ("feature pair 2 (teacher down_blocks.2 -> student down_blocks.2): "
                              "shapes (64, 2, 2) vs (64, 4, 4) differ")
    with pytest.raises(ConfigError, match=r"student feature pair module 'up_blocks.3' does not exist"):
        check_pairs(teacher, students["bk_tiny"], [("up_blocks.3", "up_blocks.3")], TOY_LATENT)


def test_check_pairs_on_an_sdxl_like_teacher():
    teacher = UNet2DConditionModel(**SDXL_LIKE)
    cfg = StudentConfig(preset="custom", keep_down=[[0], [0], [1]], keep_up=[[1, 2], [0, 2], [0, 2]],
                        mid_block=False, feature_pairs="segmind")
    spec = removal_spec(cfg)
    shapes = check_pairs(teacher, student_unet_config(teacher.config, spec), feature_pairs(cfg, spec), 16)
    assert [tuple(t) for t, _ in shapes] == [(32, 8, 8), (64, 4, 4), (64, 4, 4), (64, 8, 8), (64, 16, 16), (32, 16, 16)]


# ---------------------------------------------------------------------------------------------
# Hooks


@pytest.mark.parametrize("preset, table", list(TABLES))
def test_hooks_capture_paired_shapes_on_the_toy(teacher, students, preset, table):
    student, pairs = students[preset], pairs_for(preset, table)
    t_hooks, s_hooks = FeatureHooks(teacher, [t for t, _ in pairs]), FeatureHooks(student, [s for _, s in pairs])
    with torch.no_grad(), t_hooks.capture(), s_hooks.capture():
        teacher(*inputs())
        student(*inputs())
    real = [(t.shape[1:], s.shape[1:]) for t, s in zip(t_hooks.features, s_hooks.features)]
    assert all(t == s for t, s in real)
    assert real == check_pairs(teacher, student, pairs, TOY_LATENT)  # the meta check sees the real shapes
    t_hooks.remove(), s_hooks.remove()


def test_hooks_record_only_inside_capture(students):
    student = students["bk_small"]
    hooks = FeatureHooks(student, ["down_blocks.1", "up_blocks.3"])
    with pytest.raises(RuntimeError, match="capture"):
        _ = hooks.features
    with torch.no_grad(), hooks.capture():
        student(*inputs(0))
    kept = hooks.features
    with torch.no_grad():
        student(*inputs(1))  # outside capture(): nothing replaced
    assert all(a is b for a, b in zip(hooks.features, kept))
    with torch.no_grad(), hooks.capture():
        student(*inputs(1))
    assert not torch.equal(hooks.features[0], kept[0])
    hooks.remove()
    with torch.no_grad(), hooks.capture():
        student(*inputs(1))
    with pytest.raises(RuntimeError, match="did not run during capture.*down_blocks.1, up_blocks.3"):
        _ = hooks.features


def test_unknown_module_names_the_valid_blocks(students):
    with pytest.raises(ConfigError, match=r"'down_blocks.9' does not exist.*down_blocks.0, down_blocks.1, "
                                          r"down_blocks.2, up_blocks.0, up_blocks.1, up_blocks.2\)"):
        FeatureHooks(students["bk_tiny"], ["up_blocks.0", "down_blocks.9"])


def test_gradient_checkpointing_keeps_features_differentiable(teacher):
    student = build_student(teacher, PRESETS["bk_tiny"]).train()
    student.enable_gradient_checkpointing()
    pairs = pairs_for("bk_tiny")  # includes the proj_out pair inside an attention
    # Resnets run under checkpointing; backward re-runs them up to their last saved tensor, so
    # inner modules such as conv1 fire a second time.
    recomputed = "down_blocks.0.resnets.0.conv1"
    s_hooks = FeatureHooks(student, [s for _, s in pairs] + [recomputed])
    t_hooks = FeatureHooks(teacher, [t for t, _ in pairs])
    calls = []
    student.down_blocks[0].resnets[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad(), t_hooks.capture():
        teacher(*inputs())
    with s_hooks.capture():
        student(*inputs())
        first = s_hooks.features
        assert all(f.requires_grad for f in first)
        loss = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(first, t_hooks.features)) + first[-1].mean()
        loss.backward()  # inside capture(): the recomputation must not replace the recorded features
    assert len(calls) == 2
    assert all(a is b for a, b in zip(s_hooks.features, first))
    for module in (student.conv_in, student.down_blocks[2].attentions[0].proj_out, student.up_blocks[2].resnets[1]):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


class Wrapper(nn.Module):
    """Stands in for DDP: holds the model as `.module` and calls it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_hooks_on_the_inner_model_fire_through_a_wrapper(students):
    student = students["bk_base"]
    names = [s for _, s in pairs_for("bk_base", "segmind")]
    hooks = FeatureHooks(student, names)
    wrapped = Wrapper(student)
    with torch.no_grad(), hooks.capture():
        wrapped(*inputs())
    assert len(hooks.features) == len(names) == 9
    hooks.remove()
    with pytest.raises(TypeError, match="unwrapped"):
        FeatureHooks(nn.DataParallel(student), names)


# ---------------------------------------------------------------------------------------------
# SDXS-512 (student.preset=sdxs)


@pytest.mark.parametrize("unet, table, third", [
    (SD15_UNET, "bk", (1280, 16, 16)), (SD15_UNET, "segmind", (1280, 16, 16)),
    (SD21_BASE_UNET, "bk", (256, 1280)),  # linear proj_out: (HW, C)
    (SD21_BASE_UNET, "segmind", (1280, 16, 16)),
])
def test_sdxs_pairs_at_full_size(unet, table, third):
    student = student_unet_config(unet, PRESETS["sdxs"])
    found = check_pairs(unet, student, pairs_for("sdxs", table), 64)
    assert [tuple(t) for t, _ in found] == SD_DOWN[:2] + [third] + SD_UP[1:]


def test_custom_spec_without_attention_at_the_last_down_level_pairs_its_resnets():
    cfg = StudentConfig(preset="custom", keep_down=[[0], [0], [0], []], keep_up=[[], [0, 2], [0, 2], [0, 2]],
                        mid_block=False, deepest_stage=False, drop_attention=[0, 2])
    spec = removal_spec(cfg)
    pairs = feature_pairs(cfg, spec)
    assert pairs[2] == ("down_blocks.2.resnets.1", "down_blocks.2.resnets.0")
    found = check_pairs(SD15_UNET, student_unet_config(SD15_UNET, spec), pairs, 64)
    assert tuple(found[2][0]) == (1280, 16, 16)
    sdxs = StudentConfig(preset="custom", keep_down=cfg.keep_down, keep_up=cfg.keep_up, mid_block=False,
                         deepest_stage=False, drop_attention=[0])
    assert feature_pairs(sdxs, removal_spec(sdxs)) == TABLES[("sdxs", "bk")]


# ---------------------------------------------------------------------------------------------
# SDXL presets: block-level pairs (every student keeps the deepest stage and its levels' resolutions)


XL_DOWN, XL_UP = [(f"down_blocks.{i}",) * 2 for i in range(3)], [(f"up_blocks.{j}",) * 2 for j in range(3)]
SDXL_TABLES = {
    **{(preset, "bk"): XL_DOWN + XL_UP for preset in ("ssd1b", "vega", "koala_1b", "koala_700m")},
    # segmind pairs a kept mid block, also SSD-1B's and Vega's single resnet with the teacher's whole mid block.
    **{(preset, "segmind"): XL_DOWN + [("mid_block", "mid_block")] + XL_UP for preset in ("ssd1b", "vega", "koala_1b")},
    ("koala_700m", "segmind"): XL_DOWN + XL_UP,
}


@pytest.mark.parametrize("preset, table", list(SDXL_TABLES))
def test_sdxl_pair_tables(preset, table):
    assert pairs_for(preset, table) == SDXL_TABLES[(preset, table)]


@pytest.mark.slow  # SDXL widths (seconds each): full suite only, the fast tier stays under 3 minutes
def test_sdxl_pairs_at_full_size():
    student = student_unet_config(SDXL_UNET, PRESETS["ssd1b"])
    found = check_pairs(SDXL_UNET, student, pairs_for("ssd1b", "segmind"), 128)  # 1024 px
    assert [tuple(t) for t, _ in found] == [(320, 64, 64), (640, 32, 32), (1280, 32, 32), (1280, 32, 32),
                                            (1280, 64, 64), (640, 128, 128), (320, 128, 128)]


@pytest.mark.parametrize("preset", ["vega", "koala_700m"])
@pytest.mark.slow  # seconds of its own: the full suite runs it
def test_sdxl_hooks_capture_paired_shapes_on_a_tiny_teacher(preset):
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**SDXL_TINY).eval()
    student = build_student(teacher, PRESETS[preset]).eval()
    pairs = pairs_for(preset, "segmind")
    added = dict(text_embeds=torch.randn(1, 32), time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]))
    t_hooks, s_hooks = FeatureHooks(teacher, [t for t, _ in pairs]), FeatureHooks(student, [s for _, s in pairs])
    with torch.no_grad(), t_hooks.capture(), s_hooks.capture():
        teacher(*inputs(), added_cond_kwargs=added)
        student(*inputs(), added_cond_kwargs=added)
    real = [(t.shape[1:], s.shape[1:]) for t, s in zip(t_hooks.features, s_hooks.features)]
    assert all(t == s for t, s in real) and len(real) == len(pairs)
    assert real == check_pairs(teacher, student, pairs, SDXL_TINY["sample_size"])


# ---------------------------------------------------------------------------------------------
# Sub-block pairs (student.feature_pairs=sub_block): every resnet and attention output, as SSD-1B


def sub_block_pairs(preset: str, teacher_config) -> list[tuple[str, str]]:
    cfg = StudentConfig(preset=preset, feature_pairs="sub_block")
    return feature_pairs(cfg, removal_spec(cfg), teacher_config)


def sub_blocks(unet) -> list[str]:
    return [name for name, m in unet.named_modules() if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel")]


def test_sub_block_pairs_every_resnet_and_attention_of_the_toy_bk_small(teacher, students):
    pairs = sub_block_pairs("bk_small", teacher.config)
    # Toy teacher: 3 attention levels + 1 plain; bk_small keeps 1 resnet (+ attention) per down block (7 modules)
    # and 2 per up block (2 + 3 x 4 = 14), no mid block.
    assert len(pairs) == 21
    assert sorted(s for _, s in pairs) == sorted(sub_blocks(students["bk_small"]))
    # Each student module pairs with the teacher module its weights came from: up-block index 1 <- teacher 2.
    assert ("up_blocks.3.resnets.2", "up_blocks.3.resnets.1") in pairs
    assert ("up_blocks.1.attentions.2", "up_blocks.1.attentions.1") in pairs
    assert ("down_blocks.3.resnets.0", "down_blocks.3.resnets.0") in pairs
    t_hooks, s_hooks = FeatureHooks(teacher, [t for t, _ in pairs]), FeatureHooks(students["bk_small"],
                                                                                   [s for _, s in pairs])
    with torch.no_grad(), t_hooks.capture(), s_hooks.capture():
        teacher(*inputs())
        students["bk_small"](*inputs())
    real = [(t.shape[1:], s.shape[1:]) for t, s in zip(t_hooks.features, s_hooks.features)]
    assert all(t == s for t, s in real) and real == check_pairs(teacher, students["bk_small"], pairs, TOY_LATENT)
    # Just cut, the student's first resnet sees what the teacher's sees (conv_in is shared): equal output.
    # Further in, the removed modules change the input: the outputs differ.
    by_name = dict(zip([s for _, s in pairs], zip(t_hooks.features, s_hooks.features)))
    assert torch.equal(*by_name["down_blocks.0.resnets.0"])
    assert not torch.allclose(*by_name["up_blocks.3.resnets.1"])
    t_hooks.remove(), s_hooks.remove()


# block-removal.md section 4.3: SSD-1B's 26 sub-block terms, paired by identical index; its one mid resnet
# imitates the teacher's whole mid block.
SSD1B_SUB_BLOCKS = (
    [f"down_blocks.0.resnets.{k}" for k in (0, 1)]
    + [f"down_blocks.{i}.{kind}.{k}" for i in (1, 2) for kind in ("attentions", "resnets") for k in (0, 1)]
    + [f"up_blocks.{j}.{kind}.{k}" for j in (0, 1) for kind in ("attentions", "resnets") for k in (0, 1, 2)]
    + [f"up_blocks.2.resnets.{k}" for k in (0, 1, 2)])


@pytest.mark.slow  # SDXL widths (seconds each): full suite only, the fast tier stays under 3 minutes
@pytest.mark.parametrize("preset", ["ssd1b", "vega"])
def test_sub_block_pairs_of_ssd1b_and_vega_are_ssd1bs_26_at_sdxl_widths(preset):
    pairs = sub_block_pairs(preset, SDXL_UNET)
    assert len(pairs) == 26
    assert sorted(pairs) == sorted([(name, name) for name in SSD1B_SUB_BLOCKS] + [("mid_block", "mid_block.resnets.0")])
    student = student_unet_config(SDXL_UNET, PRESETS[preset])
    shapes = dict(zip(pairs, check_pairs(SDXL_UNET, student, pairs, 128)))  # 1024 px, on the meta device
    assert tuple(shapes[("mid_block", "mid_block.resnets.0")][0]) == (1280, 32, 32)
    assert tuple(shapes[("up_blocks.1.attentions.2", "up_blocks.1.attentions.2")][0]) == (640, 64, 64)
    assert tuple(shapes[("up_blocks.2.resnets.2", "up_blocks.2.resnets.2")][0]) == (320, 128, 128)


def test_sub_block_pairs_of_koala_keep_the_whole_mid_block_module_by_module():
    # koala_1b keeps the mid block with its attention (cut to 6 layers): its resnets and attention pair by name.
    pairs = sub_block_pairs("koala_1b", SDXL_UNET)
    assert [p for p in pairs if p[1].startswith("mid_block")] == [
        ("mid_block.attentions.0", "mid_block.attentions.0"), ("mid_block.resnets.0", "mid_block.resnets.0"),
        ("mid_block.resnets.1", "mid_block.resnets.1")]
    assert len(pairs) == 18 and len(sub_block_pairs("koala_700m", SDXL_UNET)) == 15  # one resnet per down level
    assert ("up_blocks.0.resnets.2", "up_blocks.0.resnets.1") in pairs
    check_pairs(SDXL_UNET, student_unet_config(SDXL_UNET, PRESETS["koala_1b"]), pairs, 128)


@pytest.mark.parametrize("preset", ["bk_tiny", "sdxs"])
def test_sub_block_pairs_without_the_deepest_stage_shift_the_up_blocks(preset, teacher, students):
    pairs = sub_block_pairs(preset, teacher.config)
    assert ("up_blocks.1.resnets.2", "up_blocks.0.resnets.1") in pairs
    assert sorted(s for _, s in pairs) == sorted(sub_blocks(students[preset]))
    # The highest-resolution level (student down_blocks.0, up_blocks.2): sdxs has no attention there.
    level0 = [s for _, s in pairs if ".attentions." in s and s.startswith(("down_blocks.0.", "up_blocks.2."))]
    assert len(level0) == (0 if preset == "sdxs" else 3)
    check_pairs(teacher, students[preset], pairs, TOY_LATENT)


def test_sub_block_features_stay_differentiable_under_gradient_checkpointing(teacher):
    student = build_student(teacher, PRESETS["bk_small"]).train()
    student.enable_gradient_checkpointing()  # every resnet runs inside a checkpoint
    names = [s for _, s in sub_block_pairs("bk_small", teacher.config)]
    hooks = FeatureHooks(student, names)
    with hooks.capture():
        student(*inputs())
    assert all(f.requires_grad for f in hooks.features)
    sum(f.float().pow(2).mean() for f in hooks.features).backward()
    assert all(p.grad is not None for p in student.down_blocks[0].resnets[0].parameters())
