"""The objective's noise, input and target (diffusers' noise_offset, input_perturbation and prediction_type), the
loss weights of a trainer's config, and sub-block feature KD."""

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


# ---------------------------------------------------------------------------------------------
# Sub-block feature KD (student.feature_pairs=sub_block) through the trainers' objective


FULL_COPY = ["student.preset=custom", "student.keep_down=[[0,1],[0,1],[0,1],[0,1]]",
             "student.keep_up=[[0,1,2],[0,1,2],[0,1,2],[0,1,2]]"]  # every toy teacher module kept


def sub_block_objective(teacher, student, *overrides):
    from sdkd.train.engine.config import load_config
    from sdkd.train.tasks.diffusion_config import KDConfig
    from sdkd.train.tasks.objective import kd_objective

    cfg = load_config(None, ["teacher=toy", "output_dir=unused", "student.feature_pairs=sub_block",
                             "loss.lambda_task=0", "loss.lambda_out=0", *overrides], schema=KDConfig)
    return kd_objective(cfg, scheduler(), student, teacher, LATENTS.shape[-1])


def pair_mses(objective) -> dict[str, float]:
    """Each pair's MSE, from the features the objective's own hooks recorded, by student module."""
    return {name: (s.float() - t.float()).pow(2).mean().item() for name, s, t in
            zip(objective.student_hooks.names, objective.student_hooks.features, objective.teacher_hooks.features)}


def test_sub_block_feature_kd_is_zero_exactly_where_the_student_computes_what_the_teacher_does():
    from sdkd.train.models.student_config import StudentConfig
    from sdkd.train.models.students import build_student, removal_spec
    from sdkd.train.models.toy import build_toy_pipeline

    teacher = build_toy_pipeline().unet.eval()  # left trainable: the objective alone must keep it out of the graph
    cond, rng = Conditioning(torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(2))), lambda: StepRandom(
        1, "cpu", len(LATENTS))
    full = StudentConfig(preset="custom", keep_down=[[0, 1]] * 4, keep_up=[[0, 1, 2]] * 4)
    twin = build_student(teacher, removal_spec(full))
    objective = sub_block_objective(teacher, twin, *FULL_COPY)
    every = [n for n, m in teacher.named_modules() if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel")]
    assert sorted(objective.student_hooks.names) == sorted(every) and len(every) == 38
    assert objective(twin, LATENTS, cond, rng())["feat"].item() == 0.0  # the teacher's own modules: nothing to learn

    # One kept module differs (the last attention's output projection): its pair alone, and the term, are non-zero.
    # Features compared with themselves (the teacher's replaced by the student's) would leave the term at 0.
    with torch.no_grad():
        twin.up_blocks[3].attentions[2].proj_out.weight.mul_(1.5)
    terms = objective(twin, LATENTS, cond, rng())
    mses = pair_mses(objective)
    assert mses["up_blocks.3.attentions.2"] > 1e-4 and all(v == 0.0 for n, v in mses.items()
                                                          if n != "up_blocks.3.attentions.2")
    assert terms["feat"].item() == pytest.approx(mses["up_blocks.3.attentions.2"], rel=1e-5)
    terms["loss"].backward()
    assert twin.up_blocks[3].attentions[2].proj_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())  # the teacher ran outside the graph

    # A cut student (bk_small): each module pairs with the teacher module it was copied from; the first two see
    # the teacher's input and match it, every one after a removed module (down_blocks.0.resnets.1 the first)
    # does not. The term sums all 21 pairs.
    student = build_student(teacher, removal_spec(StudentConfig(preset="bk_small")))
    objective = sub_block_objective(teacher, student, "student.preset=bk_small")
    terms = objective(student, LATENTS, cond, rng())
    mses = pair_mses(objective)
    first = ("down_blocks.0.attentions.0", "down_blocks.0.resnets.0")
    assert len(mses) == 21 and all(mses[n] == 0.0 for n in first)
    assert all(v > 1e-6 for n, v in mses.items() if n not in first), mses
    assert terms["feat"].item() == pytest.approx(sum(mses.values()), rel=1e-5)


def test_the_loss_config_weights_each_term_of_the_trainers_objective():
    """kd_objective from a config with three different weights: the loss is 0.3·task + 5·out + 0.2·feat of its
    own terms, each weighted term at least 5% of it (so a weight ignored, or one term's weight used for another,
    changes the loss)."""
    from sdkd.train.models.student_config import StudentConfig
    from sdkd.train.models.students import build_student, removal_spec

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**TOY_UNET).eval()
    weights = ["loss.lambda_task=0.3", "loss.lambda_out=5", "loss.lambda_feat=0.2"]
    cond = Conditioning(torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(2)))
    student = build_student(teacher, removal_spec(StudentConfig(preset="bk_small")))
    with torch.no_grad():
        # The trainers' objective with BK-SDM's feature pairs (the helper's sub-block pairs overridden).
        terms = sub_block_objective(teacher, student, "student.preset=bk_small", "student.feature_pairs=bk",
                                    *weights)(student, LATENTS, cond, StepRandom(1, "cpu", len(LATENTS)))
    parts = {"task": 0.3 * terms["task"].item(), "out": 5 * terms["out"].item(), "feat": 0.2 * terms["feat"].item()}
    assert terms["loss"].item() == pytest.approx(sum(parts.values()), rel=1e-5)
    assert all(v > 0.05 * terms["loss"].item() for v in parts.values()), parts  # no term too small to tell


def test_sub_block_pairs_that_disagree_in_shape_stop_in_one_line_naming_the_pair():
    from sdkd.cli.errors import ConfigError
    from sdkd.train.models.student_config import StudentConfig
    from sdkd.train.models.students import build_student, removal_spec
    from sdkd.train.models.toy import build_toy_pipeline

    teacher = build_toy_pipeline().unet.eval()
    # bk_small of another teacher, wider at its deepest level: the same module names, other widths there.
    wider = UNet2DConditionModel(**{**TOY_UNET, "block_out_channels": [32, 64, 64, 96]})
    student = build_student(wider, removal_spec(StudentConfig(preset="bk_small")))
    with pytest.raises(ConfigError) as err:
        sub_block_objective(teacher, student, "student.preset=bk_small")
    assert str(err.value) == ("feature pair 7 (teacher down_blocks.3.resnets.0 -> student "
                              "down_blocks.3.resnets.0): shapes (64, 1, 1) vs (96, 1, 1) differ")


def test_snr_gamma_weights_each_sample_of_the_objectives_loss():
    """loss.snr_gamma: the objective's task term is the per-sample MSE weighted by min-SNR-γ of each sample's
    timestep (γ = 0.02, below the SNR of the timesteps drawn here), more than 10% off the plain mean."""
    from sdkd.train.losses.kd import min_snr_weights

    unet = UNet2DConditionModel(**TOY_UNET).eval()
    cond = Conditioning(torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        plain = DiffusionObjective(scheduler(), KDLoss())(unet, LATENTS, cond, StepRandom(1, "cpu", 3))["task"]
        weighted = DiffusionObjective(scheduler(), KDLoss(), snr_gamma=0.02)(unet, LATENTS, cond,
                                                                             StepRandom(1, "cpu", 3))["task"]
        noisy, t, target = draw()
        per_sample = (unet(noisy, t, cond.hidden_states).sample - target).pow(2).flatten(1).mean(1)
    assert plain.item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    expected = (per_sample * min_snr_weights(scheduler(), t, 0.02)).mean()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(weighted.item() - plain.item()) > 0.1 * plain.item()
