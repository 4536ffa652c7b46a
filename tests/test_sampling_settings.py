"""Same images everywhere: exports and the toy teacher carry the scheduler sdkd samples with (DPM-Solver++) and
their recorded sampling settings, so eval/sample.py, the demo and eval/evaluate.py with their defaults and plain
diffusers with the recorded settings give one image (within 1 level per pixel) for one prompt and seed; training
still uses the DDPM schedule from the same scheduler config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from PIL import Image

from sdkd.train.formats.model_files import (
    META,
    SAMPLING_FILE,
    export_diffusers,
    export_single_file,
    load_source,
    read_metadata,
)
from sdkd.train.models.toy import toy_teacher_folder

PROMPT, SEED = "a red circle on a blue background", 7
TOY_RECORDED = {"steps": 20, "guidance_scale": 4.0}  # train/make_toy_teacher.py CHECK


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The toy teacher exported as a diffusers folder (train/export.py's writer), from a source holding its DDPM
    training scheduler (as students written before sdkd shipped its sampling scheduler do)."""
    source = load_source(toy_teacher_folder())
    source.pipe.scheduler = DDPMScheduler.from_config(source.pipe.scheduler.config)
    return export_diffusers(source, tmp_path_factory.mktemp("export") / "toy")


@pytest.fixture(scope="module")
def plain(export) -> np.ndarray:
    """The image plain diffusers makes from the export with its recorded settings."""
    recorded = json.loads((export / SAMPLING_FILE).read_text())
    pipe = DiffusionPipeline.from_pretrained(export, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), num_inference_steps=recorded["steps"],
                 guidance_scale=recorded["guidance_scale"]).images[0]
    return np.asarray(image)


def _same(a, b) -> None:
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1, f"images differ by up to {np.abs(a - b).max()} levels"


def test_toy_teacher_and_its_export_carry_the_sampling_scheduler_and_settings(export):
    for folder in (toy_teacher_folder(), export):
        assert json.loads((folder / "model_index.json").read_text())["scheduler"][1] == "DPMSolverMultistepScheduler"
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
        assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and pipe.scheduler.config.solver_order == 2
        # built from the training scheduler's config: its beta schedule kept
        assert (pipe.scheduler.config.beta_schedule, pipe.scheduler.config.beta_end) == ("scaled_linear", 0.012)
        assert json.loads((folder / SAMPLING_FILE).read_text()) == TOY_RECORDED
    assert "num_inference_steps=20, guidance_scale=4.0" in (export / "README.md").read_text()


def test_single_file_carries_the_scheduler_and_settings(tmp_path):
    file = export_single_file(load_source(toy_teacher_folder()), tmp_path / "toy.safetensors")
    meta = read_metadata(file)
    assert meta[META + "scheduler_class"] == "DPMSolverMultistepScheduler"
    assert json.loads(meta[META + "sampling"]) == TOY_RECORDED
    source = load_source(file)
    assert source.sampling == TOY_RECORDED and isinstance(source.pipe.scheduler, DPMSolverMultistepScheduler)


