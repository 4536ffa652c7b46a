"""The task of the U-Net trainers (kd.py, finetune.py, lora.py): one trained module, the diffusion
objective (task loss, output and feature KD against an optional teacher), sample grids of fixed prompts
with the teacher's row above, and an export at the end."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sdkd.cli.errors import UserError
from sdkd.cli.words import counted
from sdkd.data.sources.core import build_dataset
from sdkd.train.engine.config import RunConfig
from sdkd.train.engine.distributed import main_process_first
from sdkd.train.engine.loop import weight_dtype
from sdkd.train.engine.sampling import sample_images
from sdkd.train.engine.task import SampleSink, StepContext, Task, TrainedModule
from sdkd.train.formats.model_files import load_parts
from sdkd.train.losses import agreement
from sdkd.train.losses.kd import KDLoss
from sdkd.train.models.teacher import PipelineParts, PipelineSource
from sdkd.train.tasks.diffusion_config import FinetuneConfig, KDConfig
from sdkd.train.tasks.objective import DiffusionObjective, kd_objective, set_prediction_type


def load_dataset(cfg: RunConfig, acc):
    """The run's training set. Data mistakes fail fast, on every process at once; a hf source prepares its
    arrow cache once."""
    dataset = main_process_first(acc, lambda: build_dataset(cfg.data, cfg.train.seed))
    acc.print(f"data: {counted(len(dataset), 'sample')} per epoch from "
              + (f"the latent cache {cfg.data.cache} (no VAE or text encoder loaded)" if cfg.data.cache
                 else f"data.source={cfg.data.source}"))
    return dataset


def frozen_parts(parts: PipelineParts, *trained: torch.nn.Module) -> dict[str, torch.nn.Module | None]:
    """`parts`' VAE and text encoders by name (None where not loaded) for a task's `frozen`, less those
    `trained`."""
    return {name: m for name, m in parts.frozen.items() if all(m is not t for t in trained)}


def trained_module(cfg: RunConfig, module: torch.nn.Module, state=None) -> TrainedModule:
    """The U-Net trainers' one module, `unet`, with the config's optimizer, clipping and EMA."""
    return TrainedModule("unet", module, cfg.optim, cfg.train.max_grad_norm,
                         cfg.ema.decay if cfg.ema.enabled else None, state)


class DiffusionTask(Task):
    """Trains `trained` on `objective(model, latents, conditioning, rng)` of the encoded batch."""

    def __init__(self, cfg: KDConfig, accelerator, trained: TrainedModule, encoder: Callable,
                 objective: DiffusionObjective, parts: PipelineParts, export: Callable[[Path], list[Path]],
                 frozen: dict, reference_unet=None, sample_unet=None, frozen_source: PipelineSource | None = None):
        """`encoder`: batch, StepRandom -> (latents, conditioning). `parts`: the frozen VAE and text encoder
        (None from a latent cache: sample grids then load them from `frozen_source` when first due).
        `frozen`: the models the loop freezes (the teacher U-Net, and by component name the VAE and text
        encoders: `frozen_parts`; None for one not loaded).
        `reference_unet` (the teacher) is sampled once above the trained model's row; `sample_unet` is the
        U-Net the grids use (default: the trained module)."""
        self.cfg, self.accelerator, self.modules = cfg, accelerator, [trained]
        self.eval_every = cfg.eval.every
        self.encoder, self.objective, self.parts, self._export = encoder, objective, parts, export
        self.frozen, self.reference_unet, self.family = frozen, reference_unet, parts.family
        self.sample_unet, self.frozen_source = sample_unet, frozen_source or PipelineSource.of(cfg)
        self._reference_images = None
        self._triples = None

    def train_step(self, ctx: StepContext, batch: dict, rng) -> dict[str, torch.Tensor]:
        latents, cond = self.encoder(batch, rng)
        terms = self.objective(ctx.model("unet"), latents, cond, rng)
        ctx.backward("unet", terms["loss"])
        return terms

    def export(self, out: Path) -> list[Path]:
        return self._export(out)

    def next_steps(self, exported: list[Path]) -> list[tuple[str, str]]:
        return next_steps(self.cfg, exported)

    def _sampling_parts(self) -> PipelineParts:
        """The frozen VAE and text encoder for sampling. A run from a latent cache left them out; the main
        process loads them from `frozen_source` the first time a sample grid is due."""
        if not self.parts.has_encoders:
            loaded = load_parts(self.frozen_source, with_unet=False)
            loaded.freeze(self.accelerator.device, weight_dtype(self.accelerator))
            self.parts = dataclasses.replace(self.parts, components=self.parts.components | {
                name: loaded.components[name] for name in loaded.family.encoders})
        return self.parts

    def sample(self, step: int, sink: SampleSink) -> None:
        s = self.cfg.sample
        resolution = s.resolution or self.cfg.data.resolution
        parts = self._sampling_parts()
        run = lambda unet: sample_images(unet, parts, s.prompts, s.seed, s.steps, s.guidance_scale,  # noqa: E731
                                         resolution, autocast=self.accelerator.autocast)
        model = self.modules[0].module
        was_training = model.training
        model.eval()  # the whole trained module (a LoRA'd text encoder too), not only the U-Net
        rows = [run(self.sample_unet or model)]
        model.train(was_training)
        if self.reference_unet is not None:
            if self._reference_images is None:
                self._reference_images = run(self.reference_unet)
                sink.grid([self._reference_images], s.prompts, ["teacher"], name="teacher.png")
                sink.log("samples/teacher", self._reference_images, s.prompts)
            rows.insert(0, self._reference_images)
        sink.grid(rows, s.prompts, ["teacher", f"student step {step}"][-len(rows):])
        sink.log("samples/student", rows[-1], s.prompts)

    def evaluate(self, step: int) -> dict[str, float]:
        """Noise-prediction MSE against the teacher on the run's held-out triples (train/losses/agreement.py), made by
        the first evaluation and kept in OUTPUT/eval_triples.safetensors. None without a teacher."""
        if self.reference_unet is None:
            if self._triples is None:
                print("note: eval.every: no teacher to compare with (its prediction type differs from the trained "
                      "model's); no in-loop evaluation", file=sys.stderr, flush=True)
                self._triples = False  # said once
            return {}
        autocast = self.accelerator.autocast
        if self._triples is None:
            self._triples = agreement.load_or_make(
                Path(self.cfg.output_dir) / agreement.TRIPLES_FILE, self.reference_unet, self._sampling_parts(),
                agreement.run_settings(self.cfg), self.cfg.eval.batch_size, autocast)
        model = self.modules[0].module
        was_training = model.training
        model.eval()  # the whole trained module, as for sample grids
        try:
            return agreement.noise_mse(self.sample_unet or model, self._triples, self.cfg.eval.batch_size, autocast)
        finally:
            model.train(was_training)


def next_steps(cfg: KDConfig, exported: list[Path]) -> list[tuple[str, str]]:
    """Sample, export and LoRA commands for a pipeline folder; a sample command for LoRA files."""
    out, model = Path(cfg.output_dir), exported[0]
    q = lambda path: shlex.quote(str(path))  # noqa: E731  # commands stay runnable whatever the paths
    prompt, generated = q(cfg.sample.prompts[0]), q(out / "generated")
    if model.is_dir():  # a pipeline folder
        return [
            (f"python eval/sample.py --model {q(model)} --prompt {prompt} --out {generated}", "images from it"),
            (f"python train/export.py {q(out)} --format single-file --out {q(out / 'student.safetensors')}",
             "one file for diffusers, A1111, ComfyUI (--target sdcpp: stable-diffusion.cpp)"),
            (f"accelerate launch train/lora.py --config configs/lora.yaml model={q(model)} data.path=IMAGES",
             "a LoRA on it"),
        ]
    # LoRA files, for the model they were trained on
    return [(f"python eval/sample.py --model {q(cfg.model)} --lora {q(model)} --prompt {prompt} --out {generated}",
             "images with the LoRA")]


@dataclass
class FinetuneParts:
    """What the fine-tune and LoRA trainers load: `model`'s parts, the optional teacher, the objective."""

    parts: PipelineParts       # `model`: U-Net (trained, or frozen under a LoRA), frozen VAE and text encoder
    teacher: PipelineParts | None
    objective: DiffusionObjective


