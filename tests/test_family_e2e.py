"""SDXL at toy widths (train/models/toy.py `build_toy_xl_pipeline`) through the code SD runs: KD with feature KD
(train/kd.py's task on the shared loop) trains, evaluates against the teacher and draws sample grids; a latent cache
is written (train/cache_latents.py) and a run from it trains exactly as the run without it; the student exports as
a diffusers folder its family's pipeline class loads and as an SGM single file, samples through eval's pipeline,
has its MACs counted, and the stable-diffusion.cpp target is refused in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from sdkd.cli.errors import UserError
from sdkd.train.engine.config import load_config
from sdkd.train.models.families import SDXL
from sdkd.train.models.toy import build_toy_xl_pipeline
from sdkd.train.tasks.diffusion_config import KDConfig

from conftest import fit_task, sampled, size_ids

pytestmark = pytest.mark.e2e

STEPS = 4
# bk_small's cut on three levels (one resnet per level, no mid block).
XL_STUDENT = ["student.preset=custom", "student.keep_down=[[0],[0],[0]]", "student.keep_up=[[0,2],[0,2],[0,2]]",
              "student.mid_block=false"]
RUN = ["data.source=synthetic", "data.resolution=32", "data.num_samples=8", "data.random_flip=false",
       "train.batch_size=4", f"train.max_steps={STEPS}", f"train.checkpoint_every={STEPS}", "train.log_every=1",
       "train.sample_every=2", "sample.steps=2", "sample.prompts=[a red circle on a blue background]",
       "eval.every=2", "eval.timesteps=2", "eval.teacher_steps=2", "loss.lambda_out=1.0", "loss.lambda_feat=1.0",
       "log.trackers=[none]", *XL_STUDENT]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl_teacher")
    build_toy_xl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def kd_config(teacher, out, *overrides) -> KDConfig:
    return load_config(None, [f"teacher={teacher}", f"output_dir={out}", *RUN, *overrides], schema=KDConfig)


def kd(teacher, out, *overrides):
    """train/kd.py's task on the loop, as its command runs it; returns the task."""
    from sdkd.train.kd import build

    cfg = kd_config(teacher, out, *overrides)
    return fit_task(cfg, lambda acc: build(cfg, acc)[0])


