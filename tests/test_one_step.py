"""The one-step trainer's parts (train/one_step.py): the score-distillation functions, SSIM and the
feature-matching extractors, the ODE-pair cache, the update schedule, the config checks, and one step of the task
(the prompt reaching every model). The runs of the entry script are in test_one_step_e2e.py."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import pytest
import torch
from diffusers import DDPMScheduler

from sdkd.cli.errors import ConfigError
from sdkd.train.engine.config import load_config
from sdkd.train.formats.fingerprint import teacher_fingerprint
from sdkd.train.losses.feature_matching import FeatureMatching, UNetEncoder, encoder_layers, ssim
from sdkd.train.losses.score_distillation import (
    diffusion_loss,
    dmd_gradient,
    dmd_loss,
    guided,
    ramp,
    x0_from_prediction,
)
from sdkd.train.models.toy import SD_SCHEDULER
from sdkd.train.tasks import ode_pairs

from conftest import ROOT, reset_process_state, run_script

TOY_CONFIG = ROOT / "configs" / "one_step_toy.yaml"


@pytest.fixture(scope="module")
def toy():
    """The trained toy teacher's parts, frozen."""
    from sdkd.train.models.teacher import load_teacher

    parts = load_teacher("toy")
    for name in parts.family.models:
        parts.components[name].requires_grad_(False).eval()
    return parts


def conditioning(parts, n: int = 2):
    with torch.no_grad():
        return parts.family.encode(parts, {"captions": ["a red circle on a blue background"] * n})


# ---------------------------------------------------------------------------------------------
# Score distillation


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_x0_from_prediction_inverts_the_noising(kind):
    scheduler = DDPMScheduler(**{**SD_SCHEDULER, "prediction_type": kind})
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    noisy = scheduler.add_noise(x0, noise, t)
    pred = noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, t)
    assert torch.allclose(x0_from_prediction(pred, noisy, scheduler.alphas_cumprod, t, kind), x0, atol=2e-3)


def test_identical_real_and_fake_give_no_gradient():
    """(c) The distribution-matching gradient is exactly zero when the real and the fake model agree, and so is
    the loss's gradient with respect to the student sample."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    x0 = torch.randn(2, 4, 8, 8)
    grad = dmd_gradient(x, x0, x0.clone())
    assert torch.count_nonzero(grad) == 0
    dmd_loss(x, grad).backward()
    assert torch.count_nonzero(x.grad) == 0


def test_dmd_gradient_is_normalised_and_points_from_fake_to_real():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    real, fake = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    grad = dmd_gradient(x, real, fake)
    norm = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(grad, (fake - real) / norm, atol=1e-6)
    dmd_loss(x, grad).backward()
    assert torch.allclose(x.grad, grad / x.numel(), atol=1e-9)  # the surrogate's gradient is grad itself, scaled
    # A descent step moves the sample's fake-model denoising toward the real model's.
    step = x.detach() - 0.1 * grad
    assert ((step - x.detach()) * (real - fake)).sum() > 0
    assert torch.count_nonzero(dmd_gradient(x, real, real + float("nan"))) == 0  # NaN -> 0, never a NaN step


def test_identical_teacher_scores_leave_the_student_untouched(toy):
    """(c) With real models: when the online model is the teacher itself (as at the start of score distillation,
    guidance 1), the student's parameters get exactly zero gradient from the distribution-matching term."""
    from sdkd.train.models.students import PRESETS, build_student

    student = build_student(toy.unet, PRESETS["sdxs"]).float()
    cond, acp = conditioning(toy), toy.scheduler.alphas_cumprod
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t_max = torch.full((2,), 999)
    x = x0_from_prediction(student(noise, t_max, **cond.unet_kwargs()).sample, noise, acp, t_max)
    t = torch.tensor([300, 700])
    noisy = toy.scheduler.add_noise(x.detach(), torch.randn_like(x), t)
    with torch.no_grad():
        real = x0_from_prediction(toy.unet(noisy, t, **cond.unet_kwargs()).sample, noisy, acp, t)
        fake = x0_from_prediction(toy.unet(noisy, t, **cond.unet_kwargs()).sample, noisy, acp, t)
    dmd_loss(x, dmd_gradient(x, real, fake)).backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads) and any(g is not None for g in grads)


