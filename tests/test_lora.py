"""LoRA pieces (train/formats/lora_io.py): targets on every student layout, the diffusers file, layout errors,
checkpoint state with EMA, the stable-diffusion.cpp file (names here, its command train/convert_lora.py;
sd.cpp itself at SD-1.5 widths)."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from sdkd.cli.errors import UserError
from sdkd.train.formats import ldm_layout, lora_io
from sdkd.train.formats.lora_config import LoraSection
from sdkd.train.models.sd_configs import SD15_UNET, SDXS_TYPES
from sdkd.train.models.students import PRESETS, build_student, student_unet_config
from sdkd.train.models.toy import TOY_UNET, TOY_XL_DEPTHS_UNET, build_random_pipeline, build_toy_pipeline


def toy_pipe(layout: str):
    pipe = build_toy_pipeline()
    if layout in PRESETS:
        pipe.unet = build_student(pipe.unet, PRESETS[layout])
    elif layout == "sdxs":
        config = student_unet_config(TOY_UNET, PRESETS["bk_tiny"]) | SDXS_TYPES
        pipe.unet = build_random_pipeline(config, widths="toy").unet
    return pipe


def text_encoders(pipe) -> dict:
    """What lora_io takes: the adapted text encoders by component name."""
    return {"text_encoder": pipe.text_encoder}


def randomize_b(*models, seed=0, std=0.3):
    """LoRA B starts at zero (no change); give it values so the adapter does something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, std, generator=gen)


def predict(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, emb = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), emb).sample


@pytest.mark.parametrize("layout", ["teacher", "bk_base", "bk_small", "bk_tiny", "sdxs"])
def test_default_targets_fit_every_layout(layout):
    pipe = toy_pipe(layout)
    assert ldm_layout.unet_layout(dict(pipe.unet.config)) == layout
    lora_io.add_adapters(pipe.unet, text_encoders(pipe), LoraSection(rank=4, train_text_encoder=True))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.unet.named_parameters() if ".lora_A" in n}
    assert adapted and all(any(n.endswith(t) for t in LoraSection().target_modules) for n in adapted)
    assert any(".lora_A" in n for n, _ in pipe.text_encoder.named_parameters())
    # only the adapter's parameters require gradients
    assert all(".lora_" in n for n, p in pipe.unet.named_parameters() if p.requires_grad)


def test_unknown_target_is_one_clear_error():
    pipe = toy_pipe("bk_tiny")
    with pytest.raises(UserError, match=r"lora.target_modules.*no module 'to_qq'.*bk_tiny"):
        lora_io.add_adapters(pipe.unet, None, LoraSection(target_modules=["to_q", "to_qq"]))


def test_save_load_round_trip_and_metadata(tmp_path):
    pipe = toy_pipe("bk_tiny")
    lora_io.add_adapters(pipe.unet, text_encoders(pipe), LoraSection(rank=4, alpha=8, train_text_encoder=True))
    randomize_b(pipe.unet, pipe.text_encoder)
    file = lora_io.save_lora(tmp_path, pipe.unet, text_encoders(pipe), base="runs/toy/student")
    assert file == tmp_path / "pytorch_lora_weights.safetensors"
    meta = lora_io.read_metadata(file)
    assert meta["sdkd.base_model"] == "runs/toy/student" and meta["sdkd.layout"] == "bk_tiny"
    assert json.loads(meta["sdkd.unet_config"])["down_block_types"] == list(pipe.unet.config.down_block_types)
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 8  # diffusers' own metadata kept
    keys = load_file(file).keys()
    assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys)

    fresh = toy_pipe("bk_tiny")
    lora_io.add_adapters(fresh.unet, text_encoders(fresh), LoraSection(rank=4, alpha=8, train_text_encoder=True),
                         seed=5)
    lora_io.load_lora_state(file, fresh.unet, text_encoders(fresh))
    for a, b in ((pipe.unet, fresh.unet), (pipe.text_encoder, fresh.text_encoder)):
        sa, sb = get_peft_model_state_dict(a), get_peft_model_state_dict(b)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(predict(pipe.unet), predict(fresh.unet))


