"""The training loop every trainer shares: accelerate, data, accumulation, optimizers, LR schedules,
EMA, logging, sample grids, checkpoints and resume, the final export. What is trained, and how a
batch becomes loss terms, is the trainer's task (train/engine/task.py).

Loop order (edm2 / torchtitan): step -> log (with the task's metrics when `Task.eval_every` is due, and at the
last step) -> sample -> checkpoint -> done?
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sdkd.cli import limits
from sdkd.cli.errors import UserError
from sdkd.cli.files import write_text
from sdkd.cli.words import counted
from sdkd.data.sources.buckets import BucketBatchSampler, sample_buckets
from sdkd.data.sources.core import collate
from sdkd.train.engine import console, run_folder, tracking
from sdkd.train.engine.checkpoints import Checkpointer, list_checkpoints, resolve_resume
from sdkd.train.engine.config import OptimConfig, RunConfig, resolve_max_steps
from sdkd.train.engine.distributed import together
from sdkd.train.engine.frozen import freeze
from sdkd.train.engine.sharding import (
    ShardedModule,
    check_config,
    check_launch,
    check_task,
    fsdp_on_cpu,
    is_deepspeed,
    is_fsdp,
)
from sdkd.train.engine.step_random import StepRandom
from sdkd.train.engine.task import SampleSink, StepContext, Task, TrainedModule


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The run's accelerator; also creates and locks OUTPUT/, refusing one that holds another run
    (train/engine/run_folder.py; the config is saved there when training starts)."""
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on this machine")
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1" and not all(os.environ.get(k) for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        # A WORLD_SIZE left in the shell: accelerate would wait for, or fail to reach, processes never started.
        raise UserError(f"WORLD_SIZE={limits.shorten(world, 20)} is set, but no launcher started this process: "
                        f"run it with ./launch.sh --gpus N (or accelerate launch), or unset WORLD_SIZE")
    check_launch()
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
    fsdp_on_cpu(acc)
    check_config(acc, cfg)
    run_folder.claim(cfg, acc)
    return acc


def weight_dtype(acc: Accelerator) -> torch.dtype:
    """The dtype frozen models run in."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; `auto` takes the fused kernel where the device has one (CPU and CUDA do), else foreach.
    `optim.name=adamw_8bit`: bitsandbytes' AdamW8bit, refused in one line off CUDA or without bitsandbytes.

    The default per-parameter loop costs seconds per step on CPU for an SD-sized U-Net.
    """
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    params = list(params)
    if cfg.name == "adamw_8bit":
        # Asked of the machine, not of the parameters: accelerate moves them to the GPU after this.
        if not torch.cuda.is_available():
            raise UserError("optim.name=adamw_8bit: bitsandbytes' 8-bit AdamW needs a CUDA GPU and this machine "
                            "has none; use optim.name=adamw")
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("optim.name=adamw_8bit needs bitsandbytes (pip install bitsandbytes), "
                            "or use optim.name=adamw") from None
        return bitsandbytes.optim.AdamW8bit(params, **kw)
    if cfg.implementation in ("auto", "fused"):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except RuntimeError:
            if cfg.implementation == "fused":
                raise UserError(
                    "optim.implementation=fused: no fused AdamW for this device; use auto or foreach"
                ) from None
    return torch.optim.AdamW(params, foreach=cfg.implementation != "loop", **kw)


@dataclass
class Prepared:
    """A trained module as the loop runs it: wrapped, with its optimizer and LR schedule (its EMA is `spec.ema`)."""

    spec: TrainedModule
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    sharded: ShardedModule | None = None
    """Under FSDP: how to make the module whole again at the end."""


