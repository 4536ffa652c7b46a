"""Block ranking (train/tasks/ranking.py, `train/show_student.py --rank`): the units and their specs, the damage
of each removal, the additivity check, the budget proposal, and the CLI's flags."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from sdkd.train.engine.config import load_config
from sdkd.train.models.student_config import StudentConfig
from sdkd.train.models.students import PRESETS, count_params, describe, removed_modules, student_unet_config
from sdkd.train.models.teacher import load_teacher
from sdkd.train.tasks import ranking as R
from sdkd.train.tasks.diffusion_config import KDConfig
from sdkd.train.tasks.ranking import Removal

from conftest import ROOT, launch_trainer, run_script
from test_students import run_main  # show_student's CLI in-process

PROMPTS = list(R.DEFAULT_PROMPTS[:2])


def toy_config(name: str) -> dict:
    return json.loads((ROOT / f"train/models/{name}_teacher/unet/config.json").read_text())


# ---------------------------------------------------------------------------------------------
# Units and their specs (configs only)


def test_a_transformer_layer_unit_removes_that_layer_alone():
    """A depth step of an SDXL-topology attention is a custom spec whose explicit layer_init keeps the other
    layer: the student lacks exactly that teacher layer."""
    config = toy_config("toy_sdxl")
    unit = Removal(layers=frozenset([("up_blocks.0.attentions.1", 0)]))
    section = R.student_section(config, unit)
    assert section["layer_init"] == {"up_blocks.0.attentions.1": [1]}
    spec = R.removal_spec(StudentConfig(**section))
    assert removed_modules(config, spec) == ["up_blocks.0.attentions.1.transformer_blocks.0"]


def test_a_removed_stage_takes_its_own_units_with_it():
    """With the deepest stage gone, a pair, an attention drop and a transformer layer of that level add nothing:
    the effective removal, and so its student section, is the stage's alone."""
    config = toy_config("toy_sdxl")
    stage = Removal(deepest=True)
    inside = (Removal(pairs=frozenset([(2, 0, 1)])) | Removal(drop_attention=frozenset([2]))
              | Removal(layers=frozenset([("down_blocks.2.attentions.1", 1)])))
    assert R.effective(stage | inside, 3) == stage
    assert R.student_section(config, stage | inside) == R.student_section(config, stage)
    kept = Removal(layers=frozenset([("down_blocks.1.attentions.0", 0)]))
    assert R.effective(stage | kept, 3) == stage | kept  # another level's layer stays


def test_the_bk_presets_are_sets_of_units():
    """bk_small is the toy teacher's four d_i.1+u_j.1 pairs and its mid block, and rebuilds to the same student."""
    config = toy_config("toy")
    removal = R.removal_of(config, "bk_small")
    assert removal == Removal(pairs=frozenset({(i, 1, 1) for i in range(4)}), mid="removed")
    assert student_unet_config(config, R.removal_spec(R.student_config(config, removal))) == \
        student_unet_config(config, PRESETS["bk_small"])


