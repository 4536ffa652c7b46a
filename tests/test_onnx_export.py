"""--format onnx (train/formats/onnx_export.py): onnxruntime on the CPU reproduces PyTorch's U-Net and tiny
decoder within fp32 tolerance at another batch and size than the traced ones; weights past the threshold go to
one external-data file; train/export.py refuses bad requests in one line."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import AutoencoderTiny, UNet2DConditionModel

from sdkd.cli.errors import UserError
from sdkd.train import export as E
from sdkd.train.formats.onnx_export import DECODER_FILE, INFO_FILE, OPSET, UNET_FILE, export_onnx, unet_example
from sdkd.train.models.students import PRESETS, build_student, student_unet_config
from sdkd.train.models.toy import TOY_XL_DEPTHS_UNET, build_random_pipeline, build_toy_pipeline

from conftest import run_script, save_toy_student

# optimum validates exported U-Nets at 1e-4 (fp32, CPU); the toy students' outputs are O(1).
ATOL = 1e-4


def tiny_vae() -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)


def one_level_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                cross_attention_dim=8, attention_head_dim=4, mid_block_type=None)


def onnx_unet_error(unet, folder, batch: int, latent: int) -> float:
    """Max abs difference between onnxruntime's U-Net in `folder` and PyTorch's, on fresh inputs."""
    inputs = unet_example(unet, batch, latent, seed=1)
    session = ort.InferenceSession(str(folder / UNET_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    ours = session.run(None, {name: t.numpy() for name, t in inputs.items()})[0]
    with torch.no_grad():
        theirs = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                      added_cond_kwargs={k: inputs[k] for k in list(inputs)[3:]} or None).sample
    assert ours.shape == tuple(theirs.shape)
    return float(np.abs(ours - theirs.numpy()).max())


def test_sdxs_student_and_tiny_decoder_match_pytorch(tmp_path):
    unet = build_student(build_toy_pipeline().unet, PRESETS["sdxs"]).eval()
    vae = tiny_vae().eval()
    export_onnx(unet, vae, tmp_path)
    assert onnx_unet_error(unet, tmp_path, batch=2, latent=8) < ATOL  # traced at batch 1, 16x16
    latent = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(str(tmp_path / DECODER_FILE), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        image = vae.decode(latent).sample.numpy()
    assert np.abs(session.run(None, {"latent_sample": latent.numpy()})[0] - image).max() < ATOL
    info = json.loads((tmp_path / INFO_FILE).read_text())
    assert info["opset"] == OPSET and info["dtype"] == "float32"
    assert list(info["files"]["unet"]["inputs"]) == ["sample", "timestep", "encoder_hidden_states"]
    assert info["files"]["unet"]["inputs"]["sample"]["dims"] == ["batch", 4, "height", "width"]
    assert info["files"]["vae_decoder"]["outputs"]["sample"]["dims"] == ["batch", 3, "height", "width"]
    assert info["files"]["unet"]["external_data"] is None and not (tmp_path / (UNET_FILE + ".data")).exists()


@pytest.mark.slow  # the toy SDXL U-Net's trace and check: ~3 s
def test_sdxl_student_with_added_conditioning_matches_pytorch(tmp_path):
    pipe = build_random_pipeline(student_unet_config(TOY_XL_DEPTHS_UNET, PRESETS["vega"]), widths="toy_xl")
    export_onnx(pipe.unet, pipe.vae, tmp_path)  # a KL VAE: no decoder file
    assert onnx_unet_error(pipe.unet.eval(), tmp_path, batch=3, latent=8) < ATOL
    info = json.loads((tmp_path / INFO_FILE).read_text())
    assert list(info["files"]) == ["unet"] and not (tmp_path / DECODER_FILE).exists()
    assert list(info["files"]["unet"]["inputs"]) == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                     "time_ids"]


def test_weights_past_the_threshold_go_to_one_external_file(tmp_path):
    unet = one_level_unet().eval()
    export_onnx(unet, None, tmp_path / "inline")
    export_onnx(unet, None, tmp_path / "external", external_above=1000)
    inline, external = tmp_path / "inline", tmp_path / "external"
    assert sorted(p.name for p in inline.iterdir()) == [INFO_FILE, UNET_FILE]
    assert sorted(p.name for p in external.iterdir()) == [INFO_FILE, UNET_FILE, UNET_FILE + ".data"]
    info = json.loads((external / INFO_FILE).read_text())["files"]["unet"]
    assert info["external_data"] == UNET_FILE + ".data" and info["weight_bytes"] > 1000
    graph = onnx.load(str(external / UNET_FILE), load_external_data=False).graph
    assert graph.initializer and all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    where = [{kv.key: kv.value for kv in t.external_data} for t in graph.initializer]
    assert {w["location"] for w in where} == {UNET_FILE + ".data"}  # one file for all
    assert max(int(w["offset"]) + int(w["length"]) for w in where) == (external / (UNET_FILE + ".data")).stat().st_size
    assert onnx_unet_error(unet, external, batch=2, latent=4) < ATOL


def test_export_refuses_bad_onnx_requests(tmp_path):
    student = save_toy_student(tmp_path / "student", "bk_tiny")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    a_file = tmp_path / "file.onnx"
    a_file.write_text("x")
    tiny_vae().save_pretrained(tmp_path / "decoder")
    cases = [
        ([str(student), "--out", str(taken)], "already exists"),
        ([str(student), "--out", str(a_file), "--overwrite"], "is a file"),
        ([str(student), "--out", str(tmp_path / "o"), "--half"], "--half"),
        ([str(student), "--out", str(tmp_path / "o"), "--target", "sdcpp"], "--target applies"),
        ([str(tmp_path / "decoder"), "--out", str(tmp_path / "o")], "not a run folder"),  # no U-Net in it
    ]
    for args, expected in cases:
        with pytest.raises(UserError, match=expected):
            E.main([*args, "--format", "onnx"])
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a Python start for one line
def test_export_refusal_is_one_line(tmp_path):
    r = run_script([sys.executable, "train/export.py", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "o"),
                    "--half"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--half" in r.stderr
