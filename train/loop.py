"""The training loop every trainer shares: accelerate, optimizer, schedule, EMA, logging,
sampling, checkpoints and the final export. Trainers differ only in the model they train and
the objective that turns a batch into loss terms.

Loop order (edm2 / torchtitan): step -> log -> sample -> checkpoint -> done?
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sdkd.data.sources import collate
from sdkd.train.sampling import make_grid, sample_images
from sdkd.train import console, run_folder, tracking
from sdkd.train.checkpoints import Checkpointer, ModelState, list_checkpoints, resolve_resume
from sdkd.train.config import Config, OptimConfig, resolve_max_steps
from sdkd.cli.errors import UserError
from sdkd.train.objective import StepRandom


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's accelerator; also creates and locks OUTPUT/, refusing one that holds another run
    (train/run_folder.py; the config is saved there when training starts)."""
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on this machine")
    out = Path(cfg.output_dir)
    acc = Accelerator(
        # Without this, processes started by `accelerate launch --multi_gpu` on a machine with no
        # GPU each run alone (accelerate 1.15 picks gloo/MULTI_CPU only for cpu=True).
        cpu=not torch.accelerator.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        # Never sync early at the end of an epoch: an optimizer step is always grad_accum micro-steps.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        log_with=tracking.tracker_list(cfg.log.trackers, out),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    run_folder.claim(cfg, acc)
    return acc


def weight_dtype(acc: Accelerator) -> torch.dtype:
    """The dtype frozen models run in."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; `auto` takes the fused kernel where the device has one (CPU and CUDA do), else foreach.

    The default per-parameter loop costs seconds per step on CPU for an SD-sized U-Net.
    """
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    params = list(params)
    if cfg.implementation in ("auto", "fused"):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except RuntimeError:
            if cfg.implementation == "fused":
                raise UserError("optim.implementation=fused: no fused AdamW for this device; use auto or foreach")
    return torch.optim.AdamW(params, foreach=cfg.implementation != "loop", **kw)


@dataclass
class Trainer:
    """Trains `model` (the unwrapped module) on `objective(model, latents, embeds, rng)`.

    Every trainer is this loop: kd.py trains a student from a teacher, finetune.py any pipeline's U-Net,
    lora.py an adapter (its `state` checkpoints only the adapter; its `export` writes a LoRA file)."""

    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module
    objective: Callable
    encoder: Callable                 # batch, objective.StepRandom -> (latents, text embeddings)
    dataset: Dataset                  # map-style (a prepared, sharded DataLoader) or iterable (splits itself)
    parts: object                     # teacher.PipelineParts: frozen VAE/text encoder for sampling (loaded
                                      # from `frozen_source` when sampling is due if they were left out)
    export: Callable                  # (model, OUTPUT) -> [paths written, the model first], at the end,
                                      # on the main process; they feed the closing summary
    reference_unet: torch.nn.Module | None = None   # sampled once beside the student (the teacher)
    state: ModelState | None = None   # how `model` is checkpointed and EMA-tracked (default: the whole U-Net)
    sample_unet: torch.nn.Module | None = None      # the U-Net sample grids use (default: model)
    frozen_source: object = None      # teacher.PipelineSource the VAE/text encoder come from (default: the teacher)

    def fit(self) -> None:
        cfg, acc, model = self.cfg, self.accelerator, self.model
        out = Path(cfg.output_dir)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg.optim)
        loader, self.batches_per_epoch = self._loader()
        if self.batches_per_epoch == 0:
            raise UserError(f"data: {len(self.dataset)} samples are fewer than one batch "
                            f"({cfg.train.batch_size} x {acc.num_processes} processes)")
        max_steps = resolve_max_steps(cfg.train, self.batches_per_epoch)
        if cfg.train.num_epochs is not None:
            acc.print(f"train.max_steps={max_steps}: train.num_epochs={cfg.train.num_epochs} x ceil("
                      f"{self.batches_per_epoch} batches per epoch / train.grad_accum={cfg.train.grad_accum})")
        # A prepared scheduler steps once per process per optimizer step.
        lr_schedule = get_scheduler(cfg.optim.lr_scheduler, optimizer,
                                    num_warmup_steps=cfg.optim.warmup_steps * acc.num_processes,
                                    num_training_steps=max_steps * acc.num_processes)
        state = self.state or ModelState(model)
        ema = None
        if cfg.ema.enabled:
            ema = state.make_ema(cfg.ema.decay)
            ema.to(acc.device)
        checkpointer = Checkpointer(acc, out, cfg.train.checkpoints_total_limit, state, ema)
        wrapped, optimizer, lr_schedule = acc.prepare(model, optimizer, lr_schedule)
        # One seed on every process: each draws the global batch's noise and keeps its rows (StepRandom).
        rng = StepRandom(cfg.train.seed, acc.device, cfg.train.batch_size, acc.num_processes, acc.process_index)

        step = 0
        resume_from = resolve_resume(cfg.resume, out)
        if resume_from is not None:
            step = checkpointer.load(resume_from, rng.generator)
            acc.print(f"resumed from {resume_from} at step {step}")
        self._skipped, self._batches_read = 0, step * cfg.train.grad_accum
        batches = self._batches(loader, step * cfg.train.grad_accum)
        batches = chain([next(batches)], batches)  # data with nothing usable stops the run here
        # The first write: the models, the checkpoint and a first batch have loaded.
        run_folder.start(cfg, acc)
        if acc.is_main_process:
            _truncate_metrics(out / "metrics.jsonl", step)
        acc.init_trackers(cfg.log.project, config=_flat(cfg), init_kwargs=tracking.init_kwargs(cfg.log.trackers, out))
        samples_per_step = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
        progress = console.progress(max_steps, "train", initial=step, unit="step",
                                    disable=not acc.is_local_main_process)
        self._teacher_images = None
        while step < max_steps:
            start = time.perf_counter()
            terms = self.optimizer_step(wrapped, optimizer, lr_schedule, params, batches, rng)
            if ema is not None:
                ema.step(state.ema_parameters())
            step += 1
            progress.update(1)
            if step % cfg.train.log_every == 0:
                seconds = time.perf_counter() - start
                logged = {k: acc.reduce(v, "mean").item() for k, v in terms.items()}
                logged |= {"lr": lr_schedule.get_last_lr()[0], "sec_per_step": seconds,
                           "samples_per_sec": samples_per_step / seconds,
                           "epoch": self._batches_read / self.batches_per_epoch,
                           "data_skipped": int(acc.reduce(torch.tensor(self._skipped, device=acc.device), "sum"))}
                self._skipped = 0
                acc.log(logged, step=step)
                progress.set_postfix(loss=f"{logged['loss']:.4f}")
            if cfg.train.sample_every and step % cfg.train.sample_every == 0:
                self._sample(step)
            if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or step == max_steps:
                checkpointer.save(step, rng.generator)
        progress.close()

        acc.wait_for_everyone()
        if acc.is_main_process:
            if ema is not None:
                ema.copy_to(state.ema_parameters())
            exported = self.export(model, out)
        acc.end_training()
        if acc.is_main_process:  # last, after the trackers' own closing lines
            print(run_summary(cfg, step, exported), flush=True)

    def optimizer_step(self, wrapped, optimizer, lr_schedule, params, batches, rng) -> dict:
        """grad_accum micro-steps and one optimizer step; returns the mean of each loss term."""
        acc, max_norm, accum = self.accelerator, self.cfg.train.max_grad_norm, self.cfg.train.grad_accum
        totals: dict[str, torch.Tensor] = {}
        for _ in range(accum):
            batch = next(batches)
            with acc.accumulate(wrapped):
                latents, embeds = self.encoder(batch, rng)
                terms = self.objective(wrapped, latents, embeds, rng)
                acc.backward(terms["loss"])
                if acc.sync_gradients and max_norm > 0:
                    acc.clip_grad_norm_(params, max_norm)
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0) + value.detach() / accum
        return totals

    def _loader(self) -> tuple[DataLoader, int]:
        """The DataLoader and the batches each process reads per epoch.

        A map-style dataset goes through `accelerator.prepare`, which shards it over processes with a
        seedable sampler. An iterable one (webdataset) splits itself by process and worker, so it is
        never prepared; its epoch length comes from its manifest (`set_batching`)."""
        cfg, acc = self.cfg.train, self.accelerator
        if isinstance(self.dataset, IterableDataset):
            loader = DataLoader(self.dataset, batch_size=cfg.batch_size, drop_last=True, collate_fn=collate,
                                num_workers=cfg.num_workers)
            return loader, self.dataset.set_batching(cfg.batch_size, acc.num_processes, cfg.num_workers)
        loader = DataLoader(self.dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                            collate_fn=collate, num_workers=cfg.num_workers)
        loader = acc.prepare(loader)
        return loader, len(loader)

    def _batches(self, loader, start_micro_step: int):
        """Endless batches; a resumed run continues at the same epoch and position (an iterable dataset
        restarts the epoch's stream reseeded by that position instead: see webdataset_source.py).

        Bad samples were dropped by `collate` and arrive as `batch["skipped"]`: each is named in a warning
        and counted (`data_skipped` in the metrics), or stops the run when `data.strict` is set. A batch
        left with no sample is passed over; it still counts as read for the epoch. A source that gives
        only bad samples (`data.max_bad_in_a_row` of them, or a whole epoch) stops the run."""
        epoch, skip = divmod(start_micro_step, self.batches_per_epoch)
        iterable = isinstance(self.dataset, IterableDataset)
        self._bad_in_a_row, self._last_reasons = 0, []
        while True:
            usable_this_epoch = False
            if iterable:
                self.dataset.set_epoch(epoch, skip)
                epoch_batches = iter(loader)
            else:
                loader.set_epoch(epoch)  # sampler order
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(epoch)  # augmentation randomness
                epoch_batches = self.accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch in islice(epoch_batches, self.batches_per_epoch - skip):
                self._batches_read += 1
                self._note_skipped(batch["skipped"], usable=bool(batch["captions"]))
                if batch["captions"]:
                    usable_this_epoch = True
                    yield batch
            if not usable_this_epoch:
                self._stalled("a whole epoch")
            epoch, skip = epoch + 1, 0

    def _note_skipped(self, reasons: list[str], usable: bool) -> None:
        if reasons and self.cfg.data.strict:
            raise UserError(f"bad sample (data.strict=true): {reasons[0]}")
        for reason in reasons:
            # One write per line: several processes share stderr, and print's separate "\n" would let their
            # lines interleave.
            sys.stderr.write(f"warning: process {self.accelerator.process_index} skipped a sample: {reason}\n")
            sys.stderr.flush()
        self._skipped += len(reasons)
        self._bad_in_a_row = 0 if usable else self._bad_in_a_row + len(reasons)
        self._last_reasons = (self._last_reasons + reasons)[-3:]
        if self._bad_in_a_row >= self.cfg.data.max_bad_in_a_row:
            self._stalled(f"{self._bad_in_a_row} samples in a row (data.max_bad_in_a_row)")

    def _stalled(self, span: str) -> None:
        d = self.cfg.data
        where = f"data.cache={d.cache}" if d.cache else f"data.source={d.source}" + (f" ({d.path})" if d.path else "")
        raise UserError(f"{where}: no usable sample in {span}; last reasons: "
                        + ("; ".join(self._last_reasons) or "none given"))

    def _sampling_parts(self):
        """The frozen VAE and text encoder for sampling. A run from a latent cache left them out; the
        main process loads them from `frozen_source` (the teacher) the first time a sample grid is due."""
        if not self.parts.has_encoders:
            from sdkd.train.teacher import PipelineSource, freeze, load_teacher

            loaded = load_teacher(self.frozen_source or PipelineSource.of(self.cfg), with_unet=False)
            for frozen in (loaded.vae, loaded.text_encoder):
                freeze(frozen, self.accelerator.device, weight_dtype(self.accelerator))
            self.parts = dataclasses.replace(self.parts, vae=loaded.vae, text_encoder=loaded.text_encoder,
                                             tokenizer=loaded.tokenizer)
        return self.parts

    def _sample(self, step: int) -> None:
        acc, s = self.accelerator, self.cfg.sample
        if acc.is_main_process:
            resolution = s.resolution or self.cfg.data.resolution
            parts = self._sampling_parts()
            run = lambda unet: sample_images(unet, parts, s.prompts, s.seed, s.steps, s.guidance_scale,
                                             resolution, autocast=acc.autocast)
            folder = Path(self.cfg.output_dir) / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            was_training = self.model.training
            self.model.eval()  # the whole trained module (a LoRA'd text encoder too), not only the U-Net
            rows = [run(self.sample_unet or self.model)]
            self.model.train(was_training)
            if self.reference_unet is not None:
                if self._teacher_images is None:
                    self._teacher_images = run(self.reference_unet)
                    make_grid([self._teacher_images], s.prompts, ["teacher"]).save(folder / "teacher.png")
                    tracking.log_images(acc, "samples/teacher", self._teacher_images, step, s.prompts)
                rows.insert(0, self._teacher_images)
            labels = ["teacher", f"student step {step}"][-len(rows):]
            make_grid(rows, s.prompts, labels).save(folder / f"step-{step}.png")
            tracking.log_images(acc, "samples/student", rows[-1], step, s.prompts)
        acc.wait_for_everyone()