def test_guidance_ramp_and_diffusion_loss():
    u, c = torch.zeros(2), torch.ones(2)
    assert torch.equal(guided(u, c, 1.75), torch.full((2,), 1.75))
    assert [ramp(1.0, 0.5, 4, s) for s in (0, 1, 2, 4, 9)] == [1.0, 0.875, 0.75, 0.5, 0.5]
    assert ramp(1.0, 0.5, 0, 0) == 0.5
    assert diffusion_loss(torch.ones(2, 3), torch.zeros(2, 3)).item() == 1.0


def test_student_update_schedule():
    from sdkd.train.tasks.one_step import student_due

    due = student_due(warmup=3, student_every=4)
    assert [s for s in range(14) if due(s)] == [0, 1, 2, 3, 7, 11]


# ---------------------------------------------------------------------------------------------
# SSIM and feature matching


def test_ssim_matches_torchmetrics_on_images():
    from torchmetrics.functional.image import structural_similarity_index_measure as reference

    torch.manual_seed(0)
    a = torch.rand(3, 3, 32, 32)
    b = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    ours = ssim(a, b, data_range=1.0)
    # torchmetrics averages over its reflect-padded border too; Wang et al.'s SSIM (ours) over the valid part.
    _, full = reference(a, b, data_range=1.0, return_full_image=True)
    theirs = full[..., 5:-5, 5:-5].mean(dim=(1, 2, 3))
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    assert torch.allclose(ssim(a, a), torch.ones(3))


def test_ssim_on_small_signed_feature_maps_is_finite_and_differentiable():
    torch.manual_seed(0)
    target = torch.randn(2, 64, 2, 2)
    x = torch.randn(2, 64, 2, 2, requires_grad=True)
    value = ssim(x, target)  # window 1: the luminance term alone
    assert torch.isfinite(value).all() and (value < 1).all()
    value.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.allclose(ssim(target, target), torch.ones(2))


def test_unet_encoder_feature_matching(toy):
    """Zero for the target itself; for another sample, the mean over the batch of the layers' equal-weighted
    1 - SSIM of the encoder's features, recomputed here; the gradient reaches the latents, never the frozen
    teacher; the U-Net's decoder half never runs."""
    calls = []
    handle = toy.unet.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    encoder = UNetEncoder(toy.unet, encoder_layers(toy.unet))
    assert encoder.names == ["down_blocks.0.attentions.1", "down_blocks.1.attentions.1", "down_blocks.2.attentions.1",
                             "down_blocks.3.resnets.1", "mid_block"]
    fm = FeatureMatching(encoder)
    cond = conditioning(toy)
    torch.manual_seed(0)
    target = torch.randn(2, 4, 16, 16)
    x = (target.roll(1, 0) + 0.1 * torch.randn_like(target)).requires_grad_(True)
    assert fm(target, target, cond).item() == pytest.approx(0.0, abs=1e-5)
    loss = fm(x, target, cond)
    with torch.no_grad():
        got, wanted = encoder(x, cond), encoder(target, cond)
        expected = sum((1 - ssim(f, t)) / len(got) for f, t in zip(got, wanted)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0.1
    loss.backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in toy.unet.parameters())
    handle.remove()
    assert not calls
    with pytest.raises(ConfigError, match="'fm.layer_weights'"):
        FeatureMatching(encoder, [1.0])