def load_finetune_parts(cfg: FinetuneConfig, acc) -> FinetuneParts:
    """Load `model` and the teacher (only when a KD term is on). The U-Net is returned as loaded (fp32 on
    CPU); the caller makes it trainable or puts an adapter on it."""
    # From a latent cache no VAE or text encoder runs in the step (sample grids load them when due).
    parts = load_parts(PipelineSource.of(cfg, "model"), with_encoders=cfg.data.cache is None, what="model")
    # In-loop evaluation (eval.every) compares with the teacher even when no loss term uses it.
    needs_teacher = KDLoss.from_config(cfg.loss).needs_teacher or (cfg.eval.every > 0 and cfg.teacher is not None)
    teacher = load_parts(PipelineSource.of(cfg), with_encoders=False) if needs_teacher else None
    set_prediction_type(parts.scheduler, cfg.loss.prediction_type, teacher.scheduler if teacher else None, cfg.teacher)
    if teacher is not None:
        ours, theirs = parts.scheduler.config.prediction_type, teacher.scheduler.config.prediction_type
        if ours != theirs:
            raise UserError(f"teacher '{cfg.teacher}' predicts {theirs}, model '{cfg.model}' {ours}: continued KD "
                            f"needs the same prediction type")
    # Feature KD: `student` says how `model` was cut from the teacher.
    objective = kd_objective(cfg, parts.scheduler, parts.unet, teacher.unet if teacher else None,
                             cfg.data.resolution // parts.vae_scale_factor, acc.autocast)
    acc.print(f"model {cfg.model}: U-Net {sum(p.numel() for p in parts.unet.parameters()):,} params"
              + (f"; continued KD from {cfg.teacher} ({objective.num_feature_pairs} feature pairs)" if teacher else "")
              + f"; on {counted(acc.num_processes, 'process')}")
    return FinetuneParts(parts, teacher, objective)
