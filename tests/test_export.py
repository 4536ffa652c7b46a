"""Export: diffusers folders, single files in both numberings, read back by the real consumers.

Toy widths cover every layout and source kind (same code paths as SD-1.5 widths), and the SD-2.x
traits (linear projections, OpenCLIP text-encoder names) at toy widths. The `sd15` tests build one
SD-1.5- and one SD-2.1-base-width teacher with random weights (fp16, one at a time: 2 GB each), derive
the students from it by the weight map, and hand them to diffusers `from_single_file` (--target ldm)
and to stable-diffusion.cpp through cyllama (--target sdcpp), in this one process.
"""

from __future__ import annotations

import gc
import json
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file

from sdkd.cli.errors import UserError
from sdkd.train import export as E
from sdkd.train.formats import ldm_layout as L
from sdkd.train.formats import model_files as M
from sdkd.train.models.sd_configs import SD15_UNET, SD21_BASE_UNET, SDXL_UNET, SDXS_TYPES
from sdkd.train.models.students import PRESETS, build_student, student_unet_config
from sdkd.train.models.toy import TOY_SD2_UNET, TOY_UNET, TOY_XL_DEPTHS_UNET, build_random_pipeline

from conftest import run_script

LAYOUTS = ["teacher", "bk_base", "bk_small", "bk_tiny", "sdxs"]
BASE_UNETS = {"toy": TOY_UNET, "toy_sd2": TOY_SD2_UNET, "sd15": SD15_UNET, "sd21": SD21_BASE_UNET}


def layout_pipeline(layout: str, teacher_dir=None, widths: str = "toy") -> StableDiffusionPipeline:
    """A pipeline of `layout`: students built from the toy teacher folder; otherwise random weights at
    `widths` (toy, toy_sd2, sd15 or sd21: SD-2.1-base)."""
    if teacher_dir is not None and layout in PRESETS:
        pipe = StableDiffusionPipeline.from_pretrained(teacher_dir)
        pipe.unet = build_student(pipe.unet, PRESETS[layout])
        if layout == "sdxs":  # an SDXS file carries a tiny VAE (sd.cpp forces TAESD for this layout)
            pipe.vae = AutoencoderTiny()
        return pipe
    if teacher_dir is not None and layout == "teacher":
        return StableDiffusionPipeline.from_pretrained(teacher_dir)
    base = BASE_UNETS[widths]
    config = dict(base) if layout == "teacher" else student_unet_config(
        base, PRESETS["bk_tiny" if layout == "sdxs" else layout])
    if layout == "sdxs":
        config.update(SDXS_TYPES)
    return build_random_pipeline(config, widths=widths, tiny_vae=layout == "sdxs")


@pytest.fixture(scope="module")
def layout_dirs(toy_teacher_dir, tmp_path_factory):
    """Every layout at toy widths as a diffusers pipeline folder."""
    root = tmp_path_factory.mktemp("layouts")
    dirs = {}
    for layout in LAYOUTS:
        layout_pipeline(layout, toy_teacher_dir).save_pretrained(root / layout, safe_serialization=True)
        dirs[layout] = root / layout
    return dirs


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


# ---------------------------------------------------------------------------------------------
# diffusers folders


def test_diffusers_export_is_contiguous_with_model_card(layout_dirs, tmp_path):
    out = E.export(str(layout_dirs["bk_tiny"]), "diffusers", str(tmp_path / "out"))
    for f in out.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            assert all(st.get_tensor(k).is_contiguous() for k in st.keys())
    card = (out / "README.md").read_text()
    assert "bk_tiny" in card and "U-Net parameters" in card and "library_name: diffusers" in card
    reloaded = StableDiffusionPipeline.from_pretrained(out)
    assert_same_state(reloaded.unet, UNet2DConditionModel.from_pretrained(layout_dirs["bk_tiny"] / "unet"))


def test_diffusers_export_half(layout_dirs, tmp_path):
    out = E.export(str(layout_dirs["bk_small"]), "diffusers", str(tmp_path / "half"), half=True)
    for f in out.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float16}, f


