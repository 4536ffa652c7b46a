"""Convert an sdkd LoRA (diffusers format, written by train/lora.py) for stable-diffusion.cpp.

    python train/convert_lora.py to-sdcpp OUTPUT/pytorch_lora_weights.safetensors --out lora_sdcpp.safetensors

The conversion is train/formats/lora_io.py's `export_sdcpp`: kohya names over sd.cpp's teacher-slot numbering,
with alpha tensors; a LoRA of a layout sd.cpp has no model for, or whose tensors adapt models its recorded family
lacks (`lora_family`: the conversion would drop them), is refused and no file is written. An existing --out is
replaced only with --overwrite, and never when it is the input.
"""

from __future__ import annotations

import argparse

from sdkd.cli.errors import run_cli
from sdkd.cli.files import check_new_file
from sdkd.train.formats.lora_io import export_sdcpp, lora_family, lora_file, read_lora


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an sdkd LoRA (diffusers format) for stable-diffusion.cpp.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("to-sdcpp", help="kohya names over sd.cpp's numbering, with alpha tensors")
    conv.add_argument("lora", help="pytorch_lora_weights.safetensors (or its folder) written by train/lora.py")
    conv.add_argument("--out", required=True, help="output .safetensors")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing --out (never the input LoRA)")
    args = parser.parse_args(argv)
    check_new_file(args.out, "--out", args.overwrite, inputs=(lora_file(args.lora),))
    lora_family(*read_lora(args.lora), args.lora)  # the names are made from the family it records
    print(f"wrote {export_sdcpp(args.lora, args.out)}")


if __name__ == "__main__":
    run_cli(main)
