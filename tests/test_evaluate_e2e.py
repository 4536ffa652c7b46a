"""End to end: a short toy KD run with in-loop evaluation, then `python eval/evaluate.py` on it, as a user runs it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from conftest import ROOT, launch_trainer, run_script

pytestmark = pytest.mark.e2e

STEPS, EVERY, CHECKPOINT_EVERY = 12, 4, 6
CHECKPOINTS = ["checkpoint-6", "checkpoint-12"]
IMAGES = 16
FAST = ["steps=4", "latency.repeats=1", f"num_images={IMAGES}"]  # configs/eval_toy.yaml, a little lighter


def evaluate(*args):
    return run_script([sys.executable, "eval/evaluate.py", *map(str, args)])


def pixel_mse(a, b) -> float:
    """Mean squared difference of two image files, pixel values in [0, 1]."""
    x, y = (np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) / 255 for f in (a, b))
    return float(((x - y) ** 2).mean())


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, toy_teacher_dir):
    """configs/toy.yaml as pure KD (the random-weight teacher here draws nothing the task loss could agree with)
    for a dozen steps with eval.every, checkpoints at 6 and 12."""
    out = tmp_path_factory.mktemp("eval_run")
    launch_trainer("train/kd.py", "configs/toy.yaml", out, f"teacher={toy_teacher_dir}", f"train.max_steps={STEPS}",
                   "loss.lambda_task=0",
                   f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.sample_every=0", "train.batch_size=4",
                   f"eval.every={EVERY}", "log.trackers=[tensorboard]")
    return out


@pytest.fixture(scope="module")
def evaluated(run):
    """The whole run evaluated into its default folder, RUN/eval, and logged back into the run."""
    in_loop = metrics(run)  # before log_to_run adds its lines
    result = evaluate(run, "--config", "configs/eval_toy.yaml", *FAST, "log_to_run=true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run / "eval", result, in_loop


def test_in_loop_eval_logs_noise_mse_beside_the_losses_and_it_goes_down(evaluated):
    _, _, lines = evaluated
    evals = {line["step"]: line for line in lines if "eval/noise_mse" in line}
    assert sorted(evals) == [0, 4, 8, 12]  # step 0: the freshly initialised student
    for step in (4, 8, 12):
        assert "loss" in evals[step] and "out" in evals[step]  # the same line as the step's losses
    assert {k for k in evals[12] if k.startswith("eval/")} == {
        "eval/noise_mse", "eval/noise_mse_t125", "eval/noise_mse_t375", "eval/noise_mse_t625", "eval/noise_mse_t875"}
    curve = [evals[s]["eval/noise_mse"] for s in (0, 4, 8, 12)]
    assert curve[-1] < 0.8 * curve[0] and curve[-1] < curve[1], curve  # the student approaches its teacher


def test_report_has_the_teacher_and_a_row_per_checkpoint(evaluated, run):
    out, result, in_loop = evaluated
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert [row["name"] for row in report["rows"]] == ["teacher", *CHECKPOINTS]
    assert [row["step"] for row in report["rows"]] == [None, 6, 12]
    teacher, student = rows["teacher"], rows["checkpoint-12"]
    for row in report["rows"]:
        for key in ("unet_params", "params", "unet_macs", "sec_per_image", "unet_sec_per_image", "noise_mse"):
            assert row[key] >= 0, (row["name"], key)
        assert row["unet_macs"] > 0 and row["sec_per_image"] > 0
    # bk_small: fewer parameters and MACs than the teacher
    assert student["unet_params"] < teacher["unet_params"] and student["unet_macs"] < teacher["unet_macs"]
    # teacher agreement: the teacher against itself is 0; each student's is above 0, as is each image's sample MSE
    assert teacher["noise_mse"] == pytest.approx(0, abs=1e-9) and "sample_mse" not in teacher
    for name in CHECKPOINTS:
        # Sample MSE and PSNR: of each student image against the teacher's of its prompt, from the images written.
        teacher_images, images = (sorted((out / "images" / n).glob("*.png")) for n in ("teacher", name))
        mses = [pixel_mse(a, b) for a, b in zip(images, teacher_images, strict=True)]
        assert rows[name]["noise_mse"] > 0 and min(mses) > 0
        assert rows[name]["sample_mse"] == pytest.approx(np.mean(mses), rel=1e-6)
        assert rows[name]["sample_psnr"] == pytest.approx(np.mean([10 * np.log10(1 / e) for e in mses]), rel=1e-6)
    # the run's own triples (agreement.from_run): the same number the in-loop evaluation logged at step 12
    logged = next(line for line in in_loop if line["step"] == 12 and "eval/noise_mse" in line)
    assert student["noise_mse"] == pytest.approx(logged["eval/noise_mse"], rel=1e-4)
    assert not (out / "eval_triples.safetensors").exists()  # reused from the run, not made again
    assert report["triples"]["prompts"] and report["triples"]["timesteps"] == 4
    assert report["settings"]["steps"] == 4 and report["settings"]["resolution"] == 32

    md = (out / "report.md").read_text()
    assert ("| model | step | U-Net params | U-Net GMACs | s/image | U-Net s/image | noise MSE | sample MSE | PSNR dB |"
            in md)
    assert "| checkpoint-6 | 6 | " in md and f"| teacher |  | {teacher['unet_params']:,} |" in md
    assert md in result.stdout  # the table is printed too


def test_images_grids_progress_and_skip_lines(evaluated):
    out, result, _ = evaluated
    prompts = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    given = yaml.safe_load((ROOT / "configs" / "eval_toy.yaml").read_text())["prompts"][:IMAGES]
    assert [p["seed"] for p in prompts] == [1234 + i for i in range(len(given))]
    assert [p["prompt"] for p in prompts] == given
    assert prompts[0] == {"file": "00000.png", "prompt": given[0], "seed": 1234}
    for name in ["teacher", *CHECKPOINTS]:
        files = sorted((out / "images" / name).glob("*.png"))
        assert [f.name for f in files] == [f"{i:05d}.png" for i in range(len(given))]
        assert Image.open(files[0]).size == (32, 32)
        assert (out / "grids" / f"{name}.png").is_file()
    grid = Image.open(out / "grid.png")
    assert grid.height > 3 * 128  # three labelled rows (32 px images drawn at 128 px) under the prompts
    assert f"evaluate: {3 * len(given)}/{3 * len(given)} (100%)" in result.stderr  # teacher + two checkpoints
    for key in ("metrics.inception_weights", "metrics.clip_model", "metrics.lpips_weights"):
        line = next(line for line in result.stdout.splitlines() if key in line)
        assert line.startswith("skipped ") and f"set {key} to " in line
    report = json.loads((out / "report.json").read_text())
    assert len(report["skipped"]) == 3 and "Skipped:" in (out / "report.md").read_text()
    # The colour columns are what the judge reads from the very images written, per model.
    from sdkd.data.sources.colour_check import hits

    for row in report["rows"]:
        read = [hits(Image.open(out / "images" / row["name"] / f"{i:05d}.png"), p) for i, p in enumerate(given)]
        assert (row["fg_colour"], row["bg_colour"]) == pytest.approx(
            (sum(f for f, _ in read) / len(read), sum(b for _, b in read) / len(read)))


def test_log_to_run_puts_the_rows_into_the_runs_metrics(evaluated, run):
    lines = metrics(run)
    logged = {line["step"]: line for line in lines if "eval/sample_psnr" in line}
    assert sorted(logged) == [6, 12]
    assert logged[12]["eval/unet_params"] < next(line for line in lines if "eval/teacher/unet_params" in line)[
        "eval/teacher/unet_params"]
    assert list((run / "logs").rglob("events.out.tfevents.*"))


def test_a_second_evaluation_into_the_same_folder_is_refused(evaluated, run, tmp_path):
    out, _, _ = evaluated
    before = (out / "report.json").read_text()
    result = evaluate(run, "--config", "configs/eval_toy.yaml", *FAST)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --out '{out}' already holds an evaluation: choose another folder, or pass --overwrite to replace it"]
    assert (out / "report.json").read_text() == before
    # a folder that holds something else is never overwritten, not even with --overwrite
    result = evaluate(run / "checkpoint-6", "--out", run, "--overwrite", "--config", "configs/eval_toy.yaml")
    assert result.returncode == 2 and "is not empty and holds no evaluation" in result.stderr
    assert (run / "config.yaml").is_file() and (run / "checkpoint-6").is_dir()


@pytest.mark.parametrize("override, line", [
    ("bogus=1", "error: config key 'bogus': unknown key"),
    ("steps=0", "error: config key 'steps': must be > 0"),
    ("sampler=heun", "error: config key 'sampler': expected dpm_solver, pndm, ddim or euler, got 'heun'"),
])
def test_a_bad_key_is_one_line_and_exit_2(run, tmp_path, override, line):
    result = evaluate(run, "--config", "configs/eval_toy.yaml", "--out", tmp_path / "out", override)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(line), result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# With metric weights (random ones: the plumbing, not the numbers)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random FID Inception (safetensors), a tiny random transformers CLIP folder, a random LPIPS-VGG file."""
    from torch import nn
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from sdkd.eval.metrics.inception import FidInceptionV3
    from sdkd.train.losses.perceptual import LpipsVgg
    from sdkd.train.models.toy import write_toy_tokenizer

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    inception = FidInceptionV3()
    with torch.no_grad():
        for m in inception.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    save_file(inception.state_dict(), str(folder / "inception.safetensors"))
    lpips = LpipsVgg()
    with torch.no_grad():
        for k in range(5):  # non-negative heads, as lpips' trained ones
            getattr(lpips, f"lin{k}").model[1].weight.abs_()
    save_file(lpips.state_dict(), str(folder / "lpips.safetensors"))
    tokenizer = CLIPTokenizer.from_pretrained(write_toy_tokenizer(folder / "tok"), model_max_length=77)
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(text_config=dict(**small, vocab_size=len(tokenizer), max_position_embeddings=77,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(**small, image_size=32, patch_size=8), projection_dim=16)
    clip = CLIPModel(config)
    with torch.no_grad():  # a random CLIP scores nearly every pair 0 (cosine clamped): one projection for both
        # towers and a shared offset after their last norms give scores well above 0 that depend on the pairing
        clip.visual_projection.weight.copy_(clip.text_projection.weight)
        clip.text_model.final_layer_norm.bias.fill_(1.0)
        clip.vision_model.post_layernorm.bias.fill_(1.0)
    clip.save_pretrained(folder / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder / "clip")
    reference = folder / "reference"
    reference.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(6):  # real images of another size: center-cropped and resized to the generated ones
        pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=gen).numpy()
        Image.fromarray(pixels).save(reference / f"real-{i}.png")
    return dict(inception=folder / "inception.safetensors", clip=folder / "clip", lpips=folder / "lpips.safetensors",
                reference=reference)