def test_image_extractors_from_local_weights(toy, tmp_path):
    """vgg and dinov2 read local weights (random here), compare images the teacher's VAE decodes, and pass the
    gradient back to the latents."""
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    from sdkd.train.losses.feature_matching import DinoFeatures, VggFeatures
    from sdkd.train.losses.perceptual import LpipsVgg

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in LpipsVgg().state_dict().items()}, str(tmp_path / "vgg.safetensors"))
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, image_size=32)).save_pretrained(tmp_path / "dino")
    cond = conditioning(toy)
    target = torch.randn(2, 4, 16, 16)
    for extractor, layers in ((VggFeatures(str(tmp_path / "vgg.safetensors"), toy.vae, "cpu"), 5),
                              (DinoFeatures(str(tmp_path / "dino"), toy.vae, "cpu", image_size=32), 4)):
        assert len(extractor(target, cond)) == layers
        fm = FeatureMatching(extractor)
        x = torch.randn(2, 4, 16, 16, requires_grad=True)
        assert fm(target, target, cond).item() == pytest.approx(0.0, abs=1e-4)
        fm(x, target, cond).backward()
        assert x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="config key 'fm.weights_path': .* no DINOv2 folder"):
        DinoFeatures(str(tmp_path), toy.vae, "cpu")


# ---------------------------------------------------------------------------------------------
# ODE pairs


def test_ode_pairs_are_made_once_remade_on_change_and_never_half_written(toy, tmp_path, capsys):
    settings = ode_pairs.PairSettings(teacher="toy", prompts=("a red circle on a blue background",
                                                              "a green square on a white background"),
                                      solver="dpmsolver", steps=2, guidance_scale=4.0, seed=5, resolution=32)
    made = ode_pairs.load_or_make(tmp_path, "train", toy.unet, toy, settings)
    assert made.noise.shape == made.latents.shape == (2, 4, 16, 16) and len(made) == 2
    # Pair i's noise comes from seed + i alone.
    assert torch.equal(made.noise[1], torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(6))[0])
    assert made[1]["caption"] == settings.prompts[1] and torch.equal(made[1]["latents"], made.latents[1])
    manifest = json.loads((tmp_path / "train.json").read_text())
    assert {k: manifest[k] for k in ("teacher", "steps", "guidance_scale", "seed", "count")} == dict(
        teacher="toy", steps=2, guidance_scale=4.0, seed=5, count=2)
    assert manifest["prompts"] == list(settings.prompts)
    assert manifest["teacher_weights"] == teacher_fingerprint(toy.unet, toy)
    # Reused as stored: the teacher is not run again.
    stamp = (tmp_path / "train.safetensors").stat().st_mtime_ns
    again = ode_pairs.load_or_make(tmp_path, "train", toy.unet, toy, settings)
    assert torch.equal(again.latents, made.latents) and (tmp_path / "train.safetensors").stat().st_mtime_ns == stamp
    assert "making them again" not in capsys.readouterr().err
    # Other settings: one notice line naming the change, then made again.
    other = ode_pairs.PairSettings(**{**ode_pairs.asdict(settings), "steps": 3})
    remade = ode_pairs.load_or_make(tmp_path, "train", toy.unet, toy, other)
    notice = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notice == [f"note: ode pairs {tmp_path / 'train'}: made with other settings (steps 2 -> 3); "
                      f"making them again"]
    assert not torch.equal(remade.latents, made.latents) and torch.equal(remade.noise, made.noise)
    # Other weights under the same teacher name: the pairs are keyed by the weights, so made again.
    was = teacher_fingerprint(toy.unet, toy)
    with torch.no_grad():
        toy.unet.conv_out.bias.add_(0.5)  # retrained in place (the module's fixture gets it back below)
    try:
        moved = ode_pairs.load_or_make(tmp_path, "train", toy.unet, toy, other)
        now = teacher_fingerprint(toy.unet, toy)
    finally:
        with torch.no_grad():
            toy.unet.conv_out.bias.sub_(0.5)
    notice = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notice == [f"note: ode pairs {tmp_path / 'train'}: made with other settings (teacher_weights "
                      f"'{was}' -> '{now}'); making them again"]
    assert not torch.equal(moved.latents, remade.latents)
    # A write killed before its manifest: no manifest, so the tensors are never taken as a complete set.
    (tmp_path / "train.json").unlink()
    assert ode_pairs.load(tmp_path, "train", other) == (None, None)
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# Config


