"""GGUF export for stable-diffusion.cpp (train/export.py --format gguf, train/formats/gguf_export.py).

Toy widths: every tensor's GGML type read back with gguf's GGUFReader against sd.cpp's converter rules, the values
read back, the command's checks. The `sd15` test hands `bk_tiny` and the SDXS-512 layout at SD-1.5 widths (random
fp16 weights) to stable-diffusion.cpp through cyllama in q8_0 and q4_0 (and the f16 file each is compared with);
the `sdxl` one SSD-1B and Vega in q4_0.
"""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

from sdkd.cli.errors import UserError
from sdkd.train import export as E
from sdkd.train.formats import gguf_export as G
from sdkd.train.formats import ldm_layout as L
from sdkd.train.formats import model_files as M
from sdkd.train.models.sd_configs import SD15_UNET, SDXS_TYPES
from sdkd.train.models.students import PRESETS, student_unet_config
from sdkd.train.models.toy import build_random_pipeline

from test_export import layout_pipeline, xl_pipeline

gguf = pytest.importorskip("gguf", reason="gguf not installed: pip install -e '.[gguf]'")
T = gguf.GGMLQuantizationType
ONE_STEP = {"steps": 1, "guidance_scale": 0.0}


def read_back(file) -> dict[str, tuple]:
    """Each tensor of a GGUF file: (GGML type, torch-order shape, values dequantised to float32)."""
    from gguf.quants import dequantize

    out = {}
    for t in gguf.GGUFReader(file).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        out[t.name] = (t.tensor_type, shape, dequantize(t.data, t.tensor_type).reshape(shape))
    return out


def expected_type(name: str, shape: tuple, quant) -> T:
    """sd.cpp's converter rules (reference sdxl-and-scale.md section 2.2), with 1-D tensors F32."""
    if len(shape) == 1:
        return T.F32
    if (quant == T.F16 or shape[-1] % 32 or name.endswith((".bias", ".scale"))
            or any(part in name for part in ("time_embed.", "label_emb.", "embedding"))):
        return T.F16
    return quant


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q5_1", "f16"])
def test_gguf_types_follow_sdcpp_and_values_read_back(quant, tmp_path):
    """A toy bk_tiny (KL VAE, CLIP text encoder) in each type: the sdcpp single file's tensor names, shapes and
    metadata; Linear weights in the chosen type, convolutions (rows of 3 or 1), the timestep MLP, embeddings and
    biases F16 or F32 as sd.cpp's converter leaves them; every value within the type's rounding of the original."""
    pipe = layout_pipeline("bk_tiny", widths="toy")
    result = G.export_gguf(M.Source(pipe, "test"), tmp_path / "m.gguf", quant, compare_size=0)
    flat, meta = M.single_file_tensors(M.Source(pipe, "test"), "sdcpp")
    back = read_back(result.path)
    assert set(back) == set(flat)
    qtype = T[quant.upper()]
    for name, (ttype, shape, values) in back.items():
        ref = flat[name].float().numpy()
        assert shape == tuple(ref.shape), name
        assert ttype == expected_type(name, shape, qtype), name
        tol = {T.F32: 0, T.F16: 1e-3, T.Q8_0: 1 / 127, T.Q5_1: 1 / 31, T.Q4_0: 1 / 7}[ttype]
        # a block's error is within its step: the block's max magnitude over the type's levels
        assert np.abs(values - ref).max() <= tol * np.abs(ref).max() + 1e-7, name
    p = L.UNET_PREFIX
    types = {name: t for name, (t, _, _) in back.items()}
    assert types[p + "input_blocks.0.0.weight"] == T.F16  # conv_in
    assert types[p + "input_blocks.1.1.proj_in.weight"] == T.F16  # SD-1's 1x1 conv projection
    assert types[p + "time_embed.0.weight"] == T.F16
    assert types[L.CLIP_PREFIX + "embeddings.token_embedding.weight"] == T.F16
    assert types[p + "input_blocks.1.1.transformer_blocks.0.norm1.weight"] == T.F32
    assert types[p + "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.bias"] == T.F32
    for linear in (p + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                   L.CLIP_PREFIX + "encoder.layers.0.mlp.fc1.weight"):
        assert types[linear] == (T.F16 if quant == "f16" else qtype)
    assert result.types == {t.name: list(types.values()).count(t) for t in set(types.values())}
    assert result.file_bytes == result.path.stat().st_size
    fields = gguf.GGUFReader(result.path).fields
    assert fields["sdkd.numbering"].contents() == "sdcpp"
    assert L.unet_layout(json.loads(fields["sdkd.unet_config"].contents())) == "bk_tiny"