# ---------------------------------------------------------------------------------------------
# single files


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ldm_single_file_reads_back_in_diffusers(layout, layout_dirs, tmp_path):
    folder = E.export(str(layout_dirs[layout]), "diffusers", str(tmp_path / "folder"))
    file = E.export(str(layout_dirs[layout]), "single-file", str(tmp_path / "model.safetensors"), target="ldm")
    unet = UNet2DConditionModel.from_single_file(str(file), config=str(folder), subfolder="unet",
                                                 local_files_only=True)
    assert_same_state(unet, UNet2DConditionModel.from_pretrained(layout_dirs[layout] / "unet"))


def test_ldm_single_file_whole_pipeline_in_diffusers(layout_dirs, tmp_path):
    folder = E.export(str(layout_dirs["bk_small"]), "diffusers", str(tmp_path / "folder"))
    file = E.export(str(layout_dirs["bk_small"]), "single-file", str(tmp_path / "m.safetensors"))
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True,
                                                    safety_checker=None)
    ref = StableDiffusionPipeline.from_pretrained(layout_dirs["bk_small"])
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(pipe, name), getattr(ref, name))


@pytest.mark.parametrize("layout, target", [(layout, target) for layout in LAYOUTS for target in L.NUMBERINGS
                                             if not (target == "sdcpp" and layout in ("bk_base", "bk_small"))])
def test_single_file_metadata_rebuilds_the_pipeline(layout, target, layout_dirs, tmp_path):
    """(bk_base / bk_small are refused for sdcpp: tested below.)"""
    file = E.export(str(layout_dirs[layout]), "single-file", str(tmp_path / "m.safetensors"), target=target)
    meta = M.read_metadata(file)
    assert meta["sdkd.numbering"] == target
    assert json.loads(meta["sdkd.unet_config"])["block_out_channels"] == json.loads(
        (layout_dirs[layout] / "unet" / "config.json").read_text())["block_out_channels"]
    pipe = M.load_single_file(file)
    ref = StableDiffusionPipeline.from_pretrained(layout_dirs[layout])
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(pipe, name), getattr(ref, name))
    assert pipe.tokenizer("a cat").input_ids == ref.tokenizer("a cat").input_ids


@pytest.mark.parametrize("target", L.NUMBERINGS)
@pytest.mark.parametrize("layout", ["teacher", "bk_tiny"])
def test_sd2_single_file_round_trips(layout, target, tmp_path):
    """SD-2.x traits at toy widths: linear proj_in/proj_out stay 2-D, the text encoder is written in
    OpenCLIP names (q/k/v fused into in_proj), and our loader gets every tensor back."""
    pipe = layout_pipeline(layout, widths="toy_sd2")
    file = M.export_single_file(M.Source(pipe, "test"), tmp_path / "m.safetensors", target=target)
    with safe_open(str(file), framework="pt") as st:
        keys = set(st.keys())
        proj_in = st.get_tensor(L.UNET_PREFIX + "input_blocks.1.1.proj_in.weight")
        in_proj = st.get_tensor(L.OPENCLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight")
    assert proj_in.dim() == 2 and in_proj.shape == (3 * 32, 32)
    assert L.OPENCLIP_PREFIX + "token_embedding.weight" in keys
    assert not [k for k in keys if k.startswith("cond_stage_model.transformer.")]
    ours = M.load_single_file(file)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(ours, name), getattr(pipe, name))
    assert L.unet_layout(ours.unet.config) == layout and L.family(ours.unet.config) == "sd2"


def test_sdcpp_file_uses_teacher_slots(layout_dirs, tmp_path):
    file = E.export(str(layout_dirs["bk_tiny"]), "single-file", str(tmp_path / "t.safetensors"), target="sdcpp")
    with safe_open(str(file), framework="pt") as st:
        keys = set(st.keys())
    p = L.UNET_PREFIX
    assert p + "output_blocks.2.1.conv.weight" in keys and p + "output_blocks.5.2.conv.weight" in keys
    assert p + "output_blocks.0.1.proj_in.weight" in keys  # up-block-0 attention, as sd.cpp wants it
    assert p + "input_blocks.4.0.in_layers.0.weight" in keys and p + "input_blocks.2.0.in_layers.0.weight" not in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert L.VAE_PREFIX + "decoder.up.0.block.0.conv1.weight" in keys


