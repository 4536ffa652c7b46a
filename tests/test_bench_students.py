"""eval/bench_students.py: the SDXL presets against their teacher at toy widths, every printed figure checked
against one computed here on real (not meta) models; the real-width counts against the reference's."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from sdkd.cli.errors import UserError
from sdkd.eval.bench.students import configs, size
from sdkd.eval.bench.timing import unet_inputs, unet_macs
from sdkd.eval.bench_students import main
from sdkd.train.models.sd_configs import SDXL_UNET
from sdkd.train.models.students import PRESETS, build_student
from sdkd.train.models.toy import TOY_XL_DEPTHS_UNET

from conftest import run_script

SDXL_PRESETS = ["ssd1b", "vega", "koala_1b", "koala_700m"]


@pytest.mark.e2e  # a run of the command / SDXL-width counts: full suite only
def test_sdxl_presets_at_toy_widths_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    r = run_script([sys.executable, "eval/bench_students.py", "--family", "sdxl", "--widths", "toy",
                    "--macs-resolution", "64", "--resolution", "32", "--repeats", "2", "--threads", "1",
                    "--cpu-time", "--json", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(r.stdout[r.stdout.index("\n{") + 1:]) == report  # the printed JSON is the written one
    assert (report["threads"], report["timer"], report["macs_resolution"], report["resolution"]) == (
        1, "process CPU time", 64, 32)
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["teacher", *SDXL_PRESETS]

    # Independently: the toy SDXL teacher at SDXL's depths, built for real, and each student cut from it.
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**TOY_XL_DEPTHS_UNET)
    unets = {"teacher": teacher} | {name: build_student(teacher, PRESETS[name]) for name in SDXL_PRESETS}
    cpu = torch.device("cpu")
    for name, unet in unets.items():
        params = sum(p.numel() for p in unet.parameters())
        macs = unet_macs(unet, 64, 8, cpu, torch.float32)
        row = rows[name]
        assert (row["unet_params"], row["unet_gmacs"]) == (params, macs / 1e9), name
        assert row["params_ratio"] == params / rows["teacher"]["unet_params"]
        assert row["macs_ratio"] == row["unet_gmacs"] / rows["teacher"]["unet_gmacs"]
        assert row["cpu_ratio"] == row["cpu_ms"] / rows["teacher"]["cpu_ms"]
        assert f"| {name:<10} | {params:,} " in r.stdout  # the table prints the same count
        if name != "teacher":  # a student does less work than its teacher, and the timing shows it
            assert params < rows["teacher"]["unet_params"] and row["cpu_ms"] < rows["teacher"]["cpu_ms"], name
    assert "1 threads, process CPU time" in r.stdout


@pytest.mark.slow  # SDXL depths built and counted twice (seconds): full suite only, the fast tier stays under 3 minutes
def test_macs_on_the_cpu_count_attention_as_on_the_meta_device():
    """The fused CPU attention kernel has no FlopCounterMode formula: counted as it runs, its score and value
    products would be lost (the toy SDXL teacher: 74.8M instead of 79.2M at 32 px)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TOY_XL_DEPTHS_UNET)
    with torch.device("meta"):
        meta = UNet2DConditionModel(**TOY_XL_DEPTHS_UNET)
    cpu = unet_macs(unet, 32, 2, torch.device("cpu"), torch.float32)
    assert cpu == unet_macs(meta, 32, 2, torch.device("meta"), torch.float32)
    sample, t, cond = unet_inputs(unet, 1, 32, 2, torch.device("cpu"), torch.float32)
    with FlopCounterMode(display=False) as fused, torch.no_grad():  # the default backend, counted as it runs
        unet(sample, t, **cond)
    assert fused.get_total_flops() // 2 < cpu


@pytest.mark.e2e  # a run of the command / SDXL-width counts: full suite only
def test_real_sdxl_widths_match_the_reference_counts():
    """sdxl-and-scale.md 1.1: U-Net parameters and GMACs per call at 1024 px (FlopCounterMode on meta)."""
    expected = {"teacher": (2_567_463_684, 3380.6), "ssd1b": (1_331_334_404, 2103.9), "vega": (745_225_604, 1411.2),
                "koala_1b": (1_161_184_324, 1715.9), "koala_700m": (782_822_724, 1350.8)}
    for name, config in configs(dict(SDXL_UNET), SDXL_PRESETS).items():
        params, macs = size(config, 1024)
        assert (params, round(macs / 1e9, 1)) == expected[name], name


def test_a_student_can_share_its_teachers_tensors():
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**TOY_XL_DEPTHS_UNET)
    held = {p.data_ptr() for p in teacher.parameters()}
    shared = build_student(teacher, PRESETS["vega"], share=True)
    assert all(p.data_ptr() in held for p in shared.parameters())
    assert not any(p.data_ptr() in held for p in build_student(teacher, PRESETS["vega"]).parameters())


@pytest.mark.parametrize("args, message", [
    (["--presets", "bk_small"], "--presets: 'bk_small' is not a preset of family sdxl"),
    (["--family", "sd", "--presets", "vega"], "--presets: 'vega' is not a preset of family sd"),
    (["--resolution", "100"], "--resolution: must be a positive multiple of 8, got 100"),
])
def test_bad_arguments_are_one_line(args, message):
    with pytest.raises(UserError, match=message):
        main(args)
