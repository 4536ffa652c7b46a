"""The one-step trainer's task (train/one_step.py): a one-step student and an online score model (plus, with
`gan.weight`, DMD2's classifier head) against the frozen teacher; its evaluation on held-out ODE pairs, its
sample grids and its export as a one-step pipeline folder.

Who updates when, as pure functions of the step (so a resumed run continues the alternation exactly):
- steps [0, W) (W = distill.warmup_steps): the student, on L_FM only;
- steps W + s, s >= 0: the online model at every step, the student when s % distill.student_every == 0, the
  classifier head from s = gan.start on.
In a step where both update, both losses come from the same student sample and the weights before the step
(DMD2's `train_one_step` order), and each loss reaches only its own module's parameters (train/engine/loop.py).
"""

from __future__ import annotations

import copy
import math
import shlex
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset

from sdkd.cli.errors import UserError
from sdkd.data.sources.core import build_dataset
from sdkd.train.engine.checkpoints import ModelState
from sdkd.train.engine.config import resolve_max_steps
from sdkd.train.engine.distributed import main_process_first
from sdkd.train.engine.frozen import freeze
from sdkd.train.engine.loop import weight_dtype
from sdkd.train.engine.task import SampleSink, StepContext, Task, TrainedModule, every
from sdkd.train.formats.lora_config import LoraSection
from sdkd.train.formats.model_files import load_parts
from sdkd.train.losses import agreement
from sdkd.train.losses.adversarial import discriminator_loss, generator_loss
from sdkd.train.losses.feature_matching import DinoFeatures, FeatureMatching, UNetEncoder, VggFeatures, encoder_layers
from sdkd.train.losses.kd import diffusion_target
from sdkd.train.losses.score_distillation import (
    diffusion_loss,
    dmd_gradient,
    dmd_loss,
    guided,
    ramp,
    x0_from_prediction,
)
from sdkd.train.models.families import Conditioning, prompt_batch
from sdkd.train.models.teacher import PipelineParts, PipelineSource
from sdkd.train.tasks import ode_pairs

GRID = 8
"""Held-out pairs shown in the sample grids (the first ones)."""
PAIRS_FOLDER = "ode_pairs"  # in OUTPUT when pairs.cache is null


def student_due(warmup: int, student_every: int):
    """Every warm-up step; then every `student_every`-th step, starting with the first."""
    return lambda step: step < warmup or (step - warmup) % student_every == 0


@contextmanager
def adapters_off(unet):
    """The U-Net without its peft adapters (the frozen teacher under the online LoRA); a no-op without any."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        yield
        return
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@contextmanager
def config_key(old: str, new: str):
    """A shared loader's errors name its own trainer's key (`old`); here that value is under `new`."""
    try:
        yield
    except UserError as err:
        raise type(err)(str(err).replace(old, new)) from None


class ScoreClassifier(nn.Module):
    """DMD2's classifier head (`cls_pred_branch`, SD-1.5) on a U-Net's bottleneck features: conv 4x4 stride 2,
    GroupNorm, SiLU, conv 1x1 to one channel; one logit per sample (averaged over the remaining positions)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 4, stride=2, padding=1),
                                 nn.GroupNorm(math.gcd(groups, channels), channels), nn.SiLU(),
                                 nn.Conv2d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).mean(dim=(1, 2, 3))


