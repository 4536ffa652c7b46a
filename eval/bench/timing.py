"""What the benchmarks share (eval/bench_inference.py, bench_decoder.py, bench_one_step.py): timing calls
interleaved across models, peak memory, MACs counted with torch.utils.flop_counter.FlopCounterMode
(MACs = FLOPs / 2), U-Net inputs (with the conditioning the U-Net's model family gives it:
train/models/families.py) and decoder inputs, whole pipeline calls, the teacher pipelines they build, and
their Markdown tables."""

from __future__ import annotations

import functools
import statistics
import threading
import time
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sdkd.train.models.families import family_of, random_conditioning


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak on GPU, sampled process RSS on CPU (bytes)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self.peak = proc.memory_info().rss

            def sample():
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
        return False


def unet_inputs(unet, batch: int, resolution: int, vae_scale: int, device, dtype):
    """(latents, timesteps, the U-Net's keyword arguments): fixed random inputs of one forward."""
    latent = resolution // vae_scale
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, unet.config.in_channels, latent, latent, generator=g).to(device, dtype)
    cond = random_conditioning(unet.config, batch, g).to(device, dtype)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    return sample, t, cond.unet_kwargs()


@torch.inference_mode()
def unet_macs(unet, resolution: int, vae_scale: int, device, dtype) -> int:
    """Multiply-accumulates of one U-Net forward at batch 1. Attention runs in SDPA's math backend while counted:
    FlopCounterMode has no formula for the fused CPU kernel, whose score and value products would go uncounted."""
    sample, t, cond = unet_inputs(unet, 1, resolution, vae_scale, device, dtype)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        unet(sample, t, **cond)
    return counter.get_total_flops() // 2


def interleaved(calls: dict[str, Callable[[], object]], device, repeats: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call: `warmup` untimed rounds, then `repeats` timed ones, one call per name per round,
    the names taken in turn, so that on a shared or throttling machine every model sees the same
    conditions and the ratios hold even when absolute times drift."""
    times = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            sync(device)
            start = clock()
            call()
            sync(device)
            if round_ >= warmup:
                times[name].append(clock() - start)
    return times


@torch.inference_mode()
def interleaved_step_times(unets: dict, batch: int, resolution: int, vae_scale: int, device, dtype,
                           repeats: int, cpu_time: bool = False,
                           extra: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """One U-Net forward per model per round, models taken in turn (`interleaved`), after one warm-up round.
    `extra`: further calls by name timed in the same rounds (eval/bench_inference.py --onnx: the ONNX U-Nets).

    `cpu_time` times with the process CPU clock instead of the wall clock: on a CPU host shared
    with other jobs it counts only this process's own compute (use it with --threads 1, where no
    thread spins waiting for a descheduled sibling)."""
    clock = time.process_time if cpu_time and device.type == "cpu" else time.perf_counter
    calls = {}
    for name, unet in unets.items():
        sample, t, cond = unet_inputs(unet, batch, resolution, vae_scale, device, dtype)
        calls[name] = functools.partial(unet, sample, t, **cond)
    return interleaved(calls | (extra or {}), device, repeats, warmup=1, clock=clock)


def models(pipe) -> list[torch.nn.Module]:
    """A pipeline's U-Net, VAE and text encoders (its model family's models)."""
    return [pipe.components[name] for name in family_of(pipe.unet.config).models]


def weight_bytes(pipe) -> int:
    return sum(p.numel() * p.element_size() for m in models(pipe) for p in m.parameters())


def e2e_call(pipeline, args) -> Callable[[], list]:
    """One whole pipeline call as `end_to_end` times it: `args.batch` prompts, text encoding, `args.steps`
    sampling steps at `args.guidance`, VAE decoding (unless `args.no_decode`), images at `args.resolution`."""
    prompts = [f"a photo of object {i}" for i in range(args.batch)]
    return functools.partial(pipeline, prompts, seed=1, steps=args.steps, guidance_scale=args.guidance,
                             height=args.resolution, width=args.resolution,
                             output_type="latent" if args.no_decode else "pil")


def end_to_end(pipeline, args) -> dict:
    """Latency per image, images/s and peak memory of whole pipeline calls (text, steps, decode).

    Peak memory = this pipeline's weights + the most the process (CPU RSS, or the CUDA allocator)
    grew during the calls, so other models held for the benchmark do not count.
    """
    device = pipeline.device
    call = e2e_call(pipeline, args)
    call()  # warm-up
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    with PeakMemory(device) as mem:
        if before is None:
            before = mem.peak
        calls = []
        for _ in range(args.e2e_repeats):
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            calls.append(time.perf_counter() - start)
    seconds = statistics.median(calls)
    return dict(latency_ms_per_image=seconds / args.batch * 1e3, images_per_s=args.batch / seconds,
                peak_mem_mb=(weight_bytes(pipeline.pipe) + max(mem.peak - before, 0)) / 2**20)


def check_run_flags(args) -> None:
    """A benchmark's --repeats, --warmup and --json (with --overwrite), checked before the minutes of work."""
    from sdkd.cli import limits
    from sdkd.cli.files import report_file

    limits.check_int(args.repeats, "--repeats", 1, limits.MAX_STEPS)
    limits.check_int(args.warmup, "--warmup", 0, limits.MAX_STEPS)
    if args.json:
        report_file(args.json, "--json", args.overwrite)


def teacher_pipe(teacher: str):
    """`--teacher`: "sd15" (SD-1.5 widths, random weights) or any model name (train/models/names.py: toy, ...)."""
    from sdkd.train.models.sd_configs import SD15_UNET
    from sdkd.train.models.toy import build_random_pipeline

    if teacher == "sd15":
        return build_random_pipeline(SD15_UNET, widths="sd15")
    from sdkd.train.formats.model_files import load_source

    return load_source(teacher, what="--teacher").pipe


def prepare_for_speed(pipe, device, dtype, compile_: bool, backend: str = "inductor"):
    """Move a pipeline to `device` / `dtype`, SDPA attention, channels_last U-Net on CUDA, optional torch.compile
    (with `backend`)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.to(device)
    for module in models(pipe):
        if module.dtype != dtype:
            module.to(dtype=dtype)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
    if compile_:
        pipe.unet = torch.compile(pipe.unet, backend=backend)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """What a diffusers pipeline runs to turn the U-Net's latents into an image."""
    return vae.decode(latents / vae.config.scaling_factor).sample


def pixels_per_latent(vae) -> int:
    """How far the decoder upsamples (SD's KL VAE and TAESD: 8; the toy's: 2)."""
    config = vae.config
    if "decoder_block_out_channels" in config:  # AutoencoderTiny
        return config["upsampling_scaling_factor"] ** (len(config["decoder_block_out_channels"]) - 1)
    return 2 ** (len(config["block_out_channels"]) - 1)


def latents_for(vae, batch: int, resolution: int, device, dtype) -> torch.Tensor:
    """Random latents that `vae` decodes to `resolution`-pixel images."""
    g = torch.Generator().manual_seed(0)
    size = resolution // pixels_per_latent(vae)
    return torch.randn(batch, vae.config.latent_channels, size, size, generator=g).to(device, dtype)


def decoder_params(vae) -> int:
    """The decoder's parameters (the KL one with its post-quant conv)."""
    modules = [vae.decoder] + ([vae.post_quant_conv] if getattr(vae, "post_quant_conv", None) is not None else [])
    return sum(p.numel() for m in modules for p in m.parameters())


@torch.inference_mode()
def decode_macs(vae, resolution: int, device, dtype) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        decode(vae, latents_for(vae, 1, resolution, device, dtype))
    return counter.get_total_flops() // 2
