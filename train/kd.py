"""Distil a block-removed student U-Net from a Stable Diffusion teacher.

    accelerate launch train/kd.py --config configs/toy.yaml [key=value ...]
"""

from __future__ import annotations

from sdkd.cli.words import counted
from sdkd.train.engine.trainer_cli import run_trainer
from sdkd.train.tasks.diffusion_config import KDConfig

SCHEMA = KDConfig


def build(cfg: KDConfig, acc):
    # Imported here, after the arguments are read: --help and launch.sh's config check stay fast.
    from sdkd.train.formats.model_files import load_parts, save_pipeline
    from sdkd.train.models.students import build_student, removal_spec
    from sdkd.train.models.teacher import PipelineSource
    from sdkd.train.tasks.diffusion import DiffusionTask, frozen_parts, load_dataset, trained_module
    from sdkd.train.tasks.objective import build_encoder, kd_objective, set_prediction_type

    dataset = load_dataset(cfg, acc)
    # From a latent cache no VAE or text encoder runs in the step: they are not loaded (sample grids
    # load them on the main process when first due).
    teacher = load_parts(PipelineSource.of(cfg), with_encoders=cfg.data.cache is None)
    student = build_student(teacher.unet, removal_spec(cfg.student)).float()
    student.train()
    if cfg.train.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    teacher_kind = teacher.scheduler.config.prediction_type
    objective = kd_objective(cfg, teacher.scheduler, student, teacher.unet,
                             cfg.data.resolution // teacher.vae_scale_factor, acc.autocast)
    set_prediction_type(teacher.scheduler, cfg.loss.prediction_type,
                        teacher.scheduler if objective.teacher is not None else None, cfg.teacher)
    acc.print(f"teacher {sum(p.numel() for p in teacher.unet.parameters()):,} params -> "
              f"student ({cfg.student.preset}) {sum(p.numel() for p in student.parameters()):,}; "
              f"{objective.num_feature_pairs} feature pairs; on {counted(acc.num_processes, 'process')}")
    task = DiffusionTask(
        cfg, acc, trained_module(cfg, student), build_encoder(cfg.data, teacher, dataset, acc.device), objective,
        teacher, export=lambda out: [save_pipeline(student, PipelineSource.of(cfg), out / "student",
                                                   cfg.loss.prediction_type, run=out)],
        frozen=dict(teacher=teacher.unet, **frozen_parts(teacher)),
        # Sample grids use the student's prediction type: no teacher row when a task-only run changed it.
        reference_unet=teacher.unet if teacher.scheduler.config.prediction_type == teacher_kind else None,
    )
    return task, dataset


if __name__ == "__main__":
    run_trainer(SCHEMA, build, __doc__, __file__)