class OneStepTask(Task):
    def __init__(self, cfg, accelerator, teacher: PipelineParts, student, online, online_state, classifier,
                 held_out: ode_pairs.Pairs, decoder=None):
        """`teacher`: the frozen teacher's parts (its U-Net carries the online LoRA when online.kind=lora);
        `online`: the online score U-Net (a copy of the teacher's, or the teacher's own with the LoRA);
        `classifier`: the head of the adversarial term, or None; `decoder`: the export's AutoencoderTiny."""
        d, device = cfg.distill, accelerator.device
        self.cfg, self.accelerator, self.autocast = cfg, accelerator, accelerator.autocast
        self.eval_every = cfg.eval.every
        self.teacher, self.student, self.online, self.classifier = teacher, student, online, classifier
        self.held_out, self.decoder = held_out, decoder
        self.resolution = held_out.settings.resolution  # what the pairs were solved at
        self.warmup, self.max_steps = d.warmup_steps, resolve_max_steps(cfg.train, 0)
        self.scheduler = teacher.scheduler
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)  # add_noise moves it each call
        self.prediction = self.scheduler.config.prediction_type
        self.T = self.scheduler.config.num_train_timesteps
        lora = online is teacher.unet
        self.offline = (lambda: adapters_off(teacher.unet)) if lora else nullcontext
        self.fm = self._feature_matching()
        online_optim = replace(cfg.optim, lr=cfg.online.lr or cfg.optim.lr)
        self.modules = [
            TrainedModule("student", student, cfg.optim, cfg.train.max_grad_norm,
                          cfg.ema.decay if cfg.ema.enabled else None, ModelState(student, "unet"),
                          due=student_due(d.warmup_steps, d.student_every)),
            TrainedModule("online", online, online_optim, cfg.train.max_grad_norm, state=online_state,
                          due=every(start=d.warmup_steps)),
        ]
        self.online_encoder = None
        if classifier is not None:
            self.online_encoder = UNetEncoder(online, encoder_layers(online)[-1:], 0, autocast=self.autocast)
            self.modules.append(TrainedModule("classifier", classifier,
                                              replace(online_optim, lr=cfg.gan.lr or online_optim.lr),
                                              cfg.train.max_grad_norm,
                                              due=every(start=d.warmup_steps + cfg.gan.start)))
        self.frozen, self.family = {"teacher": None if lora else teacher.unet, **teacher.frozen}, teacher.family
        self._uncond = None
        self._held_out_images = None

    # ---------------------------------------------------------------------------------------------
    # Parts of a step

    def _feature_matching(self) -> FeatureMatching:
        f, device = self.cfg.fm, self.accelerator.device
        if f.extractor == "vgg":
            extractor = VggFeatures(f.weights_path, self.teacher.vae, device, self.autocast)
        elif f.extractor == "dinov2":
            extractor = DinoFeatures(f.weights_path, self.teacher.vae, device, f.image_size, self.autocast)
        else:
            unet = self.teacher.unet
            with config_key("feature pair module", "config key 'fm.layers': module"):
                extractor = UNetEncoder(unet, f.layers or encoder_layers(unet), f.timestep, self.offline, self.autocast)
        return FeatureMatching(extractor, f.layer_weights, f.window)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> Conditioning:
        with self.autocast():
            return self.teacher.family.encode(self.teacher, prompt_batch(captions, self.resolution))

    def uncond(self, cond: Conditioning) -> Conditioning:
        """`cond` with the empty prompt in place of its captions (classifier-free guidance of the real score)."""
        if self._uncond is None:
            with torch.no_grad(), self.autocast():
                self._uncond = self.teacher.family.empty_prompt(self.teacher)
        n = len(cond.hidden_states)
        return Conditioning.from_tensors(
            cond.tensors() | {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in self._uncond.items()})

    def generate(self, unet, noise: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The one-step sample: pure noise read as x_T at t = T-1 -> the U-Net's prediction -> x0."""
        t = torch.full((len(noise),), self.T - 1, device=noise.device, dtype=torch.long)
        with self.autocast():
            pred = unet(noise, t, **cond.unet_kwargs()).sample
        return x0_from_prediction(pred, noise, self.scheduler.alphas_cumprod, t, self.prediction)

    def _x0(self, unet, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning, scale: float = 1.0) -> torch.Tensor:
        """x0 predicted by a score model (no gradient), with classifier-free guidance `scale` (1: none)."""
        dtype = unet.dtype
        with torch.no_grad(), self.autocast():
            if scale == 1.0:
                pred = unet(noisy.to(dtype), t, **cond.to(dtype=dtype).unet_kwargs()).sample
            else:
                both = _cat(self.uncond(cond), cond).to(dtype=dtype)
                uncond, text = unet(noisy.to(dtype).repeat(2, 1, 1, 1), t.repeat(2),
                                    **both.unet_kwargs()).sample.chunk(2)
                pred = guided(uncond.float(), text.float(), scale)
        return x0_from_prediction(pred, noisy, self.scheduler.alphas_cumprod, t, self.prediction)

    def schedules(self, s: int) -> tuple[float, float]:
        """(α, λ_FM) at score-distillation step s."""
        d, rest = self.cfg.distill, max(self.max_steps - self.warmup, 0)
        length = lambda r: rest if r.steps is None else r.steps  # noqa: E731
        return (ramp(d.alpha.start, d.alpha.end, length(d.alpha), s),
                ramp(d.lambda_fm.start, d.lambda_fm.end, length(d.lambda_fm), s))

    # ---------------------------------------------------------------------------------------------
    # SDXS eq. 10 (warm-up) and eq. 11 / DMD2 (score distillation)

    def student_loss(self, x0, target, cond, s: int, rng) -> dict[str, torch.Tensor]:
        """The student's loss terms at score-distillation step s (s < 0: warm-up); "loss" is their weighted sum."""
        if s < 0:
            fm = self.fm(x0, target, cond)
            return {"fm": fm, "loss": fm}
        d = self.cfg.distill
        alpha, lambda_fm = self.schedules(s)
        lo = int(d.t_min * self.T)
        hi = min(max(int(alpha * self.T), lo), self.T - 1)
        t = lo + rng.randint(hi - lo + 1, len(x0)).to(x0.device)
        noise = rng.randn(x0.shape).to(x0.device)
        noisy = self.scheduler.add_noise(x0.detach(), noise, t)
        with self.offline():
            x0_real = self._x0(self.teacher.unet, noisy, t, cond, d.real_guidance_scale)
        x0_fake = self._x0(self.online, noisy, t, cond)
        grad = dmd_gradient(x0, x0_real, x0_fake)
        terms = {"dm": dmd_loss(x0, grad), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean(),
                 "alpha": torch.tensor(alpha, device=x0.device), "lambda_fm": torch.tensor(lambda_fm, device=x0.device)}
        loss = d.lambda_dm * terms["dm"]
        if lambda_fm > 0:
            terms["fm"] = self.fm(x0, target, cond)
            loss = loss + lambda_fm * terms["fm"]
        if self.classifier is not None and s >= self.cfg.gan.start:
            # The plain online encoder and head: this loss reaches only the student (train/engine/loop.py).
            terms["adversarial"] = generator_loss(self.classifier(self.online_encoder(x0, cond)[-1]), "non_saturating")
            loss = loss + self.cfg.gan.weight * terms["adversarial"]
        terms["loss"] = loss
        return terms

    def online_loss(self, online, x0: torch.Tensor, cond: Conditioning, rng) -> torch.Tensor:
        """The online score model's diffusion loss on the (detached) student samples, t ~ U[0, T) (DMD2)."""
        t = rng.randint(self.T, len(x0)).to(x0.device)
        noise = rng.randn(x0.shape).to(x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        with self.autocast():
            pred = online(noisy, t, **cond.unet_kwargs()).sample
        return diffusion_loss(pred, diffusion_target(self.scheduler, x0, noise, t))

    def train_step(self, ctx: StepContext, batch: dict, rng) -> dict[str, torch.Tensor]:
        step, s = ctx.step, ctx.step - self.warmup
        noise, target = batch["noise"].float(), batch["latents"].float()
        cond = self.encode(batch["captions"])
        terms = {}
        if self.modules[0].due(step):
            x0 = self.generate(ctx.model("student"), noise, cond)
            terms = self.student_loss(x0, target, cond, s, rng)
            ctx.backward("student", terms["loss"])
            x0 = x0.detach()
        else:
            with torch.no_grad():
                x0 = self.generate(self.student, noise, cond)
        if s >= 0:
            terms["online_loss"] = self.online_loss(ctx.model("online"), x0, cond, rng)
            ctx.backward("online", terms["online_loss"])
        if self.classifier is not None and self.modules[2].due(step):
            # DMD2's classifier on the online model's bottleneck: the teacher's ODE outputs are the real samples.
            # The features are detached: the head learns alone (DMD2 also trains the online encoder with this loss).
            with torch.no_grad():
                features = self.online_encoder(torch.cat([target, x0]), _cat(cond, cond))[-1]
            real, fake = ctx.model("classifier")(features).chunk(2)
            terms["disc_loss"] = discriminator_loss(real, fake, "non_saturating")
            terms["disc_real"], terms["disc_fake"] = real.mean(), fake.mean()
            ctx.backward("classifier", terms["disc_loss"])
        return {name: value.detach().float() for name, value in terms.items()}

    # ---------------------------------------------------------------------------------------------
    # Held-out pairs: agreement with the teacher's multi-step output, and the sample grid

    @torch.no_grad()
    def one_step(self, pairs: ode_pairs.Pairs, n: int | None = None) -> torch.Tensor:
        """The student's one-step latents for the first `n` pairs (all: None), train.batch_size at a time."""
        size, device = self.cfg.train.batch_size, self.accelerator.device
        was_training = self.student.training
        self.student.eval()
        out = []
        for start in range(0, len(pairs) if n is None else n, size):
            rows = slice(start, start + size if n is None else min(start + size, n))
            cond = self.encode(list(pairs.settings.prompts[rows]))
            out.append(self.generate(self.student, pairs.noise[rows].to(device), cond).float())
        self.student.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from the teacher's VAE, train.batch_size at a time, on the CPU."""
        vae, size = self.teacher.vae, self.cfg.train.batch_size
        out = []
        with self.autocast():
            for start in range(0, len(latents), size):
                chunk = latents[start:start + size].to(self.accelerator.device, vae.dtype) / vae.config.scaling_factor
                out.append(vae.decode(chunk).sample.float().cpu())
        return ((torch.cat(out) + 1) / 2).clamp(0, 1)

    def teacher_images(self) -> torch.Tensor:
        if self._held_out_images is None:
            self._held_out_images = self.decode(self.held_out.latents)
        return self._held_out_images

    def evaluate(self, step: int) -> dict[str, float]:
        device, size = self.accelerator.device, self.cfg.train.batch_size
        x0 = self.one_step(self.held_out)
        target = self.held_out.latents.to(device)
        with torch.no_grad():
            fm = torch.cat([self.fm.per_sample(x0[i:i + size], target[i:i + size],
                                               self.encode(list(self.held_out.settings.prompts[i:i + size])))
                            for i in range(0, len(x0), size)])
        images, wanted = self.decode(x0).numpy(), self.teacher_images().numpy()
        psnr = np.mean([agreement.psnr(agreement.image_mse(a, b)) for a, b in zip(images, wanted)])
        return {"ode_mse": (x0 - target).pow(2).mean().item(), "fm": fm.mean().item(), "psnr": float(psnr)}

    def sample(self, step: int, sink: SampleSink) -> None:
        from diffusers.image_processor import VaeImageProcessor

        n = min(GRID, len(self.held_out))
        pil = lambda images: VaeImageProcessor.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())  # noqa: E731
        rows = [pil(self.teacher_images()[:n]), pil(self.decode(self.one_step(self.held_out, n)))]
        captions = list(self.held_out.settings.prompts[:n])
        sink.grid(rows, captions, [f"teacher {self.cfg.pairs.steps} steps", f"student 1 step, {step}"])
        sink.log("samples/student", rows[1], captions)

    # ---------------------------------------------------------------------------------------------
    # Export

    def export(self, out: Path) -> list[Path]:
        from sdkd.train.formats.model_files import save_one_step_pipeline

        return [save_one_step_pipeline(self.student, PipelineSource.of(self.cfg), out / "student", self.decoder,
                                       run=out)]

    def next_steps(self, exported: list[Path]) -> list[tuple[str, str]]:
        from sdkd.train.formats import ldm_layout

        folder = exported[0]
        out, q = folder.parent, lambda p: shlex.quote(str(p))
        steps = [(f"python eval/sample.py --model {q(folder)} --steps 1 --prompt {q(self.cfg.sample.prompts[0])} "
                  f"--out {q(out / 'generated')}", "one-step images (guidance off)")]
        try:
            ldm_layout.check_sdcpp(dict(self.student.config), self.decoder is not None)
        except ldm_layout.UnsupportedLayout as err:
            print(f"note: no stable-diffusion.cpp file: {err}", file=sys.stderr)
            steps.append((f"python train/export.py {q(out)} --format single-file --target ldm "
                          f"--out {q(out / 'student.safetensors')}", "one file for diffusers and LDM tools"))
            return steps
        file = out / "student-sdcpp.safetensors"
        return steps + [
            (f"python train/export.py {q(out)} --format single-file --target sdcpp --out {q(file)}",
             "one file for stable-diffusion.cpp"),
            (f"sd -m {q(file)} -p 'a prompt' --steps 1 --cfg-scale 1", "stable-diffusion.cpp, one step"),
        ]


def _cat(a: Conditioning, b: Conditioning) -> Conditioning:
    """Two batches' conditioning as one."""
    return Conditioning.from_tensors({k: torch.cat([v, b.tensors()[k].to(v.dtype)]) for k, v in a.tensors().items()})


# ---------------------------------------------------------------------------------------------
# Building the task


def prompt_set(cfg) -> list[str]:
    """pairs.count prompts: the lines of pairs.prompt_file, else the captions of `data`, cycled."""
    count, file = cfg.pairs.count, cfg.pairs.prompt_file
    if file is not None:
        try:
            prompts = [line.strip() for line in Path(file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"config key 'pairs.prompt_file': '{file}' cannot be read ({err})") from None
        where = f"pairs.prompt_file '{file}'"
    else:
        dataset = build_dataset(cfg.data, cfg.train.seed)
        if isinstance(dataset, IterableDataset):
            raise UserError(f"data.source={cfg.data.source} streams its samples: give the prompts as a file "
                            f"(pairs.prompt_file) or use a map-style source")
        items = (dataset[i] for i in range(min(count, len(dataset))))
        prompts = [item["caption"] for item in items if "skip" not in item]
        where = f"data.source={cfg.data.source}"
    if not prompts:
        raise UserError(f"{where}: no prompts to make ODE pairs for")
    return [prompts[i % len(prompts)] for i in range(count)]


def load_student(cfg, teacher: PipelineParts):
    """`model`'s U-Net, else the teacher's cut by student.preset; fp32, trainable."""
    from sdkd.train.models.students import build_student, removal_spec

    if cfg.model is None:
        unet = build_student(teacher.unet, removal_spec(cfg.student))
    else:
        unet = load_parts(PipelineSource(cfg.model, allow_pickle=cfg.allow_pickle), with_encoders=False,
                            what="model").unet
        for key in ("in_channels", "out_channels", "cross_attention_dim"):
            if unet.config[key] != teacher.unet.config[key]:
                raise UserError(f"model '{cfg.model}': its U-Net has {key}={unet.config[key]}, the teacher's "
                                f"{teacher.unet.config[key]}; the student must take the teacher's latents and text")
    return unet.float().requires_grad_(True).train()


def load_pairs(cfg, acc, teacher: PipelineParts) -> tuple[ode_pairs.Pairs, ode_pairs.Pairs]:
    """The training and held-out pairs, from the cache when it matches (made on the main process first)."""
    p = cfg.pairs
    folder = Path(p.cache) if p.cache else Path(cfg.output_dir) / PAIRS_FOLDER
    resolution = cfg.sample.resolution or cfg.data.resolution
    common = dict(teacher=cfg.teacher, solver=str(p.solver), steps=p.steps, guidance_scale=p.guidance_scale,
                  resolution=resolution)
    held_out = tuple(cfg.sample.prompts[i % len(cfg.sample.prompts)] for i in range(p.eval_count))
    sets = {"train": ode_pairs.PairSettings(prompts=tuple(prompt_set(cfg)), seed=p.seed, **common),
            "held_out": ode_pairs.PairSettings(prompts=held_out, seed=p.seed + ode_pairs.HELD_OUT_STREAM, **common)}
    # The lambda binds the loop variables as defaults: main_process_first calls it at once, inside the loop.
    return tuple(
        main_process_first(acc, lambda name=name, settings=settings: ode_pairs.load_or_make(
            folder, name, teacher.unet, teacher, settings, p.batch_size, acc.autocast))
        for name, settings in sets.items())


def build_one_step_task(cfg, acc):
    device, dtype = acc.device, weight_dtype(acc)
    teacher = load_parts(PipelineSource.of(cfg))
    if teacher.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"teacher '{cfg.teacher}': prediction_type '{teacher.scheduler.config.prediction_type}' "
                        f"(epsilon or v_prediction)")
    # The student is cut from the teacher's U-Net before the online LoRA can go onto it.
    student = load_student(cfg, teacher)
    decoder = None
    if cfg.decoder is not None:
        from sdkd.train.tasks.decoder import load_tiny_vae

        with config_key("decoder.init", "decoder"):
            decoder = load_tiny_vae(cfg.decoder, teacher.vae.config)[0].float()
    for name in teacher.family.models:
        teacher.components[name].requires_grad_(False).eval().to(device)
    train_pairs, held_out = load_pairs(cfg, acc, teacher)

    o = cfg.online
    if o.kind == "copy":
        online = copy.deepcopy(teacher.unet).float().requires_grad_(True).train()
        state = ModelState(online, "online")
    else:
        from sdkd.train.formats import lora_io

        freeze(teacher.unet, device, dtype)
        with config_key("lora.target_modules", "online.lora_targets"):
            lora_io.add_adapters(teacher.unet, None, LoraSection(rank=o.lora_rank, alpha=o.lora_alpha,
                                                                 target_modules=list(o.lora_targets)),
                                 seed=cfg.train.seed)
        for p in teacher.unet.parameters():  # the adapter trains in fp32 whatever the base's dtype
            if p.requires_grad:
                p.data = p.data.float()
        online = teacher.unet.train()
        state = lora_io.LoraState(online, None, cfg.teacher)
    classifier = None
    if cfg.gan.weight > 0:
        with torch.random.fork_rng(devices=[]):  # its initial weights depend on train.seed only
            torch.manual_seed(cfg.train.seed + 1)
            classifier = ScoreClassifier(online.config.block_out_channels[-1])
    if cfg.train.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    acc.print(f"one-step student {count(student):,} params "
              f"({'from ' + cfg.model if cfg.model else cfg.student.preset}); "
              f"online score model: {o.kind} ({count(online):,} trained params)"
              + (f"; classifier head from score-distillation step {cfg.gan.start}" if classifier is not None else "")
              + f"; {len(train_pairs)} ODE pairs, {len(held_out)} held out; warm-up {cfg.distill.warmup_steps} "
                f"steps, then the student every {cfg.distill.student_every}")
    task = OneStepTask(cfg, acc, teacher, student, online, state, classifier, held_out, decoder)
    return task, train_pairs
