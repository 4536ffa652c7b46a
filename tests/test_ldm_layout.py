"""diffusers <-> LDM key maps: both U-Net numberings, VAE, text encoders, layouts, sd.cpp support."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from sdkd.train.formats import ldm_layout as L
from sdkd.train.models.sd_configs import SD15_UNET, SD21_BASE_UNET, SD21_TEXT, SDXS_TYPES
from sdkd.train.models.students import PRESETS, student_unet_config
from sdkd.train.models.toy import TOY_SD2_TEXT, TOY_SD2_UNET, TOY_TEXT, TOY_UNET, TOY_VAE

LAYOUTS = ["teacher", "bk_base", "bk_small", "bk_tiny", "sdxs"]


def layout_config(layout: str, teacher: dict) -> dict:
    if layout == "teacher":
        return dict(teacher)
    config = student_unet_config(teacher, PRESETS["bk_tiny" if layout == "sdxs" else layout])
    if layout == "sdxs":
        config.update(SDXS_TYPES)
    return config


def meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def block_indices(names, numbering_prefix: str) -> list[str]:
    """'input_blocks' -> sorted distinct 'N' ; 'output_blocks' -> sorted distinct 'N.M'."""
    depth = 1 if numbering_prefix != "output_blocks" else 2
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[2] == numbering_prefix:
            found.add(".".join(parts[3:3 + depth]))
    return sorted(found, key=lambda s: tuple(int(x) for x in s.split(".")))


# The teacher-slot table of shared/reference/export-sdcpp.md section 1.2 (SD-1.5 and SD-2.1-base widths).
SDCPP_TABLE = {
    "teacher": (list(range(12)), True,
                [f"{i}.0" for i in range(12)] + ["2.1", "5.2", "8.2"] + [f"{i}.1" for i in range(3, 12)]),
    "bk_base": ([0, 1, 3, 4, 6, 7, 9, 10], True,
                ["0.0", "1.0", "2.1", "3.0", "3.1", "4.0", "4.1", "5.2", "6.0", "6.1", "7.0", "7.1", "8.2", "9.0",
                 "9.1", "10.0", "10.1"]),
    "bk_small": ([0, 1, 3, 4, 6, 7, 9, 10], False,
                 ["0.0", "1.0", "2.1", "3.0", "3.1", "4.0", "4.1", "5.2", "6.0", "6.1", "7.0", "7.1", "8.2", "9.0",
                  "9.1", "10.0", "10.1"]),
    "bk_tiny": ([0, 1, 3, 4, 6, 7], False,
                ["0.0", "0.1", "1.0", "1.1", "2.1", "3.0", "3.1", "4.0", "4.1", "5.2", "6.0", "6.1", "7.0", "7.1"]),
    "sdxs": ([0, 1, 3, 4, 6, 7], False,
             ["0.0", "0.1", "1.0", "1.1", "2.1", "3.0", "3.1", "4.0", "4.1", "5.2", "6.0", "7.0"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sdcpp_numbering_matches_reference_table_at_sd15_widths(layout):
    check_sdcpp_table(layout, SD15_UNET)


@pytest.mark.parametrize("layout", ["teacher", "bk_tiny"])
def test_sdcpp_numbering_matches_reference_table_at_sd21_widths(layout):
    """The SD-2.x layouts sd.cpp runs: same slots; proj_in/proj_out linear (2-D), cross-attention from 1024."""
    check_sdcpp_table(layout, SD21_BASE_UNET)
    config = layout_config(layout, SD21_BASE_UNET)
    state = meta_unet(config).state_dict()
    names = {v: state[k] for k, v in L.unet_names(state, config, "sdcpp").items()}
    projs = [n for n in names if n.endswith((".proj_in.weight", ".proj_out.weight"))]
    assert projs and all(names[n].dim() == 2 for n in projs)
    assert names[L.UNET_PREFIX + "input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert names[L.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    assert L.family(config) == "sd2" and L.check_sdcpp(config, vae_tiny=False) == []


def check_sdcpp_table(layout: str, teacher: dict) -> None:
    config = layout_config(layout, teacher)
    names = L.unet_names(meta_unet(config).state_dict(), config, "sdcpp").values()
    inputs, mid, outputs = SDCPP_TABLE[layout]
    assert [int(i) for i in block_indices(names, "input_blocks")] == inputs
    assert any(".middle_block." in n for n in names) == mid
    assert block_indices(names, "output_blocks") == sorted(outputs, key=lambda s: tuple(map(int, s.split("."))))
    assert L.unet_layout(config) == layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ldm_numbering_is_packed(layout):
    config = layout_config(layout, SD15_UNET)
    names = L.unet_names(meta_unet(config).state_dict(), config, "ldm").values()
    levels, per = len(config["block_out_channels"]), config["layers_per_block"] + 1
    assert [int(i) for i in block_indices(names, "input_blocks")] == list(range(levels * per))
    outs = block_indices(names, "output_blocks")
    assert sorted({int(o.split(".")[0]) for o in outs}) == list(range(levels * per))
    # upsampler: the last block of each up level, after its attention when there is one
    for i in range(levels - 1):
        sub = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
        assert f"{per * i + per - 1}.{sub}" in outs


def test_teacher_numberings_coincide():
    config = dict(SD15_UNET)
    keys = meta_unet(config).state_dict()
    assert L.unet_names(keys, config, "ldm") == L.unet_names(keys, config, "sdcpp")
    # a few names every SD-1.5 single file has
    names = set(L.unet_names(keys, config, "ldm").values())
    for name in ("time_embed.0.weight", "input_blocks.3.0.op.weight", "middle_block.1.proj_in.weight",
                 "output_blocks.11.0.skip_connection.weight", "output_blocks.2.1.conv.weight", "out.2.weight"):
        assert L.UNET_PREFIX + name in names


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ldm_numbering_reads_back_with_diffusers_converter(layout):
    check_diffusers_converter(layout_config(layout, TOY_UNET))


@pytest.mark.parametrize("layout", ["teacher", "bk_tiny"])
def test_sd2_ldm_numbering_reads_back_with_diffusers_converter(layout):
    check_diffusers_converter(layout_config(layout, TOY_SD2_UNET))


def check_diffusers_converter(config: dict) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    flat = L.to_ldm(state, unet.config, "ldm")
    back = convert_ldm_unet_checkpoint(flat, dict(unet.config))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("numbering", L.NUMBERINGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inverse_map_round_trips(layout, numbering):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(layout_config(layout, TOY_UNET))
    state = unet.state_dict()
    flat = L.to_ldm(state, unet.config, numbering)
    assert len(flat) == len(state)
    assert all(t.is_contiguous() for t in flat.values())
    back = L.unet_from_ldm(flat, unet.config, numbering, {k: v.shape for k, v in state.items()})
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_non_contiguous_tensors_are_written_contiguous():
    unet = UNet2DConditionModel.from_config(TOY_UNET)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = w.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided view
    assert not state["conv_in.weight"].is_contiguous()
    flat = L.to_ldm(state, unet.config, "sdcpp")
    assert flat[L.UNET_PREFIX + "input_blocks.0.0.weight"].is_contiguous()
    assert torch.equal(flat[L.UNET_PREFIX + "input_blocks.0.0.weight"], w)


def test_vae_kl_matches_diffusers_converter():
    vae = AutoencoderKL(**TOY_VAE)
    state = vae.state_dict()
    flat = L.to_ldm({}, {}, "ldm", vae=state, vae_config=vae.config)
    assert L.VAE_PREFIX + "decoder.mid.attn_1.q.weight" in flat
    assert flat[L.VAE_PREFIX + "decoder.mid.attn_1.q.weight"].dim() == 4  # 1x1 conv, as in LDM files
    back = convert_ldm_vae_checkpoint(flat, dict(vae.config))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    mine = L.vae_from_ldm(flat, vae.config, False, {k: v.shape for k, v in state.items()})
    assert all(torch.equal(mine[k], state[k]) for k in state)


def test_tiny_vae_keys_pass_through():
    vae = AutoencoderTiny()
    state = vae.state_dict()
    flat = L.to_ldm({}, {}, "sdcpp", vae=state, vae_config=vae.config, vae_tiny=True)
    assert L.VAE_PREFIX + "decoder.layers.0.weight" in flat and L.VAE_PREFIX + "decoder.layers.18.weight" in flat
    assert {k[len(L.VAE_PREFIX):] for k in flat} == set(state)


def test_clip_l_keys_keep_text_model_prefix():
    text = CLIPTextModel(CLIPTextConfig(**TOY_TEXT))
    flat = L.to_ldm({}, {}, "ldm", texts={"cond_stage_model": (text.state_dict(), text.config.to_dict())})
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in flat
    back = L.text_from_ldm(flat, "cond_stage_model", text.config.to_dict(),
                           {k: v.shape for k, v in text.state_dict().items()})
    assert all(torch.equal(back[k], v) for k, v in text.state_dict().items() if k in back)


def test_openclip_layout_round_trips():
    text = CLIPTextModel(CLIPTextConfig(**{**TOY_TEXT, "hidden_act": "gelu"}))
    state = text.state_dict()
    flat = L.to_ldm({}, {}, "ldm", texts={"cond_stage_model": (state, text.config.to_dict())})
    p = L.OPENCLIP_PREFIX
    assert flat[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 32, 32)
    assert p + "token_embedding.weight" in flat and p + "positional_embedding" in flat and p + "ln_final.weight" in flat
    back = L.text_from_ldm(flat, "cond_stage_model", text.config.to_dict(), {k: v.shape for k, v in state.items()})
    assert all(torch.equal(back[k], state[k]) for k in back)
    assert {k for k in state if not k.endswith("position_ids")} == set(back)


def test_openclip_layout_matches_diffusers_converter():
    """diffusers' reader of real SD-2 single files (an independent implementation) gets every tensor back but
    `position_ids` (a buffer, not a weight)."""
    text = CLIPTextModel(CLIPTextConfig(**TOY_SD2_TEXT))
    state = text.state_dict()
    flat = L.to_ldm({}, {}, "sdcpp", texts={"cond_stage_model": (state, text.config.to_dict())})
    back = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(text, flat).items()}
    state = {k.removeprefix("text_model."): v for k, v in state.items()}  # transformers 5 drops the prefix
    assert set(back) == {k for k in state if not k.endswith("position_ids")}
    assert all(torch.equal(back[k], state[k]) for k in back)


def test_sd21_text_config_is_openclip_h_as_sd2_ships_it():
    config = CLIPTextConfig(**SD21_TEXT)
    assert L.is_openclip(config.to_dict())
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.projection_dim) == (1024, 23, 16, 4096, 512)
    with torch.device("meta"):
        state = CLIPTextModel(config).state_dict()
    names = {L.text_name(k, L.OPENCLIP_PREFIX)[0] for k in state if not k.endswith("position_ids")}
    # sd.cpp's OpenCLIP-H has 24 layers and skips a missing 24th (SD-2 uses the penultimate layer's output)
    assert L.OPENCLIP_PREFIX + "transformer.resblocks.22.ln_2.weight" in names
    assert not [n for n in names if ".resblocks.23." in n]


def test_unknown_keys_are_refused():
    config = dict(TOY_UNET)
    with pytest.raises(L.UnsupportedLayout, match="class_embedding"):  # (add_embedding is SDXL's label_emb)
        L.unet_name("class_embedding.linear_1.weight", config, "ldm")


@pytest.mark.parametrize("layout", ["bk_base", "bk_small"])
def test_sdcpp_refuses_layouts_it_cannot_run(layout):
    with pytest.raises(L.UnsupportedLayout) as err:
        L.check_sdcpp(layout_config(layout, SD15_UNET), vae_tiny=False)
    message = str(err.value)
    assert layout in message and "bk_tiny" in message and "teacher" in message and "--target ldm" in message
    assert "\n" not in message


def test_sdcpp_support_and_vae_kind():
    assert L.check_sdcpp(dict(SD15_UNET), vae_tiny=False) == []
    assert L.check_sdcpp(layout_config("bk_tiny", SD15_UNET), vae_tiny=False) == []
    assert L.check_sdcpp(layout_config("sdxs", SD15_UNET), vae_tiny=True) == []
    assert L.check_sdcpp(dict(SD21_BASE_UNET), vae_tiny=False) == []
    assert L.check_sdcpp(layout_config("bk_tiny", SD21_BASE_UNET), vae_tiny=False) == []
    # SD-2 without the 320-channel attention: sd.cpp's SD2 tiny U-Net expects it, SDXS-0.9 wants cross-only
    with pytest.raises(L.UnsupportedLayout, match="'sdxs' \\(SD2\\)"):
        L.check_sdcpp(layout_config("sdxs", SD21_BASE_UNET), vae_tiny=True)
    with pytest.raises(L.UnsupportedLayout, match="AutoencoderTiny"):
        L.check_sdcpp(layout_config("sdxs", SD15_UNET), vae_tiny=False)
    with pytest.raises(L.UnsupportedLayout, match="AutoencoderKL"):
        L.check_sdcpp(layout_config("bk_tiny", SD15_UNET), vae_tiny=True)
    # toy widths are structurally fine but warned about (older sd.cpp hard-codes 320 channels)
    assert any("320" in w for w in L.check_sdcpp(layout_config("bk_tiny", TOY_UNET), vae_tiny=False))
