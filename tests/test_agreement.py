"""Teacher agreement (train/losses/agreement.py): held-out triples and the no-weights metrics on them."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from sdkd.train.engine.config import load_config
from sdkd.train.formats.fingerprint import teacher_fingerprint
from sdkd.train.losses import agreement
from sdkd.train.losses.agreement import Triples, TripleSettings
from sdkd.train.models.toy import build_toy_pipeline
from sdkd.train.tasks.diffusion_config import KDConfig

SETTINGS = TripleSettings(prompts=("a red circle", "a blue square"), seed=3, timesteps=3, teacher_steps=2,
                          guidance_scale=3.0, resolution=32, teacher="toy")


@pytest.fixture(scope="module")
def toy():
    return build_toy_pipeline()


@pytest.fixture(scope="module")
def triples(toy):
    return agreement.make_triples(toy.unet, toy, SETTINGS, batch_size=4)


def perturbed(unet, scale=0.05, seed=0):
    student = copy.deepcopy(unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * p.std().nan_to_num() * torch.randn(p.shape, generator=gen))
    return student


def test_triples_are_deterministic_and_identical_across_calls(toy, triples):
    """Made again at another batch size: the same noisy latents, timesteps and conditioning, and teacher predictions
    within 1e-5; another seed gives other noisy latents."""
    again = agreement.make_triples(toy.unet, toy, SETTINGS, batch_size=2)  # another batch size
    assert len(triples) == 2 * 3 and triples.noisy.shape == (6, 4, 16, 16)
    assert triples.timesteps.tolist() == [166, 500, 833] * 2  # prompt-major, spread over 1000 steps
    assert torch.equal(triples.noisy, again.noisy) and torch.equal(triples.timesteps, again.timesteps)
    assert torch.equal(triples.cond.hidden_states, again.cond.hidden_states)
    assert torch.allclose(triples.teacher_pred, again.teacher_pred, atol=1e-5)
    # the two prompts' clean latents differ (own seeds), and each prompt's conditioning is its own
    assert not torch.equal(triples.noisy[0], triples.noisy[3])
    assert torch.equal(triples.cond.hidden_states[0], triples.cond.hidden_states[2])
    assert not torch.equal(triples.cond.hidden_states[0], triples.cond.hidden_states[3])
    # another seed, other triples
    other = agreement.make_triples(toy.unet, toy, TripleSettings(**{**SETTINGS.__dict__, "seed": 4}))
    assert not torch.equal(other.noisy, triples.noisy)


def test_saved_triples_load_back_and_are_reused_only_for_their_settings(toy, triples, tmp_path):
    path = triples.save(tmp_path / agreement.TRIPLES_FILE)
    loaded = Triples.load(path)
    assert loaded.settings == SETTINGS
    for name in ("noisy", "timesteps", "teacher_pred"):
        assert torch.equal(getattr(loaded, name), getattr(triples, name))
    weights = teacher_fingerprint(toy.unet, toy)
    agreement.load_or_make(path, toy.unet, toy, SETTINGS)  # made again: the stored set records no weights
    assert Triples.load(path).settings == replace(SETTINGS, teacher_weights=weights)
    changed = TripleSettings(**{**SETTINGS.__dict__, "timesteps": 2})
    remade = agreement.load_or_make(path, toy.unet, toy, changed)
    assert len(remade) == 4 and Triples.load(path).settings == replace(changed, teacher_weights=weights)
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    assert Triples.load(tmp_path / "broken.safetensors") is None


def test_triples_of_other_teacher_weights_at_the_same_path_are_made_again(toy, tmp_path, capsys):
    """Stored triples are keyed by the teacher's weights, not its name: new weights under the same `teacher` make
    them again, with a note naming the fingerprint that changed."""
    path = tmp_path / agreement.TRIPLES_FILE
    first = agreement.load_or_make(path, toy.unet, toy, SETTINGS)
    assert torch.equal(agreement.load_or_make(path, toy.unet, toy, SETTINGS).teacher_pred, first.teacher_pred)
    assert capsys.readouterr().err == ""  # reused silently
    other = perturbed(toy.unet, 0.2)
    again = agreement.load_or_make(path, other, toy, SETTINGS)
    note = capsys.readouterr().err.strip()
    assert note.startswith(f"note: held-out triples {path}: made with other settings (teacher_weights ") and \
        teacher_fingerprint(other, toy) in note and "\n" not in note, note
    assert not torch.allclose(again.teacher_pred, first.teacher_pred)
    assert Triples.load(path).settings.teacher_weights == teacher_fingerprint(other, toy)


def test_the_teacher_itself_scores_zero_and_a_perturbed_student_more(toy, triples):
    same = agreement.noise_mse(copy.deepcopy(toy.unet), triples, batch_size=4)
    assert same["noise_mse"] == pytest.approx(0.0, abs=1e-10)
    assert set(same) == {"noise_mse", "noise_mse_t166", "noise_mse_t500", "noise_mse_t833"}
    slightly, more = (agreement.noise_mse(perturbed(toy.unet, s), triples)["noise_mse"] for s in (0.02, 0.2))
    assert 0 < slightly < more


def test_noise_mse_of_each_timestep_is_over_its_own_triples(toy, triples):
    """noise_mse_tT: the mean squared prediction error over the triples at timestep T only (the three timesteps'
    values differ here)."""
    student = perturbed(toy.unet, 0.2)
    result = agreement.noise_mse(student, triples)
    err = (agreement.predict(student, triples) - triples.teacher_pred).pow(2).flatten(1).mean(1)
    per_timestep = [result[f"noise_mse_t{t}"] for t in (166, 500, 833)]
    for t, value in zip((166, 500, 833), per_timestep):
        assert value == pytest.approx(err[triples.timesteps == t].mean().item(), rel=1e-5)
    assert len({round(v, 6) for v in per_timestep}) == 3


def test_image_mse_and_psnr():
    a = np.random.default_rng(0).random((8, 8, 3))
    assert agreement.image_mse(a, a) == 0 and agreement.psnr(0.0) == agreement.MAX_PSNR
    b = np.clip(a + 0.1, 0, 1)
    mse = agreement.image_mse(a, b)
    assert 0 < mse <= 0.01 and agreement.psnr(mse) == pytest.approx(10 * math.log10(1 / mse))
    assert agreement.psnr(0.01) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="different shapes"):
        agreement.image_mse(a, a[:4])


def test_run_settings_resolve_nulls_from_sample_and_data(tmp_path):
    cfg = load_config("configs/toy.yaml", [f"output_dir={tmp_path}", "eval.num_prompts=1", "eval.every=5",
                                           "sample.guidance_scale=2.5"], schema=KDConfig)
    s = agreement.run_settings(cfg)
    assert s.prompts == (cfg.sample.prompts[0],) and s.guidance_scale == 2.5 and s.resolution == 32
    assert s.teacher == "toy" and s.teacher_steps == 8 and s.timesteps == 4
    cfg = load_config("configs/toy.yaml", [f"output_dir={tmp_path}", "eval.prompts=[a cat]", "eval.resolution=16",
                                           "eval.guidance_scale=1.0", "sample.resolution=64"], schema=KDConfig)
    s = agreement.run_settings(cfg)
    assert s.prompts == ("a cat",) and s.resolution == 16 and s.guidance_scale == 1.0


@pytest.mark.parametrize("override, key", [
    ("eval.every=-1", "eval.every"), ("eval.timesteps=0", "eval.timesteps"), ("eval.prompts=[]", "eval.prompts"),
    ("eval.resolution=30", "eval.resolution"), ("eval.teacher_steps=0", "eval.teacher_steps"),
])
def test_eval_section_errors_name_the_key(tmp_path, override, key):
    from sdkd.cli.errors import ConfigError

    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config("configs/toy.yaml", [f"output_dir={tmp_path}", override], schema=KDConfig)
