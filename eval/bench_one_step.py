"""One-step inference benchmark: the SDXS-512-layout student against the teacher, one run.

    python eval/bench_one_step.py --teacher sd15 --resolution 512 --teacher-steps 25 --json bench.json

- teacher: `--teacher-steps` DPM-Solver++ steps with classifier-free guidance (`--guidance`), full KL VAE decode;
- student: 1 step (t=999, trailing spacing), no guidance, the tiny decoder (AutoencoderTiny).

The student is, by default, built from the teacher by preset `sdxs`'s weight map (SDXS-512's layout, arXiv
2403.16627 sec. 3.1) and decodes with a random AutoencoderTiny of the teacher VAE's layout (TAESD's for SD:
same cost as trained weights); or `--student` a one-step model (diffusers folder, run, checkpoint, sdkd single
file; its own AutoencoderTiny `vae` is used if it has one) and `--tiny-decoder` an AutoencoderTiny folder.
`--teacher sd15` builds SD-1.5 widths with random weights (no download), `toy` the toy teacher, or give a
diffusers folder.

Per model: U-Net parameters and MACs (one forward at batch 1, FlopCounterMode; MACs = FLOPs / 2), U-Net ms per
forward at `--batch` latents (the paper's unit), U-Net ms per image over all steps (the teacher's forwards run
at the guidance batch, 2 x --batch), decoder parameters, MACs and ms per image, end-to-end ms per image (text
encoding, sampling, decoding to PIL: one pipeline call of `--batch` prompts) and images/s; then the ratios
student / teacher. The models are taken in turn in each round (eval/bench_inference.py's `interleaved`), first
the component forwards and decodes, then the end-to-end calls (after one short warm-up call each: 2 teacher
steps run the same shapes and kernels as 25), so a shared machine slows both alike; every figure is the
median of its rounds (a median forward is what a 25-step call averages). `--cpu-time` (CPU, with --threads 1)
counts the process's CPU time instead of the wall clock, so other jobs on a shared host do not inflate the
long teacher calls. On CUDA the SDXS paper's own figures are printed beside (Tables 1 and 3: fp16, batch 1,
512 px).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sdkd.cli.errors import ConfigError, UserError, run_cli
from sdkd.cli.files import report_file, write_text
from sdkd.cli.words import markdown_table
from sdkd.eval.bench.timing import (
    decode,
    decode_macs,
    decoder_params,
    e2e_call,
    interleaved,
    latents_for,
    pixels_per_latent,
    prepare_for_speed,
    teacher_pipe,
    unet_inputs,
    unet_macs,
)

# SDXS (arXiv 2403.16627v2) Table 1, per-component cost at batch 1 (SDXS-512 against SD v2.1 base at 512 px),
# Table 3's latency (fp16, batch 1, compiled) and the ~100 FPS headline; the paper does not name the GPU.
PAPER = dict(
    source="SDXS, arXiv 2403.16627v2: Table 1 (batch 1), Table 3 (fp16, batch 1, compiled, 512 px), "
           "~100 FPS headline on a single GPU (not named)",
    rows=[dict(model="paper SDXS-512", steps=1, guidance=None, unet_params=0.32e9, unet_ms_per_forward=6.3,
               unet_forwards=1, decoder_params=1.2e6, decoder_ms_per_image=1.7, text_encoder_ms=1.1,
               latency_ms_per_image=9.0, images_per_s=100.0),
          dict(model="paper SD v2.1 base", steps=None, guidance=None, unet_params=0.87e9, unet_ms_per_forward=16.0,
               unet_forwards=32, decoder_params=50e6, decoder_ms_per_image=18.0, text_encoder_ms=2.2,
               latency_ms_per_image=None, images_per_s=None)],
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Models


def tiny_decoder(path: str | None, pipe):
    """The student's decoder: `path` (an AutoencoderTiny folder), else the student folder's own AutoencoderTiny,
    else a random one of the VAE's layout (TAESD's for SD's VAE). It must fit the student's latents."""
    from diffusers import AutoencoderTiny

    from sdkd.train.formats.model_files import load_vae
    from sdkd.train.tasks.decoder import tiny_vae_config

    if path is None:
        if isinstance(pipe.vae, AutoencoderTiny):
            return pipe.vae, "the student's own AutoencoderTiny"
        torch.manual_seed(0)
        vae = AutoencoderTiny(**tiny_vae_config(pipe.vae.config))
        taesd = pixels_per_latent(vae) == 8 and vae.config.latent_channels == 4
        return vae, f"random AutoencoderTiny ({'TAESD' if taesd else 'the VAE'}'s layout)"
    vae = load_vae(path)
    if not isinstance(vae, AutoencoderTiny):
        raise UserError(f"--tiny-decoder '{path}' holds an {type(vae).__name__}, not an AutoencoderTiny")
    channels, scale = pipe.unet.config.out_channels, pipe.vae_scale_factor
    if vae.config.latent_channels != channels or pixels_per_latent(vae) != scale:
        raise UserError(f"--tiny-decoder '{path}' decodes {vae.config.latent_channels}-channel latents "
                        f"{pixels_per_latent(vae)}x; the student makes {channels}-channel latents for a {scale}x VAE")
    return vae, str(path)


def build(args):
    """(teacher pipeline, student pipeline, {model: (where its U-Net came from, where its decoder came from)})."""
    from diffusers import AutoencoderKL

    from sdkd.train.models.students import PRESETS, build_student

    log(f"loading teacher '{args.teacher}'...")
    teacher = teacher_pipe(args.teacher)
    if not isinstance(teacher.vae, AutoencoderKL):
        raise UserError(f"--teacher '{args.teacher}' decodes with an {type(teacher.vae).__name__}; the baseline "
                        f"is a teacher with its full KL VAE (AutoencoderKL)")
    if args.student:
        from sdkd.train.formats.model_files import load_source

        log(f"loading student '{args.student}'...")
        source = load_source(args.student)
        student, origin = source.pipe, source.description
    else:
        try:
            unet = build_student(teacher.unet, PRESETS["sdxs"])
        except ConfigError as err:
            raise UserError(f"--teacher '{args.teacher}': preset sdxs does not fit its U-Net ({err})") from None
        student, origin = type(teacher).from_pipe(teacher, unet=unet), "preset sdxs built from the teacher"
    vae, vae_origin = tiny_decoder(args.tiny_decoder, student)
    student = type(student).from_pipe(student, vae=vae)
    return teacher, student, dict(teacher=(args.teacher, "the teacher's AutoencoderKL"), student=(origin, vae_origin))


# ---------------------------------------------------------------------------------------------
# Measurements


def run(args) -> dict:
    from sdkd.eval.inference.pipeline import Pipeline, resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, student, origins = build(args)
    pipes = {"teacher": teacher, "student": student}
    for pipe in pipes.values():
        prepare_for_speed(pipe, device, dtype, args.compile)
    # How each model samples: (steps, guidance scale, the batch its U-Net forwards run at).
    cfg = args.guidance > 1
    runs = dict(teacher=(args.teacher_steps, args.guidance, args.batch * (2 if cfg else 1)),
                student=(1, 0.0, args.batch))
    res, batch = args.resolution, args.batch

    log("counting MACs...")
    unet_gmacs = {n: unet_macs(p.unet, res, p.vae_scale_factor, device, dtype) / 1e9 for n, p in pipes.items()}
    dec_gmacs = {n: decode_macs(p.vae, res, device, dtype) / 1e9 for n, p in pipes.items()}

    # Every U-Net forward and decode the pipelines run, at the pipelines' batches, taken in turn.
    calls = {}
    for name, pipe in pipes.items():
        unet_batches = {"unet": batch}
        if runs[name][2] != batch:  # guidance: a sampling step is one forward at twice the batch
            unet_batches["unet step"] = runs[name][2]
        for key, b in unet_batches.items():
            sample, t, cond = unet_inputs(pipe.unet, b, res, pipe.vae_scale_factor, device, dtype)
            calls[f"{name} {key}"] = functools.partial(pipe.unet, sample, t, **cond)
        calls[f"{name} decoder"] = functools.partial(decode, pipe.vae, latents_for(pipe.vae, batch, res, device, dtype))
    clock = time.process_time if args.cpu_time and device.type == "cpu" else time.perf_counter
    log(f"timing U-Net forwards and decodes, interleaved ({args.repeats} rounds after 1 warm-up)...")
    with torch.inference_mode():
        parts = interleaved(calls, device, args.repeats, warmup=1, clock=clock)

    e2e = {}
    for name, pipe in pipes.items():
        steps, guidance, _ = runs[name]
        pipeline = Pipeline(pipe, device, dtype)
        settings = SimpleNamespace(batch=batch, steps=steps, guidance=guidance, resolution=res, no_decode=False)
        e2e_call(pipeline, SimpleNamespace(**{**vars(settings), "steps": min(steps, 2)}))()  # warm-up
        e2e[name] = e2e_call(pipeline, settings)
    log(f"timing end-to-end calls, interleaved ({args.e2e_repeats} rounds; teacher {args.teacher_steps} steps)...")
    whole = interleaved(e2e, device, args.e2e_repeats, warmup=0, clock=clock)

    rows = []
    for name, pipe in pipes.items():
        steps, guidance, unet_batch = runs[name]
        forward = statistics.median(parts[f"{name} unet"])
        step = statistics.median(parts.get(f"{name} unet step", parts[f"{name} unet"]))
        call = statistics.median(whole[name])
        row = dict(model=name, source=origins[name][0], decoder_source=origins[name][1], steps=steps,
                   guidance=guidance if guidance > 1 else None,
                   sampler="DPM-Solver++" + (" (trailing, t=999)" if steps == 1 else ""), unet_batch=unet_batch,
                   unet_params=sum(p.numel() for p in pipe.unet.parameters()), unet_gmacs=unet_gmacs[name],
                   unet_ms_per_forward=forward * 1e3, unet_ms_per_step=step * 1e3,
                   unet_ms_per_image=steps * step / batch * 1e3,
                   decoder=type(pipe.vae).__name__, decoder_params=decoder_params(pipe.vae),
                   decoder_gmacs_per_image=dec_gmacs[name],
                   decoder_ms_per_image=statistics.median(parts[f"{name} decoder"]) / batch * 1e3,
                   latency_ms_per_image=call / batch * 1e3, images_per_s=batch / call)
        row["rest_ms_per_image"] = row["latency_ms_per_image"] - row["unet_ms_per_image"] - row["decoder_ms_per_image"]
        row["seconds"] = {key.removeprefix(f"{name} ").replace(" ", "_"): parts[key] for key in parts
                          if key.startswith(f"{name} ")} | {"end_to_end": whole[name]}
        rows.append(row)
        log(f"{name}: U-Net {row['unet_ms_per_forward']:.1f} ms/forward, decoder {row['decoder_ms_per_image']:.1f} "
            f"ms, {row['latency_ms_per_image']:.0f} ms/image, {row['images_per_s']:.3f} images/s")
    return dict(settings=dict(device=str(device), device_name=torch.cuda.get_device_name(device)
                              if device.type == "cuda" else "cpu", dtype=str(dtype).removeprefix("torch."),
                              threads=torch.get_num_threads(), resolution=res, batch=batch,
                              teacher_steps=args.teacher_steps, guidance=args.guidance, repeats=args.repeats,
                              e2e_repeats=args.e2e_repeats, compile=args.compile,
                              timer="process CPU time" if clock is time.process_time else "wall clock",
                              torch=torch.__version__,
                              command=" ".join(sys.argv)),
                models=rows, ratios=ratios(*rows),
                paper=PAPER if device.type == "cuda" else None)


def ratios(teacher: dict, student: dict) -> dict:
    """Student / teacher; `images_per_s_speedup` > 1 means the student makes more images per second."""
    over = lambda key: student[key] / teacher[key]  # noqa: E731
    return dict(images_per_s_speedup=over("images_per_s"), unet_params=over("unet_params"),
                unet_macs=over("unet_gmacs"), unet_ms_per_forward=over("unet_ms_per_forward"),
                unet_ms_per_image=over("unet_ms_per_image"), decoder_ms_per_image=over("decoder_ms_per_image"),
                latency_ms_per_image=over("latency_ms_per_image"))


# ---------------------------------------------------------------------------------------------
# Report


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(report: dict) -> str:
    head = ["model", "steps", "CFG", "U-Net params", "GMACs/fwd", "U-Net ms/fwd", "U-Net ms/image", "decoder",
            "decoder ms", "rest ms", "ms/image", "img/s"]
    lines = [head]
    for r in report["models"]:
        lines.append([r["model"], str(r["steps"]), _num(r["guidance"], "g"), f"{r['unet_params'] / 1e6:.1f}M",
                      f"{r['unet_gmacs']:.2f}", f"{r['unet_ms_per_forward']:.1f}", f"{r['unet_ms_per_image']:.1f}",
                      f"{r['decoder']} {r['decoder_params'] / 1e6:.2f}M", f"{r['decoder_ms_per_image']:.1f}",
                      f"{r['rest_ms_per_image']:.1f}", f"{r['latency_ms_per_image']:.1f}", f"{r['images_per_s']:.3g}"])
    for r in (report["paper"] or {}).get("rows", []):
        unet_image = r["unet_ms_per_forward"] * r["unet_forwards"]
        lines.append([r["model"], _num(r["steps"], "d"), "-", f"{r['unet_params'] / 1e6:.0f}M", "-",
                      f"{r['unet_ms_per_forward']:g}", f"{unet_image:g} ({r['unet_forwards']} NFE)",
                      f"{r['decoder_params'] / 1e6:.1f}M", f"{r['decoder_ms_per_image']:g}",
                      f"{r['text_encoder_ms']:g} (text)", _num(r["latency_ms_per_image"], "g"),
                      "~" + _num(r["images_per_s"], "g") if r["images_per_s"] else "-"])
    ratio = report["ratios"]
    ratio_lines = [["student / teacher", "x"],
                   ["images/s (speed-up)", f"{ratio['images_per_s_speedup']:.2f}"],
                   ["U-Net params", f"{ratio['unet_params']:.3f}"],
                   ["U-Net MACs per forward", f"{ratio['unet_macs']:.3f}"],
                   ["U-Net ms per forward", f"{ratio['unet_ms_per_forward']:.3f}"],
                   ["U-Net ms per image (all steps)", f"{ratio['unet_ms_per_image']:.4f}"],
                   ["decoder ms per image", f"{ratio['decoder_ms_per_image']:.3f}"],
                   ["end-to-end ms per image", f"{ratio['latency_ms_per_image']:.4f}"]]
    return markdown_table(lines) + "\n\n" + markdown_table(ratio_lines)


def header(report: dict) -> str:
    s = report["settings"]
    text = (f"{s['device_name']}, {s['dtype']}, {s['threads']} threads, {s['resolution']} px, batch {s['batch']}; "
            f"teacher {s['teacher_steps']} steps CFG {s['guidance']:g}, student 1 step; {s['timer']}, median of "
            f"{s['repeats']} interleaved rounds (components) and of {s['e2e_repeats']} (end-to-end)")
    if report["paper"]:
        text += f"\npaper rows: {report['paper']['source']}"
        if (s["resolution"], s["dtype"], s["batch"]) != (512, "float16", 1):
            text += "; this run is not at 512 px, fp16, batch 1"
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="images/s of the one-step SDXS-layout student (tiny decoder) "
                                                 "against the multi-step teacher (full VAE), in one run.")
    parser.add_argument("--teacher", default="sd15", help="sd15 (random SD-1.5 widths), toy, or a diffusers folder")
    parser.add_argument("--student", help="a one-step model (diffusers folder, run, checkpoint, sdkd file); "
                                          "default: preset sdxs built from the teacher")
    parser.add_argument("--tiny-decoder", help="AutoencoderTiny folder (default: the student's own, else a random "
                                               "one of the TAESD layout)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--teacher-steps", type=int, default=25, help="the teacher's DPM-Solver++ steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="the teacher's classifier-free guidance scale")
    parser.add_argument("--batch", type=int, default=1, help="images per pipeline call")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of U-Net forwards and decodes "
                                                               "(median)")
    parser.add_argument("--e2e-repeats", type=int, default=2, help="interleaved end-to-end calls per model (median)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--cpu-time", action="store_true",
                        help="CPU only: time with the process CPU clock (robust on a shared host; use with "
                             "--threads 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both U-Nets")
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    if args.json:
        report_file(args.json, "--json", args.overwrite)
    if args.resolution < 8 or args.resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.teacher_steps < 2:
        raise UserError(f"--teacher-steps must be at least 2 (the multi-step baseline), got {args.teacher_steps}")
    if args.batch < 1 or args.repeats < 1 or args.e2e_repeats < 1:
        raise UserError("--batch, --repeats and --e2e-repeats must be at least 1")
    if args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")
    for flag, path in (("--student", args.student), ("--tiny-decoder", args.tiny_decoder)):
        if path is not None and not Path(path).exists():
            raise UserError(f"{flag} '{path}' not found")
    report = run(args)
    print(header(report))
    print(table(report))
    if args.json:
        write_text(args.json, json.dumps(report, indent=1))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
