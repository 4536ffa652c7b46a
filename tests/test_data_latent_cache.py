"""Latent cache: written by write_cache, read back as a map-style dataset; the latents it yields are
the ones BatchEncoder samples (same mean/std, same draw from the same generator state)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from sdkd.cli.errors import UserError
from sdkd.data.sources.config import DataConfig
from sdkd.data.sources.core import SyntheticCaptions, build_dataset, collate
from sdkd.data.sources.latent_cache import CachedLatents, write_cache
from sdkd.data.sources.transforms import ImageTransform, Preprocess
from sdkd.train.engine.step_random import StepRandom
from sdkd.train.formats.fingerprint import component_fingerprint
from sdkd.train.models.teacher import load_teacher
from sdkd.train.tasks.objective import BatchEncoder, CachedEncoder, build_encoder

R, N = 32, 10


def source(dropout=0.0):
    return SyntheticCaptions(N, Preprocess(ImageTransform(R, True, False), caption_dropout=dropout), seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, toy):
    out = tmp_path_factory.mktemp("cache")
    write_cache(source(), BatchEncoder(toy), out, batch_size=4, shard_size=4,
                info={"resolution": R, "teacher": "toy"})
    return out


def test_layout_and_manifest(cache, toy):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["samples"] == N and [s["samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["scaling_factor"] == toy.vae.config.scaling_factor
    assert manifest["latent_shape"] == [4, R // 2, R // 2] and manifest["embed_shape"] == [77, 32]
    assert manifest["family"] == "sd" and manifest["fields"] == ["embeds"]
    assert sorted(p.name for p in cache.iterdir()) == ["empty_prompt.safetensors", "latents-000000.safetensors",
                                                       "latents-000001.safetensors", "latents-000002.safetensors",
                                                       "manifest.json"]


def test_cached_latents_equal_batch_encoder_latents(cache, toy):
    ds = build_dataset(DataConfig(cache=str(cache), resolution=R), seed=3)
    assert isinstance(ds, CachedLatents) and len(ds) == N
    src = source()
    indices = [7, 0, 4, 9]  # across shards, out of order: as a shuffled batch
    cached = collate([ds[i] for i in indices])
    plain = collate([src[i] for i in indices])
    assert cached["captions"] == plain["captions"] and cached["keys"] == plain["keys"]
    assert torch.equal(cached["original_size"], plain["original_size"])
    encoder = BatchEncoder(toy)
    mean, std = encoder.posterior(plain)
    assert torch.equal(cached["latent_mean"], mean) and torch.equal(cached["latent_std"], std)
    a = encoder(plain, StepRandom(11, "cpu", len(indices)))
    b = CachedEncoder(toy)(cached, StepRandom(11, "cpu", len(indices)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].hidden_states, b[1].hidden_states) and b[1].added == {}


def test_caption_dropout_matches_uncached_draws(cache, toy):
    ds = CachedLatents(cache, seed=3, caption_dropout=0.5)
    src = source(dropout=0.5)
    empty = BatchEncoder(toy).conditioning({"captions": [""]}).hidden_states[0]
    dropped = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        src.set_epoch(epoch)
        for i in range(N):
            c, p = ds[i], src[i]
            assert c["caption"] == p["caption"]
            if c["caption"] == "":
                assert torch.equal(c["embeds"], empty)
                dropped += 1
    assert 0 < dropped < 3 * N


def test_loader_with_workers_and_fp16(tmp_path, toy):
    write_cache(source(), BatchEncoder(toy), tmp_path, batch_size=3,
                shard_size=3, dtype="fp16", info={"resolution": R})
    ds = CachedLatents(tmp_path)
    batches = list(DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=2))
    assert [len(b["captions"]) for b in batches] == [4, 4, 2]
    assert batches[0]["latent_mean"].dtype == torch.float16 and batches[0]["embeds"].shape == (4, 77, 32)


def test_checked_against_the_teacher(cache, toy):
    ds = CachedLatents(cache)
    parts = load_teacher("toy", with_encoders=False)
    cfg = DataConfig(cache=str(cache), resolution=R)
    assert isinstance(build_encoder(cfg, parts, ds, torch.device("cpu")), CachedEncoder)
    with pytest.raises(UserError, match="data.resolution"):
        build_encoder(DataConfig(cache=str(cache), resolution=64), parts, ds, torch.device("cpu"))
    parts.vae_config = {**parts.vae_config, "scaling_factor": 0.13025}
    with pytest.raises(UserError, match="scaling factor"):
        build_encoder(cfg, parts, ds, torch.device("cpu"))


def test_checked_against_the_teachers_weights_not_its_path(tmp_path, toy):
    """A cache records the fingerprints of the encoders' weight files: the same files under another path pass,
    another VAE file under the same name is refused naming the VAE."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sdkd.train.models.toy import toy_teacher_folder

    write_cache(source(), BatchEncoder(toy), tmp_path / "cache", batch_size=5, info={
        "resolution": R, "teacher": "toy", "weights": {name: component_fingerprint(toy, name)
                                                       for name in ("vae", "text_encoder")}})
    ds, cfg = CachedLatents(tmp_path / "cache"), DataConfig(cache=str(tmp_path / "cache"), resolution=R)
    moved = shutil.copytree(toy_teacher_folder(), tmp_path / "moved")
    build_encoder(cfg, load_teacher(str(moved), with_encoders=False), ds, torch.device("cpu"))  # same weights
    vae = next((moved / "vae").glob("*.safetensors"))
    save_file({k: v * 1.01 for k, v in load_file(str(vae)).items()}, str(vae), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"was made with other weights of the teacher's vae \(teacher 'toy' then\)"):
        build_encoder(cfg, load_teacher(str(moved), with_encoders=False), ds, torch.device("cpu"))


