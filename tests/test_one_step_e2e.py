"""End to end: `accelerate launch train/one_step.py` on the toy world (the trained toy teacher, an SDXS-layout
student cut from it, 32 px), as a user runs it: the feature-matching warm-up brings the one-step student
closer to the teacher's multi-step output on held-out noise, score distillation runs stable and brings it
closer still, resume is bit-identical with both modules and the alternation, each optimizer touches only
its own module (the online LoRA never the teacher), and the exported folder samples in one step in sdkd's
pipeline and in diffusers.

One run (RUN: 20 warm-up steps, then 20 of score distillation with the student every 2nd step, batch 4,
24 ODE pairs of 6 DPM-Solver++ steps) is shared by the tests; its pairs are reused by the others. The runs
use one CPU thread each: on a small shared machine OpenMP threads mostly wait for each other at these sizes.
"""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from sdkd.train.models.toy import TOY_VAE
from sdkd.train.tasks.decoder import tiny_vae_config

from conftest import ROOT, launch_trainer, same_state

pytestmark = pytest.mark.e2e

SCRIPT, CONFIG = "train/one_step.py", "configs/one_step_toy.yaml"
WARMUP, STEPS, RESUME_AT = 20, 40, 25  # step 25 is score-distillation step 5: the online model's turn alone
TIMING = ("sec_per_step", "samples_per_sec")
PAIRS = ["pairs.count=24", "pairs.eval_count=8", "pairs.steps=6"]
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module", autouse=True)
def one_thread_runs():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The ODE-pair cache every run here shares, and a tiny decoder (AutoencoderTiny folder, random weights)."""
    root = tmp_path_factory.mktemp("one_step_shared")
    torch.manual_seed(0)
    AutoencoderTiny(**tiny_vae_config(TOY_VAE, 16)).save_pretrained(root / "tiny_decoder")
    return root


def overrides(shared) -> list[str]:
    return [*PAIRS, f"pairs.cache={shared / 'pairs'}", f"decoder={shared / 'tiny_decoder'}",
            f"distill.warmup_steps={WARMUP}", f"train.max_steps={STEPS}", "train.batch_size=4", "eval.every=10",
            f"train.checkpoint_every={RESUME_AT}", f"train.sample_every={WARMUP}", "log.trackers=[none]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared):
    out = tmp_path_factory.mktemp("one_step_run")
    result = launch_trainer(SCRIPT, CONFIG, out, *overrides(shared))
    return out, result


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def evals(out) -> dict[int, dict]:
    return {line["step"]: line for line in metrics(out) if "eval/ode_mse" in line}


# ---------------------------------------------------------------------------------------------------
# Training


def test_warm_up_lowers_the_distance_to_the_teachers_ode_output(run):
    """(a) On the 8 held-out pairs, the one-step student's latents and images move toward the teacher's 6-step
    DPM-Solver++ output during the 20 feature-matching steps: latent MSE below 0.9x its start and the decoded
    images' PSNR up by more than 0.5 dB. Measured (this machine, seed 0, the v-prediction toy teacher): latent MSE
    1.32 -> 1.07 (0.81x), PSNR 7.2 -> 8.9 dB, L_FM 0.926 -> 0.872 (reported, not asserted)."""
    out, result = run
    e = evals(out)
    assert sorted(e) == [0, 10, 20, 30, 40]
    before, after = e[0], e[WARMUP]
    print(f"warm-up: ode_mse {before['eval/ode_mse']:.2f} -> {after['eval/ode_mse']:.2f}, "
          f"fm {before['eval/fm']:.3f} -> {after['eval/fm']:.3f}, "
          f"psnr {before['eval/psnr']:.2f} -> {after['eval/psnr']:.2f} dB")
    assert after["eval/ode_mse"] < 0.9 * before["eval/ode_mse"], (before, after)
    assert after["eval/psnr"] > before["eval/psnr"] + 0.5, (before, after)
    warm = [line for line in metrics(out) if 0 < line["step"] <= WARMUP]
    assert all(set(line) >= {"fm", "loss", "lr/student"} and "online_loss" not in line for line in warm)
    assert "ode pairs (train): 24/24" in result.stderr and (out / "samples" / f"step-{WARMUP}.png").is_file()


def test_score_distillation_is_stable_and_improves_on_the_warm_up(run):
    """(b) Score distillation: every logged term finite, the online model's loss logged every step and the student's
    distribution-matching and feature-matching terms every 2nd, with α and λ_FM falling. Agreement with the
    teacher's multi-step output after 20 more steps, against the warm-up's end (this machine, seed 0): latent MSE
    59.1 -> 32.2 (asserted: lower), PSNR 7.8 -> 8.0 dB (reported, not asserted: the toy images are still far apart
    at 40 steps, and distribution matching does not pull a sample toward its own ODE pair). The toy recipe's full
    300 steps reach a latent MSE of 3.5 and 10.0 dB (docs/one_step.md)."""
    out, _ = run
    lines = [line for line in metrics(out) if line["step"] > WARMUP and "online_loss" in line]
    assert [line["step"] for line in lines] == list(range(WARMUP + 1, STEPS + 1))
    for line in lines:
        assert all(np.isfinite(v) for v in line.values() if isinstance(v, float)), line
    student = [line for line in lines if "dm" in line]
    assert [line["step"] - 1 - WARMUP for line in student] == list(range(0, STEPS - WARMUP, 2))
    assert all({"dm", "dm_grad_norm", "fm", "alpha", "lambda_fm", "loss", "online_loss"} <= set(line)
               for line in student)
    alphas = [line["alpha"] for line in student]
    assert alphas[0] == pytest.approx(0.98) and alphas == sorted(alphas, reverse=True)
    assert student[0]["dm"] > 0 and student[-1]["lambda_fm"] < student[0]["lambda_fm"]
    e = evals(out)
    warm, final = e[WARMUP], e[STEPS]
    print(f"agreement with the teacher's ODE output: "
          f"ode_mse {warm['eval/ode_mse']:.2f} -> {final['eval/ode_mse']:.2f}, "
          f"psnr {warm['eval/psnr']:.2f} -> {final['eval/psnr']:.2f} dB")
    assert final["eval/ode_mse"] < warm["eval/ode_mse"], (warm, final)


def test_resume_from_an_odd_step_is_bit_identical(run, shared, tmp_path):
    """(e) Resumed at step 25 (the online model's turn alone), the run ends as the uninterrupted one: both
    modules, both optimizers and schedules, the step's generator, and the same terms at the same steps."""
    out, _ = run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / f"checkpoint-{RESUME_AT}", resumed / f"checkpoint-{RESUME_AT}")
    result = launch_trainer(SCRIPT, CONFIG, resumed, *overrides(shared), "resume=latest")
    assert f"resumed from {resumed / f'checkpoint-{RESUME_AT}'} at step {RESUME_AT}" in result.stdout + result.stderr
    assert "ode pairs" not in result.stderr  # the cached pairs, not made again
    full, again = out / f"checkpoint-{STEPS}", resumed / f"checkpoint-{STEPS}"
    for name in ("unet/diffusion_pytorch_model.safetensors", "online/diffusion_pytorch_model.safetensors",
                 "generator-0.safetensors"):
        assert same_state(load_file(full / name), load_file(again / name)), name
    for name in ("optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin"):  # student, online
        assert same_state(torch.load(full / name, weights_only=True), torch.load(again / name, weights_only=True)), name
    before = [{k: v for k, v in line.items() if k not in TIMING} for line in metrics(out) if line["step"] > RESUME_AT]
    after = [{k: v for k, v in line.items() if k not in TIMING} for line in metrics(resumed)]
    assert [line["step"] for line in after] == list(range(RESUME_AT + 1, STEPS + 1))
    assert after == before