def test_recipes_load():
    from sdkd.train.one_step import OneStepConfig

    toy = load_config(TOY_CONFIG, schema=OneStepConfig)
    assert (toy.teacher, toy.student.preset, toy.online.kind, toy.fm.extractor) == ("toy", "sdxs", "copy",
                                                                                    "unet_encoder")
    sd = load_config(ROOT / "configs" / "sdxs_one_step.yaml", ["data.path=/data"], schema=OneStepConfig)
    assert (sd.distill.student_every, sd.distill.real_guidance_scale, sd.optim.lr) == (10, 1.75, 1e-5)
    assert sd.model == "runs/sdxs/student" and sd.decoder == "runs/sdxs_decoder/tiny_decoder"


@pytest.mark.parametrize("override, error", [
    ("online.kind=full", "config key 'online.kind': expected copy or lora, got 'full'"),
    ("fm.extractor=vgg", "config key 'fm.weights_path': fm.extractor=vgg needs local weights (nothing is downloaded)"),
    ("distill.alpha.end=0.01", "config key 'distill.alpha.end': must be in (distill.t_min, 1] = (0.02, 1]"),
    ("distill.student_every=0", "config key 'distill.student_every': must be > 0"),
    ("fm.window=4", "config key 'fm.window': an odd number >= 1"),
    ("pairs.prompt_file=/no/such/prompts.txt", "config key 'pairs.prompt_file': '/no/such/prompts.txt' not found"),
    ("train.num_epochs=2", "config key 'train.num_epochs': the one-step trainer's phases count steps"),
])
def test_bad_values_name_their_key(override, error):
    """(g)"""
    from sdkd.train.one_step import OneStepConfig

    overrides = [override] + ["train.max_steps=null"] * override.startswith("train.num_epochs")
    with pytest.raises(ConfigError) as err:
        load_config(TOY_CONFIG, overrides, schema=OneStepConfig)
    assert str(err.value).startswith(error)


