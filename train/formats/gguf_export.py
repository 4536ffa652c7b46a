"""GGUF files for stable-diffusion.cpp: a student's `--target sdcpp` single file (U-Net, VAE and text encoders in
the teacher-slot numbering, train/formats/ldm_layout.py) with its weights quantised the way sd.cpp's own converter
(`sd-cli -M convert --type TYPE`) quantises them, written with the `gguf` package (llama.cpp's gguf-py: GGUFWriter
and its numpy quantisers, the `gguf` extra).

Tensor types (sd.cpp's `ModelLoader::tensor_should_be_converted`, src/model_loader.cpp):
- 1-D tensors (biases, norm weights and biases): F32. sd.cpp computes with every bias and norm parameter in F32
  and dequantises a quantised one at load; its converter would quantise a norm weight whose length is a multiple
  of 32, which saves nothing worth the error.
- F16, never quantised: names ending `.bias` or `.scale`, containing `time_embed.` or `label_emb.` (the U-Net's
  timestep MLP, SDXL's size and pooled-text MLP) or `embedding` (token and position embeddings), and every tensor
  whose rows (ggml's ne[0], the last torch dimension) are not a whole number of the type's 32-value blocks: so
  every convolution kernel (rows of 3 or 1 values), which sd.cpp runs in F16 whatever the file holds.
- the rest, the Linear weights (attention, feed-forward, projections, the text encoders' layers): the chosen
  type. With `f16` every tensor of two or more dimensions is F16.

Tensor names are the single file's (sd.cpp tells the model version by them, in GGUF as in safetensors); the
file's key/value metadata (which sd.cpp ignores) holds the single file's sdkd metadata, configs, tokenizer and
sampling settings included.

sd.cpp's converter itself is not used: the one in cyllama 0.2.18 (`cyllama.sd.convert_model`) aborts the process
(std::logic_error from a null string) on every call tried, its optional arguments left out or given as "".
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdkd.cli.errors import UserError, first_line, require_package
from sdkd.cli.files import user_mode, written_whole
from sdkd.train.formats.ldm_layout import UnsupportedLayout
from sdkd.train.formats.model_files import Source, recorded_or_default, single_file_tensors

QUANTS = ("q8_0", "q5_0", "q5_1", "q4_0", "f16")
"""`--quant` values: ggml's 32-value block types that gguf-py quantises (its K-quants it can only read), and F16."""
KEEP_NAMES = ("time_embed.", "label_emb.", "embedding")  # sd.cpp's converter leaves names containing these alone
KEEP_SUFFIXES = (".bias", ".scale")
COMPARE_PROMPT = "a photo of a cat"
COMPARE_SEED = 0
ARCH = "sdkd"  # GGUF's required general.architecture; sd.cpp reads no metadata


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise UserError(f"--quant must be one of {', '.join(QUANTS)}, got '{quant}'")


def require() -> None:
    """The `gguf` package, or one line saying how to install it."""
    require_package("gguf", "--format gguf", "gguf")