@pytest.mark.slow  # seconds of its own: the full suite runs it
def test_sample_py_defaults_give_the_plain_diffusers_image(export, plain, tmp_path, capsys):
    from sdkd.eval.sample import main

    main(["--model", str(export), "--prompt", PROMPT, "--seed", str(SEED), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "sampling 20 steps, guidance 4 (defaults: 20 steps, guidance 4: the model's recorded" in printed
    record = json.loads((tmp_path / "samples.json").read_text())
    assert (record["steps"], record["guidance_scale"]) == (20, 4.0)
    _same(Image.open(tmp_path / "image-000.png"), plain)
    # an explicit flag still wins
    main(["--model", str(export), "--prompt", PROMPT, "--seed", str(SEED), "--out", str(tmp_path), "--overwrite",
          "--steps", "5"])
    assert json.loads((tmp_path / "samples.json").read_text())["steps"] == 5


def test_demo_defaults_give_the_plain_diffusers_image(export, plain, tmp_path):
    from sdkd.eval.page.models import generate, load_model

    model = load_model("toy", str(export), tmp_path)
    assert (model.default_steps, model.default_guidance) == (20, 4.0)
    assert "recorded sampling settings" in model.describe()
    result = generate(model, PROMPT, seed=SEED)
    assert (result.steps, result.guidance) == (20, 4.0)
    _same(result.image, plain)
    assert load_model("toy", str(export), tmp_path, steps=5, guidance=2.0).default_steps == 5


def test_evaluate_defaults_give_the_plain_diffusers_image(export, plain, tmp_path, capsys):
    from sdkd.eval.evaluate import main

    out = tmp_path / "eval"
    main([str(export), "--teacher", "none", "--out", str(out), f"prompts=[{PROMPT!r}]", f"seed={SEED}",
          "latency.enabled=false", "agreement.enabled=false", "grid_images=1"])
    assert "20 steps, guidance 4 (defaults: 20 steps, guidance 4: the model's recorded" in capsys.readouterr().out
    (image,) = (out / "images").glob("*/00000.png")
    _same(Image.open(image), plain)
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert (row["steps"], row["guidance_scale"]) == (20, 4.0)


def test_training_takes_the_ddpm_schedule_from_a_dpm_solver_folder():
    """The toy teacher ships DPM-Solver++; the trainers still noise with its DDPM training schedule."""
    from sdkd.train.models.teacher import load_teacher

    scheduler = load_teacher("toy", with_unet=False, with_encoders=False).scheduler
    assert type(scheduler) is DDPMScheduler
    # the toy teacher's training scheduler as a DDPM folder would carry it (SD-1.5's betas; v-prediction)
    before = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction",
                           steps_offset=1, timestep_spacing="leading", variance_type="fixed_small")
    for key, value in before.config.items():
        if not key.startswith("_"):
            assert scheduler.config[key] == value, key
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 4, 4, generator=gen), torch.randn(4, 4, 4, 4, generator=gen)
    t = torch.tensor([0, 250, 600, 999])
    assert torch.equal(scheduler.add_noise(latents, noise, t), before.add_noise(latents, noise, t))
    assert torch.equal(scheduler.step(noise, 600, latents, generator=torch.Generator().manual_seed(1)).prev_sample,
                       before.step(noise, 600, latents, generator=torch.Generator().manual_seed(1)).prev_sample)


def test_trainer_exports_carry_the_sampling_scheduler_and_settings(tmp_path):
    """What the trainers write: a student (save_pipeline; without a run, the teacher's recorded settings) and a
    one-step student (its scheduler's timesteps trailing, 1 step without guidance)."""
    from sdkd.train.formats.model_files import read_sampling, save_one_step_pipeline
    from sdkd.train.models.teacher import load_pipeline

    from conftest import save_toy_student

    student = save_toy_student(tmp_path / "student", "bk_tiny")
    pipe = DiffusionPipeline.from_pretrained(student, local_files_only=True)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert read_sampling(student) == TOY_RECORDED
    one = save_one_step_pipeline(pipe.unet, "toy", tmp_path / "one_step")
    scheduler = load_pipeline(str(one)).scheduler
    assert isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.timestep_spacing == "trailing"
    assert read_sampling(one) == {"steps": 1, "guidance_scale": 0.0}


@pytest.mark.parametrize("preset, settings", [("sdxs", {"steps": 1, "guidance_scale": 0.0}),
                                              ("bk_tiny", {"steps": 25, "guidance_scale": 7.5})])
def test_a_model_that_records_no_settings_samples_as_its_layout_asks(preset, settings):
    """Without recorded settings, a student of the SDXS layout (a one-step student) samples 1 step without
    guidance, a bk_tiny student 25 steps at guidance 7.5 (sdkd's defaults)."""
    from sdkd.train.formats.model_files import default_sampling
    from sdkd.train.models.students import PRESETS, student_unet_config
    from sdkd.train.models.toy import TOY_UNET

    assert default_sampling(student_unet_config(TOY_UNET, PRESETS[preset])) == settings
