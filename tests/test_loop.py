"""The shared loop (train/engine/loop.py) with a task of two trained modules: a small U-Net generator and a
discriminator stepping alternately with their own learning rates, schedules and EMA."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sdkd.train.engine.task import StepContext, Task, TrainedModule, every

from conftest import fit_task, loop_config

LATENT = 8


def small_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=[8, 16], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=4)


def discriminator() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 1, 3, stride=2))


class GanTask(Task):
    """The generator turns noise into 4-channel 'images' (the batch's pixels, pooled, with their mean as a
    fourth channel); the discriminator tells them apart. Generator at even steps, discriminator at odd ones."""

    def __init__(self, cfg, gen_lr: float = 1e-3, disc_lr: float = 3e-3, disc_from: int = 0, wrong_step=False,
                 gen_clip: float = 1.0):
        self.gen, self.disc = small_unet(), discriminator()
        self.cond = torch.zeros(1, 1, 8)
        self.gen_losses = []  # each micro-batch's generator loss
        self.modules = [
            TrainedModule("gen", self.gen, replace(cfg.optim, lr=gen_lr), max_grad_norm=gen_clip, ema_decay=0.9,
                          due=every(2)),
            TrainedModule("disc", self.disc, replace(cfg.optim, lr=disc_lr), due=every(2, 1, start=disc_from)),
        ]
        self.wrong_step = wrong_step
        self.gen_weights = []  # the generator's weights at each of its steps, before its update

    def train_step(self, ctx: StepContext, batch, rng):
        if ctx.step % 2 == 0:
            self.gen_weights.append({k: v.detach().clone() for k, v in self.gen.state_dict().items()})
        pixels = batch["pixel_values"]
        real = F.adaptive_avg_pool2d(pixels, LATENT)
        real = torch.cat([real, real.mean(1, keepdim=True)], 1)
        noise = rng.randn(real.shape)
        cond = self.cond.expand(len(real), -1, -1)
        t = torch.full((len(real),), 10)
        if ctx.step % 2 == 0 or self.wrong_step:
            fake = ctx.model("gen")(noise, t, cond).sample
            adversarial = F.softplus(-self.disc(fake)).mean()  # the plain discriminator: it gets no loss now
            loss = adversarial + F.mse_loss(fake, real)
            ctx.backward("gen", loss)
            self.gen_losses.append(loss.item())
            return {"loss": loss.detach(), "gen_adv": adversarial.detach()}
        if not self.modules[1].due(ctx.step):
            return {}
        with torch.no_grad():
            fake = self.gen(noise, t, cond).sample
        disc = ctx.model("disc")
        loss = F.softplus(-disc(real)).mean() + F.softplus(disc(fake)).mean()
        ctx.backward("disc", loss)
        return {"disc_loss": loss.detach()}

    def export(self, out):
        path = out / "final.safetensors"
        save_file({**{f"gen.{k}": v for k, v in self.gen.state_dict().items()},
                   **{f"disc.{k}": v for k, v in self.disc.state_dict().items()}}, str(path))
        return [path]


def fit(cfg, **task_kw) -> GanTask:
    return fit_task(cfg, lambda acc: GanTask(cfg, **task_kw))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every():
    assert [s for s in range(8) if every()(s)] == list(range(8))
    assert [s for s in range(8) if every(2)(s)] == [0, 2, 4, 6]
    assert [s for s in range(8) if every(2, 1)(s)] == [1, 3, 5, 7]
    assert [s for s in range(8) if every(3, start=2)(s)] == [2, 5]


def test_two_modules_resume_bit_identical(tmp_path):
    """A run resumed from step 3 (an odd step: the discriminator's turn) ends where the uninterrupted
    run ends: both modules, both optimizers and LR schedules, the EMA and the logged losses."""
    schedule = ["optim.lr_scheduler=cosine"]  # no warm-up: every update moves the weights
    whole = tmp_path / "whole"
    fit(loop_config(whole, *schedule))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    fit(loop_config(resumed, *schedule, "resume=latest"))
    a, b = whole / "checkpoint-6", resumed / "checkpoint-6"
    for name in ("gen/diffusion_pytorch_model.safetensors", "disc.safetensors", "final.safetensors"):
        x = load_file((whole if name.startswith("final") else a) / name)
        y = load_file((resumed if name.startswith("final") else b) / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    for name in ("optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin"):
        x, y = torch.load(a / name, weights_only=False), torch.load(b / name, weights_only=False)
        assert _equal(x, y), name
    ema_a = load_file(a / "gen_ema" / "diffusion_pytorch_model.safetensors")
    ema_b = load_file(b / "gen_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    after = lambda rows: [r for r in rows if r["step"] > 3]  # noqa: E731
    assert after(metrics(whole)) and [
        {k: v for k, v in r.items() if not k.startswith(("sec_", "samples_"))} for r in after(metrics(whole))
    ] == [{k: v for k, v in r.items() if not k.startswith(("sec_", "samples_"))} for r in after(metrics(resumed))]


def _equal(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_equal(a, b) for a, b in zip(x, y))
    return x == y


def test_ema_is_the_running_average_of_the_generators_updates(tmp_path):
    """The generator's EMA (decay 0.9) after its 3 updates of 6 steps is diffusers' EMAModel average of the weights
    each update left, recomputed here: the first update copies them, the next two weigh the average by
    min(0.9, (1 + n) / (10 + n)), n = 1, 2; and the run ends with the EMA's weights in the generator."""
    out = tmp_path / "run"
    task = fit(loop_config(out))
    ckpt = out / "checkpoint-6"
    after = task.gen_weights[1:] + [load_file(ckpt / "gen" / "diffusion_pytorch_model.safetensors")]
    expected = dict(after[0])
    for n, weights in enumerate(after[1:], start=1):
        decay = min(0.9, (1 + n) / (10 + n))
        expected = {k: decay * v + (1 - decay) * weights[k] for k, v in expected.items()}
    ema = load_file(ckpt / "gen_ema" / "diffusion_pytorch_model.safetensors")
    start = task.gen_weights[0]
    gap = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a)  # noqa: E731
    assert gap(after[-1], start) > 1e-3  # training moved the generator
    # Float rounding of the average: 1e-7 measured, against 3e-3 moved.
    assert gap(ema, expected) < 1e-3 * gap(after[-1], start), (gap(ema, expected), gap(after[-1], start))
    assert all(torch.equal(v, ema[k]) for k, v in task.gen.state_dict().items())  # the run ends on the EMA weights


