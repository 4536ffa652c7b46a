"""Size buckets (data.buckets; data/sources/buckets.py): each image cropped to the bucket of nearest aspect ratio
with its size and crop recorded as diffusers' SDXL script records them, every batch one bucket from every
source, the same batches on 1 or 2 processes and after a resume, and the latent cache round-tripping them."""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from accelerate.data_loader import BatchSamplerShard
from PIL import Image
from torch.utils.data import DataLoader

from sdkd.cli.errors import ConfigError, UserError
from sdkd.data.sources.buckets import BucketBatchSampler, group_by_bucket, sample_buckets
from sdkd.data.sources.config import DataConfig
from sdkd.data.sources.core import FirstSamples, build_dataset, collate
from sdkd.data.sources.latent_cache import CachedLatents, write_cache
from sdkd.data.sources.transforms import ImageTransform, nearest_bucket
from sdkd.train.engine.config import RunConfig, load_config
from sdkd.train.engine.task import Task, TrainedModule
from sdkd.train.models.families import SDXL
from sdkd.train.models.teacher import PipelineParts
from sdkd.train.models.toy import build_toy_xl_pipeline
from sdkd.train.tasks.objective import BatchEncoder

from conftest import fit_task, loop_config, run_script

# (width, height) of the test images: landscape, portrait, square and a wide panorama.
SHAPES = [(48, 32), (32, 48), (40, 40), (64, 24), (30, 45), (45, 30)]
TOY_BUCKETS = ((24, 40), (32, 32), (40, 24))  # (height, width): auto at data.resolution=32


