"""What eval/gpu_check.py measures, each with its peak memory, built from the benchmarks' own machinery: the
inference benchmark's timing (timing.py: interleaved U-Net steps, whole pipeline calls, `prepare_for_speed`), the
KD-step benchmark's models (setup.py `build_bench`) stepped by the real `Loop.optimizer_step`, and train/kd.py
launched by accelerate under DeepSpeed ZeRO-2.

`Mode` holds the sizes: `FULL` is the GPU check (512 px fp16 inference on SD-1.5-width students, the KD step at
512 px in bf16, 20 ZeRO-2 steps); `TINY` the same paths on the toy teacher at toy sizes, seconds on a CPU.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from sdkd.eval.bench.setup import SEED, build_bench
from sdkd.eval.bench.timing import PeakMemory, end_to_end, interleaved, prepare_for_speed, sync, teacher_pipe

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = ("bk_tiny", "sdxs")


@dataclass(frozen=True)
class Mode:
    widths: str             # the teacher's: "sd15" (SD-1.5) or "toy" (TOY_UNET), random weights
    resolution: int         # inference, px
    multi_step: int         # bk_tiny's sampling steps (SDXS: one step, no guidance)
    tiny_decoder_channels: int
    compile_backend: str    # torch.compile backend of the "compiled" rows
    repeats: int
    kd_model: str           # build_bench's name
    kd_latent: int
    kd_batch: int
    kd_mixed_precision: str
    kd_steps: int           # timed KD steps, after one untimed
    deepspeed_steps: int


FULL = Mode("sd15", 512, 25, 64, "inductor", 5, "sd15", 64, 1, "bf16", 10, 20)
# eager: dynamo traces and runs the graph as is; inductor would spend a minute compiling kernels on a CPU.
TINY = Mode("toy", 32, 2, 8, "eager", 1, "toy", 8, 2, "bf16", 2, 20)


def inference(mode: Mode, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Per layout (bk_tiny, SDXS, built from the teacher at its widths with random weights), with and without
    torch.compile, with the full (KL) and the tiny decoder: the fastest U-Net step of `repeats` and whole pipeline
    calls (timing.end_to_end: latency, images/s, peak memory)."""
    from diffusers import AutoencoderTiny

    from sdkd.eval.inference.pipeline import Pipeline
    from sdkd.train.models.students import PRESETS, build_student
    from sdkd.train.models.toy import TOY_UNET, build_random_pipeline
    from sdkd.train.tasks.decoder import tiny_vae_config

    # The toy's 4-level layout at random weights: the trained toy teacher has 3 levels, fewer than the presets cut.
    base = teacher_pipe("sd15") if mode.widths == "sd15" else build_random_pipeline(TOY_UNET, widths="toy")
    decoders = {"full": base.vae,
                "tiny": AutoencoderTiny(**tiny_vae_config(base.vae.config, mode.tiny_decoder_channels))}
    teacher, rows = base.unet, []
    for layout in LAYOUTS:
        steps, guidance = (mode.multi_step, 7.5) if layout == "bk_tiny" else (1, 0.0)
        student = build_student(teacher, PRESETS[layout])
        for compiled in (False, True):
            base.unet, base.vae = student, decoders["full"]
            prepare_for_speed(base, device, dtype, compiled, mode.compile_backend)
            decoders["tiny"].to(device, dtype)
            unet = base.unet
            cfg_batch = 2 if guidance > 1 and steps > 1 else 1
            call = _unet_call(unet, cfg_batch, mode.resolution, base.vae_scale_factor, device, dtype)
            start = time.perf_counter()
            call()  # the first call compiles
            sync(device)
            first_call = time.perf_counter() - start
            with PeakMemory(device) as mem:
                unet_s = min(interleaved({layout: call}, device, mode.repeats)[layout])
            for decoder, vae in decoders.items():
                base.vae = vae
                args = SimpleNamespace(batch=1, steps=steps, guidance=guidance, resolution=mode.resolution,
                                       no_decode=False, e2e_repeats=mode.repeats)
                row = dict(layout=layout, decoder=decoder, compile=compiled,
                           compile_backend=mode.compile_backend if compiled else None, steps=steps,
                           guidance=guidance, unet_params=sum(p.numel() for p in student.parameters()),
                           first_unet_call_s=first_call, unet_ms_per_step=unet_s * 1e3,
                           unet_peak_mem_mb=mem.peak / 2**20)
                row.update(end_to_end(Pipeline(base, device, dtype), args))
                rows.append(row)
        del student, unet, call
        gc.collect()
    del base, teacher
    return rows


def _unet_call(unet, batch: int, resolution: int, vae_scale: int, device, dtype):
    from sdkd.eval.bench.timing import unet_inputs

    sample, t, cond = unet_inputs(unet, batch, resolution, vae_scale, device, dtype)

    @torch.inference_mode()
    def call():
        unet(sample, t, **cond)

    return call


