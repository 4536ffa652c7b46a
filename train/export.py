"""Export a student: a diffusers folder or a single `.safetensors` file (LDM layout, two numberings).

    python train/export.py SRC --format diffusers   --out DEST_FOLDER [--half] [--ema] [--vae FOLDER]
    python train/export.py SRC --format single-file --out DEST.safetensors [--target ldm|sdcpp] [--half] [--ema]
    python train/export.py SRC --format onnx        --out DEST_FOLDER [--ema] [--vae FOLDER]
    python train/export.py SRC --format gguf        --out DEST.gguf [--quant q8_0|q5_0|q5_1|q4_0|f16] [--ema]

SRC is a run folder (config.yaml; its `student/`, or with --ema the newest checkpoint's `unet_ema/`),
a `checkpoint-STEP` folder (its `unet/` or `unet_ema/`, the other parts from the run's `student/` or
its `model` / teacher), a diffusers pipeline folder (model_index.json) or an sdkd single file.

- diffusers: a pipeline folder with contiguous safetensors and a model card `README.md`.
- single-file: U-Net + VAE + text encoder in one flat LDM state dict, configs and tokenizer in its
  metadata. `--target ldm` (default): packed numbering, for diffusers `from_single_file(file,
  config=FOLDER)` and other LDM tools. `--target sdcpp`: teacher-slot numbering, for
  stable-diffusion.cpp; refused for layouts sd.cpp has no model for (no file is written then).
- onnx: the U-Net (`unet.onnx`), the tiny decoder when the VAE is an AutoencoderTiny (`vae_decoder.onnx`) and
  `onnx.json` (inputs, outputs, shapes, dtype, opset); fp32, external data past 2 GB (train/formats/onnx_export.py).
- gguf: the `--target sdcpp` file as GGUF for stable-diffusion.cpp, its Linear weights in the `--quant` type, the
  rest unquantised as sd.cpp keeps them (train/formats/gguf_export.py); prints the file's size and how far the
  image sd.cpp generates from it is from the f16 file's at the same seed (`--compare-size 0`: not measured).
The writing and reading is train/formats/model_files.py.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from sdkd.cli.errors import UserError, run_cli
from sdkd.cli.files import creatable, refuse_links, same_file
from sdkd.train.formats import ldm_layout
from sdkd.train.formats.model_files import export_diffusers, export_single_file, load_source

FORMATS = ("diffusers", "single-file", "onnx", "gguf")
GGUF_DEFAULT, GGUF_COMPARE_SIZE = "q8_0", 256


def export(src: str, fmt: str, out: str, target: str | None = None, half: bool = False, ema: bool = False,
           vae: str | None = None, overwrite: bool = False, allow_pickle: bool = False, quant: str | None = None,
           compare_size: int | None = None):
    """The written folder or file; for gguf, train/formats/gguf_export.py's GgufExport (file, size, comparison)."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be {', '.join(FORMATS)}, got '{fmt}'")
    if fmt != "gguf" and (quant, compare_size) != (None, None):
        flag = "--quant" if quant is not None else "--compare-size"
        raise UserError(f"{flag} applies to --format gguf only (a {fmt} export is not quantised)")
    if fmt == "gguf":
        from sdkd.train.formats import gguf_export

        quant, compare_size = quant or GGUF_DEFAULT, GGUF_COMPARE_SIZE if compare_size is None else compare_size
        gguf_export.check_quant(quant)
        if half:
            raise UserError("--half: --format gguf sets its tensor types with --quant (f16: half precision)")
        if compare_size < 0 or compare_size % 64:  # every U-Net level halves the latent: whole sizes at each
            raise UserError(f"--compare-size must be 0 (no comparison) or a positive multiple of 64, got "
                            f"{compare_size}")
        if Path(out).is_dir() or Path(out).suffix != ".gguf":
            raise UserError(f"--out '{out}': --format gguf writes one file; give a path ending in .gguf")
    if fmt != "single-file" and target is not None:
        raise UserError(f"--target applies to --format single-file only (a {fmt} export has one layout)")
    if fmt == "onnx" and half:
        raise UserError("--half: --format onnx writes fp32 (fp16 ONNX U-Nets give black images or NaNs in several "
                        "runtimes); convert the fp32 file with onnxruntime's float16 tools")
    target = target or "ldm"
    if target not in ldm_layout.NUMBERINGS:
        raise UserError(f"--target must be ldm or sdcpp, got '{target}'")
    if fmt == "single-file" and (Path(out).is_dir() or Path(out).suffix != ".safetensors"):
        raise UserError(f"--out '{out}': --format single-file writes one file; give a path ending in .safetensors")
    target_path = Path(out)
    for given, flag in ((src, "the model to export"), (vae, "--vae")):
        if given is not None and same_file(out, given):
            raise UserError(f"--out '{out}' is {flag} ('{given}'): write the export elsewhere")
    if fmt == "onnx" and target_path.is_file():
        raise UserError(f"--out '{out}' is a file; --format onnx writes a folder")
    if not overwrite and (target_path.is_file() or (target_path.is_dir() and any(target_path.iterdir()))):
        raise UserError(f"--out '{out}' already exists; choose another path or pass --overwrite")
    refuse_links(target_path, "--out")
    creatable(target_path, "--out")  # before the model loads
    if fmt == "onnx":  # onnx is imported only for this format, before the model is loaded
        from sdkd.train.formats.onnx_export import export_onnx, require

        require("onnx", "--format onnx")
    if fmt == "gguf":
        gguf_export.require()
    source = load_source(src, ema=ema, vae=vae, allow_pickle=allow_pickle)
    if fmt == "gguf":
        return gguf_export.export_gguf(source, out, quant, compare_size)
    if fmt == "diffusers":
        return export_diffusers(source, out, half)
    if fmt == "onnx":
        return export_onnx(source.pipe.unet, source.pipe.vae, out)
    return export_single_file(source, out, target, half)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a student as a diffusers folder, a single .safetensors "
                                                 "file (LDM layout: --target ldm for diffusers/A1111/ComfyUI, "
                                                 "--target sdcpp for stable-diffusion.cpp) or ONNX (U-Net and "
                                                 "tiny decoder).")
    parser.add_argument("src", help="run folder, checkpoint-STEP folder, diffusers pipeline folder or sdkd "
                                    ".safetensors file")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="folder (diffusers, onnx), FILE.safetensors (single-file) or "
                                                     "FILE.gguf (gguf)")
    parser.add_argument("--target", choices=list(ldm_layout.NUMBERINGS),
                        help="single-file U-Net numbering: ldm (default; diffusers from_single_file, LDM tools) "
                             "or sdcpp (stable-diffusion.cpp)")
    parser.add_argument("--quant", help="gguf: the type of the Linear weights, q8_0 (default), q5_0, q5_1, q4_0 "
                                        "or f16; convolutions, biases, norms and embeddings stay unquantised, "
                                        "as in stable-diffusion.cpp's own converter")
    parser.add_argument("--compare-size", type=int, metavar="PX",
                        help="gguf: generate one PX x PX image (a multiple of 64) in stable-diffusion.cpp from the "
                             "file and from its f16 version at one seed and print how far apart they are (default "
                             "256; 0: skip)")
    parser.add_argument("--half", action="store_true", help="store every tensor as fp16")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (run folder or checkpoint)")
    parser.add_argument("--vae", help="replace the VAE: a diffusers AutoencoderKL or AutoencoderTiny folder")
    parser.add_argument("--overwrite", action="store_true", help="replace what is already at --out")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load .bin (pickle) weights where there are no safetensors; pickle can run code")
    args = parser.parse_args(argv)
    out = export(args.src, args.format, args.out, args.target, args.half, args.ema, args.vae, args.overwrite,
                 args.allow_pickle, args.quant, args.compare_size)
    if args.format == "gguf":
        from sdkd.train.formats.gguf_export import report

        print(f"wrote {out.path} ({out.quant})")
        print("\n".join(report(out)))
        print(f"next: sd -m {shlex.quote(str(out.path))} -p 'a prompt' -o out.png  # stable-diffusion.cpp (README)")
        return
    print(f"wrote {out}")
    if args.format == "onnx":
        print(f"inputs and outputs: {out / 'onnx.json'}; onnxruntime.InferenceSession('{out / 'unet.onnx'}') runs it, "
              f"and eval/bench_inference.py --onnx times it beside PyTorch (README)")
    elif args.target == "sdcpp":
        print(f"next: sd -m {shlex.quote(str(out))} -p 'a prompt' -o out.png  # stable-diffusion.cpp (README)")
    else:
        print(f"next: python eval/sample.py --model {shlex.quote(str(out))} --prompt 'a prompt' --out samples")


if __name__ == "__main__":
    run_cli(main)