class Loop:
    """Trains `task` on `dataset`: the one loop every trainer runs (train/engine/task.py says what a task gives it)."""

    def __init__(self, cfg: RunConfig, accelerator: Accelerator, task: Task, dataset: Dataset):
        self.cfg, self.accelerator, self.task, self.dataset = cfg, accelerator, task, dataset
        self.bucket_sampler: BucketBatchSampler | None = None

    def fit(self) -> None:
        cfg, acc, task = self.cfg, self.accelerator, self.task
        out = Path(cfg.output_dir)
        loader, self.batches_per_epoch = self._loader()
        if self.batches_per_epoch == 0:
            raise UserError(f"data: {counted(len(self.dataset), 'sample')}, fewer than one batch "
                            f"({cfg.train.batch_size} x {counted(acc.num_processes, 'process')})"
                            + (" in every size bucket (data.buckets)" if self.bucket_sampler else ""))
        max_steps = resolve_max_steps(cfg.train, self.batches_per_epoch)
        if cfg.train.num_epochs is not None:
            acc.print(f"train.max_steps={max_steps}: train.num_epochs={cfg.train.num_epochs} x ceil("
                      f"{self.batches_per_epoch} batches per epoch / train.grad_accum={cfg.train.grad_accum})")
        self.prepare(max_steps)
        samples_per_step = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
        checkpointer = Checkpointer(acc, out, cfg.train.checkpoints_total_limit,
                                    [(p.spec.state, p.spec.ema) for p in self.modules.values()], task,
                                    [p.lr_schedule for p in self.modules.values()], samples_per_step,
                                    streamed=isinstance(self.dataset, IterableDataset))
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
        progress = console.progress(max_steps, "train", initial=step, unit="step",
                                    disable=not acc.is_local_main_process)
        if step == 0 and task.eval_every:  # the curve's starting point: the freshly initialised model
            acc.log(self._evaluate(step), step=step)
        while step < max_steps:
            start = time.perf_counter()
            terms = self.optimizer_step(step, batches, rng)
            step += 1
            progress.update(1)
            logged = {}
            if step % cfg.train.log_every == 0:
                seconds = time.perf_counter() - start
                logged = {k: acc.reduce(v, "mean").item() for k, v in terms.items()}
                logged |= self._learning_rates()
                logged |= {"sec_per_step": seconds, "samples_per_sec": samples_per_step / seconds,
                           "epoch": self._batches_read / self.batches_per_epoch,
                           "data_skipped": int(acc.reduce(torch.tensor(self._skipped, device=acc.device), "sum"))}
                self._skipped = 0
                shown = "loss" if "loss" in terms else next(iter(terms), None)
                if shown is not None:
                    progress.set_postfix(**{shown: f"{logged[shown]:.4f}"})
            if task.eval_every and (step % task.eval_every == 0 or step == max_steps):  # and the final model
                logged |= self._evaluate(step)
            if logged:
                acc.log(logged, step=step)
            if cfg.train.sample_every and step % cfg.train.sample_every == 0:
                self._sample(step)
            if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or step == max_steps:
                checkpointer.save(step, rng.generator)
        progress.close()

        acc.wait_for_everyone()
        for p in self.modules.values():
            if p.sharded is not None:  # every process: the gather is collective
                p.sharded.unshard(p.spec.ema)
        if acc.is_main_process:
            for p in self.modules.values():
                if p.spec.ema is not None:
                    p.spec.ema.copy_to(p.spec.state.ema_parameters())
            exported = task.export(out)
        acc.end_training()
        if acc.is_main_process:  # last, after the trackers' own closing lines
            print(run_summary(cfg, step, exported, task.next_steps(exported)), flush=True)

    def prepare(self, max_steps: int) -> None:
        """Freeze the task's frozen models (each in its `frozen_dtype`); give each trained module its optimizer,
        LR schedule and EMA (`TrainedModule.ema`)."""
        acc = self.accelerator
        check_task(acc, self.task)
        for name, frozen in self.task.frozen.items():
            if frozen is not None:
                freeze(frozen, acc.device, self.task.frozen_dtype(name, weight_dtype(acc)))
        self.modules = {m.name: self._prepare(m, max_steps) for m in self.task.modules}

    def _prepare(self, spec: TrainedModule, max_steps: int) -> Prepared:
        """Optimizer, LR schedule over the steps the module is due at, EMA; wrapped by accelerate."""
        acc = self.accelerator
        optimizer = build_optimizer(spec.parameters, spec.optim)
        updates = sum(map(spec.due, range(max_steps)))
        # A prepared scheduler steps once per process per optimizer step.
        lr_schedule = get_scheduler(spec.optim.lr_scheduler, optimizer,
                                    num_warmup_steps=spec.optim.warmup_steps * acc.num_processes,
                                    num_training_steps=updates * acc.num_processes)
        sharded = ShardedModule(spec.module) if is_fsdp(acc) else None
        if is_deepspeed(acc):  # what accelerate would otherwise fill in: clipping at 1.0, the loader's batch
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["gradient_clipping"] = spec.max_grad_norm
            ds["train_micro_batch_size_per_gpu"] = self.cfg.train.batch_size
        if spec.ema_decay is not None and sharded is None:
            spec.ema = spec.state.make_ema(spec.ema_decay)
            spec.ema.to(acc.device)
        wrapped, optimizer, lr_schedule = acc.prepare(spec.module, optimizer, lr_schedule)
        if spec.ema_decay is not None and sharded is not None:  # kept per shard: of the sharded parameters
            spec.ema = spec.state.make_ema(spec.ema_decay)
        return Prepared(spec, wrapped, optimizer, lr_schedule, sharded)

    def _learning_rates(self) -> dict[str, float]:
        """`lr` of a task with one module, else `lr/NAME` of each."""
        rates = {name: p.lr_schedule.get_last_lr()[0] for name, p in self.modules.items()}
        if len(rates) == 1:
            return {"lr": next(iter(rates.values()))}
        return {f"lr/{name}": lr for name, lr in rates.items()}

    def optimizer_step(self, step: int, batches, rng) -> dict:
        """grad_accum micro-batches through the task, then one update of each module it gave a loss for;
        returns the mean of each loss term."""
        acc, accum = self.accelerator, self.cfg.train.grad_accum
        totals: dict[str, torch.Tensor] = {}
        wrapped = {name: p.wrapped for name, p in self.modules.items()}
        ctx = StepContext(step, wrapped, lambda name, loss: self._backward(step, name, loss))
        for _ in range(accum):
            batch = next(batches)
            with acc.accumulate(*wrapped.values()):
                terms = self.task.train_step(ctx, batch, rng)
                for name in ctx.updated:
                    self._update(self.modules[name])
            for name, value in terms.items():
                totals[name] = totals.get(name, 0) + value.detach() / accum
        return totals

    def _backward(self, step: int, name: str, loss: torch.Tensor) -> None:
        p = self.modules[name]
        if not p.spec.due(step):  # its LR schedule was sized for the steps it is due at
            raise RuntimeError(f"the task gave module '{name}' a loss at step {step}, where it is not due")
        # With several trained modules a loss reaches only its own module's parameters.
        inputs = p.spec.parameters if len(self.modules) > 1 else None
        self.accelerator.backward(loss, inputs=inputs)

    def _update(self, p: Prepared) -> None:
        """An optimizer and LR-schedule step (accelerate skips both until the last micro-batch), clipping first."""
        acc = self.accelerator
        if acc.sync_gradients:
            if p.spec.max_grad_norm > 0:
                acc.clip_grad_norm_(p.spec.parameters, p.spec.max_grad_norm)
        p.optimizer.step()
        p.lr_schedule.step()
        p.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients and p.spec.ema is not None:
            p.spec.ema.step(p.spec.state.ema_parameters())

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
        buckets = sample_buckets(self.dataset)
        if buckets is None:
            loader = DataLoader(self.dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                collate_fn=collate, num_workers=cfg.num_workers)
        else:  # every batch one size: the sampler deals each process its part of a one-bucket global batch
            self.bucket_sampler = BucketBatchSampler(buckets, cfg.batch_size, acc.num_processes, cfg.seed)
            loader = DataLoader(self.dataset, batch_sampler=self.bucket_sampler, collate_fn=collate,
                                num_workers=cfg.num_workers)
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
                if self.bucket_sampler is not None:  # accelerate's shard of it does not pass the epoch on
                    self.bucket_sampler.set_epoch(epoch)
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
            self._stalled(f"{counted(self._bad_in_a_row, 'sample')} in a row (data.max_bad_in_a_row)")

    def _stalled(self, span: str) -> None:
        d = self.cfg.data
        where = f"data.cache={d.cache}" if d.cache else f"data.source={d.source}" + (f" ({d.path})" if d.path else "")
        raise UserError(f"{where}: no usable sample in {span}; last reasons: "
                        + ("; ".join(self._last_reasons) or "none given"))

    def _evaluate(self, step: int) -> dict[str, float]:
        """The task's metrics as `eval/NAME`: computed on the main process while the others wait; a user
        mistake there stops every process."""
        acc = self.accelerator
        metrics = together(acc, lambda: self.task.evaluate(step) if acc.is_main_process else {})
        return {f"eval/{name}": value for name, value in metrics.items()}

    def _sample(self, step: int) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            log_images = functools.partial(tracking.log_images, acc)
            self.task.sample(step, SampleSink(Path(self.cfg.output_dir) / "samples", step, log_images))
        acc.wait_for_everyone()


def run_summary(cfg: RunConfig, step: int, exported: list[Path], next_steps: list[tuple[str, str]]) -> str:
    """A run's closing lines: what it wrote where, then the commands to run next (the task's, with why).
    `exported` is what the task's export wrote, the model first."""
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
    lines = [f"trained {step} steps; wrote:"] + [f"  {name:<12} {value}" for name, value in wrote if value]
    if next_steps:
        lines += ["next:"] + [f"  {command}  # {why}" for command, why in next_steps]
    return "\n".join(lines)


def _flat(cfg: RunConfig) -> dict:
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
    write_text(path, "".join(line + "\n" for line in lines))
