"""End to end on a toy SDXL student (a KD cut of train/models/toy.py's `build_toy_xl_pipeline`): `accelerate
launch train/finetune.py` (with caption dropout) and `train/lora.py` (a LoRA on the U-Net and both text
encoders) train it; the LoRA loads in plain diffusers' `StableDiffusionXLPipeline` and changes its images at
scale 1, not at scale 0; a LoRA run resumes exactly. And the commands' one-line refusals: an SDXL LoRA on an
SD-1.x model and the reverse (eval/sample.py, the demo, train/convert_lora.py), a latent cache of another
family, a preset for another family, an explicit teacher-layer list that does not fit."""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from sdkd.train.formats import lora_io

from conftest import ROOT, launch_trainer, run_in_process, run_script, same_state, save_toy_student, selected

pytestmark = pytest.mark.e2e

RUN = ["train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=4", "data.num_samples=8",
       "log.trackers=[none]"]
LORA = ["lora.train_text_encoder=true", "ema.enabled=true", "optim.lr=1.0e-2", *RUN]
# bk_small's cut on the toy SDXL teacher's three levels (one resnet per level, no mid block).
CUT = dict(preset="custom", keep_down=[[0], [0], [0]], keep_up=[[0, 2], [0, 2], [0, 2]], mid_block=False)


@pytest.fixture(scope="module")
def xl_teacher(tmp_path_factory):
    from sdkd.train.models.toy import build_toy_xl_pipeline

    folder = tmp_path_factory.mktemp("xl_teacher")
    build_toy_xl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def xl_student(xl_teacher, tmp_path_factory):
    """What train/kd.py leaves in OUTPUT/student for an SDXL teacher."""
    from sdkd.train.formats.model_files import save_pipeline
    from sdkd.train.models.student_config import StudentConfig
    from sdkd.train.models.students import build_student, removal_spec

    teacher_unet = UNet2DConditionModel.from_pretrained(xl_teacher / "unet")
    student = build_student(teacher_unet, removal_spec(StudentConfig(**CUT)))
    return save_pipeline(student, str(xl_teacher), tmp_path_factory.mktemp("xl_student"))


@pytest.fixture(scope="module")
def runs(xl_student, tmp_path_factory):
    """The fine-tune and the LoRA run, side by side."""
    ft, lora = tmp_path_factory.mktemp("xl_finetune"), tmp_path_factory.mktemp("xl_lora")
    with ThreadPoolExecutor(2) as pool:
        launched = [pool.submit(launch_trainer, "train/finetune.py", "configs/portrait_toy.yaml", ft,
                                f"model={xl_student}", "data.caption_dropout=0.5", *RUN, "train.checkpoint_every=0"),
                    pool.submit(launch_trainer, "train/lora.py", "configs/lora_toy.yaml", lora, f"model={xl_student}",
                                *LORA)]
        for run in launched:
            run.result()
    return ft, lora


@pytest.fixture(scope="module", autouse=True)
def resumed(request, runs, xl_student, tmp_path_factory):
    """The LoRA run resumed from its checkpoint-2, launched in the background once the runs are done when its test
    is selected: the other tests run meanwhile."""
    if not any(item.name == "test_sdxl_lora_resume_matches_uninterrupted" for item in selected(request)):
        yield None
        return
    out = tmp_path_factory.mktemp("xl_lora_resumed")
    shutil.copytree(runs[1] / "checkpoint-2", out / "checkpoint-2")
    with ThreadPoolExecutor(1) as pool:  # on leaving: waits for the run, whatever the tests did
        yield out, pool.submit(launch_trainer, "train/lora.py", "configs/lora_toy.yaml", out, f"model={xl_student}",
                               *LORA, "train.sample_every=0", "resume=latest")


def steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_finetune_trains_an_sdxl_student(runs, xl_student):
    out, _ = runs
    assert steps(out) == [1, 2, 3, 4] and (out / "samples" / "step-4.png").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "student", local_files_only=True)
    start = StableDiffusionXLPipeline.from_pretrained(xl_student, local_files_only=True)
    assert pipe.unet.config.mid_block_type is None  # still the cut student
    trained, before = pipe.unet.state_dict(), start.unet.state_dict()
    assert trained.keys() == before.keys() and any(not torch.equal(trained[k], before[k]) for k in before)
    for name in ("vae", "text_encoder", "text_encoder_2"):  # frozen, as stored
        mine, theirs = getattr(pipe, name).state_dict(), getattr(start, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


def xl_image(pipe) -> np.ndarray:
    """Sampled with sdkd's pipeline's scheduler, as test_lora_e2e.py does."""
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_lora_trains_both_text_encoders_and_loads_in_diffusers(runs, xl_student):
    from sdkd.eval.inference.pipeline import load_pipeline

    _, out = runs
    assert steps(out) == [1, 2, 3, 4] and (out / "samples" / "step-4.png").is_file()
    tensors = load_file(out / lora_io.LORA_FILE)
    for part in ("unet", "text_encoder", "text_encoder_2"):  # every up matrix starts at zero: all three trained
        ups = [t for k, t in tensors.items() if k.startswith(part + ".") and k.endswith(".up.weight")]
        assert ups and any(t.abs().max() > 0 for t in ups), part
    assert lora_io.read_metadata(out / lora_io.LORA_FILE)["sdkd.base_model"] == str(xl_student)

    plain = xl_image(StableDiffusionXLPipeline.from_pretrained(xl_student, local_files_only=True))
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_student, local_files_only=True)
    pipe.load_lora_weights(str(out), adapter_name="trained")  # plain diffusers: OUTPUT/pytorch_lora_weights...
    assert all("trained" in getattr(pipe, name).peft_config for name in ("unet", "text_encoder", "text_encoder_2"))
    with_lora = xl_image(pipe)
    assert np.abs(with_lora - plain).mean() > 1e-3
    pipe.set_adapters(["trained"], adapter_weights=[0.0])
    assert np.abs(xl_image(pipe) - plain).max() < 1e-5
    # sdkd's pipeline loads it (checked, then fused by diffusers) to the same image.
    ours = load_pipeline(xl_student, lora=out / lora_io.LORA_FILE)
    image = ours(["a red circle"], steps=3, guidance_scale=5.0, seed=0, height=32, width=32, output_type="np")[0]
    assert np.abs(image - with_lora).max() < 1e-4, np.abs(image - with_lora).max()


