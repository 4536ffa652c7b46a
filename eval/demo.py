"""A web page to compare a teacher and its students side by side (Gradio: pip install -e ".[demo]").

    python eval/demo.py --models teacher=PATH student=PATH [NAME=PATH ...] [--tiny-vae FOLDER] [--lora NAME=FILE]

PATH is anything eval/sample.py takes (run folder, checkpoint-STEP folder, diffusers pipeline folder, sdkd
single file, `toy` (the built-in toy teacher), a hub id) or `toy:PRESET` (a student built from it by the weight
map).
With no --models: the toy teacher and a toy student, something real on a laptop CPU. The page: prompt,
negative prompt, seed; per model its steps and guidance (its recorded sampling settings unless --steps and
--guidance are given; a one-step model starts at 1 step), its image,
seconds and U-Net parameter count. fp16 on a GPU, fp32 on CPU. A model that cannot be loaded or cannot
generate is left out with one line at start-up; none left: exit code 2. Served on 127.0.0.1 (--host) at
a free port (--port); the address is printed once the page answers.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile

from sdkd.cli import limits
from sdkd.cli.errors import UserError, run_cli
from sdkd.eval.inference.threads import HELP as THREADS_HELP

INSTALL = 'pip install -c constraints.txt -e ".[demo]"'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a page that runs a teacher and its students on one prompt, "
                                                 "side by side.")
    parser.add_argument("--models", nargs="+", default=[], metavar="NAME=PATH",
                        help="models to compare (run folder, checkpoint, diffusers folder, sdkd file, toy, hub id, "
                             "toy:PRESET); default: teacher=toy student=<the toy student>")
    parser.add_argument("--tiny-vae", metavar="FOLDER",
                        help="AutoencoderTiny folder every model decodes with (default: its own VAE)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=FILE",
                        help="LoRA weights (diffusers/peft .safetensors) for the model NAME; repeat for others")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--steps", type=int, help="steps the page starts with (default: each model's recorded "
                        "sampling settings, else 25; one-step models: 1)")
    parser.add_argument("--guidance", type=float, help="guidance the page starts with (default: each model's "
                        "recorded sampling settings, else 7.5)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=0, help="port to serve on (default: a free one)")
    parser.add_argument("--share", action="store_true", help="also ask Gradio for a public link (needs internet)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load .bin (pickle) weights where there are no safetensors; pickle can run code")
    args = parser.parse_args(argv)
    if args.steps is not None:
        limits.check_steps(args.steps, "--steps")
    if args.guidance is not None:
        limits.check_guidance(args.guidance, "--guidance")
    limits.check_float(args.lora_scale, "--lora-scale", -limits.MAX_LORA_SCALE, limits.MAX_LORA_SCALE)
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be 0 (a free port) or 1-65535, got {args.port}")
    if importlib.util.find_spec("gradio") is None:  # before the models load (seconds to minutes)
        raise UserError(f"the demo page needs Gradio (gradio is missing): {INSTALL}")
    from sdkd.eval.inference.threads import set_threads
    from sdkd.eval.page.models import default_models, load_models, parse_loras, parse_models

    set_threads(args.threads)

    specs = parse_models(args.models) if args.models else default_models()
    loras = parse_loras(args.lora, [name for name, _ in specs])
    with tempfile.TemporaryDirectory(prefix="sdkd-demo-") as scratch:  # toy:PRESET students are written here
        models, problems = load_models(specs, scratch, args.device, args.dtype, args.tiny_vae, loras, args.lora_scale,
                                       args.allow_pickle, args.steps, args.guidance)
        for line in problems:
            print(f"warning: {line}", file=sys.stderr, flush=True)
        if not models:
            raise UserError(f"none of the {len(specs)} models could be loaded (see above)")
        try:  # Gradio itself (seconds): only once there is something to show
            from sdkd.eval.page import layout as demo_page
        except ImportError as err:
            raise UserError(f"the demo page needs Gradio ({err.name or err} is missing): {INSTALL}") from None
        for model in models:
            print(f"{model.name}: {model.describe()}", flush=True)
        port = args.port or demo_page.free_port(args.host)
        demo_page.serve(demo_page.build_page(models, problems), args.host, port, args.share)


if __name__ == "__main__":
    run_cli(main)