def test_each_optimizer_touches_only_its_module(tmp_path):
    """Step 0 updates only the generator (whose loss runs through the discriminator); step 1 only the
    discriminator (whose loss runs through the generator's output)."""
    start_gen, start_disc = small_unet().state_dict(), discriminator().state_dict()
    changed = lambda before, after: {k for k in before if not torch.equal(before[k], after[k])}  # noqa: E731
    one = fit(loop_config(tmp_path / "one", "train.max_steps=1", "train.checkpoint_every=0"))
    assert changed(start_gen, one.gen.state_dict()) and not changed(start_disc, one.disc.state_dict())
    two = fit(loop_config(tmp_path / "two", "train.max_steps=2", "train.checkpoint_every=0"))
    assert changed(one.gen.state_dict(), two.gen.state_dict()) == set()
    assert changed(start_disc, two.disc.state_dict())


def test_learning_rates_and_schedules_per_module(tmp_path):
    """Each module logs its own LR; a linear schedule with one warm-up step counts only the module's own
    updates: 3 of 6 steps each, so each decays to zero over its third update."""
    out = tmp_path / "run"
    fit(loop_config(out, "optim.lr_scheduler=linear", "optim.warmup_steps=1"), gen_lr=1e-3, disc_lr=3e-3)
    rows = metrics(out)
    gen = [r["lr/gen"] for r in rows]
    disc = [r["lr/disc"] for r in rows]
    assert gen[0] == pytest.approx(1e-3) and disc[1] == pytest.approx(3e-3)
    assert gen == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 0.0, 0.0])
    assert disc == pytest.approx([0.0, 3e-3, 3e-3, 1.5e-3, 1.5e-3, 0.0])
    assert "lr" not in rows[0] and "gen_adv" in rows[0] and "disc_loss" in rows[1]


def test_module_waits_for_its_start_step(tmp_path):
    """A discriminator started at step 3 (every(2, 1, start=3)) is untouched before it."""
    start_disc = discriminator().state_dict()
    task = fit(loop_config(tmp_path / "run", "train.max_steps=3", "train.checkpoint_every=0"), disc_from=3)
    assert all(torch.equal(start_disc[k], v) for k, v in task.disc.state_dict().items())


def test_a_loss_for_a_module_not_due_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="'gen' a loss at step 1, where it is not due"):
        fit(loop_config(tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=0"), wrong_step=True)


def test_the_optimizer_steps_on_gradients_clipped_to_max_grad_norm(tmp_path):
    """The generator's gradient reaches AdamW with its max_grad_norm as its norm (0.01 here)."""
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    hook = register_optimizer_step_pre_hook(record)
    try:
        fit(loop_config(tmp_path / "run", "train.max_steps=1", "train.checkpoint_every=0"), gen_clip=0.01)
    finally:
        hook.remove()
    assert norms == [pytest.approx(0.01, rel=1e-3)]


def test_the_exported_generator_is_its_ema(tmp_path):
    """At the end the EMA's weights go into the model the task exports: final.safetensors holds the generator's
    EMA of the last checkpoint, not its raw weights (which differ from it)."""
    out = tmp_path / "run"
    fit(loop_config(out, "train.max_steps=2", "train.checkpoint_every=2"))
    final = load_file(out / "final.safetensors")
    ema = load_file(out / "checkpoint-2" / "gen_ema" / "diffusion_pytorch_model.safetensors")
    raw = load_file(out / "checkpoint-2" / "gen" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[f"gen.{k}"], v) for k, v in ema.items())
    assert not all(torch.equal(raw[k], v) for k, v in ema.items())


def test_the_last_step_is_checkpointed_between_checkpoint_steps(tmp_path):
    """train.checkpoint_every=2 over 3 steps: checkpoints at step 2 and at the last step, 3."""
    out = tmp_path / "run"
    fit(loop_config(out, "train.max_steps=3", "train.checkpoint_every=2"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_a_logged_loss_is_the_mean_over_the_accumulated_micro_batches(tmp_path):
    """train.grad_accum=2: step 1's logged loss is the mean of its two micro-batches' (different) losses."""
    out = tmp_path / "run"
    task = fit(loop_config(out, "train.max_steps=1", "train.checkpoint_every=0", "train.grad_accum=2"))
    first, second = task.gen_losses
    assert first != pytest.approx(second)
    assert metrics(out)[0]["loss"] == pytest.approx((first + second) / 2, rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_8bit_adamw_off_cuda_is_one_line_naming_the_key():
    from sdkd.cli.errors import UserError
    from sdkd.train.engine.config import OptimConfig
    from sdkd.train.engine.loop import build_optimizer

    # Built in code, so no config check ran: the optimizer's own refusal.
    with pytest.raises(UserError) as err:
        build_optimizer(discriminator().parameters(), OptimConfig(name="adamw_8bit"))
    assert str(err.value) == ("optim.name=adamw_8bit: bitsandbytes' 8-bit AdamW needs a CUDA GPU and this machine "
                              "has none; use optim.name=adamw")