# ---------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize("args, says", [
    (["--teacher", "toy", "--preset", "bk_small", "--budget-params", "5"], "--budget-params needs --rank"),
    (["--teacher", "toy", "--rank", "--budget-params", "5", "--budget-macs", "5"], "give one budget"),
    (["--teacher", "toy", "--rank", "--preset", "bk_small"], "not both"),
    (["--teacher", "toy"], "not both"),
    (["--teacher", "toy", "--rank", "--pairs", "bk"], "--pairs shows one student"),
    (["--teacher", "toy", "--rank", "--budget-params", "0"], "--budget-params: must be an integer from 1"),
    (["--teacher", "toy", "--rank", "--prompts", "/nonexistent/prompts.txt"], "does not exist"),
    (["--teacher", "no_such_model_here", "--rank"], "no_such_model_here"),
    pytest.param(["--teacher", "toy", "--rank", "--budget-params", "1000"],
                 "no student of this teacher fits; the smallest the units make has", marks=pytest.mark.slow),
    pytest.param(["--teacher", "toy", "--rank", "--budget-params", "9999999"], "the teacher itself fits",
                 marks=pytest.mark.slow),
])
def test_flag_mistakes_are_one_line_exit_2(args, says, capsys):
    code, out, err = run_main(args, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and says in err, err


def test_an_empty_prompt_file_is_refused(tmp_path, capsys):
    file = tmp_path / "prompts.txt"
    file.write_text("\n  \n")
    code, _, err = run_main(["--teacher", "toy", "--rank", "--prompts", str(file)], capsys)
    assert code == 2 and err.strip() == f"error: --prompts: '{file}' holds no prompt"


# ---------------------------------------------------------------------------------------------
# Damage, ranking, additivity, budget (the toy teachers, a probe of 2 prompts x 1 timestep)


@pytest.fixture(scope="module")
def identity_l0():
    """The toy teacher with its level-0 attentions' output projections zeroed: each is then the identity (a
    residual adding zero), so dropping them changes nothing."""
    parts = load_teacher("toy")
    parts.components["unet"] = unet = copy.deepcopy(parts.unet)
    for name, module in unet.named_modules():
        if name.startswith(("down_blocks.0.attentions", "up_blocks.3.attentions")) and name.endswith("proj_out"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    probe = R.make_probe(parts, PROMPTS, 1, 1, 32)
    ranking = R.sized_units(dict(unet.config))
    R.measure_units(parts, probe, ranking)
    return parts, probe, ranking


@pytest.mark.slow
def test_an_identity_unit_does_no_damage_and_ranks_first(identity_l0):
    _, _, ranking = identity_l0
    first, second = ranking.rows[:2]
    assert first.name == "attention L0" and first.damage < 1e-10
    assert second.damage > 1e3 * max(first.damage, 1e-12)
    assert ranking.rows[-1].damage > 0.01  # the probe does see a removal that matters


@pytest.mark.slow
def test_ranking_is_deterministic(identity_l0):
    """A new probe and a second measurement give the same damages, bit for bit, in the same order."""
    parts, _, ranking = identity_l0
    again = R.sized_units(dict(parts.unet.config))
    R.measure_units(parts, R.make_probe(parts, PROMPTS, 1, 1, 32), again)
    assert [(r.name, r.damage, r.params, r.macs) for r in again.rows] == \
        [(r.name, r.damage, r.params, r.macs) for r in ranking.rows]


@pytest.mark.slow
def test_additivity_is_the_measured_damage_over_the_sum(identity_l0):
    """With an identity unit, a pair's measured damage is its other unit's: ratio 1; for two real units the ratio
    is the pair's own damage over the sum of theirs."""
    parts, probe, ranking = identity_l0
    damage = {r.name: r.damage for r in ranking.rows}
    unit = {r.name: r.unit for r in ranking.rows}
    pair = unit["attention L0"] | unit["d2.0+u1.0"]
    real = unit["d1.1+u2.0"] | unit["d2.0+u1.0"]
    with_identity, two = R.measure_sets(parts, probe, ranking, [("identity", pair), ("two", real)])
    assert with_identity["measured"] == pytest.approx(damage["d2.0+u1.0"], rel=1e-5)
    assert with_identity["ratio"] == pytest.approx(1.0, rel=1e-4)
    assert two["predicted"] == damage["d1.1+u2.0"] + damage["d2.0+u1.0"]
    assert two["measured"] == R.damage(parts, probe, dict(parts.unet.config), real)
    assert two["ratio"] == two["measured"] / two["predicted"]


@pytest.mark.slow
def test_unit_sizes_are_their_students_shrinkage(identity_l0):
    """Each unit's parameters and MACs are the teacher's minus its student's (the deepest stage's MACs aside: it
    moves the mid block to a finer level)."""
    parts, _, ranking = identity_l0
    config = dict(parts.unet.config)
    for row in ranking.rows:
        params, macs = R.removal_size(config, row.unit, ranking.latent_hw)
        assert ranking.teacher_params - params == row.params, row.name
        if not row.unit.deepest:
            assert ranking.teacher_macs - macs == row.macs, row.name


@pytest.mark.slow
def test_budget_proposal_fits_beats_the_preset_and_is_a_recipe_section(identity_l0, tmp_path):
    """At bk_small's parameters the proposal has at most as many, predicts no more damage than bk_small's units,
    and its YAML loads as a KD recipe's student section that builds with feature pairs."""
    parts, _, ranking = identity_l0
    config = dict(parts.unet.config)
    budget = count_params(student_unet_config(config, PRESETS["bk_small"]))
    removal, params, macs = R.propose(ranking, config, budget, "params")
    assert params <= budget and params == R.removal_size(config, removal, ranking.latent_hw)[0]
    assert ranking.predicted(removal) <= ranking.predicted(R.removal_of(config, "bk_small"))
    assert "attention L0" in [R.label(u, ranking.levels) for u in removal.units()]  # free: it does no damage
    recipe = tmp_path / "ranked.yaml"
    recipe.write_text(R.proposal_yaml(config, removal))
    cfg = load_config(recipe, ["teacher=toy", f"output_dir={tmp_path / 'run'}"], schema=KDConfig)
    assert cfg.student.preset == "custom"
    report = describe(config, cfg.student)
    assert report["student_params"] == params and report["feature_pairs"]
    by_macs, _, student_macs = R.propose(ranking, config, ranking.teacher_macs // 2, "macs")
    assert student_macs <= ranking.teacher_macs // 2


@pytest.mark.slow
def test_sdxl_toy_ranks_its_depth_steps_and_proposes_a_recipe(tmp_path):
    """toy_sdxl: every unit kind appears (pairs, attention drops, transformer layers, mid, stage), and a proposal
    at two thirds of the parameters loads as a recipe section of an SDXL teacher."""
    parts = load_teacher("toy_sdxl")
    config = dict(parts.unet.config)
    ranking = R.sized_units(config)
    R.measure_units(parts, R.make_probe(parts, PROMPTS[:1], 1, 1, 32), ranking)
    names = [r.name for r in ranking.rows]
    for name in ("d1.1+u1.0", "attention L2", "u0.a2 tx1", "d2.a1 tx0", "mid attention", "mid block",
                 "deepest stage"):
        assert name in names
    budget = ranking.teacher_params * 2 // 3
    removal, params, _ = R.propose(ranking, config, budget, "params")
    assert params <= budget
    recipe = tmp_path / "ranked.yaml"
    recipe.write_text(R.proposal_yaml(config, removal))
    cfg = load_config(recipe, ["teacher=toy_sdxl", f"output_dir={tmp_path / 'run'}"], schema=KDConfig)
    assert describe(config, cfg.student)["student_params"] == params


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.e2e
def test_show_student_rank_proposal_trains_as_is(tmp_path):
    """`show_student.py --rank --budget-params --json` as a user runs it; its proposal, written as YAML, is the
    student section of a KD run that trains (2 steps) and saves that student."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    budget = count_params(student_unet_config(toy_config("toy"), PRESETS["bk_small"]))
    done = run_script([sys.executable, str(ROOT / "train/show_student.py"), "--teacher", "toy", "--rank",
                       "--prompts", str(prompts), "--timesteps", "1", "--budget-params", str(budget), "--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert "removals measured" in done.stderr  # the progress bar
    assert [u["damage"] for u in report["units"]] == sorted(u["damage"] for u in report["units"])
    assert report["proposal"]["params"] <= budget and len(report["additivity"]) == 3
    recipe = tmp_path / "ranked.yaml"
    recipe.write_text(OmegaConf.to_yaml(OmegaConf.merge(OmegaConf.load(ROOT / "configs/toy.yaml"),
                                                        {"student": report["proposal"]["student"]})))
    out = tmp_path / "run"
    launch_trainer("train/kd.py", str(recipe), out, "train.max_steps=2", "train.batch_size=2",
                   "data.num_samples=4", "train.checkpoint_every=0", "train.sample_every=0", "eval.every=0",
                   "log.trackers=[none]")
    saved = json.loads((out / "student" / "unet" / "config.json").read_text())
    assert count_params(saved) == report["proposal"]["params"]