def tensor_type(name: str, shape: tuple[int, ...], quant: str):
    """The GGML type sdkd writes the tensor `name` of torch `shape` in, for `--quant quant` (module docstring)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) <= 1:
        return GGMLQuantizationType.F32
    qtype = GGMLQuantizationType[quant.upper()]
    block = GGML_QUANT_SIZES[qtype][0]
    if (quant == "f16" or shape[-1] % block or name.endswith(KEEP_SUFFIXES)
            or any(part in name for part in KEEP_NAMES)):
        return GGMLQuantizationType.F16
    return qtype


def write_gguf(flat: dict[str, torch.Tensor], meta: dict[str, str], out: str | Path, quant: str) -> dict[str, int]:
    """`flat` (a single file's tensors, by name) as the GGUF file `out` in the types of `tensor_type`, `meta` as
    string metadata; written whole (a temporary file renamed into place), with the mode the umask gives. Tensors
    are converted one at a time as they are written, so the file is never held in memory. Returns how many tensors
    it holds of each GGML type (by name: F32, F16, Q8_0, ...)."""
    from gguf import GGML_QUANT_SIZES, GGUFWriter
    from gguf.quants import quantize

    types = {name: tensor_type(name, tuple(t.shape), quant) for name, t in flat.items()}
    with written_whole(out) as tmp:
        writer = GGUFWriter(tmp, ARCH)
        for key, value in meta.items():
            writer.add_string(key, value)
        for name, tensor in flat.items():
            block, block_bytes = GGML_QUANT_SIZES[types[name]]
            shape = tuple(tensor.shape) or (1,)
            writer.add_tensor_info(name, shape, np.dtype(np.float32), tensor.numel() // block * block_bytes,
                                   raw_dtype=types[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, tensor in flat.items():
            data = tensor.detach().float().reshape(tuple(tensor.shape) or (1,)).numpy()
            writer.write_tensor_data(quantize(data, types[name]))
        writer.close()
    user_mode(out)
    return dict(Counter(t.name for t in types.values()))


@dataclass
class Comparison:
    """The quantised file's image against the f16 file's, both generated by stable-diffusion.cpp at one seed."""

    f16_bytes: int
    size: int
    steps: int
    cfg_scale: float
    psnr: float
    """dB over 8-bit RGB; inf for identical images."""
    mean_abs: float
    """Mean absolute difference per channel value, 0-255."""


@dataclass
class GgufExport:
    path: Path
    quant: str
    file_bytes: int
    types: dict[str, int]
    """How many tensors the file holds of each GGML type (its name: F32, F16, Q8_0, ...)."""
    comparison: Comparison | None = None
    not_compared: str = ""
    """Why there is no comparison (no comparison was asked for, or sd.cpp could not run the files)."""


def sdcpp_image(file: Path, size: int, steps: int, cfg_scale: float, seed: int = COMPARE_SEED,
                prompt: str = COMPARE_PROMPT, n_threads: int = -1) -> np.ndarray:
    """One image of `file` generated by the stable-diffusion.cpp of cyllama, as H x W x 3 uint8; a RuntimeError
    naming sd.cpp's last error line when it cannot load the file."""
    from cyllama import sd

    logs: list[str] = []
    sd.set_log_callback(lambda level, message: logs.append(str(message).strip()))
    try:
        params = sd.SDContextParams(model_path=str(file), n_threads=n_threads, vae_decode_only=True)
        with sd.SDContext(params) as ctx:
            return ctx.generate(prompt, width=size, height=size, seed=seed, sample_steps=steps,
                                cfg_scale=cfg_scale)[0].to_numpy()
    except RuntimeError:
        errors = [m for m in logs if "fail" in m.lower() or "error" in m.lower()]
        raise RuntimeError(errors[-1] if errors else "context creation failed") from None
    finally:
        sd.set_log_callback(None)


def image_difference(image: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(PSNR in dB, mean absolute difference in 0-255) of two uint8 images."""
    diff = image.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff**2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return psnr, float(np.mean(np.abs(diff)))


def compare_with_f16(flat: dict, meta: dict, file: Path, sampling: dict, size: int,
                     n_threads: int = -1) -> Comparison:
    """`file` against the same tensors written as f16 (a temporary file beside it): one image of each from
    stable-diffusion.cpp at `COMPARE_SEED`, `size` px, the model's sampling steps and guidance (guidance <= 1:
    sd.cpp's cfg scale 1, no guidance)."""
    steps, cfg_scale = sampling["steps"], max(float(sampling["guidance_scale"]), 1.0)
    with tempfile.TemporaryDirectory(dir=file.parent, prefix=".f16-") as tmp:
        reference = Path(tmp) / "f16.gguf"
        write_gguf(flat, meta, reference, "f16")
        reference_image = sdcpp_image(reference, size, steps, cfg_scale, n_threads=n_threads)
        image = sdcpp_image(file, size, steps, cfg_scale, n_threads=n_threads)
        f16_bytes = reference.stat().st_size
    psnr, mean_abs = image_difference(image, reference_image)
    return Comparison(f16_bytes, size, steps, cfg_scale, psnr, mean_abs)


def export_gguf(source: Source, out: str | Path, quant: str = "q8_0", compare_size: int = 256,
                n_threads: int = -1) -> GgufExport:
    """`source` as a GGUF file for stable-diffusion.cpp at `out`, its Linear weights in `quant`; refused in one
    line (nothing written) for a model sd.cpp has no model for. With `compare_size` > 0 and quant not f16, the
    image sd.cpp generates from it is compared with that of the f16 file (`compare_with_f16`); without cyllama,
    or when sd.cpp cannot load the file, `not_compared` says why."""
    check_quant(quant)
    out = Path(out)
    try:
        flat, meta = single_file_tensors(source, "sdcpp", what="--format gguf")
    except UnsupportedLayout as err:
        raise UnsupportedLayout(f"--format gguf (a stable-diffusion.cpp file): {err}") from None
    types = write_gguf(flat, meta, out, quant)
    result = GgufExport(out, quant, out.stat().st_size, types)
    if compare_size <= 0 or quant == "f16":
        result.not_compared = "this is the f16 file" if quant == "f16" else "not asked for (--compare-size 0)"
        return result
    try:
        import cyllama.sd  # noqa: F401  (the sdcpp extra)
    except ImportError:
        result.not_compared = ("needs stable-diffusion.cpp's Python binding: "
                               "pip install -c constraints.txt -e \".[sdcpp]\"")
        return result
    try:
        result.comparison = compare_with_f16(flat, meta, out, recorded_or_default(source), compare_size, n_threads)
    except RuntimeError as err:
        result.not_compared = f"the stable-diffusion.cpp of cyllama could not run the files ({first_line(err)})"
    return result


def report(result: GgufExport) -> list[str]:
    """What train/export.py prints about a GGUF export: its size and types, and the image difference."""
    types = ", ".join(f"{n} {t}" for t, n in sorted(result.types.items(), key=lambda item: -item[1]))
    lines = [f"size: {result.file_bytes / 1e6:,.1f} MB ({types} tensors)"]
    c = result.comparison
    if c is None:
        lines.append(f"image difference against the f16 file: not measured, {result.not_compared}")
        return lines
    lines[0] += f"; the f16 file: {c.f16_bytes / 1e6:,.1f} MB ({result.file_bytes / c.f16_bytes:.0%})"
    psnr = "identical" if c.psnr == float("inf") else f"PSNR {c.psnr:.1f} dB"
    lines.append(f"image difference against the f16 file (stable-diffusion.cpp, \"{COMPARE_PROMPT}\", seed "
                 f"{COMPARE_SEED}, {c.size}x{c.size}, {c.steps} steps, cfg scale {c.cfg_scale:g}): {psnr}, "
                 f"mean abs {c.mean_abs:.2f}/255")
    return lines
