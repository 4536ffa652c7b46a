"""End to end: `accelerate launch train/kd.py` on the toy default, as a user runs it."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from sdkd.train.engine.sampling import LABEL_CELL
from sdkd.train.models.student_config import StudentConfig
from sdkd.train.models.students import build_student, removal_spec
from sdkd.train.models.teacher import load_teacher

from conftest import free_port, launch_trainer, run_script, same_state, selected

pytestmark = pytest.mark.e2e

STEPS = 20  # the toy run, KD alone: it has cut the student's gap to the teacher to 0.6x by then


def launch_kd(out, *overrides, num_processes=1):
    return launch_trainer("train/kd.py", "configs/toy.yaml", out, *overrides, num_processes=num_processes)


# The toy run, output and feature KD (both 1, at a constant 1e-3: its own recipe, not the README's) without the
# task loss (which alone shrinks the toy student's gap to the teacher as well): what the run learns is KD's. Sample
# grids at 2 sampler steps: the grids are what is checked, not the pictures.
TOY_RUN = ["loss.lambda_task=0", "loss.lambda_out=1", "loss.lambda_feat=1", "optim.lr=1e-3",
           "optim.lr_scheduler=constant", f"train.max_steps={STEPS}", f"train.checkpoint_every={STEPS // 4}",
           "train.checkpoints_total_limit=2", f"train.sample_every={STEPS // 2}", "sample.steps=2",
           "log.trackers=[tensorboard,wandb]"]


def resume_recipe(teacher_dir) -> list[str]:
    # A local teacher folder exercises the real loading path; EMA and accumulation are part of the state.
    return [f"teacher={teacher_dir}", "train.max_steps=8", "train.checkpoint_every=4", "train.sample_every=0",
            "train.grad_accum=2", "train.batch_size=4", "data.num_samples=24", "ema.enabled=true",
            "optim.lr_scheduler=cosine", "optim.warmup_steps=2", "log.trackers=[none]"]


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Runs that tests only read, launched one after another in the background from the module's start when a
    selected test needs them: the tests above the ones reading them launch their own runs meanwhile.
    {fixture name: (output folder, future of the launch)}."""
    needed = {name for item in selected(request) for name in item.fixturenames}
    runs = {}
    with ThreadPoolExecutor(1) as pool:  # on leaving: waits for the runs, whatever the tests did
        if "uninterrupted" in needed:
            out = tmp_path_factory.mktemp("uninterrupted")
            recipe = resume_recipe(request.getfixturevalue("toy_teacher_dir"))
            runs["uninterrupted"] = out, pool.submit(launch_kd, out, *recipe)
        if "toy_run" in needed:
            out = tmp_path_factory.mktemp("toy_run")
            runs["toy_run"] = out, pool.submit(launch_kd, out, *TOY_RUN)
        yield runs


@pytest.fixture(scope="module")
def toy_run(background):
    out, launched = background["toy_run"]
    return out, launched.result()


@pytest.fixture(scope="module")
def uninterrupted(background):
    """The resume test's uninterrupted run: 8 steps, checkpoints at 4 and 8."""
    out, launched = background["uninterrupted"]
    launched.result()
    return out