@pytest.mark.parametrize("layout", ["bk_base", "bk_small"])
def test_sdcpp_export_refused_and_no_file(layout, layout_dirs, tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(L.UnsupportedLayout, match=f"cannot run '{layout}'"):
        E.export(str(layout_dirs[layout]), "single-file", str(out), target="sdcpp")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_sdcpp_export_refused_cli_one_line(layout_dirs, tmp_path):
    out = tmp_path / "x.safetensors"
    r = run_script([sys.executable, "train/export.py", str(layout_dirs["bk_small"]), "--format", "single-file",
                    "--target", "sdcpp", "--out", str(out)])
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stable-diffusion.cpp cannot run") and "bk_tiny" in last and "--target ldm" in last
    assert not list(tmp_path.iterdir())


def test_half_single_file(layout_dirs, tmp_path):
    file = E.export(str(layout_dirs["bk_tiny"]), "single-file", str(tmp_path / "h.safetensors"), half=True)
    with safe_open(str(file), framework="pt") as st:
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float16}


# ---------------------------------------------------------------------------------------------
# sources: run folders and checkpoints


@pytest.fixture
def run_dir(toy_teacher_dir, tmp_path):
    """A run folder as the trainer leaves it (config.yaml, metrics.jsonl, checkpoint-5 with unet_ema/)."""
    run = tmp_path / "run"
    ckpt = run / "checkpoint-5"
    teacher = StableDiffusionPipeline.from_pretrained(toy_teacher_dir).unet
    student = build_student(teacher, PRESETS["bk_tiny"])
    student.save_pretrained(ckpt / "unet")
    ema = EMAModel(student.parameters(), model_cls=UNet2DConditionModel, model_config=student.config)
    for p in ema.shadow_params:
        p.data.add_(0.5)
    ema.save_pretrained(str(ckpt / "unet_ema"))
    (ckpt / "trainer_state.json").write_text('{"step": 5, "files": {}}')  # complete: lists no files to check
    (run / "config.yaml").write_text(f"teacher: {toy_teacher_dir}\noutput_dir: {run}\nstudent:\n  preset: bk_tiny\n"
                                     f"train:\n  max_steps: 5\n  batch_size: 2\nema:\n  enabled: true\n")
    (run / "metrics.jsonl").write_text('{"step": 5, "loss": 0.25, "task": 0.1}\n')
    return run