def test_a_bad_value_is_one_line_and_exit_2(tmp_path):
    """(g) As a user runs it: one `error:` line on stderr, exit code 2, nothing started."""
    result = run_script([sys.executable, "train/one_step.py", "--config", str(TOY_CONFIG),
                         f"output_dir={tmp_path / 'r'}", "distill.lambda_fm.start=-1"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: config key 'distill.lambda_fm.start': must be >= 0"]
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# The task's step: the prompt reaches every model, the online model learns the student's samples


@contextmanager
def toy_one_step_task(tmp_path, *overrides: str):
    """OneStepTask of configs/one_step_toy.yaml with its fewest ODE pairs, 16 px, no warm-up and `overrides`, built
    in this process (which is reset after)."""
    from sdkd.train.engine.loop import make_accelerator
    from sdkd.train.one_step import OneStepConfig
    from sdkd.train.tasks.one_step import build_one_step_task

    cfg = load_config(TOY_CONFIG, [f"output_dir={tmp_path}", "pairs.count=2", "pairs.eval_count=1", "pairs.steps=2",
                                   "data.resolution=16", "distill.warmup_steps=0", "log.trackers=[none]", *overrides],
                      schema=OneStepConfig)
    try:
        yield build_one_step_task(cfg, make_accelerator(cfg))[0]
    finally:
        reset_process_state()


def train_step(task, captions: list[str], noise: torch.Tensor):
    """One OneStepTask.train_step on `captions` and `noise` (random ODE targets), gradients left in place; its
    StepContext."""
    from sdkd.train.engine.step_random import StepRandom
    from sdkd.train.engine.task import StepContext

    batch = {"noise": noise, "latents": torch.randn(noise.shape), "captions": captions}
    ctx = StepContext(0, {m.name: m.module for m in task.modules}, lambda name, loss: loss.backward())
    task.train_step(ctx, batch, StepRandom(0, "cpu", len(captions)))
    return ctx


def test_the_prompt_conditions_the_student_and_every_score_model_of_a_step(tmp_path, unet_calls):
    """One score-distillation step of OneStepTask (warm-up 0) on two captions: every U-Net forward of the step
    (the student's sample, the teacher's guided real score, the online fake score and its own loss, the feature
    matching) gets the captions' text embeddings (the guided one after the empty prompt's); and the one-step
    student's samples of one noise under the two captions differ by a clear part of their size."""
    captions = ["a red circle on a blue background", "a yellow square on a black background"]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    with toy_one_step_task(tmp_path, "distill.student_every=1") as task:
        text = task.encode(captions).hidden_states
        unet_calls.clear()
        ctx = train_step(task, captions, noise)
        assert ctx.updated == {"student", "online"} and len(unet_calls) >= 4
        assert all(torch.equal(call["hidden"][-2:], text) for call in unet_calls)
        with torch.no_grad():
            x0 = task.generate(task.student, noise, task.encode(captions))
    # Measured: the two captions' samples differ by 0.83x the samples' mean size.
    assert (x0[0] - x0[1]).abs().mean() > 0.2 * x0.abs().mean(), ((x0[0] - x0[1]).abs().mean(), x0.abs().mean())


def test_the_online_model_learns_the_students_samples_detached(tmp_path):
    """A score-distillation step trains the online (fake) score model on the student's one-step samples of the
    batch's noise (DMD2), not on the teacher's ODE outputs, and on them detached: no graph leads from the online
    loss back to the student."""
    captions = ["a red circle on a blue background", "a yellow square on a black background"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with toy_one_step_task(tmp_path, "distill.student_every=1", "gan.weight=0") as task:
        with torch.no_grad():
            samples = task.generate(task.student, noise, task.encode(captions))
        seen, online_loss = [], task.online_loss
        task.online_loss = lambda online, x0, cond, rng: seen.append(x0) or online_loss(online, x0, cond, rng)
        ctx = train_step(task, captions, noise)
    assert ctx.updated == {"student", "online"} and len(seen) == 1
    torch.testing.assert_close(seen[0], samples)
    assert not seen[0].requires_grad


def test_score_timesteps_are_drawn_from_t_min_to_the_alpha_ramp(tmp_path, unet_calls):
    """SDXS's segmented score distillation: OneStepTask.student_loss at score-distillation step s queries the
    teacher's real score and the online fake score at timesteps in [t_min T, alpha(s) T], alpha ramping here from
    0.9 to 0.3 over 4 steps: at step 4 and after every timestep of 64 samples is in [20, 300]; at step 0 some
    are above 300 (their range reaches 900)."""
    from sdkd.train.engine.step_random import StepRandom

    # No feature matching or classifier: their forwards (at t = 0) are not queries.
    with toy_one_step_task(tmp_path, "distill.t_min=0.02", "distill.alpha.start=0.9", "distill.alpha.end=0.3",
                           "distill.alpha.steps=4", "distill.lambda_fm.start=0", "distill.lambda_fm.end=0",
                           "gan.weight=0") as task:
        n = 64
        cond = task.encode(["a red circle on a blue background"] * n)
        x0, target = torch.randn(2, n, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        drawn = {}
        for s in (0, 4, 9):
            unet_calls.clear()
            with torch.no_grad():
                task.student_loss(x0, target, cond, s, StepRandom(s, "cpu", n))
            assert {c["shape"][0] for c in unet_calls} == {n, 2 * n}  # the fake score, the guided real score
            drawn[s] = torch.cat([c["timestep"].flatten() for c in unet_calls])
    for s in (4, 9):
        assert drawn[s].min() >= 20 and drawn[s].max() <= 300, (s, drawn[s].min(), drawn[s].max())
    assert drawn[0].min() >= 20 and drawn[0].max() > 300 and drawn[0].max() <= 900, drawn[0].max()