def run_summary(cfg: Config, step: int, exported: list[Path]) -> str:
    """A run's closing lines: what it wrote where, then the commands to run next. `exported` is what the
    trainer's export wrote: a pipeline folder (kd, finetune) or LoRA files (lora), the model first."""
    out, model = Path(cfg.output_dir), exported[0]
    card = (model if model.is_dir() else model.parent) / "README.md"
    samples = sorted((out / "samples").glob("step-*.png"), key=lambda p: int(p.stem.removeprefix("step-")))
    checkpoints = list_checkpoints(out)
    wrote = [("model", ", ".join(map(str, exported))), ("model card", card if card.is_file() else None),
             ("samples", samples and f"{out / 'samples'} (newest {samples[-1].name})"),
             ("checkpoints", checkpoints and f"{checkpoints[-1]} (newest of {len(checkpoints)})"),
             ("metrics", out / "metrics.jsonl"),
             ("tensorboard", "tensorboard" in cfg.log.trackers and f"tensorboard --logdir {out / 'logs'}"),
             ("wandb", "wandb" in cfg.log.trackers and out / "wandb")]
    q = lambda path: shlex.quote(str(path))  # noqa: E731  # commands stay runnable whatever the paths
    prompt, generated = q(cfg.sample.prompts[0]), q(out / "generated")
    if model.is_dir():  # a pipeline folder
        next_steps = [
            (f"python eval/sample.py --model {q(model)} --prompt {prompt} --out {generated}", "images from it"),
            (f"python train/export.py {q(out)} --format single-file --out {q(out / 'student.safetensors')}",
             "one file for diffusers, A1111, ComfyUI (--target sdcpp: stable-diffusion.cpp)"),
            (f"accelerate launch train/lora.py --config configs/lora.yaml model={q(model)} data.path=IMAGES",
             "a LoRA on it"),
        ]
    else:  # LoRA files, for the model they were trained on
        next_steps = [(f"python eval/sample.py --model {q(cfg.model)} --lora {q(model)} --prompt {prompt} "
                       f"--out {generated}", "images with the LoRA")]
    lines = [f"trained {step} steps; wrote:"] + [f"  {name:<12} {value}" for name, value in wrote if value]
    return "\n".join(lines + ["next:"] + [f"  {command}  # {why}" for command, why in next_steps])


def _flat(cfg: Config) -> dict:
    """Config as flat scalar values for trackers (tensorboard takes no lists)."""
    from omegaconf import OmegaConf

    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return flat


def _truncate_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint: drop their old lines."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in lines))
