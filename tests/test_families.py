"""Model families: SD-1.x/2.x conditioning as before, the latent cache's named tensors, the U-Net's
arguments, SDXL refused in one line, and a cache made for one family refused by another."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdkd.cli.errors import UserError
from sdkd.data.sources.latent_cache import CachedLatents, write_cache
from sdkd.data.sources.core import SyntheticCaptions
from sdkd.data.sources.transforms import ImageTransform, Preprocess
from sdkd.train.models.families import SD, Conditioning, StableDiffusion, family_of
from sdkd.train.tasks.objective import BatchEncoder
from sdkd.train.models.teacher import PipelineParts, load_teacher
from sdkd.train.models.toy import TOY_UNET

CAPTIONS = ["a red fox", "", "a lighthouse at dusk " * 20]  # the last one is cut at 77 tokens
SDXL_CONFIG = {**TOY_UNET, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
               "projection_class_embeddings_input_dim": 80}


@pytest.fixture(scope="module")
def toy():
    parts = load_teacher("toy")
    for m in parts.encoders:
        m.requires_grad_(False).eval()
    return parts


def test_sd_encodes_captions_as_one_hidden_state(toy):
    ids = toy.tokenizer(CAPTIONS, padding="max_length", max_length=toy.tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
    with torch.no_grad():
        expected = toy.text_encoder(ids)[0]
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
    assert (pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet) == (toy.vae, toy.text_encoder, toy.tokenizer,
                                                                         toy.unet)
    assert PipelineParts(toy.unet, None, None, None, toy.scheduler, vae_config=toy.vae_config).family is SD


def test_sdxl_is_refused_in_one_line(toy_teacher_dir, tmp_path):
    with pytest.raises(UserError) as err:
        family_of(SDXL_CONFIG, "teacher 'x'")
    assert str(err.value).startswith("teacher 'x': SDXL is not supported yet") and "\n" not in str(err.value)
    folder = tmp_path / "sdxl"
    shutil.copytree(toy_teacher_dir, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **SDXL_CONFIG}))
    for with_unet in (True, False):  # refused from the U-Net's config, before any weights load
        with pytest.raises(UserError, match=f"^teacher '{folder}': SDXL is not supported yet"):
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