def data(**kw) -> DataConfig:
    return DataConfig(**{"resolution": 32, "buckets": "auto", "random_flip": False, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder of 18 images of the SHAPES in turn, each a left-to-right ramp (so crops and flips show)."""
    root = tmp_path_factory.mktemp("images")
    lines = []
    for i in range(18):
        w, h = SHAPES[i % len(SHAPES)]
        ramp = np.broadcast_to(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, w, 3))
        Image.fromarray(np.ascontiguousarray(ramp)).save(root / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"image {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return root


# ---------------------------------------------------------------------------------------------
# Config


def test_auto_buckets_hold_the_pixel_budget_in_steps_of_64():
    # SDXL's 1024 px buckets (its paper's 1024x1024, 1152x896, 1216x832, 1344x768 among them), aspect <= 2.
    assert DataConfig(resolution=1024, buckets="auto").bucket_sizes() == (
        (704, 1408), (768, 1280), (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024),
        (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704))
    assert DataConfig(resolution=512, buckets="auto").bucket_sizes() == (
        (384, 640), (448, 576), (512, 512), (576, 448), (640, 384))
    assert data().bucket_sizes() == TOY_BUCKETS  # the step scaled down to 8 px for the toy resolution
    assert DataConfig(resolution=512, buckets="auto", bucket_max_aspect=1.0).bucket_sizes() == ((512, 512),)
    assert len(DataConfig(resolution=512, buckets="auto", bucket_step=32).bucket_sizes()) > 5
    assert DataConfig(buckets=[[640, 384], [512, 512]]).bucket_sizes() == ((512, 512), (640, 384))
    assert DataConfig().bucket_sizes() == ()


@pytest.mark.parametrize("override, message", [
    ("data.buckets=wide", "config key 'data.buckets': expected none, auto or a list of [height, width], got 'wide'"),
    ("data.buckets=[[512]]", "config key 'data.buckets': expected none, auto or a non-empty list of [height, width]"),
    ("data.buckets=[]", "config key 'data.buckets': expected none, auto or a non-empty list"),
    ("data.buckets=[[500,512]]", "config key 'data.buckets': bucket sides must be multiples of 8"),
    ("data.buckets=[[512,512],[512,512]]", "config key 'data.buckets': a size is repeated"),
    ("data.bucket_step=12", "config key 'data.bucket_step': must be a positive multiple of 8 or null, got 12"),
    ("data.bucket_max_aspect=0.5", "config key 'data.bucket_max_aspect': must be >= 1"),
    ("data.synthetic_sizes=[[32,0]]", "config key 'data.synthetic_sizes': expected [height, width] pairs"),
])
def test_bad_bucket_config_is_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["output_dir=out", override], schema=RunConfig)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_bucket_config_from_a_trainer_exits_2(tmp_path):
    result = run_script([sys.executable, "train/kd.py", "--config", "configs/toy.yaml", f"output_dir={tmp_path}",
                         "data.buckets=[[30,40]]", "--check-config"], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: config key 'data.buckets': bucket sides must be multiples of 8 (the VAE's factor), got [[30, 40]]"]


def test_sampled_latents_cache_refuses_buckets(tmp_path):
    result = run_script([sys.executable, "train/cache_latents.py", "--config", "configs/toy.yaml", "--from-samples",
                         f"data.cache={tmp_path / 'c'}", "data.buckets=auto", "--check-config"], timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: config key 'data.buckets': --from-samples samples square latents at data.resolution; "
        "set data.buckets=none"]


# ---------------------------------------------------------------------------------------------
# One image: bucket, resize, crop, flip, time ids


def ramp(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                                           np.zeros((h, w, 1), np.float32)], 2).astype(np.uint8))


def test_nearest_bucket_by_aspect_ratio():
    assert nearest_bucket(TOY_BUCKETS, 32, 48) == 0 and nearest_bucket(TOY_BUCKETS, 48, 32) == 2
    assert nearest_bucket(TOY_BUCKETS, 33, 32) == 1 and nearest_bucket(TOY_BUCKETS, 200, 100) == 2
    # Portrait and landscape alike: 3:2 is nearer 2:1 than 1:1 by ratio (1.5 / 1 > 2 / 1.5), both ways.
    wide_square_tall = ((32, 64), (32, 32), (64, 32))
    assert nearest_bucket(wide_square_tall, 48, 32) == 2 and nearest_bucket(wide_square_tall, 32, 48) == 0


def test_image_is_resized_to_cover_its_bucket_and_cropped():
    transform = ImageTransform(32, center_crop=True, random_flip=False, buckets=TOY_BUCKETS)
    out = transform(ramp(64, 24), np.random.default_rng(0))
    # 64x24 (w x h) -> bucket 24x40 (h x w); covering it takes 64x24 as it is; centre crop (64 - 40) / 2 = 12.
    assert out.pixel_values.shape == (3, 24, 40) and out.target_size == (24, 40)
    assert out.original_size == (24, 64) and out.crop_top_left == (0, 12)
    expected = np.asarray(ramp(64, 24), np.float32)[:, 12:52] / 127.5 - 1
    assert torch.allclose(out.pixel_values, torch.from_numpy(expected.transpose(2, 0, 1).copy()), atol=1e-6)


class Flip:
    """A generator whose first draw flips (random() < 0.5) and whose crop draws give the largest offsets."""

    def random(self):
        return 0.0

    def integers(self, low, high):
        return high - 1


def test_flip_comes_before_the_crop_as_in_diffusers():
    image = ramp(60, 24)  # -> bucket 24x40, nothing to resize; random crop, flipped
    out = ImageTransform(32, center_crop=False, random_flip=True, buckets=TOY_BUCKETS)(image, Flip())
    assert out.crop_top_left == (0, 20)  # the crop's own offset in the flipped image (segmind's would be 60 - 20)
    flipped = np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), np.float32)[:, 20:60]
    assert torch.allclose(out.pixel_values, torch.from_numpy((flipped / 127.5 - 1).transpose(2, 0, 1).copy()))


@pytest.fixture(scope="module")
def xl_parts():
    return PipelineParts.of(build_toy_xl_pipeline())


def test_sdxl_time_ids_match_diffusers_train_text_to_image_sdxl(xl_parts):
    """A 1500x1000 (w x h) photo at resolution 1024, as diffusers' script computes its time ids
    (original_size = (h, w) before resizing, crop (y1, x1) in the resized (flipped) image, target = the crop's size),
    by hand: square, shorter side to 1024 -> 1536x1024, centre crop x1 = round((1536 - 1024) / 2) = 256. In the
    bucket nearest 3:2 (832x1216, h x w): cover -> 1248x832, x1 = round((1248 - 1216) / 2) = 16."""
    photo = Image.new("RGB", (1500, 1000))
    square = ImageTransform(1024, center_crop=True, random_flip=False)
    buckets = DataConfig(resolution=1024, buckets="auto").bucket_sizes()
    bucketed = ImageTransform(1024, center_crop=True, random_flip=True, buckets=buckets)
    samples = [square(photo, np.random.default_rng(0)), bucketed(photo, Flip())]
    batch = {"captions": ["a", "b"], "original_size": [s.original_size for s in samples],
             "crop_top_left": [s.crop_top_left for s in samples], "target_size": [s.target_size for s in samples]}
    ids = SDXL.tokenize(xl_parts, batch)["time_ids"]
    assert ids.tolist() == [[1000, 1500, 0, 256, 1024, 1024], [1000, 1500, 0, 16, 832, 1216]]
    assert samples[1].pixel_values.shape == (3, 832, 1216)
    # From a collated batch of one bucket, without target_size: the images' size.
    one = collate([{"caption": "c", "key": "k", "pixel_values": samples[1].pixel_values,
                    "original_size": (1000, 1500), "crop_top_left": (0, 16)}])
    assert SDXL.tokenize(xl_parts, one)["time_ids"].tolist() == [[1000, 1500, 0, 16, 832, 1216]]


# ---------------------------------------------------------------------------------------------
# Batches of one bucket


def sizes_of(batch) -> set:
    return {tuple(t) for t in batch["target_size"].tolist()} | {tuple(batch["pixel_values"].shape[-2:])}


def test_imagefolder_batches_hold_one_bucket(folder):
    ds = build_dataset(data(source="imagefolder", path=str(folder)), seed=0)
    buckets = sample_buckets(ds)
    assert buckets.tolist() == [0, 2, 1, 0, 2, 0] * 3  # from the image headers, before any decode
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(buckets, 3, seed=5), collate_fn=collate, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 6  # 9, 3 and 6 samples per bucket: all in full batches of 3
    assert all(len(sizes_of(b)) == 1 and len(b["keys"]) == 3 for b in batches)
    assert {s for b in batches for s in sizes_of(b)} == set(TOY_BUCKETS)
    for b in batches:  # each sample in the bucket its header said
        assert all(TOY_BUCKETS[buckets[int(k[-6:-4])]] == tuple(b["pixel_values"].shape[-2:]) for k in b["keys"])
    assert sorted(k for b in batches for k in b["keys"]) == sorted(str(folder / f"{i:02d}.png") for i in range(18))
    # data.max_train_samples: the first samples' buckets.
    assert sample_buckets(FirstSamples(ds, 7)).tolist() == [0, 2, 1, 0, 2, 0, 0]
    assert sample_buckets(build_dataset(data(buckets="none", source="imagefolder", path=str(folder)), 0)) is None


def test_synthetic_and_hf_sources_bucket_too(tmp_path, folder):
    synthetic = build_dataset(data(num_samples=6, synthetic_sizes=[[48, 32], [32, 32], [20, 60]]), seed=0)
    assert sample_buckets(synthetic).tolist() == [2, 1, 0] * 2
    assert [tuple(synthetic[i]["pixel_values"].shape[-2:]) for i in range(3)] == [(40, 24), (32, 32), (24, 40)]
    assert synthetic[0]["original_size"] == (48, 32)
    pytest.importorskip("datasets")
    import datasets

    rows = {"image": [{"bytes": (folder / f"{i:02d}.png").read_bytes(), "path": None} for i in range(6)],
            "text": [f"row {i}" for i in range(6)]}
    datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string")})).to_parquet(str(tmp_path / "d.parquet"))
    hf = build_dataset(data(source="hf", path=str(tmp_path / "d.parquet")), seed=0)
    assert sample_buckets(hf).tolist() == [0, 2, 1, 0, 2, 0]
    assert [tuple(hf[i]["pixel_values"].shape[-2:]) for i in range(6)] == [TOY_BUCKETS[b] for b in [0, 2, 1, 0, 2, 0]]


def test_the_vae_trainers_first_images_are_of_one_bucket():
    from sdkd.train.tasks.autoencoder import first_images

    ds = build_dataset(data(num_samples=6, synthetic_sizes=[[48, 32], [32, 32]]), seed=0)
    pixels, captions = first_images(ds, 3)
    assert pixels.shape == (3, 3, 40, 24) and captions == [ds[i]["caption"] for i in (0, 2, 4)]


def test_the_tiny_decoders_held_out_samples_are_of_one_bucket():
    from sdkd.train.tasks.decoder import split_held_out

    ds = build_dataset(data(num_samples=7, synthetic_sizes=[[48, 32], [32, 32]]), seed=0)  # the last is 48x32
    training, held = split_held_out(ds, 2)
    assert [s["key"] for s in held] == ["synthetic/4", "synthetic/6"]
    assert collate(held)["pixel_values"].shape[-2:] == (40, 24)
    assert list(training.indices) == [0, 1, 2, 3, 5] and sample_buckets(training).tolist() == [2, 1, 2, 1, 1]


def test_exif_rotated_image_goes_to_the_bucket_of_its_upright_shape(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48x32 landscape, shown turned a quarter: 32x48 portrait
    Image.new("RGB", (48, 32)).save(tmp_path / "0.jpg", exif=exif)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "0.jpg", "text": "t"}))
    ds = build_dataset(data(source="imagefolder", path=str(tmp_path)), seed=0)
    assert sample_buckets(ds).tolist() == [2] and ds[0]["pixel_values"].shape[-2:] == (40, 24)


def test_sampler_is_seeded_per_epoch_and_two_processes_share_one_global_batch():
    buckets = np.array([0] * 9 + [1] * 17 + [2] * 6)
    sampler = BucketBatchSampler(buckets, 4, num_processes=1, seed=3)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 == list(sampler) and epoch1 != list(BucketBatchSampler(buckets, 4, seed=3))
    assert all(len(set(buckets[b])) == 1 and len(b) == 4 for b in epoch1) and len(epoch1) == len(sampler) == 2 + 4 + 1
    # Two processes of batch 2, dealt by accelerate's own shard of the sampler: each step's two batches are one
    # bucket and together the batch of 4 one process reads.
    two = BucketBatchSampler(buckets, 2, num_processes=2, seed=3)
    two.set_epoch(1)
    shards = [list(BatchSamplerShard(two, num_processes=2, process_index=k)) for k in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(epoch1) == len(BatchSamplerShard(two, 2, 0))
    assert [a + b for a, b in zip(*shards)] == epoch1


def test_group_by_bucket_keeps_skip_markers_in_batches():
    items = [{"k": 0}, {"skip": "a"}, {"k": 1}, {"k": 0}, {"k": 1}, {"k": 1}, {"skip": "b"}, {"k": 0}, {"k": 2}]
    groups = list(group_by_bucket(iter(items), 3, lambda s: s["k"], pad=True))
    assert all(len(g) == 3 and len({s["k"] for s in g if "k" in s}) == 1 for g in groups)
    assert sorted(s["skip"] for g in groups for s in g if "skip" in s) == ["a", "b"]
    assert [s for g in groups for s in g].count({"k": 2}) == 3  # the last part-filled bucket, padded
    unpadded = list(group_by_bucket(iter(items), 3, lambda s: s["k"], pad=False))
    assert sorted(json.dumps(s) for g in unpadded for s in g) == sorted(json.dumps(s) for s in items)


def jpeg(w: int, h: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def test_webdataset_stream_is_grouped_by_bucket_per_worker(tmp_path):
    with wds.ShardWriter(str(tmp_path / "shard-%06d.tar"), maxcount=12, verbose=0) as writer:
        for i in range(24):
            sample = {"__key__": f"s{i:03d}", "jpg": jpeg(*SHAPES[i % len(SHAPES)], i), "txt": f"s {i}"}
            if i == 5:
                sample["jpg"] = sample["jpg"][:50]  # a bad sample rides along in some batch
            writer.write(sample)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"shards": [{"name": f"shard-{k:06d}.tar", "samples": 12} for k in range(2)]}))
    ds = build_dataset(data(source="webdataset", path=str(tmp_path), resampled=False, shuffle_buffer=4), seed=0)
    per_epoch = ds.set_batching(3, 1, 2)
    loader = DataLoader(ds, batch_size=3, drop_last=True, collate_fn=collate, num_workers=2)
    batches = list(loader)[:per_epoch]
    assert per_epoch == 8 and len(batches) == per_epoch
    assert all(len(sizes_of(b)) == 1 for b in batches if b["keys"])
    assert sum(len(b["skipped"]) for b in batches) == 1
    assert {s for b in batches if b["keys"] for s in sizes_of(b)} == set(TOY_BUCKETS)


# ---------------------------------------------------------------------------------------------
# The loop: same batches after a resume


class Record(Task):
    """Trains one weight on the batch's mean pixel; records each step's sample keys and image size."""

    def __init__(self, cfg):
        self.weight = torch.nn.Linear(1, 1)
        self.modules = [TrainedModule("w", self.weight, cfg.optim)]
        self.seen = []

    def train_step(self, ctx, batch, rng):
        self.seen.append((batch["keys"], tuple(batch["pixel_values"].shape)))
        loss = ctx.model("w")(batch["pixel_values"].mean().view(1, 1)).square().sum()
        ctx.backward("w", loss)
        return {"loss": loss.detach()}

    def export(self, out):
        path = out / "w.pt"
        torch.save(self.weight.state_dict(), path)
        return [path]


def test_resume_mid_epoch_reads_the_same_bucketed_batches(tmp_path):
    # 24 samples in three buckets of 8: 12 batches of 2 per epoch; 16 steps cross an epoch, resume at step 7.
    run = ["data.resolution=32", "data.buckets=auto", "data.num_samples=24",
           "data.synthetic_sizes=[[32,32],[48,24],[24,48]]", "train.max_steps=16", "train.checkpoint_every=7"]
    cfg = loop_config(tmp_path / "whole", *run)
    whole = fit_task(cfg, lambda acc: Record(cfg))
    assert len(whole.seen) == 16 and len({shape for _, shape in whole.seen}) == 3
    assert all(shape[-2:] in TOY_BUCKETS and len(keys) == 2 for keys, shape in whole.seen)
    first_epoch = [k for keys, _ in whole.seen[:12] for k in keys]
    assert sorted(first_epoch) == sorted(f"synthetic/{i}" for i in range(24))  # every sample once per epoch
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-7", resumed_dir / "checkpoint-7")
    cfg = loop_config(resumed_dir, *run, "resume=latest")
    resumed = fit_task(cfg, lambda acc: Record(cfg))
    assert resumed.seen == whole.seen[7:]


# ---------------------------------------------------------------------------------------------
# Latent cache


def test_latent_cache_round_trips_bucketed_samples(tmp_path, toy):
    cfg = data(num_samples=11, synthetic_sizes=[[48, 32], [32, 32], [20, 60], [32, 32]])
    source = build_dataset(cfg, seed=1)
    manifest = write_cache(source, BatchEncoder(toy), tmp_path, batch_size=2, shard_size=2,
                           buckets=cfg.bucket_sizes(), info={"resolution": 32})
    # Buckets 2, 1, 0, 1 in turn: 3, 5 and 3 samples; shards of at most 2 of one bucket.
    assert manifest["buckets"] == [list(b) for b in TOY_BUCKETS]
    assert sorted((s["bucket"], s["samples"]) for s in manifest["shards"]) == [(0, 1), (0, 2), (1, 1), (1, 2),
                                                                               (1, 2), (2, 1), (2, 2)]
    cached = CachedLatents(tmp_path, seed=1)
    assert len(cached) == 11 and cached.sample_buckets().tolist() == sample_buckets(source).tolist()
    encoder = BatchEncoder(toy)
    for i in [0, 5, 2, 10, 3]:
        plain, stored = source[i], cached[i]
        assert stored["key"] == plain["key"] and stored["caption"] == plain["caption"]
        for name in ("original_size", "crop_top_left", "target_size"):
            assert stored[name] == plain[name], name
        mean, _ = encoder.posterior(collate([plain]))  # alone, not in its cache batch: equal up to summation order
        assert mean.shape[-2:] == tuple(s // 2 for s in plain["target_size"])
        assert torch.allclose(stored["latent_mean"], mean[0], atol=1e-5)
    assert isinstance(build_dataset(data(cache=str(tmp_path)), 0), CachedLatents)
    with pytest.raises(UserError, match=r"^config key 'data.buckets': none gives sizes none, but the latent cache "):
        build_dataset(DataConfig(cache=str(tmp_path), resolution=32), 0)
    # A trainer's batch from the cache is one bucket.
    batches = list(DataLoader(cached, batch_sampler=BucketBatchSampler(cached.sample_buckets(), 2, seed=0),
                              collate_fn=collate))
    assert batches and all(len({tuple(t) for t in b["target_size"].tolist()}) == 1 for b in batches)


def test_sdxl_cache_keeps_each_samples_time_ids(tmp_path, xl_parts):
    cfg = data(num_samples=3, synthetic_sizes=[[48, 32], [32, 32], [20, 60]], center_crop=False)
    source = build_dataset(cfg, seed=0)
    write_cache(source, BatchEncoder(xl_parts), tmp_path, batch_size=2, buckets=cfg.bucket_sizes(),
                info={"resolution": 32})
    cached = CachedLatents(tmp_path, caption_dropout=1.0)
    for i in range(3):
        s = source[i]
        expected = [*s["original_size"], *s["crop_top_left"], *s["target_size"]]
        assert cached[i]["time_ids"].tolist() == expected and cached[i]["caption"] == ""
    assert cached[2]["time_ids"].tolist() == [20, 60, 0, int(cached[2]["crop_top_left"][1]), 24, 40]
