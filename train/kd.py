"""Distil a block-removed student U-Net from a Stable Diffusion teacher.

    accelerate launch train/kd.py --config configs/toy.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from sdkd.data.sources import build_dataset
from sdkd.train.config import load_trainer_config
from sdkd.train.distributed import main_process_first
from sdkd.cli.errors import run_cli
from sdkd.train.model_files import save_pipeline
from sdkd.train.loop import Trainer, make_accelerator, weight_dtype
from sdkd.train.objective import build_encoder, kd_objective, set_prediction_type
from sdkd.train.students import build_student, removal_spec
from sdkd.train.teacher import PipelineSource, freeze, load_teacher


def main() -> None:
    cfg = load_trainer_config(__file__, sys.argv[1:], __doc__)
    acc = make_accelerator(cfg)
    # Data mistakes fail fast, on every process at once; a hf source prepares its arrow cache once.
    dataset = main_process_first(acc, lambda: build_dataset(cfg.data, cfg.train.seed))
    # From a latent cache no VAE or text encoder runs in the step: they are not loaded (sample grids
    # load them on the main process when first due).
    teacher = load_teacher(PipelineSource.of(cfg), with_encoders=cfg.data.cache is None)
    student = build_student(teacher.unet, removal_spec(cfg.student)).float()
    student.train()
    if cfg.train.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    teacher_kind = teacher.scheduler.config.prediction_type
    objective = kd_objective(cfg, teacher.scheduler, student, teacher.unet,
                             cfg.data.resolution // teacher.vae_scale_factor, acc.autocast)
    set_prediction_type(teacher.scheduler, cfg.loss.prediction_type,
                        teacher.scheduler if objective.teacher is not None else None, cfg.teacher)

    dtype = weight_dtype(acc)
    for frozen in (teacher.unet, teacher.vae, teacher.text_encoder):
        if frozen is not None:
            freeze(frozen, acc.device, dtype)
    acc.print(f"teacher {sum(p.numel() for p in teacher.unet.parameters()):,} params -> "
              f"student ({cfg.student.preset}) {sum(p.numel() for p in student.parameters()):,}; "
              f"{objective.num_feature_pairs} feature pairs; on {acc.num_processes} processes")
    acc.print(f"data: {len(dataset):,} samples per epoch from "
              + (f"the latent cache {cfg.data.cache} (no VAE or text encoder loaded)" if cfg.data.cache
                 else f"data.source={cfg.data.source}"))
    Trainer(
        cfg=cfg, accelerator=acc, model=student, objective=objective,
        encoder=build_encoder(cfg.data, teacher, dataset, acc.device),
        dataset=dataset, parts=teacher,
        export=lambda unet, out: [save_pipeline(unet, PipelineSource.of(cfg), out / "student", cfg.loss.prediction_type,
                                                run=out)],
        # Sample grids use the student's prediction type: no teacher row when a task-only run changed it.
        reference_unet=teacher.unet if teacher.scheduler.config.prediction_type == teacher_kind else None,
    ).fit()


if __name__ == "__main__":
    run_cli(main)
