"""End to end: `accelerate launch train/kd.py` reading WebDataset shards on 2 processes, and reading a
latent cache made by `train/cache_latents.py`."""

from __future__ import annotations

import io
import json
import re
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from conftest import accelerate_launch, free_port, run_script

pytestmark = pytest.mark.e2e

SHARDS, PER_SHARD = 4, 8


def jpeg(seed: int, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards of 8 samples, written by webdataset's ShardWriter; sample 1 of each is bad: a truncated JPEG
    in even shards, no caption in odd ones. manifest.json as data/make_shards.py writes it."""
    out = tmp_path_factory.mktemp("shards")
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=PER_SHARD, verbose=0) as writer:
        for i in range(SHARDS * PER_SHARD):
            sample = {"__key__": f"s{i:04d}", "jpg": jpeg(i)}
            bad = i % PER_SHARD == 1
            if bad and i // PER_SHARD % 2 == 0:
                sample["jpg"] = sample["jpg"][:100]
            if not (bad and i // PER_SHARD % 2 == 1):
                sample["txt"] = f"sample {i}"
            writer.write(sample)
    shards = [{"name": f"shard-{k:06d}.tar", "samples": PER_SHARD} for k in range(SHARDS)]
    (out / "manifest.json").write_text(json.dumps({"samples": SHARDS * PER_SHARD, "shards": shards}))
    return out


def test_two_processes_read_disjoint_shards_for_the_right_epochs(tmp_path, shards):
    # Not resampled: rank 0 reads shards 0 and 2, rank 1 shards 1 and 3, 16 samples = 4 batches of 4 per
    # epoch each. 8 steps are 2 epochs: every bad sample is met exactly twice, always by the same rank.
    # (A batch holds at most 2 bad samples, so none is passed over empty.)
    result = accelerate_launch(["train/kd.py", "--config", "configs/toy.yaml", f"output_dir={tmp_path}",
                                "data.source=webdataset", f"data.path={shards}", "data.resampled=false",
                                "data.shuffle_buffer=4", "train.batch_size=4", "train.max_steps=8",
                                "train.checkpoint_every=0", "train.sample_every=0", "log.trackers=[none]"],
                               num_processes=2)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "on 2 processes" in result.stdout
    seen = re.findall(r"warning: process (\d) skipped a sample: shard-(\d+)\.tar/(s\d+): (.*)", result.stderr)
    by_key: dict[str, list[int]] = {}
    for rank, shard, key, reason in seen:
        assert int(shard) % 2 == int(rank), (rank, shard, key)  # split by node: disjoint shards per rank
        assert ("no caption" if int(shard) % 2 else "cannot read image") in reason
        by_key.setdefault(key, []).append(int(rank))
    bad = {f"s{i:04d}" for i in range(SHARDS * PER_SHARD) if i % PER_SHARD == 1}
    assert set(by_key) == bad and all(len(ranks) == 2 and len(set(ranks)) == 1 for ranks in by_key.values())

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 9))
    assert lines[3]["epoch"] == 1.0 and lines[-1]["epoch"] == 2.0
    assert sum(line["data_skipped"] for line in lines) == 2 * len(bad)  # summed over both ranks


def test_strict_stops_at_the_first_bad_sample(tmp_path, shards):
    result = accelerate_launch(["train/kd.py", "--config", "configs/toy.yaml", f"output_dir={tmp_path}",
                                "data.source=webdataset", f"data.path={shards}", "data.strict=true",
                                "train.batch_size=4", "train.max_steps=4", "train.sample_every=0",
                                "log.trackers=[none]"])
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if "data.strict=true" in line]
    assert error and re.search(r"shard-\d+\.tar/s\d+", error[0])


def test_training_from_the_latent_cache_matches_training_without_it(tmp_path, toy_teacher_dir):
    common = ["--config", "configs/toy.yaml", f"teacher={toy_teacher_dir}", "data.num_samples=16",
              "data.random_flip=false", "data.caption_dropout=0.25", "train.batch_size=4", "train.max_steps=6",
              "train.checkpoint_every=0", "log.trackers=[none]"]
    cache = tmp_path / "cache"
    # Through the same launcher as training, so that both run with the same thread count (the VAE's
    # results differ in the last bits between thread counts).
    made = accelerate_launch(["train/cache_latents.py", *common, f"data.cache={cache}", "--shard-size", "5"])
    assert made.returncode == 0, made.stderr[-3000:]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["samples"] == 16 and [s["samples"] for s in manifest["shards"]] == [5, 5, 5, 1]

    plain = accelerate_launch(["train/kd.py", *common, f"output_dir={tmp_path / 'plain'}", "train.sample_every=0"])
    assert plain.returncode == 0, plain.stderr[-3000:]
    # Two sample grids (the first loads the VAE and text encoder) at 2 sampler steps instead of 20: sampling
    # took half of this run (measured: 25 s -> 13 s).
    cached = accelerate_launch(["train/kd.py", *common, f"output_dir={tmp_path / 'cached'}", f"data.cache={cache}",
                                "train.sample_every=3", "sample.steps=2"])
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert "no VAE or text encoder loaded" in cached.stdout
    assert (tmp_path / "cached" / "samples" / "step-6.png").is_file()  # VAE and text encoder loaded for sampling

    # Same data order, caption dropout, latents, noise and timesteps: the same training, bit for bit.
    a, b = (load_file(tmp_path / run / "checkpoint-6" / "unet" / "diffusion_pytorch_model.safetensors")
            for run in ("plain", "cached"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    la, lb = ([json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("plain", "cached"))
    assert la == lb


def stall_error(result):
    """The run stopped as a user mistake, before any step, with one error line."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_a_source_with_no_usable_sample_stops_the_run(tmp_path, shards):
    """A truncated only shard (default webdataset settings: resampled) and a folder of unreadable images
    each stop the run with one line naming the source and its last reasons, instead of skipping forever."""
    broken = tmp_path / "broken_shards"
    broken.mkdir()
    (broken / "shard-000000.tar").write_bytes((shards / "shard-000000.tar").read_bytes()[:700])
    (broken / "manifest.json").write_text(
        json.dumps({"samples": 8, "shards": [{"name": "shard-000000.tar", "samples": 8}]}))
    folder = tmp_path / "bad_images"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(b"not a png")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": "x"}) + "\n" for i in range(6)))
    common = ["train/kd.py", "--config", "configs/toy.yaml", "train.batch_size=2", "train.max_steps=3",
              "train.sample_every=0", "log.trackers=[none]", "data.max_bad_in_a_row=20"]
    run = lambda args: run_script([sys.executable] + common + args)  # noqa: E731
    error = stall_error(run([f"output_dir={tmp_path / 'a'}", "data.source=webdataset", f"data.path={broken}"]))
    assert "data.source=webdataset" in error and "no usable sample" in error and "shard-000000.tar" in error
    error = stall_error(run([f"output_dir={tmp_path / 'b'}", "data.source=imagefolder", f"data.path={folder}"]))
    assert "data.source=imagefolder" in error and "a whole epoch" in error and ".png" in error


def test_a_bad_sample_on_one_of_two_processes_stops_both_with_one_line(tmp_path, shards):
    """data.strict under launch.sh --gpus 2: the launcher exits 2 with the one line of a process that read a bad
    sample (each process may read one: the shards are resampled), whichever process ended first; no traceback
    from the other, left in a collective, nor from the launcher. tests/test_cli_errors.py forces each order."""
    result = run_script(["bash", "launch.sh", "--gpus", "2", "--port", str(free_port()), "train/kd.py", "--config",
                         "configs/toy.yaml", f"output_dir={tmp_path}", "data.source=webdataset", f"data.path={shards}",
                         "data.strict=true", "train.batch_size=4", "train.max_steps=8", "train.sample_every=0",
                         "log.trackers=[none]"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.strict=true" in errors[0], result.stderr[-3000:]


BUCKETED = ["data.buckets=auto", "data.synthetic_sizes=[[32,32],[48,24],[24,48],[32,32]]", "data.num_samples=32",
            "train.checkpoint_every=0", "train.sample_every=0", "log.trackers=[none]"]


def test_bucketed_two_processes_match_one_process_of_the_same_global_batch(tmp_path):
    """Size buckets (24x40, 32x32, 40x24: 8, 16 and 8 samples), 6 steps into the second epoch (4 batches each):
    2 processes of batch 4 log the losses 1 process of batch 8 logs (rtol 1e-4) and end with weights a mean absolute
    1e-7 or less apart from its (as test_kd_e2e's unbucketed test)."""
    common = ["--config", "configs/toy.yaml", *BUCKETED, "train.max_steps=6"]
    one = accelerate_launch(["train/kd.py", *common, f"output_dir={tmp_path / 'one'}", "train.batch_size=8"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(["train/kd.py", *common, f"output_dir={tmp_path / 'two'}", "train.batch_size=4"],
                            num_processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (load_file(tmp_path / run / "checkpoint-6" / "unet" / "diffusion_pytorch_model.safetensors")
            for run in ("one", "two"))
    la, lb = ([json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two"))
    assert len(la) == 6 and np.allclose(la, lb, rtol=1e-4), (la, lb)
    apart = sum((a[k] - b[k]).abs().sum().item() for k in a) / sum(v.numel() for v in a.values())
    assert apart < 1e-7, apart


def test_training_from_a_bucketed_latent_cache_matches_training_without_it(tmp_path, toy_teacher_dir):
    common = ["--config", "configs/toy.yaml", f"teacher={toy_teacher_dir}", *BUCKETED, "data.random_flip=false",
              "data.caption_dropout=0.25", "train.batch_size=4", "train.max_steps=6"]
    cache = tmp_path / "cache"
    made = accelerate_launch(["train/cache_latents.py", *common, f"data.cache={cache}", "--shard-size", "5"])
    assert made.returncode == 0, made.stderr[-3000:]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["buckets"] == [[24, 40], [32, 32], [40, 24]] and manifest["samples"] == 32
    runs = {}
    for name, extra in (("plain", []), ("cached", [f"data.cache={cache}"])):
        result = accelerate_launch(["train/kd.py", *common, f"output_dir={tmp_path / name}", *extra])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = load_file(tmp_path / name / "checkpoint-6" / "unet" / "diffusion_pytorch_model.safetensors")
    # Same one-bucket batches, caption dropout, latents, noise and timesteps: the same training, bit for bit.
    a, b = runs["plain"], runs["cached"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
