"""The toy world: the committed toy teacher (train/models/toy_teacher/, what `teacher: toy` loads) draws what its
captions ask for.

The judge is independent of the training code: data/sources/colour_check.py reads each generated image with numpy
and PIL only (background: median of the border pixels; foreground: median of the pixels farthest from it),
matched to the nearest of the synthetic source's 8 named colours. The teacher is loaded by diffusers itself
from the folder and sampled at fixed seeds. Measured when the weights were made (48 captions, 20 DPM-Solver++
steps, guidance 4, seeds 0-47): foreground 90%, background 40%, both 40%; chance 12.5% each.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from sdkd.data.sources.colour_check import CHANCE, caption_colours, check_captions, match_rates, read_colours
from sdkd.data.sources.core import COLOURS, SyntheticCaptions
from sdkd.data.sources.transforms import ImageTransform

from conftest import ROOT

TEACHER = ROOT / "train" / "models" / "toy_teacher"
N, STEPS, GUIDANCE = 48, 20, 4.0  # train/make_toy_teacher.py CHECK: the check its provenance.json reports


@pytest.fixture(scope="module")
def samples():
    pipe = StableDiffusionPipeline.from_pretrained(TEACHER, local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    captions = check_captions(N, seed=0)
    generators = [torch.Generator().manual_seed(i) for i in range(N)]
    images = pipe(captions, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32,
                  generator=generators).images
    return images, captions


def test_teacher_draws_the_captioned_colours_at_least_twice_as_often_as_chance(samples):
    rates = match_rates(*samples)
    print(rates)
    assert rates["fg"] >= 2 * CHANCE and rates["bg"] >= 2 * CHANCE, rates


def test_the_rates_are_those_the_provenance_reports(samples):
    # Same captions, seeds and sampler as train/make_toy_teacher.py's check; CPU kernels may round differently
    # on another machine, so a few images may read otherwise.
    reported = json.loads((TEACHER / "provenance.json").read_text())["colour_check"]
    assert (reported["n"], reported["steps"], reported["guidance_scale"]) == (N, STEPS, GUIDANCE)
    rates = match_rates(*samples)
    assert abs(rates["fg"] - reported["fg"]) <= 3 / N and abs(rates["bg"] - reported["bg"]) <= 3 / N


def test_the_judge_reads_the_synthetic_source_exactly():
    # On the very images the teacher learnt from, the colour reading is never wrong.
    source = SyntheticCaptions(200, ImageTransform(32), seed=7)
    images, captions = zip(*(source.load(i, None)[:2] for i in range(len(source))))
    assert match_rates(list(images), list(captions)) | {"chance": 0} == {"fg": 1.0, "bg": 1.0, "both": 1.0,
                                                                          "chance": 0, "n": 200}


def test_the_judge_on_flat_and_noisy_images():
    from PIL import Image

    flat = Image.new("RGB", (32, 32), COLOURS["blue"])
    assert read_colours(flat) == ("blue", "blue")  # no shape: the centre is read as the foreground
    assert caption_colours("an orange circle on a white background") == ("orange", "white")
    with pytest.raises(ValueError):
        caption_colours("a portrait photo of an astronaut")
    captions = check_captions(56, seed=3)
    assert len(set(captions)) == 56 and len({caption_colours(c) for c in captions}) == 56


def test_the_committed_teacher_is_small_safetensors_package_data():
    files = [f for f in TEACHER.rglob("*") if f.is_file()]
    weights = [f for f in files if f.name.endswith((".safetensors", ".bin", ".pt", ".ckpt", ".pth"))]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    assert "toy_teacher/" in (ROOT / "pyproject.toml").read_text()  # installed with the package