def output_gap(student, teacher, seed=0, n=16):
    """Mean squared difference of the two U-Nets' predictions on fixed noisy inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    emb = torch.randn(n, 77, 32, generator=gen)
    with torch.no_grad():
        return (student(x, t, emb).sample - teacher(x, t, emb).sample).pow(2).mean().item()


def test_num_epochs_on_max_train_samples_gives_the_steps(tmp_path):
    # 12 of 32 samples in batches of 4: 3 batches per epoch; grad_accum 2: ceil(3 / 2) = 2 steps per epoch.
    result = launch_kd(tmp_path, "train.max_steps=null", "train.num_epochs=2", "data.num_samples=32",
                       "data.max_train_samples=12", "train.batch_size=4", "train.grad_accum=2",
                       "optim.lr=1e-3", "optim.lr_scheduler=linear", "train.checkpoint_every=0", "train.sample_every=0",
                       "log.trackers=[none]", "loss.noise_offset=0.1", "loss.input_perturbation=0.1")
    assert "data: 12 samples per epoch" in result.stdout
    assert "train.max_steps=4: train.num_epochs=2 x ceil(3 batches per epoch / train.grad_accum=2)" in result.stdout
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[-1]["epoch"] == pytest.approx(8 / 3)  # 8 micro-batches read, 3 per epoch
    assert lines[0]["lr"] == pytest.approx(0.75e-3) and lines[-1]["lr"] == 0.0  # the schedule ends at step 4


def test_prediction_type_unlike_the_teacher_stops_kd_with_one_line(tmp_path):
    import sys

    result = run_script([sys.executable, "train/kd.py", "--config", "configs/toy.yaml", f"output_dir={tmp_path}",
                         "loss.prediction_type=epsilon"], timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config key 'loss.prediction_type': epsilon, but teacher 'toy' predicts v_prediction; output and "
        "feature KD (loss.lambda_out, loss.lambda_feat) need the same")


def test_two_processes_through_launch_sh(tmp_path):
    # DDP over 2 gloo processes, with bf16 autocast (teacher, VAE and text encoder cast to bf16),
    # gradient checkpointing under the feature hooks, and EMA.
    result = run_script(["bash", "launch.sh", "--gpus", "2", "--port", str(free_port()), "train/kd.py", "--config",
                         "configs/toy.yaml", f"output_dir={tmp_path}", "train.max_steps=6", "train.checkpoint_every=3",
                         "train.sample_every=6", "sample.steps=2", "log.trackers=[none]", "data.num_samples=32",
                         "train.mixed_precision=bf16", "train.gradient_checkpointing=true", "ema.enabled=true"])
    assert result.returncode == 0, result.stderr[-5000:]
    assert "on 2 processes" in result.stdout
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 7))
    assert (tmp_path / "checkpoint-6" / "generator-1.safetensors").is_file()  # both ranks' state saved
    assert (tmp_path / "samples" / "step-6.png").is_file()
    assert lines[-1]["feat"] < lines[0]["feat"]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "student", local_files_only=True)
    assert pipe.vae.dtype == torch.float32  # the export reads the frozen parts again, not their bf16 copies


def test_two_processes_match_one_process_of_the_same_global_batch(tmp_path):
    """2 gloo processes of batch 4 end with the weights 1 process of batch 8 ends with (same samples, same
    noise: objective.StepRandom), up to float summation order. The runs step as SGD does, so that a constant
    gradient scale shows (plain AdamW's update ignores one): AdamW with eps = 10, far above every gradient entry,
    divides each by about eps alone; no weight decay, no clipping (which rescales to the threshold). Gradients
    summed over the 2 processes instead of averaged would double every update."""
    common = ["train.max_steps=4", "train.checkpoint_every=0", "train.sample_every=0", "log.trackers=[none]",
              "data.num_samples=32", "optim.eps=10", "optim.lr=0.1", "optim.lr_scheduler=constant",
              "optim.weight_decay=0", "train.max_grad_norm=0", "loss.lambda_feat=1"]
    with ThreadPoolExecutor(2) as pool:  # independent runs, side by side (each spends seconds importing)
        runs = [pool.submit(launch_kd, tmp_path / "one", *common, "train.batch_size=8"),
                pool.submit(launch_kd, tmp_path / "two", *common, "train.batch_size=4", num_processes=2)]
        for run in runs:
            run.result()
    one = load_file(tmp_path / "one" / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors")
    two = load_file(tmp_path / "two" / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors")
    start = build_student(load_teacher("toy").unet, removal_spec(StudentConfig(preset="bk_small"))).state_dict()
    mean_abs = lambda a, b: sum((a[k] - b[k]).abs().sum().item() for k in a) / sum(v.numel() for v in a.values())  # noqa: E731
    moved, apart = mean_abs(one, start), mean_abs(one, two)
    # Measured: moved 4e-4, apart 2e-10; gradients summed, not averaged: apart about as much as moved.
    assert moved > 1e-4 and apart < moved * 1e-3, (moved, apart)


def test_sdxs_toy_recipe_distils_the_sdxs_student(tmp_path, toy_teacher_dir):
    """configs/sdxs_toy.yaml: the sdxs preset of the toy teacher, trained by output + feature KD alone."""
    from sdkd.train.formats.ldm_layout import unet_layout
    from sdkd.train.models.students import PRESETS

    launch_trainer("train/kd.py", "configs/sdxs_toy.yaml", tmp_path, f"teacher={toy_teacher_dir}",
                   "train.max_steps=10", "train.checkpoint_every=0", "train.sample_every=0", "log.trackers=[none]")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and all(abs(line["loss"] - (line["out"] + line["feat"])) < 1e-4 * line["loss"]
                                    for line in lines)  # task loss off, as SDXS
    trained = UNet2DConditionModel.from_pretrained(tmp_path / "student" / "unet").eval()
    assert unet_layout(dict(trained.config)) == "sdxs"
    teacher = StableDiffusionPipeline.from_pretrained(toy_teacher_dir).unet.eval()
    initial = build_student(teacher, PRESETS["sdxs"]).eval()
    assert output_gap(trained, teacher) < 0.7 * output_gap(initial, teacher)


# ---------------------------------------------------------------------------------------------
# Runs launched in the background at the module's start


def test_resumed_run_matches_uninterrupted(tmp_path, uninterrupted, toy_teacher_dir):
    """Resumed from checkpoint-4 (beside a checkpoint-8 killed mid-write), the run says so, logs steps 5 to 8, and its
    checkpoint-8 U-Net and EMA U-Net weights equal the uninterrupted run's (same_state)."""
    full, resumed = uninterrupted, tmp_path / "resumed"
    # The state a run stopped after step 4 leaves behind, plus a checkpoint killed mid-write.
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    shutil.copytree(full / "checkpoint-8", resumed / ".tmp-checkpoint-8")
    result = launch_kd(resumed, *resume_recipe(toy_teacher_dir), "resume=latest")
    assert "resumed from" in result.stdout + result.stderr and "checkpoint-4" in result.stdout + result.stderr

    for sub in ("unet", "unet_ema"):
        a = load_file(full / "checkpoint-8" / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / "checkpoint-8" / sub / "diffusion_pytorch_model.safetensors")
        assert same_state(a, b), sub
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 6, 7, 8]