def test_gguf_sdxl_names_sdcpp_keeps(tmp_path):
    """SSD-1B at toy widths: SDXL's size and pooled-text MLP (label_emb) stays F16, the U-Net's Linear weights are
    quantised, the toy OpenCLIP encoder's fused q/k/v (24-value rows, not whole 32-value blocks) is not."""
    result = G.export_gguf(M.Source(xl_pipeline("ssd1b"), "test"), tmp_path / "xl.gguf", "q8_0", compare_size=0)
    types = {name: t for name, (t, _, _) in read_back(result.path).items()}
    p = L.UNET_PREFIX
    assert types[p + "label_emb.0.0.weight"] == types[p + "label_emb.0.2.weight"] == T.F16
    assert types["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] == T.F16
    assert types["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"] == T.F32
    assert types[p + "output_blocks.3.1.transformer_blocks.1.attn1.to_q.weight"] == T.Q8_0


def test_gguf_sd2_linear_projections_are_quantised(tmp_path):
    """SD-2 at toy widths: its linear projections are quantised, OpenCLIP's position embedding is not."""
    result = G.export_gguf(M.Source(layout_pipeline("teacher", widths="toy_sd2"), "test"), tmp_path / "sd2.gguf",
                           "q4_0", compare_size=0)
    types = {name: t for name, (t, _, _) in read_back(result.path).items()}
    assert types[L.UNET_PREFIX + "input_blocks.1.1.proj_in.weight"] == T.Q4_0
    assert types[L.OPENCLIP_PREFIX + "positional_embedding"] == T.F16


@pytest.fixture(scope="module")
def model_dirs(toy_teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_models")
    for layout in ("bk_tiny", "bk_base"):
        layout_pipeline(layout, toy_teacher_dir).save_pretrained(root / layout, safe_serialization=True)
    return root


def test_export_gguf_command_prints_size_and_checks_its_flags(model_dirs, tmp_path, capsys):
    """The command: size and types printed; without a comparison it says why (--compare-size 0, or an sd.cpp that
    cannot load toy widths). Refused in one line, nothing written: an unknown --quant, --quant or --compare-size
    on another format, a --compare-size not a multiple of 64, --half, a path not ending .gguf, a layout sd.cpp has
    no model for, an existing file without --overwrite."""
    src, out = str(model_dirs / "bk_tiny"), tmp_path / "m.gguf"
    E.main([src, "--format", "gguf", "--quant", "q4_0", "--out", str(out), "--compare-size", "0"])
    printed = capsys.readouterr().out
    assert f"wrote {out} (q4_0)" in printed and "Q4_0" in printed
    assert f"size: {out.stat().st_size / 1e6:,.1f} MB" in printed
    assert "image difference against the f16 file: not measured, not asked for (--compare-size 0)" in printed
    assert read_back(out)[L.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"][0] == T.Q4_0
    cases = [
        (["--quant", "q3_k"], "--quant must be one of q8_0, q5_0, q5_1, q4_0, f16, got 'q3_k'"),
        (["--quant", "q8_0", "--format", "single-file"], "--quant applies to --format gguf only"),
        (["--compare-size", "64", "--format", "single-file"], "--compare-size applies to --format gguf only"),
        (["--half"], "--half: --format gguf sets its tensor types with --quant"),
        (["--compare-size", "100"], "--compare-size must be 0 (no comparison) or a positive multiple of 64"),
        (["--out", str(tmp_path / "x.safetensors")], "give a path ending in .gguf"),
        ([], "already exists; choose another path or pass --overwrite"),
    ]
    for extra, expected in cases:
        args = [src, "--format", "gguf", "--out", str(out), *extra]
        if "--format" in extra:
            args = [src, "--out", str(tmp_path / "y.safetensors"), *extra]
        with pytest.raises(UserError, match=expected.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
            E.main(args)
    with pytest.raises(UserError) as err:
        E.main([str(model_dirs / "bk_base"), "--format", "gguf", "--out", str(tmp_path / "base.gguf")])
    assert "\n" not in str(err.value) and "stable-diffusion.cpp cannot run 'bk_base'" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    pytest.importorskip("cyllama.sd", reason="cyllama not installed")
    E.main([src, "--format", "gguf", "--out", str(out), "--overwrite", "--compare-size", "64"])
    printed = capsys.readouterr().out
    assert "not measured, the stable-diffusion.cpp of cyllama could not run the files" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the f16 file is gone


def test_image_difference():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 48
    psnr, mean_abs = G.image_difference(b, a)
    assert mean_abs == 1.0 and psnr == pytest.approx(10 * np.log10(255**2 / 48))
    assert G.image_difference(a, a) == (float("inf"), 0.0)


# ---------------------------------------------------------------------------------------------
# stable-diffusion.cpp at SD-1.5 and SDXL widths


def sdcpp_version(sd, file) -> str:
    """The model version stable-diffusion.cpp detects in `file` (it generates one 64 px image to tell)."""
    logs = []
    sd.set_log_callback(lambda level, message: logs.append(str(message)))
    try:
        params = sd.SDContextParams(model_path=str(file), n_threads=2, vae_decode_only=True)
        with sd.SDContext(params) as ctx:
            image = ctx.generate("a red fox", width=64, height=64, seed=1, sample_steps=1, cfg_scale=1.0)[0]
    finally:
        sd.set_log_callback(None)
    assert image.to_numpy().shape == (64, 64, 3)
    detected = [m for m in logs if "Version:" in m]
    return detected[0].split("Version:")[1].strip()


def exported(pipe, tmp_path, quants) -> dict[str, G.GgufExport]:
    """`pipe` as GGUF files in `quants`, each compared in sd.cpp (64 px, one step) with its f16 file; one table row
    each on stdout (docs/export.md's table: `pytest -s`)."""
    results = {}
    for quant in quants:
        result = G.export_gguf(M.Source(pipe, "test", sampling=ONE_STEP), tmp_path / f"{quant}.gguf", quant,
                               compare_size=64, n_threads=2)
        c = result.comparison
        assert c is not None, result.not_compared
        print(f"| {L.unet_layout(dict(pipe.unet.config))} | {quant} | {result.file_bytes / 1e6:,.0f} MB | "
              f"{result.file_bytes / c.f16_bytes:.0%} | {c.psnr:.1f} dB | {c.mean_abs:.2f} |")
        results[quant] = result
    return results


@pytest.mark.sd15
@pytest.mark.parametrize("layout, version", [("bk_tiny", "SD 1.x Tiny UNet"), ("sdxs", "SDXS (512-DS)")])
def test_sd15_gguf_generates_in_stable_diffusion_cpp(layout, version, tmp_path):
    """SD-1.5 widths (random fp16 weights): the q8_0 and q4_0 files and the f16 file each is compared with load in
    sd.cpp, are told apart as the layout they are, and generate; each is smaller than f16, q4_0 than q8_0, and
    q8_0's image is nearer the f16 file's than q4_0's."""
    sd = pytest.importorskip("cyllama.sd", reason="cyllama (stable-diffusion.cpp binding) not installed: "
                                                  "pip install -e '.[sdcpp]'")
    config = student_unet_config(SD15_UNET, PRESETS["bk_tiny"])
    if layout == "sdxs":
        config.update(SDXS_TYPES)
    pipe = build_random_pipeline(config, widths="sd15", tiny_vae=layout == "sdxs", dtype=torch.float16)
    results = exported(pipe, tmp_path, ["q8_0", "q4_0"])
    del pipe
    gc.collect()
    q8, q4 = results["q8_0"], results["q4_0"]
    assert q4.file_bytes < q8.file_bytes < q8.comparison.f16_bytes
    assert q8.comparison.psnr > q4.comparison.psnr
    assert q4.types["Q4_0"] == q8.types["Q8_0"] > 100
    assert sdcpp_version(sd, q4.path) == version
