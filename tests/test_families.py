"""Model families: SD-1.x/2.x conditioning as before, the latent cache's named tensors, the U-Net's
arguments, an unknown U-Net refused in one line, a registered family claiming its U-Nets, and a cache made for
one family refused by another; SDXL (toy widths): claimed U-Nets, components loaded by name, its conditioning as
its pipeline makes it, its dtype rule, cached caption dropout, LoRA files on both text encoders. Its runs
through the trainers are in test_family_e2e.py."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from sdkd.cli.errors import UserError
from sdkd.data.sources.core import SyntheticCaptions
from sdkd.data.sources.latent_cache import CachedLatents, write_cache
from sdkd.data.sources.transforms import ImageTransform, Preprocess
from sdkd.train.models.families import (
    SD,
    SDXL,
    Conditioning,
    StableDiffusion,
    conditioning_shapes,
    family_of,
    prompt_batch,
    register_family,
    unregister_family,
)
from sdkd.train.models.teacher import PipelineParts, load_pipeline, load_teacher
from sdkd.train.models.toy import TOY_UNET, TOY_XL_UNET, build_toy_xl_pipeline
from sdkd.train.tasks.objective import BatchEncoder

CAPTIONS = ["a red fox", "", "a lighthouse at dusk " * 20]  # the last one is cut at 77 tokens
SDXL_CONFIG = {**TOY_UNET, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
               "projection_class_embeddings_input_dim": 80}


def test_sd_encodes_captions_as_one_hidden_state(toy):
    tokenizer, text_encoder = toy.components["tokenizer"], toy.components["text_encoder"]
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        expected = text_encoder(ids)[0]
        cond = SD.encode(toy, {"captions": CAPTIONS})
    assert torch.equal(cond.hidden_states, expected) and cond.added == {}
    assert torch.equal(SD.empty_prompt(toy)["embeds"], expected[1])
    assert toy.family is SD and family_of(toy.unet.config) is SD


def test_unet_kwargs_call_the_unet_as_before(toy):
    cond = Conditioning(torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0)))
    assert cond.unet_kwargs().keys() == {"encoder_hidden_states"}
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(toy.unet(x, t, **cond.unet_kwargs()).sample, toy.unet(x, t, cond.hidden_states).sample)
    sdxl = Conditioning(cond.hidden_states, {"text_embeds": torch.ones(2, 8), "time_ids": torch.ones(2, 6)})
    assert sdxl.unet_kwargs()["added_cond_kwargs"] is sdxl.added
    half = sdxl.to(dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in (half.hidden_states, *half.added.values()))


def test_cache_tensors_round_trip(toy):
    cond = BatchEncoder(toy).conditioning({"captions": CAPTIONS})
    assert tuple(cond.tensors()) == SD.fields == ("embeds",)  # today's on-disk name
    back = Conditioning.from_tensors(cond.tensors())
    assert torch.equal(back.hidden_states, cond.hidden_states) and back.added == {}
    added = {"text_embeds": torch.ones(3, 8), "time_ids": torch.zeros(3, 6)}
    assert Conditioning.from_tensors(Conditioning(cond.hidden_states, added).tensors()).added == added


def test_pipeline_class_and_parts(toy):
    pipe = SD.pipeline(toy, toy.unet, toy.scheduler)
    assert type(pipe) is StableDiffusionPipeline and pipe.safety_checker is None
    assert all(pipe.components[name] is part for name, part in toy.components.items())
    assert list(toy.components) == ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    cached = PipelineParts({**dict.fromkeys(SD.components), "unet": toy.unet, "scheduler": toy.scheduler},
                           vae_config=toy.vae_config)
    assert cached.family is SD and not cached.has_encoders and set(cached.frozen) == {"vae", "text_encoder"}


UNKNOWN = {**TOY_UNET, "addition_embed_type": "image"}


def test_a_unet_of_no_family_is_refused_in_one_line(toy_teacher_dir, tmp_path):
    with pytest.raises(UserError) as err:
        family_of(UNKNOWN, "teacher 'x'")
    assert str(err.value) == ("teacher 'x': a U-Net with addition_embed_type 'image' is of no model family sdkd "
                              "trains (SD-1.x, SD-2.x, SDXL)")
    folder = tmp_path / "unknown"
    shutil.copytree(toy_teacher_dir, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **UNKNOWN}))
    for with_unet in (True, False):  # refused from the U-Net's config: also when the U-Net is not loaded
        with pytest.raises(UserError, match=f"^teacher '{folder}': a U-Net with addition_embed_type 'image'"):
            load_teacher(str(folder), with_unet=with_unet)


class Pooled(StableDiffusion):
    """A family whose cache holds another tensor beside the hidden states."""

    name, fields = "pooled", ("embeds", "text_embeds")


def test_cache_of_another_family_is_refused(toy, tmp_path):
    data = SyntheticCaptions(4, Preprocess(ImageTransform(32, True, False)), seed=0)
    write_cache(data, BatchEncoder(toy), tmp_path, batch_size=4, info={"resolution": 32})
    cache = CachedLatents(tmp_path)
    assert cache[0]["embeds"].shape == (77, 32)
    cache.check_teacher(toy, 32)
    other = dataclasses.replace(toy, family=Pooled())
    with pytest.raises(UserError) as err:
        cache.check_teacher(other, 32)
    assert str(err.value) == (f"latent cache {tmp_path} was made for model family 'sd' (tensors embeds), the teacher "
                              f"is of family 'pooled' (tensors embeds, text_embeds); write a cache with this teacher")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["family"], manifest["fields"]  # a cache written before manifests named the family
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    CachedLatents(tmp_path).check_teacher(toy, 32)
    with pytest.raises(UserError, match="made for model family 'sd'"):
        CachedLatents(tmp_path).check_teacher(other, 32)


class ImageConditioned(StableDiffusion):
    """A family claiming the U-Nets no built-in family claims."""

    name = "image"

    def claims(self, unet_config) -> bool:
        return unet_config.get("addition_embed_type") == "image"


def test_a_registered_family_claims_its_unets():
    family = register_family(ImageConditioned())
    try:
        assert family_of(UNKNOWN) is family and family_of(TOY_XL_UNET) is SDXL and family_of(TOY_UNET) is SD
        with pytest.raises(ValueError, match="'image' is registered already"):
            register_family(ImageConditioned())
    finally:
        unregister_family(family)
    with pytest.raises(UserError, match="addition_embed_type 'image' is of no model family"):
        family_of(UNKNOWN)


# ---------------------------------------------------------------------------------------------
# SDXL at toy widths


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl")
    build_toy_xl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def xl():
    return SDXL


def test_sdxl_claims_its_unets(xl_dir):
    assert family_of(TOY_XL_UNET) is SDXL and family_of(SDXL_CONFIG) is SDXL
    assert load_teacher(str(xl_dir)).family is SDXL


def test_components_load_by_name(xl, xl_dir):
    parts = load_teacher(str(xl_dir))
    assert list(parts.components) == list(xl.components)
    assert type(parts.components["text_encoder_2"]) is CLIPTextModelWithProjection
    assert xl.text_encoders == ("text_encoder", "text_encoder_2") and xl.tokenizers == ("tokenizer", "tokenizer_2")
    assert set(parts.frozen) == {"vae", "text_encoder", "text_encoder_2"} and xl.models[0] == "unet"
    cached = load_teacher(str(xl_dir), with_encoders=False)
    assert [n for n, c in cached.components.items() if c is not None] == ["unet", "scheduler"]
    assert cached.vae_config["latent_channels"] == 4 and cached.vae_scale_factor == 2
    assert type(load_pipeline(str(xl_dir))) is StableDiffusionXLPipeline


def test_the_family_encodes_as_its_pipeline_does(xl, xl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)
    parts = PipelineParts.of(pipe)
    with torch.no_grad():
        cond = xl.encode(parts, prompt_batch(CAPTIONS, 32))
        hidden, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(cond.hidden_states, hidden) and torch.equal(cond.added["text_embeds"], pooled)
    assert cond.hidden_states.shape == (3, 77, 40) and cond.added["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 3
    assert set(cond.tensors()) == set(xl.fields)
    assert {k: t.shape for k, t in cond.tensors().items()} == {k: (3, *s[1:]) for k, s in
                                                               conditioning_shapes(TOY_XL_UNET).items()}
    # A data batch: each sample's original size and crop, and the images' size.
    batch = {"captions": CAPTIONS[:2], "pixel_values": torch.zeros(2, 3, 32, 32),
             "original_size": torch.tensor([[64, 48], [32, 40]]), "crop_top_left": torch.tensor([[16, 8], [0, 4]])}
    with torch.no_grad():
        assert xl.encode(parts, batch).added["time_ids"].tolist() == [[64, 48, 16, 8, 32, 32], [32, 40, 0, 4, 32, 32]]


def test_frozen_models_take_their_family_dtype(xl, xl_dir):
    parts = load_teacher(str(xl_dir))
    parts.freeze(torch.device("cpu"), torch.float16)
    assert {name: m.dtype for name, m in parts.frozen.items()} == {
        "vae": torch.float32, "text_encoder": torch.float16, "text_encoder_2": torch.float16}
    assert parts.unet.dtype == torch.float32 and not any(p.requires_grad for p in parts.vae.parameters())
    assert SD.dtype("vae", torch.float16) == torch.float16 and xl.dtype("vae", torch.bfloat16) == torch.bfloat16


def test_cached_dropout_swaps_only_the_caption_made_tensors(xl, xl_dir, tmp_path):
    parts = load_teacher(str(xl_dir))
    for m in parts.frozen.values():
        m.requires_grad_(False).eval()
    data = SyntheticCaptions(4, Preprocess(ImageTransform(32, True, False)), seed=0)
    write_cache(data, BatchEncoder(parts), tmp_path, batch_size=4, info={"resolution": 32})
    CachedLatents(tmp_path).check_teacher(parts, 32)
    with pytest.raises(UserError, match="made for model family 'sdxl'"):
        CachedLatents(tmp_path).check_teacher(load_teacher("toy"), 32)
    empty = load_file(tmp_path / "empty_prompt.safetensors")
    assert set(empty) == {"embeds", "text_embeds"}
    kept, dropped = CachedLatents(tmp_path)[1], CachedLatents(tmp_path, caption_dropout=1.0)[1]
    assert dropped["caption"] == "" and torch.equal(dropped["text_embeds"], empty["text_embeds"])
    assert torch.equal(dropped["embeds"], empty["embeds"]) and not torch.equal(kept["embeds"], empty["embeds"])
    assert torch.equal(dropped["time_ids"], kept["time_ids"]) and kept["time_ids"][-2:].tolist() == [32, 32]
    with torch.no_grad():
        encoded = BatchEncoder(parts).conditioning(prompt_batch([""], 32))
    assert torch.allclose(encoded.added["text_embeds"][0], empty["text_embeds"], atol=1e-6)


def test_uncached_dropout_encodes_the_empty_prompt_for_both_encoders_and_keeps_the_time_ids(xl, xl_dir):
    import numpy as np
    from PIL import Image

    from sdkd.data.sources.core import collate

    parts = load_teacher(str(xl_dir))
    for m in parts.frozen.values():
        m.requires_grad_(False).eval()
    images = [Image.new("RGB", size, colour) for size, colour in (((64, 48), "red"), ((40, 56), "blue"))]

    def batch(dropout):  # as the training data makes it: each sample's own size and random crop
        p = Preprocess(ImageTransform(32, center_crop=False, random_flip=False), caption_dropout=dropout)
        return collate([p(image, caption, np.random.default_rng(i), np.random.default_rng(i), "k")
                        for i, (image, caption) in enumerate(zip(images, ["a red fox", "a blue lake"]))])

    kept, dropped = batch(0.0), batch(1.0)
    assert dropped["captions"] == ["", ""] and torch.equal(kept["pixel_values"], dropped["pixel_values"])
    with torch.no_grad():
        cond, caption_cond = BatchEncoder(parts).conditioning(dropped), BatchEncoder(parts).conditioning(kept)
        # "" through each encoder alone, as its pipeline encodes a prompt: both halves of the hidden states
        hidden, _, pooled, _ = StableDiffusionXLPipeline(**parts.components, **xl.pipeline_extras).encode_prompt(
            "", device="cpu", do_classifier_free_guidance=False)
    width = parts.components["text_encoder"].config.hidden_size
    for i in range(2):
        assert torch.allclose(cond.hidden_states[i, :, :width], hidden[0, :, :width], atol=1e-6)  # the first's
        assert torch.allclose(cond.hidden_states[i, :, width:], hidden[0, :, width:], atol=1e-6)  # the second's
        assert torch.allclose(cond.added["text_embeds"][i], pooled[0], atol=1e-6)
    assert not torch.allclose(caption_cond.hidden_states[:, :, width:], cond.hidden_states[:, :, width:], atol=1e-3)
    assert not torch.allclose(caption_cond.added["text_embeds"], cond.added["text_embeds"], atol=1e-3)
    # The time ids stay each sample's own: original size, its crop, the target size.
    expected = [[*size, *crop, 32, 32] for size, crop in zip(dropped["original_size"].tolist(),
                                                             dropped["crop_top_left"].tolist())]
    assert expected[0][:2] == [48, 64] and expected[1][:2] == [56, 40] and expected[0][2:4] != [0, 0]
    assert cond.added["time_ids"].tolist() == expected == caption_cond.added["time_ids"].tolist()


def test_lora_on_both_text_encoders(xl, xl_dir, tmp_path):
    from sdkd.train.engine.step_random import StepRandom
    from sdkd.train.formats import lora_io
    from sdkd.train.formats.lora_config import LoraSection
    from sdkd.train.tasks.lora import TextConditionedUNet, TokenEncoder

    def pipe():
        return StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)

    src = pipe()
    text = {name: getattr(src, name) for name in xl.text_encoders}
    lora_io.add_adapters(src.unet, text, LoraSection(rank=2, train_text_encoder=True), seed=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (src.unet, *text.values()):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3, generator=gen)
    file = lora_io.save_lora(tmp_path, src.unet, text, base="xl")
    keys = load_file(file).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    # The trained module of a text-encoder LoRA: the family's conditioning made inside it.
    parts = PipelineParts.of(src)
    batch = prompt_batch(CAPTIONS, 32)
    x, t = torch.randn(3, 4, 16, 16, generator=gen), torch.tensor([1, 500, 999])
    rng = StepRandom(0, torch.device("cpu"), 3)
    with torch.no_grad():
        tokens = TokenEncoder(parts)({**batch, "pixel_values": torch.zeros(3, 3, 32, 32)}, rng)[1].tokens
        ours = TextConditionedUNet(src.unet, xl, text)(x, t, tokens).sample
        theirs = src.unet(x, t, **xl.encode(parts, batch).unet_kwargs()).sample
    assert torch.equal(ours, theirs)

    back = pipe()
    back_text = {name: getattr(back, name) for name in xl.text_encoders}
    lora_io.add_adapters(back.unet, back_text, LoraSection(rank=2, train_text_encoder=True), seed=2)
    lora_io.load_lora_state(file, back.unet, back_text)
    adapter = lambda model: {n: p for n, p in model.named_parameters() if "lora_" in n}  # noqa: E731
    for a, b in ((src.unet, back.unet), *((text[n], back_text[n]) for n in text)):
        mine, loaded = adapter(a), adapter(b)
        assert mine and mine.keys() == loaded.keys() and all(torch.equal(mine[k], loaded[k]) for k in mine)
    fused = pipe()
    before = fused.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj.weight.clone()
    lora_io.load_lora(fused, file)  # checked, then loaded and fused by diffusers' SDXL loader
    assert not torch.equal(before, fused.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj.weight)
    with pytest.raises(UserError, match="adapts the text encoder 'text_encoder_2', but no text encoder was given"):
        lora_io.check_lora(load_file(file), back.unet, {"text_encoder": back.text_encoder}, "x")
    with pytest.raises(UserError, match="'custom' SDXL U-Net, which stable-diffusion.cpp cannot run"):  # toy depths
        lora_io.export_sdcpp(file, tmp_path / "sdcpp.safetensors")
