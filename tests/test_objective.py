"""The objective's noise, input and target: diffusers' noise_offset, input_perturbation and prediction_type."""

import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from sdkd.cli.errors import UserError
from sdkd.train.engine.step_random import StepRandom
from sdkd.train.losses.kd import KDLoss
from sdkd.train.models.families import Conditioning
from sdkd.train.models.toy import TOY_UNET
from sdkd.train.tasks.objective import DiffusionObjective, set_prediction_type

LATENTS = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def scheduler(kind="epsilon"):
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)


def draw(sched=None, **options):
    objective = DiffusionObjective(sched or scheduler(), KDLoss(), **options)
    return objective.draw(LATENTS, StepRandom(1, "cpu", len(LATENTS)))


def test_defaults_draw_plain_noise():
    noisy, t, target = draw()
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(LATENTS.shape, generator=gen)
    assert torch.equal(target, noise)
    assert torch.equal(noisy, scheduler().add_noise(LATENTS, noise, t))


def test_noise_offset_shifts_each_channel_of_input_and_target_alike():
    noisy0, t0, target0 = draw()
    noisy, t, target = draw(noise_offset=0.1)
    assert torch.equal(t, t0)
    shift = target - target0
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant over H, W
    assert shift[:, :, 0, 0].abs().min() > 0 and shift[:, :, 0, 0].std() > 0.01  # per sample and channel
    assert torch.allclose(noisy, scheduler().add_noise(LATENTS, target, t), atol=1e-6)  # input from the same noise


def test_input_perturbation_changes_the_input_not_the_target():
    noisy0, t0, target0 = draw()
    noisy, t, target = draw(input_perturbation=0.1)
    assert torch.equal(target, target0) and torch.equal(t, t0)
    extra = (noisy - noisy0) / (1 - scheduler().alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert 0.05 < extra.std() < 0.15  # 0.1 x unit noise, scaled as add_noise scales noise


def test_teacher_and_student_see_the_same_input():
    unet = UNet2DConditionModel(**TOY_UNET).eval()
    objective = DiffusionObjective(scheduler(), KDLoss(0.0, 1.0, 0.0), teacher=unet, noise_offset=0.1,
                                   input_perturbation=0.1)
    with torch.no_grad():
        terms = objective(unet, LATENTS, Conditioning(torch.randn(3, 77, 32)), StepRandom(1, "cpu", len(LATENTS)))
    assert terms["out"].item() == 0.0  # the same U-Net on the same input


def test_prediction_type_v_makes_the_target_the_velocity():
    noise = draw()[2]
    sched = scheduler()
    set_prediction_type(sched, "v_prediction")
    noisy, t, target = draw(sched)
    assert sched.config.prediction_type == "v_prediction"
    assert torch.allclose(target, sched.get_velocity(LATENTS, noise, t))
    assert not torch.allclose(target, noise)


def test_prediction_type_must_match_a_kd_teacher():
    teacher = scheduler("epsilon")
    set_prediction_type(scheduler(), "epsilon", teacher, "toy")  # the same: fine
    with pytest.raises(UserError) as err:
        set_prediction_type(teacher, "v_prediction", teacher, "toy")  # KD's student shares the teacher's
    assert str(err.value) == ("config key 'loss.prediction_type': v_prediction, but teacher 'toy' predicts epsilon; "
                              "output and feature KD (loss.lambda_out, loss.lambda_feat) need the same")
    assert teacher.config.prediction_type == "epsilon"
    unchanged = scheduler("v_prediction")
    set_prediction_type(unchanged, None, teacher)
    assert unchanged.config.prediction_type == "v_prediction"


def test_export_writes_the_trained_prediction_type(tmp_path):
    from sdkd.train.formats.model_files import save_pipeline

    save_pipeline(UNet2DConditionModel(**TOY_UNET), "toy", tmp_path, prediction_type="v_prediction")
    assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"


def test_two_processes_draw_what_one_process_draws_for_the_same_samples():
    """StepRandom: ranks 0 and 1 of batch 3 get the rows one process of batch 6 gets, in order, for the
    latents' noise, the timesteps and the options' extra draws."""
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    options = dict(noise_offset=0.1, input_perturbation=0.1)
    one = DiffusionObjective(scheduler(), KDLoss(), **options).draw(latents, StepRandom(5, "cpu", 6))
    ranks = [DiffusionObjective(scheduler(), KDLoss(), **options).draw(latents[3 * r:3 * r + 3],
                                                                        StepRandom(5, "cpu", 3, 2, r))
             for r in (0, 1)]
    for i in range(3):  # noisy latents, timesteps, target
        assert torch.equal(torch.cat([ranks[0][i], ranks[1][i]]), one[i])
    short = DiffusionObjective(scheduler(), KDLoss()).draw(latents[3:5], StepRandom(5, "cpu", 3, 2, 1))
    plain = DiffusionObjective(scheduler(), KDLoss()).draw(latents, StepRandom(5, "cpu", 6))
    assert torch.equal(short[1], plain[1][3:5])  # a batch that lost a bad sample keeps its rows' draws
