import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from sdkd.cli.errors import UserError
from sdkd.train.engine.checkpoints import (
    Checkpointer,
    ModelState,
    checkpoint_problem,
    find_latest,
    list_checkpoints,
    resolve_resume,
)


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def fake_checkpoint(folder, step, files=None):
    """A checkpoint folder whose trainer_state.json lists `files` (name -> content)."""
    folder.mkdir(parents=True)
    files = {"weights.bin": "w" * step} if files is None else files
    for name, content in files.items():
        (folder / name).write_text(content)
    sizes = {name: len(content) for name, content in files.items()}
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "files": sizes}))
    return folder


def test_latest_ignores_partial_incomplete_and_foreign_folders(tmp_path):
    for step in (10, 2):
        fake_checkpoint(tmp_path / f"checkpoint-{step}", step)
    fake_checkpoint(tmp_path / "checkpoint-12", 12)
    (tmp_path / "checkpoint-12" / "weights.bin").write_text("truncated")  # listed size no longer matches
    for name in ("checkpoint-20", ".tmp-checkpoint-30", "checkpoint-x", "samples"):
        (tmp_path / name).mkdir()  # checkpoint-20: empty, so incomplete whatever its name says
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert find_latest(tmp_path).name == "checkpoint-10"
    assert find_latest(tmp_path / "missing") is None
    assert "weights.bin has 9 bytes, 12 were written" == checkpoint_problem(tmp_path / "checkpoint-12")
    assert "no trainer_state.json" in checkpoint_problem(tmp_path / "checkpoint-20")


def test_resolve_resume(tmp_path, capsys):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-5"), tmp_path)
    good = fake_checkpoint(tmp_path / "checkpoint-5", 5)
    assert resolve_resume("latest", tmp_path) == good
    assert resolve_resume(str(good), tmp_path) == good
    # A broken newest checkpoint is named; the previous one is used only when asked for.
    (tmp_path / "checkpoint-9").mkdir()
    with pytest.raises(UserError, match=r"newest checkpoint '.*checkpoint-9' is incomplete .*latest_complete"):
        resolve_resume("latest", tmp_path)
    assert resolve_resume("latest_complete", tmp_path) == good
    assert "passing over '" in capsys.readouterr().err


def test_save_load_roundtrip_rotation_and_ema(tmp_path, accelerator):
    model = tiny_unet()
    ema = EMAModel(model.parameters(), model_cls=UNet2DConditionModel, model_config=model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = Checkpointer(accelerator, tmp_path, 2, [(ModelState(model), ema)])
    model, opt = accelerator.prepare(model, opt)
    gen = torch.Generator().manual_seed(7)

    def train_step():
        out = model(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 3, 8)).sample
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.step(model.parameters())

    for step in (1, 2, 3):
        train_step()
        saved = ckpt.save(step, gen)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == 3
    assert checkpoint_problem(saved) is None
    assert (saved / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert UNet2DConditionModel.from_pretrained(saved / "unet").config.block_out_channels == [8, 16]
    assert not list(tmp_path.glob(".tmp-*"))

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = [p.clone() for p in ema.shadow_params]
    opt_state = opt.state_dict()["state"][0]["exp_avg"].clone()
    expected_noise = torch.randn(3, generator=gen)
    gen.manual_seed(99)
    train_step()  # move everything away from the saved state
    assert ckpt.load(saved, gen) == 3
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, shadow))
    assert ema.optimization_step == 3
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt_state)
    assert torch.equal(torch.randn(3, generator=gen), expected_noise)


