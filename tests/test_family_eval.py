"""SDXL folders through evaluation, at toy widths: eval/sample.py, eval/evaluate.py on a model folder, the demo page's
handler and the training sample grid each sample with the family's pipeline, and what reaches the U-Net is the
family's conditioning (both text encoders, the pooled projection, time ids of the requested size, uncropped);
under fp16 the VAE stays fp32, as the family keeps it. (evaluate.py on an SDXL KD run: tests/test_family_e2e.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderTiny

from sdkd.train.models.families import SDXL, prompt_batch
from sdkd.train.models.toy import build_toy_xl_pipeline

from conftest import sampled, size_ids

A, B = "a red circle on a blue background", "a white triangle on a black background"


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl_teacher")
    build_toy_xl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def family_cond(folder, prompts: list[str], size: int):
    from sdkd.train.models.teacher import load_teacher

    parts = load_teacher(str(folder), with_unet=False)
    with torch.no_grad():
        return SDXL.encode(parts, prompt_batch(prompts, size))


def test_sample_command_conditions_on_the_requested_size(xl, tmp_path, unet_calls):
    from PIL import Image

    from sdkd.eval.sample import main

    def sample(prompt, *more):
        main(["--model", str(xl), "--prompt", prompt, "--steps", "2", "--height", "48", "--width", "32",
              "--seed", "5", "--out", str(tmp_path), "--overwrite", *more])
        with Image.open(tmp_path / "image-000.png") as im:
            return im.convert("RGB")

    image = sample(A, "--negative-prompt", "blurry")
    assert image.size == (32, 48)  # width, height
    record = json.loads((tmp_path / "samples.json").read_text())
    assert (record["height"], record["width"], record["negative_prompt"]) == (48, 32, "blurry")
    calls = list(unet_calls)
    assert len(calls) == 2 and all(c["shape"] == (2, 4, 24, 16) for c in calls)  # [negative, prompt] x 2 steps
    for call in calls:
        assert call["time_ids"].tolist() == [size_ids(48, 32)] * 2
    # Both text encoders' hidden states and the second's pooled projection, as training conditions on them.
    cond = family_cond(xl, ["blurry", A], 48)
    assert torch.allclose(calls[0]["hidden"], cond.hidden_states, atol=1e-5)
    assert torch.allclose(calls[0]["text_embeds"], cond.added["text_embeds"], atol=1e-5)
    assert sample(A, "--negative-prompt", "blurry").tobytes() == image.tobytes()  # run again: the same image
    assert sample(B, "--negative-prompt", "blurry").tobytes() != image.tobytes()
    assert sample(A).tobytes() != image.tobytes()


def test_fp16_keeps_the_vae_fp32(xl, monkeypatch):
    """--dtype fp16 (on CPU here: the device check is bypassed) runs the text encoders and the U-Net in fp16 and
    the VAE in fp32, its family's rule; a tiny VAE takes fp16."""
    from sdkd.eval.inference import pipeline as inference

    monkeypatch.setattr(inference, "resolve_device_dtype", lambda device, dtype: (torch.device("cpu"), torch.float16))
    pipe = inference.load_pipeline(xl, dtype="fp16")
    models = pipe.pipe.components
    assert {name: models[name].dtype for name in SDXL.models} == {
        "unet": torch.float16, "vae": torch.float32, "text_encoder": torch.float16, "text_encoder_2": torch.float16}
    decoded = []
    pipe.pipe.vae.decoder.conv_out.register_forward_hook(lambda m, args, out: decoded.append(out.dtype))
    half = pipe([A], steps=2, seed=0, guidance_scale=3.0, output_type="pt")[0]
    assert decoded == [torch.float32] and half.isfinite().all()
    full = inference.load_pipeline(xl, device="cpu")([A], steps=2, seed=0, guidance_scale=3.0, output_type="pt")[0]
    assert (half.float() - full).abs().mean() < 0.02  # the same image, up to fp16 rounding

    vae = AutoencoderTiny(latent_channels=4, decoder_block_out_channels=(8, 8, 8, 8),
                          encoder_block_out_channels=(8, 8, 8, 8))
    inference.cast_models(pipe.pipe, torch.float16)
    pipe.pipe.vae = vae
    inference.cast_models(pipe.pipe, torch.float16)
    assert vae.dtype == torch.float16 and pipe.pipe.unet.dtype == torch.float16