def test_lora_whose_modules_all_exist_in_another_layout_is_refused_by_its_recorded_structure(tmp_path):
    """Every module of a bk_small LoRA exists in the teacher with the same widths (bk_small only removes blocks),
    so only the block structure the file records tells: refused in one line naming both layouts."""
    src = toy_pipe("bk_small")
    lora_io.add_adapters(src.unet, None, LoraSection(rank=2))
    file = lora_io.save_lora(tmp_path, src.unet, None, base="the toy bk_small")
    state, meta = lora_io.read_lora(file)
    teacher = toy_pipe("teacher")
    with pytest.raises(UserError) as err:
        lora_io.check_lora(state, teacher.unet, text_encoders(teacher), str(file), meta)
    assert str(err.value) == (f"LoRA '{file}' does not fit this model: the LoRA was trained on a 'bk_small' U-Net "
                              f"(base model the toy bk_small), this U-Net's layout is 'teacher'. Load it into that "
                              f"model, or train a LoRA on this one")
    lora_io.check_lora(state, toy_pipe("bk_small").unet, None, str(file), meta)  # its own layout: accepted


@pytest.mark.parametrize("trained_on, loaded_into, missing", [
    ("bk_tiny", "teacher", "up_blocks.0.attentions.0"),   # the teacher's first up block has no attention
    ("teacher", "bk_tiny", "down_blocks.0.attentions.1"),  # bk_tiny keeps one attention per level
    ("bk_small", "bk_tiny", "up_blocks.3"),        # bk_tiny has no deepest stage
])
def test_lora_into_another_layout_fails_clearly(tmp_path, trained_on, loaded_into, missing):
    src = toy_pipe(trained_on)
    lora_io.add_adapters(src.unet, None, LoraSection(rank=4))
    file = lora_io.save_lora(tmp_path, src.unet, None, base=f"the toy {trained_on}")
    dst = toy_pipe(loaded_into)
    state, meta = lora_io.read_lora(file)
    with pytest.raises(UserError) as err:
        lora_io.check_lora(state, dst.unet, text_encoders(dst), str(file), meta)
    msg = str(err.value)
    assert "\n" not in msg and missing in msg and f"'{loaded_into}'" in msg and f"'{trained_on}'" in msg, msg
    # resume into the wrong model and the diffusers route refuse it the same way, before loading anything
    lora_io.add_adapters(dst.unet, None, LoraSection(rank=4))
    with pytest.raises(UserError, match="does not fit this model"):
        lora_io.load_lora_state(file, dst.unet)
    with pytest.raises(UserError, match="does not fit this model"):
        lora_io.load_lora(toy_pipe(loaded_into), file)


def test_a_lora_of_another_family_is_refused_before_its_modules(tmp_path):
    from sdkd.train.convert_lora import main as convert_lora
    from sdkd.train.models.families import SD, SDXL
    from sdkd.train.models.toy import build_toy_xl_pipeline

    xl, sd = build_toy_xl_pipeline(), build_toy_pipeline()
    # One attention both toy U-Nets have at the same widths: only the family tells this LoRA does not belong.
    shared = LoraSection(rank=2, target_modules=["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"])
    lora_io.add_adapters(xl.unet, None, shared)
    xl_state, xl_meta = lora_io.read_lora(lora_io.save_lora(tmp_path / "xl", xl.unet, None, base="xl"))
    lora_io.check_lora(xl_state, sd.unet, None, "x", {})  # the modules alone fit
    with pytest.raises(UserError) as err:
        lora_io.check_lora(xl_state, sd.unet, None, "x", xl_meta)
    assert str(err.value) == ("LoRA 'x' was trained on a model of family 'sdxl', this model is of family 'sd': a "
                              "LoRA applies only to models of its own family")
    lora_io.add_adapters(sd.unet, None, LoraSection(rank=2))
    sd_state, sd_meta = lora_io.read_lora(lora_io.save_lora(tmp_path / "sd", sd.unet, None, base="sd"))
    with pytest.raises(UserError, match="^LoRA 'y' was trained on a model of family 'sd', this model is of family "
                                        "'sdxl': a LoRA applies only"):
        lora_io.check_lora(sd_state, build_toy_xl_pipeline().unet, None, "y", sd_meta)
    # Without sdkd's metadata a text encoder the family lacks tells; with it, tensors that contradict it are refused.
    full = build_toy_xl_pipeline()
    lora_io.add_adapters(full.unet, xl_text := {n: getattr(full, n) for n in SDXL.text_encoders},
                         LoraSection(rank=2, train_text_encoder=True))
    full_state, _ = lora_io.read_lora(lora_io.save_lora(tmp_path / "full", full.unet, xl_text))
    with pytest.raises(UserError, match="^LoRA 'z' adapts 'text_encoder_2', which a model of family 'sd' does not "
                                        "have: it was trained on another model family$"):
        lora_io.check_lora(full_state, build_toy_pipeline().unet, None, "z", {})
    with pytest.raises(UserError, match="^LoRA 'w' records a U-Net of model family 'sd', but adapts "
                                        "'text_encoder_2', which that family does not have"):
        lora_io.lora_family(full_state, sd_meta, "w")
    mislabelled, out = tmp_path / "mislabelled.safetensors", tmp_path / "sdcpp.safetensors"
    save_file(full_state, str(mislabelled), metadata=sd_meta)
    with pytest.raises(UserError, match=f"^LoRA '{mislabelled}' records a U-Net of model family 'sd'"):
        convert_lora(["to-sdcpp", str(mislabelled), "--out", str(out)])  # its SDXL text encoder would be dropped
    assert not out.exists()
    assert lora_io.lora_family(sd_state, sd_meta) is SD
    assert lora_io.lora_family(full_state, {}) is None


