"""The ONNX U-Nets of eval/bench_inference.py --onnx: each benchmarked U-Net exported as train/export.py --format
onnx writes it (train/formats/onnx_export.py), run in onnxruntime, and its forward as a call that the U-Net
timings interleave beside the PyTorch ones."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from sdkd.train.formats.onnx_export import UNET_FILE, export_onnx, require, unet_example


def providers(device: torch.device) -> list[str]:
    """onnxruntime's CUDA provider where the benchmark runs on CUDA and the installed onnxruntime has one
    (onnxruntime-gpu), else the CPU one."""
    ort = require("onnxruntime", "--onnx")
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_step_calls(unets: dict, folder: str | Path, batch: int, resolution: int, vae_scale: int,
                    device: torch.device, threads: int | None = None) -> tuple[dict, str]:
    """({name: one forward of that U-Net's ONNX export in onnxruntime}, the provider that runs them). Each U-Net
    is exported into `folder`/name first, fp32 on the CPU: call this before the U-Nets move or change dtype.
    The inputs are numpy arrays, so on CUDA each call copies them in and the output out (under a megabyte at
    SD-1.5 widths)."""
    ort = require("onnxruntime", "--onnx")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads  # as torch's threads, so both run on as many cores
    chosen = providers(device)
    calls = {}
    for i, (name, unet) in enumerate(unets.items()):
        out = export_onnx(unet, None, Path(folder) / str(i))
        session = ort.InferenceSession(str(out / UNET_FILE), options, providers=chosen)
        inputs = {k: t.numpy() for k, t in unet_example(unet, batch, resolution // vae_scale).items()}
        calls[name] = functools.partial(session.run, None, inputs)
    return calls, chosen[0]