def kd_step(mode: Mode, device: torch.device) -> list[dict]:
    """The KD step (`Loop.optimizer_step`, bk_small from the bench's teacher, `kd_mixed_precision`) with the
    latents and embeddings a latent cache hands it, then with the VAE and text encoders encoding each batch:
    seconds per step (median of `kd_steps` after one untimed) and the peak memory over the steps."""
    from sdkd.train.engine.loop import Loop
    from sdkd.train.engine.step_random import StepRandom

    b = build_bench(mode.kd_model, mode.kd_latent, mode.kd_batch, cpu=device.type == "cpu",
                    mixed_precision=mode.kd_mixed_precision)
    latents, cond = b.latents.to(b.acc.device), b.cond.to(b.acc.device)
    batch = {k: v.to(b.acc.device) if isinstance(v, torch.Tensor) else v for k, v in b.batch.items()}
    rows = []
    for cached in (True, False):
        encoder = (lambda _batch, _rng: (latents, cond)) if cached else b.encoder
        loop = Loop(b.cfg, b.acc, b.task(encoder), dataset=None)
        loop.prepare(max_steps=mode.kd_steps + 1)
        rng = StepRandom(SEED, b.acc.device, b.cfg.train.batch_size)
        batches = itertools.repeat(batch)
        loop.optimizer_step(0, batches, rng)  # untimed: allocates the optimizer state, warms the kernels
        times = []
        with PeakMemory(b.acc.device) as mem:
            for _ in range(mode.kd_steps):
                sync(b.acc.device)
                start = time.perf_counter()
                loop.optimizer_step(0, batches, rng)
                sync(b.acc.device)
                times.append(time.perf_counter() - start)
        rows.append(dict(latent_cache=cached, mixed_precision=mode.kd_mixed_precision, model=mode.kd_model,
                         pixels=b.cfg.data.resolution, batch=mode.kd_batch, steps_timed=mode.kd_steps,
                         seconds_per_step=sorted(times)[len(times) // 2], peak_mem_mb=mem.peak / 2**20))
        del loop
        b.acc.free_memory()  # the optimizer it prepared, before the next variant allocates its own
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def deepspeed_zero2(mode: Mode, device: torch.device, out: Path) -> dict:
    """train/kd.py on the toy recipe, `deepspeed_steps` steps, one process, launched by `accelerate launch
    --use_deepspeed --zero_stage 2`; skipped with its reason where DeepSpeed is not installed or there is no
    CUDA GPU. Peak memory: the most the GPU's used memory (nvidia-smi) rose above where it stood before."""
    result = dict(steps=mode.deepspeed_steps, zero_stage=2, processes=1)
    if importlib.util.find_spec("deepspeed") is None:
        return result | dict(skipped="deepspeed is not installed (pip install deepspeed)")
    if device.type != "cuda":
        return result | dict(skipped="DeepSpeed ZeRO-2 needs a CUDA GPU; this machine has none")
    run = out / "deepspeed_zero2_run"
    shutil.rmtree(run, ignore_errors=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--use_deepspeed", "--zero_stage", "2", "--mixed_precision", "bf16", "--dynamo_backend", "no",
               str(ROOT / "train" / "kd.py"), "--config", str(ROOT / "configs" / "toy.yaml"),
               f"output_dir={run}", f"train.max_steps={mode.deepspeed_steps}", "train.mixed_precision=bf16",
               "train.sample_every=0", f"train.checkpoint_every={mode.deepspeed_steps}", "log.trackers=[none]"]
    poll = _GpuMemoryPoll(device)
    start = time.perf_counter()
    with poll:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    seconds = time.perf_counter() - start
    result |= dict(command=" ".join(command), returncode=done.returncode, seconds=seconds,
                   peak_mem_mb=poll.peak_rise_mb)
    if done.returncode != 0:
        return result | dict(ok=False, error_tail=(done.stderr or done.stdout)[-3000:])
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    return result | dict(ok=len(losses) == mode.deepspeed_steps, logged_steps=len(losses), first_loss=losses[0],
                         last_loss=losses[-1])


class _GpuMemoryPoll:
    """The GPU's used memory (nvidia-smi) sampled every 0.2 s while the block runs: another process's peak."""

    def __init__(self, device: torch.device):
        self.index, self.peak_rise_mb, self._stop = device.index or 0, 0.0, threading.Event()

    def _used_mb(self) -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              "-i", str(self.index)], capture_output=True, text=True)
        return float(out.stdout.strip() or 0)

    def __enter__(self):
        torch.cuda.empty_cache()
        self._before = self._used_mb()

        def sample():
            while not self._stop.wait(0.2):
                self.peak_rise_mb = max(self.peak_rise_mb, self._used_mb() - self._before)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False