@pytest.fixture(scope="module")
def run(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("xl_run")
    return out, kd(teacher, out)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kd_trains_evaluates_and_samples(run, teacher):
    from sdkd.train.models.students import build_student, removal_spec
    from sdkd.train.models.teacher import load_teacher

    out, task = run
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    for name in ("loss", "task", "out", "feat"):
        assert all(math.isfinite(r[name]) for r in rows if "loss" in r), name
    assert task.objective.num_feature_pairs == 6  # every student down and up block, by the bk table
    assert [r["step"] for r in rows if "eval/noise_mse" in r] == [0, 2, 4]
    assert all((out / "samples" / name).is_file() for name in ("teacher.png", "step-2.png", "step-4.png"))
    # The student moved from where it was cut.
    spec = removal_spec(kd_config(teacher, out).student)
    start = build_student(load_teacher(str(teacher)).unet, spec).state_dict()
    final = load_file(out / f"checkpoint-{STEPS}" / "unet" / "diffusion_pytorch_model.safetensors")
    assert final.keys() == start.keys() and any(not torch.equal(final[k], start[k]) for k in start)
    # The family's dtype rule: its VAE stays fp32 under fp16, the text encoders and the teacher take fp16.
    assert task.parts.family is SDXL
    assert {name: task.frozen_dtype(name, torch.float16) for name in task.frozen} == {
        "teacher": torch.float16, "vae": torch.float32, "text_encoder": torch.float16, "text_encoder_2": torch.float16}
    assert task.frozen_dtype("vae", torch.bfloat16) == torch.bfloat16


def test_the_student_folder_is_the_family_pipeline(run, teacher):
    out, _ = run
    student = StableDiffusionXLPipeline.from_pretrained(out / "student", local_files_only=True)
    assert isinstance(student.text_encoder_2, CLIPTextModelWithProjection)
    assert student.unet.config.addition_embed_type == "text_time" and student.unet.config.layers_per_block == 1
    assert len(student.unet.down_blocks) == 3 and student.unet.mid_block is None
    source = StableDiffusionXLPipeline.from_pretrained(teacher, local_files_only=True)
    for name in ("vae", "text_encoder", "text_encoder_2"):  # the frozen parts, as the teacher stores them
        mine, theirs = getattr(student, name).state_dict(), getattr(source, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name
    card = (out / "student" / "README.md").read_text()
    assert 'StableDiffusionXLPipeline.from_pretrained("PATH/TO/THIS/FOLDER")' in card


def test_export_sampling_and_cost(run, teacher, tmp_path):
    """The export, eval's pipeline, and cost counting (MACs, latency, the benchmarks' U-Net timing) call the U-Net
    with the added conditions it takes."""
    from sdkd.eval.bench.timing import interleaved_step_times
    from sdkd.eval.bench.timing import unet_macs as bench_macs
    from sdkd.eval.evaluation.cost import latency, pipeline_params, unet_macs
    from sdkd.eval.inference.pipeline import load_pipeline
    from sdkd.train.export import export
    from sdkd.train.formats.model_files import load_single_file

    out, _ = run
    folder = export(str(out), "diffusers", str(tmp_path / "exported"))
    exported = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    trained = load_file(out / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, trained[k]) for k, v in exported.unet.state_dict().items())
    single = export(str(out), "single-file", str(tmp_path / "student.safetensors"))  # the SGM layout
    assert all(torch.equal(v, trained[k]) for k, v in load_single_file(single).unet.state_dict().items())
    with pytest.raises(UserError) as err:  # sd.cpp has tables for SDXL's, SSD-1B's and Vega's depths only
        export(str(out), "single-file", str(tmp_path / "sdcpp.safetensors"), target="sdcpp")
    assert "stable-diffusion.cpp cannot run" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "sdcpp.safetensors").exists()

    pipe = load_pipeline(folder)
    assert type(pipe.pipe) is StableDiffusionXLPipeline
    images = pipe(["a red circle on a blue background"], steps=2, seed=0)
    assert images[0].size == (32, 32)
    device, dtype = torch.device("cpu"), torch.float32
    teacher_pipe = load_pipeline(teacher).pipe
    macs = {name: unet_macs(p, 32, device, dtype) for name, p in (("student", pipe.pipe), ("teacher", teacher_pipe))}
    assert 0 < macs["student"] < macs["teacher"]
    assert bench_macs(pipe.unet, 32, pipe.pipe.vae_scale_factor, device, dtype) == macs["student"]
    seconds = latency(pipe, "a red circle", steps=2, guidance_scale=4.0, resolution=32, seed=0, negative_prompt=None,
                      warmup=0, repeats=1)
    assert seconds["sec_per_image"] > 0 and seconds["unet_sec_per_image"] > 0
    times = interleaved_step_times({"student": pipe.unet}, 2, 32, 2, device, dtype, repeats=1)
    assert len(times["student"]) == 1 and times["student"][0] > 0
    counted = pipeline_params(pipe.pipe)
    assert counted["params"] == sum(p.numel() for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                                    for p in getattr(pipe.pipe, name).parameters())