def test_run_writes_every_output(toy_run):
    out, _ = toy_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    for key in ("loss", "task", "out", "feat", "lr", "sec_per_step", "samples_per_sec"):
        assert all(isinstance(line[key], float) for line in lines), key
    # lambda_task 0, lambda_out and lambda_feat 1 (TOY_RUN): the task term is logged, not trained on.
    assert all(abs(line["loss"] - (line["out"] + line["feat"])) < 1e-4 * line["loss"] for line in lines)
    assert all(line["task"] > 1e-3 * line["loss"] for line in lines)  # large enough for the sum above to show it
    assert "output_dir" in (out / "config.yaml").read_text()

    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{STEPS * 3 // 4}", f"checkpoint-{STEPS}"]
    assert not list(out.glob(".tmp-*"))
    teacher_png = Image.open(out / "samples" / "teacher.png")
    for step in (STEPS // 2, STEPS):
        grid = Image.open(out / "samples" / f"step-{step}.png")
        # the teacher row above the student row (32 px images drawn at LABEL_CELL px, under the prompts)
        assert grid.size == (teacher_png.width, teacher_png.height + LABEL_CELL)
        assert grid.crop((0, 0, *teacher_png.size)).tobytes() == teacher_png.tobytes()  # prompts, labels, images
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run missing"
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard events missing"


def test_exported_student_loads_and_generates(toy_run):
    out, _ = toy_run
    folder = out / "student"
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.unet.config.layers_per_block == 1 and pipe.unet.config.mid_block_type is None  # bk_small's own
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0
    # The saved weights are exactly the final checkpoint's student.
    final = load_file(out / f"checkpoint-{STEPS}" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, final[k]) for k, v in pipe.unet.state_dict().items())


def test_kd_shrinks_the_student_teacher_gap(toy_run):
    """The toy run trains on output and feature KD alone (no task loss): after it the student's output gap to the
    teacher is under 0.75x the starting one (measured: 0.58 -> 0.35, 0.60x; a run whose KD terms train nothing
    stays at 1x)."""
    out, _ = toy_run
    teacher = load_teacher("toy").unet.eval()  # the trained toy teacher the run distilled
    initial = build_student(teacher, removal_spec(StudentConfig(preset="bk_small"))).eval()
    trained = UNet2DConditionModel.from_pretrained(out / "student" / "unet").eval()
    before, after = output_gap(initial, teacher), output_gap(trained, teacher)
    assert after < 0.75 * before, (before, after)


def test_a_finished_run_is_never_touched_by_a_refused_start(toy_run, tmp_path):
    """Starting into the run's folder without resume, or resuming it with another student layout, exits 2 with one
    error line and leaves every file of the run but .lock byte for byte as it was, config.yaml included."""
    import sys

    def files(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and p.name != ".lock"}

    out, _ = toy_run
    twin = tmp_path / "twin"  # the same finished run, byte for byte: the two starts go side by side, one lock each
    shutil.copytree(out, twin, symlinks=True, ignore=shutil.ignore_patterns(".lock"))  # wandb/latest-run: a link
    before = files(out)
    assert files(twin) == before
    starts = [(out, ["train.max_steps=2"], "holds another run"),
              (twin, ["resume=latest", "student.preset=bk_tiny"], "cannot be loaded into this run")]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda start: run_script([sys.executable, "train/kd.py", "--config", "configs/toy.yaml",
                                                          f"output_dir={start[0]}", "log.trackers=[none]", *start[1]]),
                                starts))
    for (folder, _, expected), result in zip(starts, results):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
        assert files(folder) == before, folder
