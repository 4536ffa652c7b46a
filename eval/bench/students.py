"""A family's teacher U-Net and its student presets side by side (eval/bench_students.py): parameters and MACs
counted on the meta device (a 2.6B-parameter SDXL U-Net costs no memory there), CPU time per forward measured in
one teacher's memory.

For the timing the teacher gets random weights (train/models/toy.py `random_unet`) and every student is built
from it by its preset's weight map with the teacher's tensors shared, not copied (`build_student(share=True)`):
all of them fit in the teacher's memory (SDXL fp32: 10.3 GB), and one round calls each model in turn
(timing.py `interleaved`), so a busy machine slows them alike. Weight values do not change the cost of a
forward.
"""

from __future__ import annotations

import statistics

import torch
from diffusers import UNet2DConditionModel

from sdkd.eval.bench.timing import interleaved_step_times, unet_macs
from sdkd.train.models import students
from sdkd.train.models.sd_configs import SD15_UNET, SDXL_UNET
from sdkd.train.models.students import PRESETS, build_student, student_unet_config
from sdkd.train.models.toy import TOY_UNET, TOY_XL_UNET, random_unet

VAE_SCALE = 8  # SD's and SDXL's VAE: pixels per latent, at either width
# family -> (the students.py family its presets name, the teacher U-Net at real widths, at toy widths). The toy
# SDXL teacher takes SDXL's transformer depths (1, 2, 10), which the SDXL presets cut down from.
FAMILIES = {
    "sd": (students.SD, SD15_UNET, TOY_UNET),
    "sdxl": (students.SDXL, SDXL_UNET, {**TOY_XL_UNET,
                                        "transformer_layers_per_block": SDXL_UNET["transformer_layers_per_block"]}),
}


def teacher_config(family: str, widths: str) -> dict:
    """The teacher U-Net config of `family` ("sd": SD-1.5, "sdxl": SDXL base) at "real" or "toy" widths."""
    _, real, toy = FAMILIES[family]
    return dict(real if widths == "real" else toy)


def family_presets(family: str) -> list[str]:
    """The student presets made for `family`'s teachers, in students.py's order."""
    return [name for name, spec in PRESETS.items() if spec.family == FAMILIES[family][0]]


def configs(teacher: dict, presets: list[str]) -> dict[str, dict]:
    """{"teacher": its config, preset: the student's config}."""
    return {"teacher": teacher} | {name: student_unet_config(teacher, PRESETS[name]) for name in presets}


def size(config: dict, resolution: int) -> tuple[int, int]:
    """(parameters, MACs of one forward at batch 1 and `resolution` px) of a U-Net config, built on meta."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    meta = torch.device("meta")
    return sum(p.numel() for p in unet.parameters()), unet_macs(unet, resolution, VAE_SCALE, meta, torch.float32)


def cpu_times(teacher: dict, presets: list[str], resolution: int, repeats: int,
              cpu_time: bool) -> dict[str, list[float]]:
    """Seconds per U-Net forward (batch 1, `resolution` px, fp32, CPU) of the teacher and each preset's student,
    `repeats` interleaved rounds after one warm-up round."""
    unet = random_unet(teacher).eval()
    unets = {"teacher": unet} | {name: build_student(unet, PRESETS[name], share=True).eval() for name in presets}
    return interleaved_step_times(unets, 1, resolution, VAE_SCALE, torch.device("cpu"), torch.float32, repeats,
                                  cpu_time=cpu_time)


def rows(family: str, widths: str, presets: list[str], macs_resolution: int, resolution: int, repeats: int,
         cpu_time: bool) -> list[dict]:
    """One row per model, the teacher first: parameters, GMACs at `macs_resolution`, CPU ms per forward at
    `resolution` (the fastest round, and the median), each against the teacher's."""
    teacher = teacher_config(family, widths)
    times = cpu_times(teacher, presets, resolution, repeats, cpu_time)
    out = []
    for name, config in configs(teacher, presets).items():
        params, macs = size(config, macs_resolution)
        out.append(dict(model=name, unet_params=params, unet_gmacs=macs / 1e9, cpu_ms=min(times[name]) * 1e3,
                        cpu_ms_median=statistics.median(times[name]) * 1e3))
    for row in out:
        for key, ratio in (("unet_params", "params_ratio"), ("unet_gmacs", "macs_ratio"), ("cpu_ms", "cpu_ratio")):
            row[ratio] = row[key] / out[0][key]
    return out