def test_stale_partial_write_is_replaced(tmp_path, accelerator):
    model = tiny_unet()
    ckpt = Checkpointer(accelerator, tmp_path, None, [(ModelState(model), None)])
    model = accelerator.prepare(model)
    partial = tmp_path / ".tmp-checkpoint-4"
    partial.mkdir(parents=True)
    (partial / "garbage").write_text("killed mid-write")
    assert find_latest(tmp_path) is None
    path = ckpt.save(4, torch.Generator())
    assert not (path / "garbage").exists() and find_latest(tmp_path) == path


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no cleanup."""


def marker(path):
    """The value the scenario wrote into a saved U-Net's first bias."""
    from safetensors.torch import load_file

    return load_file(path / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.bias"][0].item()


def run_saves(tmp_path, accelerator, kill_at=None):
    """Saves steps 1, 2, 3 (limit 2: rotation), then step 3 again with new weights (a resumed run
    reaching it again); the `kill_at`-th file operation (rename, or removal: half done) is a kill."""
    import shutil
    from pathlib import Path

    model = tiny_unet()
    ckpt = Checkpointer(accelerator, tmp_path, 2, [(ModelState(model), None)])
    ops = {"n": 0}
    real_rename, real_rmtree = Path.rename, shutil.rmtree

    def tick():
        ops["n"] += 1
        return ops["n"] == kill_at

    def rename(self, target):
        if tick():
            raise Killed
        return real_rename(self, target)

    def rmtree(path, *a, **kw):
        if tick():
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for f in files[: len(files) // 2 + 1]:
                f.unlink()
            raise Killed
        return real_rmtree(path, *a, **kw)

    saved = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "rename", rename)
        mp.setattr(shutil, "rmtree", rmtree)
        try:
            for step, value in ((1, 1.0), (2, 2.0), (3, 3.0), (3, 3.5)):
                with torch.no_grad():
                    model.conv_in.bias.fill_(value)
                ckpt.save(step, torch.Generator())
                saved.append((step, value))
        except Killed:
            pass
    return saved, ops["n"]


@pytest.mark.slow  # seconds of its own: the full suite runs it
def test_a_kill_at_any_point_of_saving_rotating_or_resaving_loses_nothing(tmp_path, accelerator):
    _, total = run_saves(tmp_path / "uninterrupted", accelerator)
    assert total >= 8  # renames into place, rotation and the re-save's moves were all exercised
    for kill_at in range(1, total + 1):
        out = tmp_path / f"kill-{kill_at}"
        saved, _ = run_saves(out, accelerator, kill_at)
        Checkpointer(accelerator, out, 2, [(ModelState(tiny_unet()), None)])  # the next start recovers
        named = sorted(p.name for p in out.iterdir())
        assert all(n.startswith("checkpoint-") for n in named), (kill_at, named)  # nothing half-done left
        assert all(checkpoint_problem(out / n) is None for n in named), (kill_at, named)
        latest = resolve_resume("latest", out)
        if not saved:
            assert latest is None or marker(latest) == 1.0
            continue
        step, value = saved[-1]
        # The newest finished save, or the one being written when killed: never an older step.
        assert int(latest.name.split("-")[1]) >= step, (kill_at, named)
        assert marker(latest) in (value, {1: 2.0, 2: 3.0, 3: 3.5}.get(step)), (kill_at, marker(latest))


def test_damaged_or_foreign_checkpoint_gives_one_line(tmp_path, accelerator):
    model = tiny_unet()
    ckpt = Checkpointer(accelerator, tmp_path, None, [(ModelState(model), None)])
    model = accelerator.prepare(model)
    path = ckpt.save(1, torch.Generator())
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(b"\0" * size)  # same size, garbage contents: passes the listing, fails to load
    with pytest.raises(UserError, match=r"resume '.*checkpoint-1': cannot be loaded into this run"):
        ckpt.load(path, torch.Generator())

    other = tiny_unet()  # another layout: wider blocks
    wide = UNet2DConditionModel(**{**other.config, "block_out_channels": (16, 32), "norm_num_groups": 8})
    path2 = Checkpointer(accelerator, tmp_path / "wide", None, [(ModelState(wide), None)]).save(1, torch.Generator())
    with pytest.raises(UserError, match="cannot be loaded into this run: .*size"):
        ckpt.load(path2, torch.Generator())


def test_resume_in_another_number_of_processes_needs_the_same_global_batch_and_strategy(tmp_path, accelerator):
    """A checkpoint as 2 processes of batch 4 leave it (the trainer state says so) resumes in this 1 process only
    at a global batch of 8, and only with the strategy family (FSDP or not) that saved it."""
    model = accelerator.prepare(tiny_unet())
    path = Checkpointer(accelerator, tmp_path, None, [(ModelState(model), None)], samples_per_step=8).save(
        3, torch.Generator())
    state = json.loads((path / "trainer_state.json").read_text())
    assert (state["processes"], state["fsdp"], state["samples_per_step"]) == (1, False, 8)
    (path / "trainer_state.json").write_text(json.dumps({**state, "processes": 2}))

    def resume(samples_per_step):
        return Checkpointer(accelerator, tmp_path, None, [(ModelState(model), None)],
                            samples_per_step=samples_per_step).load(path, torch.Generator())

    with pytest.raises(UserError) as err:
        resume(4)
    assert str(err.value) == (f"resume '{path}': written by 2 processes, resumed with 1, and a global batch of 4 "
                              f"samples per step instead of 8; set train.batch_size so that batch_size x grad_accum x "
                              f"processes stays the same")
    assert resume(8) == 3
    (path / "trainer_state.json").write_text(json.dumps({**state, "fsdp": True}))
    with pytest.raises(UserError) as err:
        resume(8)
    assert str(err.value) == (f"resume '{path}': saved under FSDP, resumed without FSDP; launch it with the "
                              f"strategy that saved it")