def test_each_optimizer_touches_only_its_own_module_with_the_online_lora(run, shared, tmp_path):
    """(d) The real loop with the online model as a LoRA on the frozen teacher and the classifier head on, a
    checkpoint after every step: warm-up steps 0-1 change the student alone; score-distillation steps 2 (student +
    online), 3 (online + head) and 4 (all three) change exactly the modules due. Each optimizer holds only its own
    module's parameters, and the teacher's own weights, VAE and text encoder never change, though the LoRA sits
    on that very U-Net."""
    from accelerate.state import AcceleratorState, GradientState

    from sdkd.train.engine.config import load_config
    from sdkd.train.engine.loop import Loop, make_accelerator
    from sdkd.train.formats.lora_io import LORA_FILE, save_lora
    from sdkd.train.one_step import SCHEMA, build

    out = tmp_path / "lora"
    cfg = load_config(ROOT / CONFIG, [f"output_dir={out}", *overrides(shared), "decoder=null", "online.kind=lora",
                                      "online.lora_rank=4", "gan.weight=0.01", "gan.start=1", "distill.warmup_steps=2",
                                      "train.max_steps=5", "eval.every=0", "train.checkpoint_every=1",
                                      "train.checkpoints_total_limit=null", "train.sample_every=0"], schema=SCHEMA)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = make_accelerator(cfg)
    task, dataset = build(cfg, acc)
    unet = task.online
    assert unet is task.teacher.unet  # the LoRA is on the teacher's U-Net: two U-Nets in memory
    frozen = {f"{part}.{n}": p.detach().clone() for part, model in (("unet", unet), ("vae", task.teacher.vae),
                                                                  ("text", task.teacher.components["text_encoder"]))
              for n, p in model.named_parameters() if "lora_" not in n}
    save_lora(tmp_path / "initial", unet)
    states = [{"student": {k: v.clone() for k, v in task.student.state_dict().items()},
               "online": load_file(tmp_path / "initial" / LORA_FILE),
               "classifier": {k: v.clone() for k, v in task.classifier.state_dict().items()}}]
    loop = Loop(cfg, acc, task, dataset)
    loop.fit()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for step in range(1, 6):
        ckpt = out / f"checkpoint-{step}"
        states.append({"student": load_file(ckpt / "unet" / "diffusion_pytorch_model.safetensors"),
                       "online": load_file(ckpt / LORA_FILE), "classifier": load_file(ckpt / "classifier.safetensors")})
    changed = {step: {part for part in states[step] if not same_state(states[step][part], states[step + 1][part])}
               for step in range(5)}
    assert changed == {0: {"student"}, 1: {"student"}, 2: {"student", "online"}, 3: {"online", "classifier"},
                       4: {"student", "online", "classifier"}}
    now = {f"{part}.{n}": p for part, model in (("unet", unet), ("vae", task.teacher.vae),
                                                ("text", task.teacher.components["text_encoder"]))
           for n, p in model.named_parameters() if "lora_" not in n}
    assert now.keys() == frozen.keys() and all(torch.equal(now[k].cpu(), frozen[k].cpu()) for k in frozen)
    held = {name: {id(p) for group in m.optimizer.param_groups for p in group["params"]}
            for name, m in loop.modules.items()}
    assert held["online"] == {id(p) for n, p in unet.named_parameters() if "lora_" in n}
    assert held["student"] == {id(p) for p in task.student.parameters()}
    assert held["classifier"] == {id(p) for p in task.classifier.parameters()}


