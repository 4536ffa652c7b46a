"""The models and inputs the benchmarks measure (eval/bench_kd_step.py, eval/bench_data.py on the CPU;
eval/gpu_check.py on a GPU).

`build_bench` sets one model up as train/kd.py does: the teacher (the toy, or SD-1.5 widths at random
weights), the bk_small student, the real `DiffusionObjective` and default config, on an
`Accelerator(cpu=True)` (or the GPU's), with one collated synthetic batch and the latents and text embeddings
a latent cache would hand the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel

from sdkd.data.sources.config import DataConfig
from sdkd.data.sources.core import build_dataset, collate
from sdkd.train.engine.loop import weight_dtype
from sdkd.train.engine.step_random import StepRandom
from sdkd.train.models.families import Conditioning, random_conditioning
from sdkd.train.models.sd_configs import SD15_UNET
from sdkd.train.models.students import build_student, removal_spec
from sdkd.train.models.teacher import PipelineParts, load_teacher
from sdkd.train.models.toy import build_random_pipeline
from sdkd.train.tasks.diffusion import DiffusionTask, trained_module
from sdkd.train.tasks.diffusion_config import KDConfig
from sdkd.train.tasks.objective import BatchEncoder, DiffusionObjective, kd_objective

SEED = 0


def sd15_parts() -> PipelineParts:
    """SD-1.5's U-Net, VAE and CLIP ViT-L/14 text encoder at their real widths, random weights."""
    return PipelineParts.of(build_random_pipeline(SD15_UNET, widths="sd15"))


@dataclass
class Bench:
    """One model's measured objects, set up as train/kd.py sets them up."""

    name: str
    cfg: KDConfig
    acc: Accelerator
    parts: PipelineParts
    student: UNet2DConditionModel
    objective: DiffusionObjective
    encoder: BatchEncoder
    batch: dict           # collated synthetic images + captions (for the encoding line)
    latents: torch.Tensor  # what the latent cache hands the step
    cond: Conditioning

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def task(self, encoder) -> DiffusionTask:
        """train/kd.py's task over this student and objective, with `encoder` (its models are frozen already)."""
        return DiffusionTask(self.cfg, self.acc, trained_module(self.cfg, self.student), encoder, self.objective,
                             self.parts, export=None, frozen={})


def build_bench(name: str, latent: int, batch_size: int, cpu: bool = True, mixed_precision: str = "no") -> Bench:
    """`cpu=False`: on the machine's accelerator (eval/gpu_check.py); `mixed_precision` as train.mixed_precision."""
    torch.manual_seed(SEED)
    parts = load_teacher("toy") if name == "toy" else sd15_parts()
    cfg = KDConfig(teacher=name, output_dir="unused")  # the library defaults are what is measured
    cfg.train.batch_size = batch_size
    cfg.train.mixed_precision = mixed_precision
    cfg.data = DataConfig(source="synthetic", resolution=latent * parts.vae_scale_factor, num_samples=batch_size)
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision)

    student = build_student(parts.unet, removal_spec(cfg.student)).float()
    student.train()
    objective = kd_objective(cfg, parts.scheduler, student, parts.unet, latent, acc.autocast)  # the trainer's own
    parts.freeze(acc.device, weight_dtype(acc), parts.family.models)

    dataset = build_dataset(cfg.data, SEED)
    batch = collate([dataset[i] for i in range(batch_size)])
    encoder = BatchEncoder(parts)
    rng = StepRandom(SEED, acc.device, batch_size)
    if name == "toy":
        latents, cond = encoder(batch, rng)
    else:  # random weights make the encodings meaningless anyway; the step only needs the shapes
        latents = torch.randn(batch_size, 4, latent, latent, generator=rng.generator)
        cond = random_conditioning(parts.unet.config, batch_size, rng.generator)
    return Bench(name, cfg, acc, parts, student, objective, encoder, batch, latents, cond)