def test_a_damaged_shard_is_named_when_the_cache_is_opened(cache, tmp_path):
    import shutil

    damaged = shutil.copytree(cache, tmp_path / "cache")
    shard = damaged / "latents-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match=f"^latent cache shard {shard} is damaged or missing"):
        CachedLatents(damaged)


def test_unfinished_cache_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a finished latent cache"):
        CachedLatents(tmp_path)


def test_teacher_samples_are_stored_exactly_with_a_seed_per_sample(toy):
    """`train/cache_latents.py --from-samples` (SampledLatents): sample i is the latent diffusers' own pipeline
    of the teacher samples with seed + i, as a posterior of zero spread; the seeds run on across batches."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from sdkd.train.models.toy import TOY_TEACHER
    from sdkd.train.tasks.sampled_latents import SampledLatents

    captions = ["a red circle on a blue background", "a green square on a white background", "a yellow triangle"]
    encoder = SampledLatents(toy, steps=2, guidance_scale=4.0, resolution=R, seed=5)
    first, spread = encoder.posterior({"captions": captions[:2]})
    second, _ = encoder.posterior({"captions": captions[2:]})  # the next batch: seeds 7, ...
    assert torch.equal(spread, torch.zeros_like(first))
    pipe = StableDiffusionPipeline.from_pretrained(TOY_TEACHER, local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = [pipe([caption], num_inference_steps=2, guidance_scale=4.0, height=R, width=R, output_type="latent",
                     generator=torch.Generator().manual_seed(5 + i)).images for i, caption in enumerate(captions)]
    scaled = torch.cat([first, second]) * toy.vae.config.scaling_factor
    torch.testing.assert_close(scaled, torch.cat(expected), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(scaled[0], scaled[1])


def test_kd_from_the_cache_loads_no_vae_or_text_encoder(cache, tmp_path):
    """train/kd.py's build with data.cache: the step's encoder is the cache's, and neither the task's parts nor
    the models the loop freezes (and moves to the device) hold a VAE or text encoder; the student has gradient
    checkpointing on."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from sdkd.train.engine.config import load_config
    from sdkd.train.kd import build
    from sdkd.train.tasks.diffusion_config import KDConfig

    cfg = load_config(None, ["teacher=toy", f"output_dir={tmp_path}", f"data.cache={cache}", f"data.resolution={R}",
                             "train.gradient_checkpointing=true"], schema=KDConfig)
    try:
        task, dataset = build(cfg, Accelerator(cpu=True))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert isinstance(dataset, CachedLatents) and isinstance(task.encoder, CachedEncoder)
    assert not task.parts.has_encoders
    assert {name: m for name, m in task.parts.frozen.items()} == {"vae": None, "text_encoder": None}
    assert [name for name, m in task.frozen.items() if m is not None] == ["teacher"]
    assert task.modules[0].module.is_gradient_checkpointing
