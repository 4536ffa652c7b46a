"""Fine-tune a Stable Diffusion U-Net (a distilled student, or any SD-1.x/2.x pipeline) on your data.

    accelerate launch train/finetune.py --config configs/portrait.yaml data.path=/data/portraits [key=value ...]

The task loss (min-SNR weighted with `loss.snr_gamma`), optionally continued KD from `teacher`
(`loss.lambda_out`; `loss.lambda_feat` with `student` describing `model`'s layout). Loop, EMA,
checkpoints, resume, sample grids, trackers and data are train/kd.py's (`Trainer`). Writes
OUTPUT/student/, a complete pipeline folder with `model`'s VAE, text encoder, tokenizer and scheduler,
and its model card.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


from sdkd.data.sources import build_dataset
from sdkd.train.config import FinetuneConfig, load_trainer_config
from sdkd.train.distributed import main_process_first
from sdkd.cli.errors import UserError, run_cli
from sdkd.train.model_files import save_pipeline
from sdkd.train.loop import Trainer, make_accelerator, weight_dtype
from sdkd.train.losses import KDLoss
from sdkd.train.objective import DiffusionObjective, build_encoder, kd_objective, set_prediction_type
from sdkd.train.teacher import PipelineParts, PipelineSource, freeze, load_teacher


@dataclass
class Run:
    """What the fine-tune and LoRA trainers share: data, `model`'s parts, the optional teacher, the objective."""

    dataset: object
    parts: PipelineParts       # `model`: U-Net (trained, or frozen under a LoRA), frozen VAE and text encoder
    teacher: PipelineParts | None
    objective: DiffusionObjective


def prepare_run(cfg: FinetuneConfig, acc) -> Run:
    """Load data, `model` and the teacher (only when a KD term is on); freeze all but `model`'s U-Net.

    The U-Net is returned as loaded (fp32 on CPU); the caller makes it trainable or puts an adapter on it."""
    # Data mistakes fail fast, on every process at once; a hf source prepares its arrow cache once.
    dataset = main_process_first(acc, lambda: build_dataset(cfg.data, cfg.train.seed))
    # From a latent cache no VAE or text encoder runs in the step (sample grids load them when due).
    parts = load_teacher(PipelineSource.of(cfg, "model"), with_encoders=cfg.data.cache is None, what="model")
    needs_teacher = KDLoss.from_config(cfg.loss).needs_teacher
    teacher = load_teacher(PipelineSource.of(cfg), with_encoders=False) if needs_teacher else None
    set_prediction_type(parts.scheduler, cfg.loss.prediction_type, teacher.scheduler if teacher else None, cfg.teacher)
    if teacher is not None:
        ours, theirs = parts.scheduler.config.prediction_type, teacher.scheduler.config.prediction_type
        if ours != theirs:
            raise UserError(f"teacher '{cfg.teacher}' predicts {theirs}, model '{cfg.model}' {ours}: continued KD "
                            f"needs the same prediction type")

    # Feature KD: `student` says how `model` was cut from the teacher.
    objective = kd_objective(cfg, parts.scheduler, parts.unet, teacher.unet if teacher else None,
                             cfg.data.resolution // parts.vae_scale_factor, acc.autocast)

    dtype = weight_dtype(acc)
    for frozen in (parts.vae, parts.text_encoder, teacher.unet if teacher else None):
        if frozen is not None:
            freeze(frozen, acc.device, dtype)
    acc.print(f"model {cfg.model}: U-Net {sum(p.numel() for p in parts.unet.parameters()):,} params"
              + (f"; continued KD from {cfg.teacher} ({objective.num_feature_pairs} feature pairs)" if teacher else "")
              + f"; on {acc.num_processes} processes")
    acc.print(f"data: {len(dataset):,} samples per epoch from "
              + (f"the latent cache {cfg.data.cache}" if cfg.data.cache else f"data.source={cfg.data.source}"))
    return Run(dataset, parts, teacher, objective)


def main() -> None:
    cfg = load_trainer_config(__file__, sys.argv[1:], __doc__)
    acc = make_accelerator(cfg)
    run = prepare_run(cfg, acc)
    unet = run.parts.unet.float()
    unet.requires_grad_(True)
    unet.train()
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    Trainer(
        cfg=cfg, accelerator=acc, model=unet, objective=run.objective,
        encoder=build_encoder(cfg.data, run.parts, run.dataset, acc.device),
        dataset=run.dataset, parts=run.parts,
        export=lambda trained, out: [save_pipeline(trained, PipelineSource.of(cfg, "model"), out / "student",
                                                   cfg.loss.prediction_type, run=out)],
        reference_unet=run.teacher.unet if run.teacher else None, frozen_source=PipelineSource.of(cfg, "model"),
    ).fit()


if __name__ == "__main__":
    run_cli(main)
