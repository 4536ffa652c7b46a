"""eval/gpu_check.py's tiny mode, which it takes by itself without a CUDA GPU: one JSON file with every figure."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdkd.cli.errors import UserError


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow  # the toy through inference (compiled too), two KD-step variants: tens of seconds
@pytest.mark.skipif(torch.cuda.is_available(), reason="without --tiny a CUDA machine runs the full GPU check")
def test_tiny_mode_writes_every_figure(tmp_path):
    from sdkd.eval.gpu_check import main

    main(["--out", str(tmp_path)])  # no --tiny: chosen because there is no CUDA GPU
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["tiny"] is True and report["device"] == "cpu" and positive(report["seconds"])
    assert report["mode"]["resolution"] == 32 and report["mode"]["compile_backend"] == "eager"

    rows = report["inference"]
    assert [(r["layout"], r["compile"], r["decoder"]) for r in rows] == [
        (layout, compiled, decoder) for layout in ("bk_tiny", "sdxs") for compiled in (False, True)
        for decoder in ("full", "tiny")]
    for r in rows:
        for key in ("unet_params", "first_unet_call_s", "unet_ms_per_step", "unet_peak_mem_mb",
                    "latency_ms_per_image", "images_per_s", "peak_mem_mb"):
            assert positive(r[key]), (r["layout"], r["compile"], r["decoder"], key)
        assert r["images_per_s"] == pytest.approx(1e3 / r["latency_ms_per_image"])
        assert r["compile_backend"] == ("eager" if r["compile"] else None)
        assert (r["steps"], r["guidance"]) == ((2, 7.5) if r["layout"] == "bk_tiny" else (1, 0.0))
    for layout in ("bk_tiny", "sdxs"):
        mine = [r for r in rows if r["layout"] == layout]
        assert len({r["unet_params"] for r in mine}) == 1  # one student, compiled or not, either decoder
        for compiled in (False, True):  # one U-Net timing per student and compile setting, shared by the decoders
            assert len({r["unet_ms_per_step"] for r in mine if r["compile"] == compiled}) == 1
    assert rows[0]["unet_params"] > rows[-1]["unet_params"]  # SDXS drops bk_tiny's 320-channel attention

    kd = report["kd_step"]
    assert [r["latent_cache"] for r in kd] == [True, False]
    for r in kd:
        assert r["mixed_precision"] == "bf16" and r["steps_timed"] == 2
        assert positive(r["seconds_per_step"]) and positive(r["peak_mem_mb"])

    ds = report["deepspeed_zero2"]
    assert ds["steps"] == 20 and ds["zero_stage"] == 2 and ds["processes"] == 1
    assert ds["skipped"] in ("deepspeed is not installed (pip install deepspeed)",
                             "DeepSpeed ZeRO-2 needs a CUDA GPU; this machine has none")


def test_out_that_is_a_file_is_one_line(tmp_path):
    from sdkd.eval.gpu_check import main

    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match=r"^--out '.*f' is a file, not a folder$"):
        main(["--out", str(tmp_path / "f")])