def test_width_mismatch_fails_clearly(tmp_path):
    src = toy_pipe("bk_tiny")
    lora_io.add_adapters(src.unet, None, LoraSection(rank=4))
    file = lora_io.save_lora(tmp_path, src.unet, None)
    state, meta = lora_io.read_lora(file)
    key = next(k for k in state if k.endswith("lora.down.weight"))
    state[key] = torch.zeros(4, state[key].shape[1] + 1)
    with pytest.raises(UserError, match=r"inputs in this U-Net \(layout 'bk_tiny'\)"):
        lora_io.check_lora(state, toy_pipe("bk_tiny").unet, None, "x", meta)


def test_checkpoint_state_with_ema(tmp_path):
    pipe = toy_pipe("bk_tiny")
    lora_io.add_adapters(pipe.unet, text_encoders(pipe), LoraSection(rank=4, train_text_encoder=True))
    state = lora_io.LoraState(pipe.unet, text_encoders(pipe), "base")
    ema = state.make_ema(0.9)
    randomize_b(pipe.unet, pipe.text_encoder)
    for _ in range(3):
        ema.step(state.ema_parameters())
    state.save(tmp_path, ema)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora_ema.safetensors", "pytorch_lora_weights.safetensors"]

    other = toy_pipe("bk_tiny")
    lora_io.add_adapters(other.unet, text_encoders(other), LoraSection(rank=4, train_text_encoder=True), seed=3)
    restored = lora_io.LoraState(other.unet, text_encoders(other), "base")
    ema2 = restored.make_ema(0.9)
    restored.load(tmp_path, ema2, "cpu")
    assert ema2.optimization_step == ema.optimization_step == 3
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, ema2.shadow_params))
    assert all(torch.equal(a, b) for a, b in zip(state.ema_parameters(), restored.ema_parameters()))
    assert isinstance(ema2, EMAModel)