def test_training_grid_conditions_on_its_resolution(xl, unet_calls):
    from sdkd.train.engine.sampling import sample_images
    from sdkd.train.models.teacher import load_teacher

    parts = load_teacher(str(xl))
    unet = parts.components["unet"]
    grid = lambda prompt, **kw: sample_images(unet, parts, [prompt], 3, 2, 4.0, 48, **kw)[0]  # noqa: E731
    image = grid(A)
    assert image.size == (48, 48)
    assert len(unet_calls) == 2 and all(c["time_ids"].tolist() == [size_ids(48, 48)] * 2 for c in unet_calls)
    cond = family_cond(xl, [A], 48)
    assert torch.allclose(unet_calls[0]["text_embeds"][1:], cond.added["text_embeds"], atol=1e-5)
    assert grid(A).tobytes() == image.tobytes() and grid(B).tobytes() != image.tobytes()
    # Under autocast (bf16 on CPU here) the VAE, which its family keeps fp32 under fp16, still decodes in fp32.
    decoded = []
    parts.components["vae"].decoder.conv_out.register_forward_hook(lambda m, args, out: decoded.append(out.dtype))
    grid(A, autocast=lambda: torch.autocast("cpu", torch.bfloat16))
    assert decoded == [torch.float32]


def test_evaluate_a_model_folder_against_its_teacher(xl, tmp_path, unet_calls):
    from safetensors.torch import load_file

    from sdkd.eval.evaluate import main
    from sdkd.train.formats.model_files import save_pipeline
    from sdkd.train.models.students import RemovalSpec, build_student
    from sdkd.train.models.teacher import load_teacher

    cut = RemovalSpec(keep_down=((0,), (0,), (0,)), keep_up=((0, 2), (0, 2), (0, 2)), mid_block=False)  # bk_small's
    student = save_pipeline(build_student(load_teacher(str(xl)).unet, cut), str(xl), tmp_path / "student")
    out = tmp_path / "eval"
    main([str(student), "--teacher", str(xl), "--config", "configs/eval_toy.yaml", "--out", str(out), "steps=2",
          f"prompts=[{A}, {B}]", "latency.enabled=false", "agreement.teacher_steps=2", "agreement.timesteps=2"])
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["teacher", "student"]
    assert rows[0]["noise_mse"] == 0 and rows[1]["noise_mse"] > 0 and rows[1]["sample_mse"] > 0
    assert 0 < rows[1]["unet_macs"] < rows[0]["unet_macs"]
    from PIL import Image

    with Image.open(out / "images" / "student" / "00001.png") as im:
        assert im.size == (32, 32)
    calls = sampled(unet_calls)
    assert len(calls) > 8 and all(c["time_ids"].tolist() == [size_ids(32, 32)] * len(c["time_ids"]) for c in calls)
    # The held-out triples: the teacher's conditioning of its prompts at the evaluation's size.
    triples = load_file(out / "eval_triples.safetensors")
    cond = family_cond(xl, [A], 32)
    assert triples["cond.time_ids"].tolist() == [size_ids(32, 32)] * 4  # 2 prompts x 2 timesteps
    assert torch.allclose(triples["cond.text_embeds"][0], cond.added["text_embeds"][0], atol=1e-5)


def test_demo_handler_shows_an_sdxl_model(xl, tmp_path, unet_calls):
    from sdkd.eval.page.layout import build_page
    from sdkd.eval.page.models import generate, load_model

    model = load_model("xl", str(xl), tmp_path, steps=2, guidance=3.0)
    assert "32 px" in model.describe()
    (handler,) = [function.fn for function in build_page([model]).fns.values()]
    unet_calls.clear()  # the warm-up image
    *_, (image, line) = handler(A, "blurry", 4, 2, 3.0)
    assert image.size == (32, 32) and "2 steps · guidance 3" in line
    assert len(unet_calls) == 2 and all(c["time_ids"].tolist() == [size_ids(32, 32)] * 2 for c in unet_calls)
    cond = family_cond(xl, ["blurry", A], 32)
    assert torch.allclose(unet_calls[0]["text_embeds"], cond.added["text_embeds"], atol=1e-5)
    assert generate(model, A, "blurry", seed=4).image.tobytes() == image.tobytes()
    assert generate(model, B, "blurry", seed=4).image.tobytes() != image.tobytes()