def test_given_weights_add_fid_kid_clip_score_and_lpips(run, weights, tmp_path):
    out = tmp_path / "scored"
    result = evaluate(run / "checkpoint-12", "--out", out, "--config", "configs/eval_toy.yaml", *FAST,
                      "latency.enabled=false", "agreement.enabled=false", f"reference_images={weights['reference']}",
                      f"metrics.inception_weights={weights['inception']}", f"metrics.clip_model={weights['clip']}",
                      f"metrics.lpips_weights={weights['lpips']}", "metrics.kid_subset_size=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "skipped" not in result.stdout
    teacher, student = json.loads((out / "report.json").read_text())["rows"]
    assert student["name"] == "checkpoint-12" and student["step"] == 12
    for row in (teacher, student):
        assert "kid" in row and "noise_mse" not in row
        # FID and CLIP score of the very images written, recomputed here (KID draws random subsets: left out).
        recomputed = recomputed_metrics(out, row["name"], weights)
        assert row["fid"] == pytest.approx(recomputed["fid"], rel=1e-4), row["name"]
        assert row["clip_score"] == pytest.approx(recomputed["clip_score"], rel=1e-4), row["name"]
        # ... of each image against its own prompt: against the prompts reversed the same images score at least
        # 10 times the tolerance above away (measured: 64.3 against 64.5)
        mispaired = mispaired_clip_score(out, row["name"], weights)
        assert row["clip_score"] > 10 and abs(mispaired - row["clip_score"]) > 10 * 1e-4 * row["clip_score"]
    # LPIPS: of each student image against the teacher's image of its prompt.
    assert "lpips" not in teacher and student["lpips"] == pytest.approx(recomputed["lpips"], rel=1e-4)
    assert student["fid"] != pytest.approx(teacher["fid"])  # the two models' images are measured apart
    md = (out / "report.md").read_text()
    assert "| FID | KID | CLIP |" in md and "LPIPS" in md


def written(out, model: str) -> tuple[list[str], list[Image.Image]]:
    """The prompts evaluate listed in OUT/images.jsonl and the images it wrote for them for `model`, in order."""
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows], [Image.open(out / "images" / model / r["file"]).convert("RGB") for r in rows]