def test_sdcpp_file_names_and_alphas(tmp_path):
    pipe = toy_pipe("bk_tiny")
    lora_io.add_adapters(pipe.unet, text_encoders(pipe), LoraSection(rank=4, alpha=6, train_text_encoder=True))
    file = lora_io.save_lora(tmp_path, pipe.unet, text_encoders(pipe))
    out = load_file(lora_io.export_sdcpp(file, tmp_path / "sdcpp.safetensors"))
    n_unet = sum(1 for k in load_file(file) if k.startswith("unet."))
    assert sum(1 for k in out if k.startswith("lora_unet_") and not k.endswith(".alpha")) == n_unet
    # teacher-slot numbering (sd.cpp's): student up_blocks.2.attentions.0 -> output_blocks.6.1
    stem = "lora_unet_output_blocks_6_1_transformer_blocks_0_attn1_to_q"
    assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= out.keys()
    assert out[f"{stem}.alpha"].item() == 6.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in out
    # a layout sd.cpp has no model for: refused, no file
    small = toy_pipe("bk_small")
    lora_io.add_adapters(small.unet, None, LoraSection(rank=4))
    small_file = lora_io.save_lora(tmp_path / "small", small.unet, None)
    with pytest.raises(ldm_layout.UnsupportedLayout, match="bk_small"):
        lora_io.export_sdcpp(small_file, tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


def xl_lora(tmp_path, layout: str, text: bool = True):
    """A LoRA (U-Net and, with `text`, both text encoders) of an SDXL student of `layout` at toy widths, and the
    pipeline it was trained on."""
    pipe = build_random_pipeline(student_unet_config(TOY_XL_DEPTHS_UNET, PRESETS[layout]), widths="toy_xl")
    encoders = {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2")} if text else None
    lora_io.add_adapters(pipe.unet, encoders, LoraSection(rank=4, alpha=6, train_text_encoder=text))
    return lora_io.save_lora(tmp_path / layout, pipe.unet, encoders), pipe


def test_sdxl_sdcpp_file_names_and_refusals(tmp_path):
    """SSD-1B's (and Vega's) LoRA in kohya's SDXL names over the sd.cpp numbering: lora_te1_ (CLIP-L), lora_te2_
    (OpenCLIP-bigG, in CLIP names as kohya writes them); KOALA's is refused (sd.cpp has no KOALA model)."""
    file, _ = xl_lora(tmp_path, "ssd1b")
    out = load_file(lora_io.export_sdcpp(file, tmp_path / "sdcpp.safetensors"))
    n_unet = sum(1 for k in load_file(file) if k.startswith("unet."))
    assert sum(1 for k in out if k.startswith("lora_unet_") and not k.endswith(".alpha")) == n_unet
    # up_blocks.0.attentions.2 (SSD-1B's 10 layers) -> output_blocks.2.1; down_blocks.1.attentions.0 -> input_blocks.4.1
    for stem in ("lora_unet_output_blocks_2_1_transformer_blocks_9_attn1_to_q",
                 "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_1_self_attn_v_proj"):
        assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= out.keys(), stem
        assert out[f"{stem}.alpha"].item() == 6.0
    assert not [k for k in out if k.startswith("lora_te_")]
    koala, _ = xl_lora(tmp_path, "koala_700m", text=False)
    with pytest.raises(ldm_layout.UnsupportedLayout, match="'koala_700m' SDXL U-Net, which stable-diffusion.cpp "
                                                           "cannot run"):
        lora_io.export_sdcpp(koala, tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


def test_lora_of_another_family_refused_in_one_line(tmp_path):
    """An SDXL LoRA on an SD-1.x model file, and an SD-1.x LoRA on an SDXL model file: one line naming both
    families, before diffusers sees the file."""
    import sdkd.train.formats.model_files as M

    xl_file, _ = xl_lora(tmp_path, "vega")
    sd_pipe = toy_pipe("bk_tiny")
    lora_io.add_adapters(sd_pipe.unet, text_encoders(sd_pipe), LoraSection(rank=4, train_text_encoder=True))
    sd_file = lora_io.save_lora(tmp_path / "sd", sd_pipe.unet, text_encoders(sd_pipe))
    xl_model = build_random_pipeline(student_unet_config(TOY_XL_DEPTHS_UNET, PRESETS["vega"]), widths="toy_xl")
    for model, lora, theirs, ours in ((toy_pipe("bk_tiny"), xl_file, "sdxl", "sd"), (xl_model, sd_file, "sd", "sdxl")):
        single = M.export_single_file(M.Source(model, "test"), tmp_path / f"{ours}.safetensors")
        with pytest.raises(UserError) as err:
            lora_io.load_lora(M.load_single_file(single), lora)
        message = str(err.value)
        assert "\n" not in message
        assert f"trained on a model of family '{theirs}', this model is of family '{ours}'" in message


def test_convert_lora_command_writes_the_sdcpp_file(tmp_path, capsys):
    from sdkd.train.convert_lora import main

    pipe = toy_pipe("bk_tiny")
    lora_io.add_adapters(pipe.unet, None, LoraSection(rank=4))
    file = lora_io.save_lora(tmp_path, pipe.unet, None)
    out = tmp_path / "converted" / "lora_sdcpp.safetensors"
    main(["to-sdcpp", str(file), "--out", str(out)])
    assert capsys.readouterr().out == f"wrote {out}\n"
    expected = load_file(lora_io.export_sdcpp(file, tmp_path / "direct.safetensors"))
    converted = load_file(out)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


@pytest.mark.sd15
def test_sd15_sdcpp_lora_matches_the_fused_model_in_stable_diffusion_cpp(tmp_path):
    """sd.cpp applies every tensor of our LoRA file, and base + LoRA renders like the model with the LoRA
    fused in by diffusers (exported as a plain sd.cpp single file)."""
    sd = pytest.importorskip("cyllama.sd", reason="cyllama (stable-diffusion.cpp binding) not installed: "
                                                  "pip install -e '.[sdcpp]'")
    import sdkd.train.formats.model_files as E

    def bk_tiny():
        config = student_unet_config(SD15_UNET, PRESETS["bk_tiny"])
        return build_random_pipeline(config, widths="sd15")

    pipe = bk_tiny()
    base = E.export_single_file(E.Source(pipe, "test"), tmp_path / "base.safetensors", target="sdcpp", half=True)
    lora_io.add_adapters(pipe.unet, text_encoders(pipe), LoraSection(rank=4, alpha=8, train_text_encoder=True))
    randomize_b(pipe.unet, pipe.text_encoder, std=0.05)  # larger updates overflow fp16 weights
    lora_file = lora_io.save_lora(tmp_path / "lora", pipe.unet, text_encoders(pipe))
    sdcpp_lora = lora_io.export_sdcpp(lora_file, tmp_path / "lora_sdcpp.safetensors")
    del pipe
    gc.collect()
    fused = bk_tiny()
    lora_io.load_lora(fused, lora_file)  # checked, loaded and fused by diffusers
    fused.unload_lora_weights()  # keeps the fused weights, drops the peft layers (their keys would hang sd.cpp)
    assert not any("lora" in k for k in list(fused.unet.state_dict()) + list(fused.text_encoder.state_dict()))
    fused_file = E.export_single_file(E.Source(fused, "test"), tmp_path / "fused.safetensors", target="sdcpp",
                                      half=True)
    del fused
    gc.collect()

    logs = []
    sd.set_log_callback(lambda level, message: logs.append(str(message)))

    def generate(model, loras=()):
        params = sd.SDContextParams(model_path=str(model), n_threads=2, vae_decode_only=True)
        with sd.SDContext(params) as ctx:
            gen = sd.SDImageGenParams(prompt="a red fox", width=64, height=64, seed=1, sample_steps=1, cfg_scale=1.0)
            if loras:
                gen.set_loras([{"path": str(p), "multiplier": 1.0} for p in loras])
            return ctx.generate_with_params(gen)[0].to_numpy().astype(np.float32)

    try:
        plain, with_lora, fused_image = generate(base), generate(base, [sdcpp_lora]), generate(fused_file)
    finally:
        sd.set_log_callback(None)
    applied = [m for m in logs if "LoRA tensors have been applied" in m]
    n = len(load_file(sdcpp_lora))
    assert applied and f"({n} / {n})" in applied[0], applied
    change, error = np.abs(with_lora - plain).mean(), np.abs(with_lora - fused_image).mean()
    assert change > 1.0 and error < 0.1 * change, (change, error)


def test_a_text_encoder_lora_trains_with_the_unet_as_one_module():
    """lora.train_text_encoder (train/tasks/lora.py): the U-Net and the text encoder are one trained module fed
    token ids; it predicts what the U-Net predicts on the text encoder's states, and the loss's gradient reaches
    both adapters and nothing else."""
    from sdkd.train.engine.step_random import StepRandom
    from sdkd.train.models.teacher import load_teacher
    from sdkd.train.tasks.lora import TextConditionedUNet, TokenEncoder
    from sdkd.train.tasks.objective import BatchEncoder

    parts = load_teacher("toy")
    text = {name: parts.components[name] for name in parts.family.text_encoders}
    for model in (parts.unet, *text.values(), parts.vae):
        model.requires_grad_(False)
    lora_io.add_adapters(parts.unet, text, LoraSection(rank=4, train_text_encoder=True))
    randomize_b(parts.unet, *text.values())
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "captions": ["a red circle", "a blue square"]}
    latents, tokens = TokenEncoder(parts)(batch, StepRandom(0, "cpu", 2))
    same_latents, conditioning = BatchEncoder(parts)(batch, StepRandom(0, "cpu", 2))
    assert torch.equal(latents, same_latents)
    t = torch.tensor([10, 500])
    prediction = TextConditionedUNet(parts.unet, parts.family, text)(latents, t, **tokens.unet_kwargs()).sample
    with torch.no_grad():
        expected = parts.unet(latents, t, **conditioning.unet_kwargs()).sample
    torch.testing.assert_close(prediction, expected)
    prediction.square().mean().backward()
    for model in (parts.unet, *text.values()):
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in name for name in grads)
        assert any(g.abs().sum() > 0 for name, g in grads.items() if "lora_A" in name)
