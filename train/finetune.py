"""Fine-tune a Stable Diffusion U-Net (a distilled student, or any SD-1.x/2.x pipeline) on your data.

    accelerate launch train/finetune.py --config configs/portrait.yaml data.path=/data/portraits [key=value ...]

The task loss (min-SNR weighted with `loss.snr_gamma`), optionally continued KD from `teacher`
(`loss.lambda_out`; `loss.lambda_feat` with `student` describing `model`'s layout). Loop, EMA,
checkpoints, resume, sample grids, trackers and data are the shared loop's (train/engine/loop.py). Writes
OUTPUT/student/, a complete pipeline folder with `model`'s VAE, text encoder, tokenizer and scheduler,
and its model card.
"""

from __future__ import annotations

from sdkd.train.engine.trainer_cli import run_trainer
from sdkd.train.tasks.diffusion_config import FinetuneConfig

SCHEMA = FinetuneConfig


def build(cfg: FinetuneConfig, acc):
    # Imported here, after the arguments are read: --help and launch.sh's config check stay fast.
    from sdkd.train.formats.model_files import save_pipeline
    from sdkd.train.models.teacher import PipelineSource
    from sdkd.train.tasks.diffusion import (
        DiffusionTask,
        frozen_parts,
        load_dataset,
        load_finetune_parts,
        trained_module,
    )
    from sdkd.train.tasks.objective import build_encoder

    dataset = load_dataset(cfg, acc)
    run = load_finetune_parts(cfg, acc)
    unet = run.parts.unet.float()
    unet.requires_grad_(True)
    unet.train()
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = PipelineSource.of(cfg, "model")
    task = DiffusionTask(
        cfg, acc, trained_module(cfg, unet), build_encoder(cfg.data, run.parts, dataset, acc.device), run.objective,
        run.parts, export=lambda out: [save_pipeline(unet, model, out / "student", cfg.loss.prediction_type, run=out)],
        frozen=dict(teacher=run.teacher and run.teacher.unet, **frozen_parts(run.parts)),
        reference_unet=run.teacher.unet if run.teacher else None, frozen_source=model,
    )
    return task, dataset


if __name__ == "__main__":
    run_trainer(SCHEMA, build, __doc__, __file__)