def recomputed_metrics(out, name: str, weights: dict) -> dict:
    """FID against the reference folder, CLIP score, and LPIPS against the teacher's images, of the images the
    evaluation wrote for model `name`, by eval/metrics/image_metrics.py fed as evaluate feeds it."""
    from sdkd.eval.evaluation.runner import square, to_uint8
    from sdkd.eval.metrics.image_metrics import image_metrics

    metrics = image_metrics(dict(inception_weights=weights["inception"], clip_model=weights["clip"],
                                 lpips_weights=weights["lpips"], kid_subset_size=2))
    prompts, images = written(out, name)
    real = [square(Image.open(f), images[0].width) for f in sorted(weights["reference"].glob("*.png"))]
    metrics.fid_kid.update(to_uint8(real), real=True)
    metrics.fid_kid.update(to_uint8(images), real=False)
    metrics.clip.update(to_uint8(images), prompts)
    metrics.lpips.update(to_uint8(images), to_uint8(written(out, "teacher")[1]))
    return metrics.compute()


def mispaired_clip_score(out, name: str, weights: dict) -> float:
    """CLIP score of the images evaluate wrote for model `name` against the prompts in reverse order."""
    from sdkd.eval.evaluation.runner import to_uint8
    from sdkd.eval.metrics.image_metrics import ClipScore

    prompts, images = written(out, name)
    clip = ClipScore(weights["clip"], "cpu")
    clip.update(to_uint8(images), prompts[::-1])
    return clip.compute()["clip_score"]