# ---------------------------------------------------------------------------------------------------
# Export


def test_exported_folder_samples_in_one_step(run, tmp_path):
    """(f) OUTPUT/student/ holds the one-step U-Net with the tiny decoder of `decoder`; diffusers'
    StableDiffusionPipeline (1 step, guidance 0) and sdkd's pipeline (steps=1) both sample the student's own
    image: x0 of its one v prediction at t=999 from the same noise, decoded. Of the printed next steps, the
    one-step sample command's arguments are checked and the stable-diffusion.cpp single-file export is run and read
    back with the student's U-Net."""
    out, result = run
    folder = out / "student"
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderTiny.from_pretrained(folder / "vae")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vae, AutoencoderTiny) and pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]
    with torch.no_grad():
        noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
        cond = pipe.text_encoder(pipe.tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True,
                                                return_tensors="pt").input_ids)[0]
        v = unet(noise, torch.tensor([999]), encoder_hidden_states=cond).sample
        assert pipe.scheduler.config.prediction_type == "v_prediction"  # the toy teacher's, kept by its student
        alpha = pipe.scheduler.alphas_cumprod[999]
        x0 = alpha.sqrt() * noise - (1 - alpha).sqrt() * v
        expected = (vae.decode(x0).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    images = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.abs(images - expected).max() < 1e-4

    from sdkd.eval.inference.pipeline import load_pipeline

    ours = load_pipeline(out, device="cpu")
    assert ours.settings(steps=1)["guidance_scale"] == 0.0
    images = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in ours(PROMPT, steps=1, seed=0)])
    assert np.abs(images - expected).max() <= 1 / 255 + 1e-6  # PIL rounding
    card = (folder / "README.md").read_text()
    assert "num_inference_steps=1, guidance_scale=0.0" in card and "train/one_step.py" in card

    commands = {line.split("  #")[0].strip() for line in result.stdout.splitlines() if line.startswith("  python ")}
    (sample,) = [c for c in commands if "eval/sample.py" in c]
    assert "--steps 1" in sample and f"--model {folder}" in sample
    (export,) = [c for c in commands if "train/export.py" in c]
    assert "--target sdcpp" in export  # an SDXS layout with a tiny decoder: stable-diffusion.cpp's SDXS
    args = shlex.split(export)[2:]
    args[args.index("--out") + 1] = str(tmp_path / "student-sdcpp.safetensors")
    from sdkd.train import export as export_script
    from sdkd.train.formats.model_files import load_single_file

    export_script.main(args)
    single = load_single_file(tmp_path / "student-sdcpp.safetensors")
    assert isinstance(single.vae, AutoencoderTiny) and single.scheduler.config.timestep_spacing == "trailing"
    assert all(torch.equal(t, single.unet.state_dict()[k]) for k, t in unet.state_dict().items())
    assert "sd -m " in result.stdout and "--steps 1 --cfg-scale 1" in result.stdout
