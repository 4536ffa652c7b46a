"""The memory table's arithmetic (eval/bench/memory.py, eval/memory_table.py): counts on the meta device equal
the counts of the same models built for real, and each strategy's terms divide as its sharding does."""

from __future__ import annotations

import json

import pytest
import torch

from sdkd.cli.errors import UserError
from sdkd.eval.bench.memory import (
    STRATEGIES,
    Sizes,
    per_process_bytes,
    saved_activation_bytes,
    sizes,
    smallest_card,
)
from sdkd.train.models.students import PRESETS, student_unet_config
from sdkd.train.models.toy import TOY_UNET, TOY_XL_UNET


@pytest.mark.slow  # the real forward in bf16 on the CPU: seconds
@pytest.mark.parametrize("teacher, preset", [(TOY_UNET, "bk_small"), (TOY_XL_UNET, "vega")])
def test_meta_counts_equal_real_counts(teacher, preset):
    """Parameters, the largest wrap unit and the saved activations (with real tensors on the CPU) are what the
    meta device counts."""
    student = student_unet_config(teacher, PRESETS[preset])
    meta = sizes(student, teacher, 32, device="meta")
    real = sizes(student, teacher, 32, device="cpu")
    assert meta == real
    from diffusers import UNet2DConditionModel

    built = UNet2DConditionModel.from_config(student)
    assert real.student_params == sum(p.numel() for p in built.parameters())
    assert 0 < real.wrap_unit_params < real.student_params


def test_attention_saves_no_score_matrix():
    """Attention is counted as a fused kernel keeps it: all the toy saves weighs less than the (queries x keys)
    score matrix of its first attention, which the decomposed math path would keep."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(TOY_UNET)
    saved = saved_activation_bytes(unet, 1, 64)  # latent 32: the first level's attention has 1024 queries
    heads = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads
    assert saved < heads * 1024 * 1024 * 4  # fp32 scores, as the math path saves them


def test_each_strategy_divides_what_it_shards():
    p, t, unit, act = 1_000_000, 3_000_000, 50_000, 7_000
    s = Sizes("m", 64, p, t, unit, act, 0)
    fixed = 2 * t + act  # the bf16 teacher and the activations, on every process whatever the strategy
    gather = 2 * 8 * unit
    expected = {
        ("ddp", 1): 16 * p, ("ddp", 2): 20 * p, ("ddp", 8): 20 * p,
        ("fsdp", 2): 16 * p / 2 + gather, ("fsdp", 8): 16 * p / 8 + gather,
        ("fsdp_offload", 2): gather, ("fsdp_offload", 8): gather,
        ("zero2", 4): 4 * p + 12 * p / 4,
        ("zero3", 4): 16 * p / 4 + gather,
    }
    for (strategy, n), student in expected.items():
        terms = per_process_bytes(s, strategy, n)
        assert terms == {"student": student, "teacher": 2 * t, "activations": act, "total": student + fixed}, \
            (strategy, n)
    assert per_process_bytes(s, "ddp", 1, "adamw_8bit")["student"] == 10 * p
    assert per_process_bytes(s, "fsdp", 4, "adamw_8bit")["student"] == 10 * p / 4 + gather
    assert set(STRATEGIES) == {strategy for strategy, _ in expected}


def test_smallest_card():
    gib = 2**30
    assert [smallest_card(x * gib) for x in (1, 24, 24.01, 48, 79.9, 80.5)] == [24, 24, 48, 48, 80, None]


@pytest.mark.slow  # builds the SD-1.5-width student and teacher on meta: seconds
def test_table_command_for_bk_small(tmp_path, capsys):
    from sdkd.eval.memory_table import main

    main(["--models", "bk_small", "--json", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [(r["optimizer"], r["strategy"]) for r in rows] == [
        ("adamw", s) for s in STRATEGIES] + [("adamw_8bit", "ddp")]
    assert rows[0]["student_params"] == 482_346_884 and rows[0]["teacher_params"] == 859_520_964
    ddp = rows[0]["gib_per_process"]
    assert list(ddp) == ["1", "2", "4", "8"] and ddp["2"] > ddp["1"]  # DDP's buckets from 2 processes
    assert f"| bk_small 512 px | AdamW       | DDP                | {ddp['1']:.1f} (24)" in out


def test_unknown_model_is_one_line():
    from sdkd.eval.memory_table import main

    with pytest.raises(UserError, match="--models: unknown model 'sdxl'"):
        main(["--models", "sdxl"])