def test_wrong_family_inputs_are_refused_in_one_line(runs, xl_teacher, xl_student, tmp_path, capsys):
    from sdkd.data.sources.core import SyntheticCaptions
    from sdkd.data.sources.latent_cache import write_cache
    from sdkd.data.sources.transforms import ImageTransform, Preprocess
    from sdkd.train.formats.lora_config import LoraSection
    from sdkd.train.models.teacher import load_teacher
    from sdkd.train.tasks.objective import BatchEncoder

    xl_lora = runs[1] / lora_io.LORA_FILE
    sd_student = save_toy_student(tmp_path / "sd_student", "bk_tiny")
    sd = load_teacher(str(sd_student))
    for m in sd.frozen.values():
        m.requires_grad_(False)
    lora_io.add_adapters(sd.unet, None, LoraSection(rank=2))
    sd_lora = lora_io.save_lora(tmp_path / "sd_lora", sd.unet, None, base=str(sd_student))
    # An SDXL LoRA whose metadata claims an SD-1.x U-Net: converted, its text_encoder_2 tensors would be lost.
    mislabelled = tmp_path / "mislabelled.safetensors"
    save_file(load_file(xl_lora), str(mislabelled), metadata=lora_io.read_metadata(sd_lora))
    cache = tmp_path / "sd_cache"
    write_cache(SyntheticCaptions(4, Preprocess(ImageTransform(32)), seed=0), BatchEncoder(sd), cache, batch_size=4,
                info={"resolution": 32})
    kd = ["train/kd.py", "--config", str(ROOT / "configs" / "toy.yaml"), f"output_dir={tmp_path / 'kd'}",
          f"teacher={xl_teacher}"]
    sample = ["eval/sample.py", "--prompt", "a red circle", "--out", str(tmp_path / "images")]
    commands = {
        f"LoRA '{xl_lora}' was trained on a model of family 'sdxl', this model is of family 'sd'":
            [*sample, "--model", str(sd_student), "--lora", str(xl_lora)],
        f"LoRA '{sd_lora}' was trained on a model of family 'sd', this model is of family 'sdxl'":
            [*sample, "--model", str(xl_student), "--lora", str(sd_lora)],
        f"LoRA '{mislabelled}' records a U-Net of model family 'sd', but adapts 'text_encoder_2'":
            ["train/convert_lora.py", "to-sdcpp", str(mislabelled), "--out", str(tmp_path / "x")],
        f"latent cache {cache} was made for model family 'sd'":
            ["train/finetune.py", "--config", str(ROOT / "configs" / "portrait_toy.yaml"), f"model={xl_student}",
             f"output_dir={tmp_path / 'ft'}", f"data.cache={cache}"],
        "config key 'student.preset': bk_small is a preset for SD-1.x/2.x teachers, but the teacher U-Net is SDXL":
            [*kd, "student.preset=bk_small"],
        "config key 'student.layer_init': down_blocks.2.attentions.0 has 1 transformer layers":
            [*kd, *(f"student.{k}={v}" for k, v in dict(
                preset="custom", keep_down=[[0, 1]] * 3, keep_up=[[0, 1, 2]] * 3, transformer_layers_per_block=[1] * 3,
                reverse_transformer_layers_per_block=[1] * 3,
                layer_init="{down_blocks.2.attentions.0: [0, 2]}").items())],
    }
    with ThreadPoolExecutor(1) as pool:
        # One as a real process (exit code, no traceback); the rest in this process, as `python SCRIPT ARGS` runs
        # (a Python start costs seconds here): the commands' own argument reading, run_cli and exit code.
        (expected, args), *rest = commands.items()
        process = pool.submit(run_script, [sys.executable, *args], timeout=300)
        for expected_line, (script, *argv) in rest:
            code = run_in_process(script, argv)
            err = capsys.readouterr().err
            assert code == 2 and err.strip().splitlines()[-1:] == [err.strip()], err[-3000:]
            assert err.startswith(f"error: {expected_line}"), err[-3000:]
        assert run_in_process("eval/demo.py", ["--models", f"xl={xl_student}", "--lora", f"xl={sd_lora}"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [  # the demo shows what loads, a line for the rest
            f"warning: model 'xl' ({xl_student}) left out: LoRA '{sd_lora}' was trained on a model of family 'sd', "
            f"this model is of family 'sdxl': a LoRA applies only to models of its own family",
            "error: none of the 1 models could be loaded (see above)"]
        result = process.result()
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {expected}: a LoRA applies "
                                                                               f"only to models of its own family"]
    assert not (tmp_path / "x").exists()


def test_sdxl_lora_resume_matches_uninterrupted(runs, resumed):
    """Resumed from checkpoint-2: its checkpoint-4 LoRA and EMA files and its final LoRA file equal the
    uninterrupted run's (same_state)."""
    _, out = runs
    resumed, launched = resumed
    result = launched.result()
    assert "resumed from" in result.stdout + result.stderr
    for name in (lora_io.LORA_FILE, lora_io.EMA_FILE):
        assert same_state(load_file(out / "checkpoint-4" / name), load_file(resumed / "checkpoint-4" / name)), name
    assert same_state(load_file(out / lora_io.LORA_FILE), load_file(resumed / lora_io.LORA_FILE))