@pytest.mark.slow
def test_export_run_folder_ema_and_checkpoint(run_dir, tmp_path):
    plain = M.load_source(run_dir)
    ema = M.load_source(run_dir, ema=True)
    delta = (ema.pipe.unet.conv_in.weight - plain.pipe.unet.conv_in.weight).abs().mean()
    assert torch.isclose(delta, torch.tensor(0.5))
    r = run_script([sys.executable, "train/export.py", str(run_dir / "checkpoint-5"), "--format", "diffusers",
                    "--ema", "--out", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "bk_tiny" in card and "train.max_steps" in card and "unet_ema" in card and "loss" in card
    assert "teacher's" in card  # parameter ratio against the teacher
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    assert_same_state(reloaded, ema.pipe.unet)


def test_export_errors(layout_dirs, run_dir, tmp_path):
    cases = [
        (["missing-folder", "--format", "diffusers", "--out", str(tmp_path / "o")], "not found"),
        ([str(layout_dirs["bk_tiny"]), "--format", "single-file", "--out", str(tmp_path / "o.bin")], ".safetensors"),
        ([str(layout_dirs["bk_tiny"]), "--format", "diffusers", "--target", "sdcpp", "--out", str(tmp_path / "o")],
         "--target applies"),
        ([str(layout_dirs["bk_tiny"]), "--format", "diffusers", "--ema", "--out", str(tmp_path / "o")], "--ema"),
        ([str(tmp_path), "--format", "diffusers", "--out", str(tmp_path / "o")], "not a run folder"),
    ]
    for args, expected in cases:
        with pytest.raises(UserError, match=expected.replace(".", r"\.")):
            E.main(args)
    (run_dir / "checkpoint-5" / "unet_ema").rename(run_dir / "checkpoint-5" / "gone")
    with pytest.raises(UserError, match="no EMA weights"):
        M.load_source(run_dir, ema=True)


# ---------------------------------------------------------------------------------------------
# SD-1.5 / SD-2.1-base widths against the real consumers


@pytest.fixture(scope="module")
def sd_teacher():
    """`sd_teacher(widths)`: a random teacher of widths sd15 or sd21 in fp16 (what the tests export), built
    once and held one at a time (the tests of one widths run in a row)."""
    held = {}

    def teacher(widths: str) -> StableDiffusionPipeline:
        if widths not in held:
            held.clear()
            gc.collect()
            held[widths] = build_random_pipeline(BASE_UNETS[widths], widths=widths, dtype=torch.float16)
        return held[widths]

    yield teacher
    held.clear()
    gc.collect()


def student_of(teacher: StableDiffusionPipeline, layout: str) -> StableDiffusionPipeline:
    """The teacher itself, or a student of `layout` by the weight map around the teacher's text encoder and
    VAE (sdxs: a tiny VAE, as an SDXS file carries; sd.cpp forces TAESD for this layout)."""
    if layout == "teacher":
        return teacher
    parts = {k: getattr(teacher, k) for k in ("text_encoder", "tokenizer", "scheduler", "vae")}
    if layout == "sdxs":
        parts["vae"] = AutoencoderTiny().half()
    return StableDiffusionPipeline(**parts, unet=build_student(teacher.unet, PRESETS[layout]), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.mark.sd15
def test_sd15_ldm_file_reads_back_in_diffusers(sd_teacher, tmp_path):
    """Real widths, the layout sd.cpp cannot run: diffusers from_single_file gets the exact weights."""
    pipe = student_of(sd_teacher("sd15"), "bk_small")
    file = M.export_single_file(M.Source(pipe, "test"), tmp_path / "m.safetensors", target="ldm", half=True)
    pipe.unet.save_config(tmp_path / "folder" / "unet")  # all from_single_file reads of a diffusers folder here
    unet = UNet2DConditionModel.from_single_file(str(file), config=str(tmp_path / "folder"), subfolder="unet",
                                                 local_files_only=True, torch_dtype=torch.float16)
    assert_same_state(unet, pipe.unet)
    del unet, pipe
    gc.collect()


@pytest.mark.sd15
@pytest.mark.parametrize("layout, widths, version", [
    # sdxs: the SDXS-512 student (student.preset=sdxs) of a teacher, one step at cfg scale 1
    ("teacher", "sd15", "SD 1.x"), ("bk_tiny", "sd15", "SD 1.x Tiny UNet"), ("sdxs", "sd15", "SDXS (512-DS)"),
    # SD-2.1-base: OpenCLIP-H text encoder (23 layers, as diffusers ships it; sd.cpp skips the 24th),
    # linear projections, 64-dim heads
    ("teacher", "sd21", "SD 2.x"), ("bk_tiny", "sd21", "SD 2.x Tiny UNet"),
])
def test_sd15_sdcpp_file_generates_in_stable_diffusion_cpp(layout, widths, version, sd_teacher, tmp_path):
    sd = pytest.importorskip("cyllama.sd", reason="cyllama (stable-diffusion.cpp binding) not installed: "
                                                  "pip install -e '.[sdcpp]'")
    pipe = student_of(sd_teacher(widths), layout)
    if layout == "sdxs":
        assert sum(p.numel() for p in pipe.unet.parameters()) == 315_746_244
    file = M.export_single_file(M.Source(pipe, "test"), tmp_path / f"{layout}-{widths}.safetensors",
                                target="sdcpp", half=True)
    del pipe
    gc.collect()
    logs = []
    sd.set_log_callback(lambda level, message: logs.append(str(message)))
    try:
        params = sd.SDContextParams(model_path=str(file), n_threads=2, vae_decode_only=True)
        with sd.SDContext(params) as ctx:
            images = ctx.generate("a red fox", width=64, height=64, seed=1, sample_steps=1, cfg_scale=1.0)
    finally:
        sd.set_log_callback(None)
    assert len(images) == 1 and images[0].to_numpy().shape == (64, 64, 3)
    detected = [m for m in logs if "Version:" in m]
    assert detected and detected[0].split("Version:")[1].strip() == version, detected
    # our own pipeline loads the same file
    ours = M.load_single_file(file)
    assert L.unet_layout(ours.unet.config) == layout
    assert L.family(ours.unet.config) == ("sd2" if widths == "sd21" else "sd1")
    assert ours.text_encoder.config.hidden_size == (1024 if widths == "sd21" else 768)
    assert isinstance(ours.vae, AutoencoderTiny) == (layout == "sdxs")
    del ours
    gc.collect()


# ---------------------------------------------------------------------------------------------
# The SDXS-512 student (student.preset=sdxs) at SD-1.5 widths


def sdcpp_sd1_version(flat: dict) -> str:
    """stable-diffusion.cpp's version detection for an SD-1.x single file (export-sdcpp.md section 2.1)."""
    p = L.UNET_PREFIX
    assert any(k.startswith(p + "input_blocks.") for k in flat)  # is_unet
    assert flat[L.CLIP_PREFIX + "embeddings.token_embedding.weight"].shape[1] == 768  # SD-1 family
    if any(k.startswith(p + "middle_block.1.") for k in flat):
        return "SD 1.x"
    return "SD 1.x Tiny UNet" if any(k.startswith(p + "output_blocks.7.1") for k in flat) else "SDXS (512-DS)"


def test_sdxs_student_at_sd15_widths_exports_an_sdxs_file(monkeypatch):
    """What --target sdcpp writes for an SD-1.5-width sdxs student with a tiny VAE, built on the meta device (names
    and shapes, no weights, nothing written): the SDXS-512-DS slots of export-sdcpp.md section 1.2, the names sd.cpp
    tells SDXS by, the TAESD decoder sd.cpp forces for it, and metadata that names the layout."""
    from sdkd.train.models import toy

    monkeypatch.setattr(toy, "_random_init", lambda module, seed, dtype: module)  # stays on meta
    monkeypatch.setattr(L, "_contiguous", lambda t: t)
    config = student_unet_config(SD15_UNET, PRESETS["sdxs"])
    pipe = build_random_pipeline(config, widths="sd15", tiny_vae=True)
    assert L.check_sdcpp(dict(pipe.unet.config), vae_tiny=True) == []  # what export checks first: no warnings
    flat, meta = M.single_file_state(pipe, "sdcpp")
    p = L.UNET_PREFIX
    unet = [k[len(p):].split(".") for k in flat if k.startswith(p)]
    assert sorted({int(k[1]) for k in unet if k[0] == "input_blocks"}) == [0, 1, 3, 4, 6, 7]
    assert not [k for k in unet if k[:3] in (["input_blocks", "1", "1"], ["output_blocks", "6", "1"],
                                             ["output_blocks", "7", "1"]) or k[0] == "middle_block"]
    assert sorted({(int(k[1]), int(k[2])) for k in unet if k[0] == "output_blocks"}) == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1), (5, 2), (6, 0), (7, 0)]
    assert sum(flat[p + ".".join(k)].numel() for k in unet) == 315_746_244
    assert sdcpp_sd1_version(flat) == "SDXS (512-DS)"
    assert flat[L.VAE_PREFIX + "decoder.layers.18.weight"].shape == (3, 64, 3, 3)  # TAESD's last conv
    assert L.unet_layout(json.loads(meta["sdkd.unet_config"])) == "sdxs"
    assert (meta["sdkd.numbering"], meta["sdkd.vae_class"]) == ("sdcpp", "AutoencoderTiny")


# ---------------------------------------------------------------------------------------------
# SDXL: the SGM single file (A1111, ComfyUI), and SSD-1B / Vega in stable-diffusion.cpp

SDXL_LAYOUTS = ["teacher", "ssd1b", "vega", "koala_1b", "koala_700m"]
XL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def xl_pipeline(layout: str, widths: str = "toy_xl", dtype: torch.dtype = torch.float32):
    """An SDXL pipeline of `layout` with random weights: SDXL's blocks and depths at toy widths (toy_xl), or at
    SDXL's own (sdxl)."""
    base = TOY_XL_DEPTHS_UNET if widths == "toy_xl" else SDXL_UNET
    config = base if layout == "teacher" else student_unet_config(base, PRESETS[layout])
    return build_random_pipeline(config, widths=widths, dtype=dtype)


def sdcpp_sdxl_version(keys: set[str]) -> str:
    """stable-diffusion.cpp's version detection for a file with two text encoders (export-sdcpp.md section 2.1)."""
    p = L.UNET_PREFIX
    assert any(k.startswith(p + "input_blocks.") for k in keys) and any(k.startswith("conditioner.embedders.1")
                                                                          for k in keys)
    if any(k.startswith(p + "middle_block.1.") for k in keys):
        return "SDXL"
    has_311 = any(k.startswith(p + "output_blocks.3.1.transformer_blocks.1") for k in keys)
    return "SDXL (SSD1B)" if has_311 else "SDXL (Vega)"


@pytest.mark.parametrize("layout", SDXL_LAYOUTS)
def test_sdxl_single_file_reads_back_in_diffusers(layout, tmp_path):
    """The SGM layout: diffusers' own reader of A1111/ComfyUI SDXL files gets every tensor of every part back,
    and so does ours (from the file alone)."""
    pipe = xl_pipeline(layout)
    assert L.unet_layout(dict(pipe.unet.config)) == layout  # SDXL layouts are named by structure, never "sdxs"
    pipe.save_pretrained(tmp_path / "folder", safe_serialization=True)
    file = M.export_single_file(M.Source(pipe, "test"), tmp_path / "m.safetensors", target="ldm")
    with safe_open(str(file), framework="pt") as st:
        keys = set(st.keys())
        projection = st.get_tensor("conditioner.embedders.1.model.text_projection")
    assert {L.UNET_PREFIX + "label_emb.0.0.weight", L.UNET_PREFIX + "label_emb.0.2.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"} <= keys
    assert not [k for k in keys if k.startswith("cond_stage_model.")]
    assert torch.equal(projection, pipe.text_encoder_2.text_projection.weight.T)  # OpenCLIP multiplies x @ P
    theirs = StableDiffusionXLPipeline.from_single_file(str(file), config=str(tmp_path / "folder"),
                                                        local_files_only=True)
    ours = M.load_single_file(file)
    for name in XL_PARTS:
        assert_same_state(getattr(theirs, name), getattr(pipe, name))
        assert_same_state(getattr(ours, name), getattr(pipe, name))
    assert ours.tokenizer_2("a cat").input_ids == pipe.tokenizer_2("a cat").input_ids


@pytest.mark.parametrize("layout", ["teacher", "ssd1b", "vega"])
def test_sdxl_sdcpp_file_has_the_names_sdcpp_detects(layout, tmp_path):
    """--target sdcpp for the SDXL layouts sd.cpp runs: upsamplers after the attention (as the SDXL script writes
    them), the names sd.cpp tells SDXL, SSD-1B and Vega apart by; ours reads every tensor back."""
    pipe = xl_pipeline(layout)
    file = M.export_single_file(M.Source(pipe, "test"), tmp_path / "m.safetensors", target="sdcpp")
    with safe_open(str(file), framework="pt") as st:
        keys = set(st.keys())
    p = L.UNET_PREFIX
    assert {p + "output_blocks.2.2.conv.weight", p + "output_blocks.5.2.conv.weight"} <= keys
    assert sdcpp_sdxl_version(keys) == {"teacher": "SDXL", "ssd1b": "SDXL (SSD1B)", "vega": "SDXL (Vega)"}[layout]
    ours = M.load_single_file(file)
    for name in XL_PARTS:
        assert_same_state(getattr(ours, name), getattr(pipe, name))


@pytest.mark.parametrize("layout", ["koala_1b", "koala_700m"])
def test_sdxl_sdcpp_export_refused_in_one_line(layout, tmp_path):
    pipe = xl_pipeline(layout)
    with pytest.raises(L.UnsupportedLayout) as err:
        M.export_single_file(M.Source(pipe, "test"), tmp_path / "x.safetensors", target="sdcpp")
    message = str(err.value)
    assert "\n" not in message and f"cannot run '{layout}' (SDXL)" in message
    assert "SSD-1B and Vega" in message and "--target ldm" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.sdxl
@pytest.mark.parametrize("layout, version", [("ssd1b", "SDXL (SSD1B)"), ("vega", "SDXL (Vega)")])
def test_sdxl_students_generate_in_stable_diffusion_cpp(layout, version, tmp_path):
    """SSD-1B and Vega at SDXL's widths (random fp16 weights, CLIP-L and OpenCLIP-bigG: about 4.5 GB for SSD-1B)
    in the sd.cpp of cyllama: the single file and its q4_0 GGUF (`--format gguf`, under 60% of the fp16 weights'
    bytes) each detected as what they are, one 64 px image in one step; for SSD-1B also a LoRA on the U-Net and
    both text encoders, converted for sd.cpp, of which sd.cpp applies every tensor. (One test for both files: the
    model is built once.)"""
    sd = pytest.importorskip("cyllama.sd", reason="cyllama (stable-diffusion.cpp binding) not installed: "
                                                  "pip install -e '.[sdcpp]'")
    from sdkd.train.formats import lora_io
    from sdkd.train.formats.lora_config import LoraSection

    from test_lora import randomize_b

    pipe = xl_pipeline(layout, widths="sdxl", dtype=torch.float16)
    assert sum(p.numel() for p in pipe.unet.parameters()) == {"ssd1b": 1_331_334_404, "vega": 745_225_604}[layout]
    file = M.export_single_file(M.Source(pipe, "test"), tmp_path / f"{layout}.safetensors", target="sdcpp",
                                half=True)
    pytest.importorskip("gguf", reason="gguf not installed: pip install -e '.[gguf]'")
    from sdkd.train.formats import gguf_export

    q4 = gguf_export.export_gguf(M.Source(pipe, "test"), tmp_path / "q4_0.gguf", "q4_0", compare_size=0)
    f16_bytes = sum(p.numel() * 2 for name in XL_PARTS for p in getattr(pipe, name).parameters())
    assert q4.file_bytes < 0.6 * f16_bytes  # Vega's: 50% of its f16 file
    loras = []
    if layout == "ssd1b":
        text = {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2")}
        lora_io.add_adapters(pipe.unet, text, LoraSection(rank=4, alpha=8, train_text_encoder=True))
        randomize_b(pipe.unet, *text.values(), std=0.05)
        lora_file = lora_io.save_lora(tmp_path / "lora", pipe.unet, text)
        loras = [lora_io.export_sdcpp(lora_file, tmp_path / "lora_sdcpp.safetensors")]
        names = load_file(loras[0])
        assert {k.split("_")[1] for k in names} == {"unet", "te1", "te2"}
    del pipe
    gc.collect()
    logs = []
    sd.set_log_callback(lambda level, message: logs.append(str(message)))
    try:
        images = []
        runs = [(file, []), *([(file, loras)] if loras else []), (q4.path, [])]
        for model, applied in runs:  # a context each (two generations in one segfaulted)
            params = sd.SDContextParams(model_path=str(model), n_threads=2, vae_decode_only=True)
            with sd.SDContext(params) as ctx:
                gen = sd.SDImageGenParams(prompt="a red fox", width=64, height=64, seed=1, sample_steps=1,
                                          cfg_scale=1.0)
                if applied:
                    gen.set_loras([{"path": str(f), "multiplier": 1.0} for f in applied])
                images.append(ctx.generate_with_params(gen)[0].to_numpy().astype(np.float32))
    finally:
        sd.set_log_callback(None)
    assert images[0].shape == images[-1].shape == (64, 64, 3)
    detected = [m.split("Version:")[1].strip() for m in logs if "Version:" in m]
    assert detected == [version] * len(runs), detected
    if loras:
        n = len(names)
        applied = [m for m in logs if "LoRA tensors have been applied" in m]
        assert applied and f"({n} / {n})" in applied[0], applied
        assert np.abs(images[1] - images[0]).mean() > 1.0