def test_evaluate_the_run(run, teacher, tmp_path, unet_calls):
    """eval/evaluate.py on the SDXL run: its teacher from config.yaml, its checkpoint on the teacher's parts, and the
    run's own held-out triples, on which the checkpoint scores what the loop measured at its step."""
    from sdkd.eval.evaluate import main

    out, _ = run
    main([str(out), "--config", "configs/eval_toy.yaml", "--out", str(tmp_path), "steps=2", "num_images=2",
          "latency.enabled=false"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["teacher"] == str(teacher) and report["triples"]["resolution"] == 32
    teacher_row, row = report["rows"]
    assert (teacher_row["name"], row["name"], row["step"]) == ("teacher", f"checkpoint-{STEPS}", STEPS)
    assert teacher_row["noise_mse"] == 0 and row["sample_mse"] > 0
    in_loop = [r["eval/noise_mse"] for r in metrics(out) if r.get("step") == STEPS and "eval/noise_mse" in r]
    assert row["noise_mse"] == pytest.approx(in_loop[0], rel=1e-4)
    calls = sampled(unet_calls)
    assert len(calls) == 6  # per model: its noise MSE on the run's 2 triples, and 2 steps for the 2 prompts
    assert all(c["time_ids"].tolist() == [size_ids(32, 32)] * len(c["time_ids"]) for c in calls)
    assert all(c["text_embeds"].shape[-1] == 16 for c in calls)  # the second text encoder's pooled projection


def test_a_run_from_the_latent_cache_trains_as_the_run_without_it(run, teacher, tmp_path):
    from sdkd.data.sources.latent_cache import CachedLatents
    from sdkd.train.cache_latents import main as cache_latents

    out, _ = run
    cache = tmp_path / "cache"
    common = [f"teacher={teacher}", *RUN]
    cache_latents(["--shard-size", "5", *common, f"output_dir={tmp_path / 'unused'}", f"data.cache={cache}"])
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["fields"] == ["embeds", "text_embeds", "time_ids"]
    sample = CachedLatents(cache)[0]
    assert sample["embeds"].shape == (77, 40) and sample["text_embeds"].shape == (16,)
    assert sample["time_ids"].tolist() == [*sample["original_size"], *sample["crop_top_left"], 32, 32]

    cached = tmp_path / "cached"
    task = kd(teacher, cached, f"data.cache={cache}")
    assert task.parts.has_encoders  # loaded for the sample grids and the evaluation, not for the steps
    assert (cached / "samples" / f"step-{STEPS}.png").is_file()
    # Same data order, latents, conditioning, noise and timesteps: the same training, bit for bit. (Caption
    # dropout is left out: the second encoder's pooled projection of "" differs in the last bit between a batch
    # of one, the cache's, and a batch of four; test_families.py checks what dropout puts in a cached sample.)
    unet = f"checkpoint-{STEPS}/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(out / unet), load_file(cached / unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(out) if "loss" in r] == [r["loss"] for r in metrics(cached) if "loss" in r]


def test_sub_block_kd_trains_the_toy_sdxl_student_with_the_teacher_frozen_and_unwrapped(teacher, tmp_path,
                                                                                       monkeypatch):
    """Feature KD on every resnet and attention output (student.feature_pairs=sub_block) trains the toy SDXL
    student; the teacher never enters accelerator.prepare (no DDP, no master copy) and gets no gradient."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    prepared, prepare = [], Accelerator.prepare

    def recording_prepare(self, *args, **kwargs):
        prepared.extend(args)
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "prepare", recording_prepare)
    out = tmp_path / "run"
    task = kd(teacher, out, "student.feature_pairs=sub_block", "train.max_steps=3", "train.checkpoint_every=0",
              "train.sample_every=0", "eval.every=0")
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r[name]) for r in rows for name in ("loss", "task", "out", "feat"))
    assert all(r["feat"] > 0 for r in rows)
    # XL_STUDENT on the toy SDXL teacher: down 1 + 2 + 2 (resnet, attention), up 4 + 4 + 2, no mid block.
    assert task.objective.num_feature_pairs == 15
    frozen = task.frozen["teacher"]
    assert task.objective.teacher is frozen and type(frozen) is UNet2DConditionModel
    assert any(m is task.modules[0].module for m in prepared)  # the student went through prepare ...
    assert not any(m is frozen for m in prepared)  # ... the teacher did not
    assert not any(p.requires_grad or p.grad is not None for p in frozen.parameters())


def test_bucketed_batches_give_each_sample_its_time_ids(teacher, tmp_path, monkeypatch):
    """Size buckets through SDXL KD: every training batch is one size, and the time ids the family makes are each
    sample's original size, crop and that size (diffusers' SDXL script's), not the square resolution."""
    seen = []
    tokenize = SDXL.tokenize

    def recording(parts, batch):
        tokens = tokenize(parts, batch)
        if "pixel_values" in batch:  # a training batch (sample grids and evaluation have none)
            seen.append((tuple(batch["pixel_values"].shape[-2:]), tokens["time_ids"].tolist(),
                         batch["original_size"].tolist()))
        return tokens

    monkeypatch.setattr(SDXL, "tokenize", recording)
    kd(teacher, tmp_path, "data.buckets=auto", "data.synthetic_sizes=[[48,24],[24,48]]", "data.num_samples=16",
       "train.batch_size=4", "data.center_crop=false", "eval.every=0", "train.sample_every=0")
    assert len(metrics(tmp_path)) == STEPS and len(seen) == STEPS
    assert {size for size, _, _ in seen} == {(40, 24), (24, 40)}  # both buckets trained
    for size, ids, original in seen:
        assert [row[:2] for row in ids] == original and all(row[4:] == list(size) for row in ids)
        # 48x24 covers 40x24 at 48x24: a random crop's top within the 8 spare rows (and the mirror for 24x48).
        assert all(0 <= row[2] + row[3] <= 8 and 0 in row[2:4] for row in ids)
    assert any(row[2] + row[3] > 0 for _, ids, _ in seen for row in ids)  # random crops recorded, not all zero
