import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from sdkd.train.checkpoints import Checkpointer, find_latest, list_checkpoints, resolve_resume
from sdkd.train.config import UserError


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


def test_latest_ignores_partial_and_foreign_folders(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", ".tmp-checkpoint-30", "checkpoint-x", "samples"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert find_latest(tmp_path).name == "checkpoint-10"
    assert find_latest(tmp_path / "missing") is None


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(UserError, match="not a checkpoint folder"):
        resolve_resume(str(tmp_path / "checkpoint-5"), tmp_path)


def test_save_load_roundtrip_rotation_and_ema(tmp_path, accelerator):
    model = tiny_unet()
    ema = EMAModel(model.parameters(), model_cls=UNet2DConditionModel, model_config=model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = Checkpointer(accelerator, tmp_path, 2, model, ema)
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
    assert json.loads((saved / "trainer_state.json").read_text()) == {"step": 3}
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
    ckpt = Checkpointer(accelerator, tmp_path, None, model)
    model = accelerator.prepare(model)
    partial = tmp_path / ".tmp-checkpoint-4"
    partial.mkdir(parents=True)
    (partial / "garbage").write_text("killed mid-write")
    assert find_latest(tmp_path) is None
    path = ckpt.save(4, torch.Generator())
    assert not (path / "garbage").exists() and find_latest(tmp_path) == path
