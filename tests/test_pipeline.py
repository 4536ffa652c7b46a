"""sdkd's inference pipeline and eval/sample.py: both kinds of model, seeds, modes, LoRA, errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from sdkd.cli.errors import UserError
from sdkd.eval.inference.pipeline import load_pipeline, resolve_device_dtype
from sdkd.train import export as E
from sdkd.train.formats import model_files as M
from sdkd.train.models.students import PRESETS, build_student

from conftest import run_script


@pytest.fixture(scope="module")
def models(toy_teacher_dir, tmp_path_factory):
    """bk_tiny from the toy teacher: a diffusers folder and single files in both numberings."""
    root = tmp_path_factory.mktemp("pipeline_models")
    pipe = StableDiffusionPipeline.from_pretrained(toy_teacher_dir)
    pipe.unet = build_student(pipe.unet, PRESETS["bk_tiny"])
    pipe.save_pretrained(root / "folder", safe_serialization=True)
    out = {"folder": root / "folder"}
    for target in ("ldm", "sdcpp"):
        out[target] = E.export(str(root / "folder"), "single-file", str(root / f"{target}.safetensors"), target=target)
    return out


def images(pipe, **kw):
    kw = {"steps": 2, "seed": 7, "output_type": "np", **kw}
    return np.stack(pipe(kw.pop("prompt", ["a red fox", "a blue car"]), **kw))


def test_folder_and_both_single_files_give_the_same_images(models):
    ref = images(load_pipeline(models["folder"]))
    assert ref.shape == (2, 32, 32, 3)
    for kind in ("ldm", "sdcpp"):
        np.testing.assert_allclose(images(load_pipeline(models[kind])), ref, atol=1e-5)  # same weights


def test_seeds_reproducible_and_batch_invariant(models):
    pipe = load_pipeline(models["ldm"])
    a = images(pipe, prompt=["a", "b", "c"])
    np.testing.assert_array_equal(a, images(pipe, prompt=["a", "b", "c"]))
    np.testing.assert_allclose(a, images(pipe, prompt=["a", "b", "c"], batch_size=1), atol=1e-4)
    assert not np.allclose(a, images(pipe, prompt=["a", "b", "c"], seed=8))


def test_defaults_dpm_solver_and_one_step_mode(models):
    pipe = load_pipeline(models["folder"])
    assert type(pipe.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))]).__name__ == "AttnProcessor2_0"
    assert pipe.dtype == torch.float32  # CPU
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kw: calls.append(args[0].shape[0]), with_kwargs=True)
    pipe("a fox", steps=1, output_type="np")
    handle.remove()
    assert calls == [1]  # one U-Net call, no classifier-free-guidance batch
    assert pipe.pipe.scheduler.timesteps.tolist() == [999]


def test_negative_prompt_changes_images(models):
    pipe = load_pipeline(models["folder"])
    a = images(pipe, prompt=["a fox"])
    b = images(pipe, prompt=["a fox"], negative_prompt="blurry")
    assert not np.allclose(a, b)


def test_tiny_vae(models, tmp_path):
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1),
                    num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(tmp_path / "taesd")
    pipe = load_pipeline(models["folder"], tiny_vae=tmp_path / "taesd")
    assert isinstance(pipe.pipe.vae, AutoencoderTiny)
    out = images(pipe, prompt=["x"])
    assert out.shape[0] == 1 and out.shape[-1] == 3 and np.isfinite(out).all()


def _lora(unet_dir, folder):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


def test_lora(models, toy_teacher_dir, tmp_path):
    lora = _lora(models["folder"] / "unet", tmp_path / "lora_student")
    plain = images(load_pipeline(models["ldm"]), prompt=["a fox"])
    with_lora = images(load_pipeline(models["ldm"], lora=lora), prompt=["a fox"])
    assert not np.allclose(plain, with_lora)
    other = _lora(toy_teacher_dir / "unet", tmp_path / "lora_teacher")
    with pytest.raises(UserError, match="does not fit this model: it adapts"):
        load_pipeline(models["ldm"], lora=other)


def _to_q_weight(pipe) -> torch.Tensor:
    """The first self-attention query weight of `pipe`'s U-Net (the LoRA-wrapped layer's own weight, fused)."""
    module = next(m for name, m in pipe.pipe.unet.named_modules() if name.endswith("attn1.to_q"))
    return getattr(module, "base_layer", module).weight.detach().clone()


def test_lora_scale_multiplies_the_fused_change(models, tmp_path):
    """The LoRA moves the fused weights by `lora_scale` times its change: 0 leaves the plain weights, 0.5 half of
    what 1 moves them."""
    lora = _lora(models["folder"] / "unet", tmp_path / "lora")
    plain = _to_q_weight(load_pipeline(models["ldm"]))
    moved = {s: _to_q_weight(load_pipeline(models["ldm"], lora=lora, lora_scale=s)) - plain for s in (0.0, 0.5, 1.0)}
    assert moved[1.0].abs().max() > 1e-2
    assert moved[0.0].abs().max() < 1e-6
    assert torch.allclose(moved[0.5], 0.5 * moved[1.0], atol=1e-5)


def test_bad_inputs(models, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_pipeline(tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(64))
    with pytest.raises(UserError, match="not a readable"):
        load_pipeline(corrupt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(foreign))
    with pytest.raises(UserError, match="no sdkd metadata"):
        load_pipeline(foreign)
    # metadata of bk_tiny, tensors of something else: a file of an unknown layout
    meta = M.read_metadata(models["ldm"])
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(foreign), metadata=meta)
    with pytest.raises(UserError, match="do not match the layout"):
        load_pipeline(foreign)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(models["ldm"].read_bytes()[:-1000])
    with pytest.raises(UserError):
        load_pipeline(truncated)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a GPU"):
            resolve_device_dtype("auto", "fp16")


@pytest.mark.slow
def test_sample_cli(models, tmp_path):
    out = tmp_path / "samples"
    r = run_script([sys.executable, "eval/sample.py", "--model", str(models["sdcpp"]), "--prompt", "a fox",
                    "--prompt", "a car", "--steps", "2", "--seed", "3", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["image-000.png", "image-001.png"]
    assert (out / "samples.json").is_file()
    if not torch.cuda.is_available():
        r = run_script([sys.executable, "eval/sample.py", "--model", str(models["ldm"]), "--prompt", "x",
                        "--dtype", "fp16", "--out", str(tmp_path / "fp16")])
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1].startswith("error: --dtype fp16 needs a GPU")
