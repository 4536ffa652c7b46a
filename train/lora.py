"""Train a LoRA (peft) on a student's U-Net, and optionally its text encoder.

    accelerate launch train/lora.py --config configs/lora.yaml model=runs/tiny/student data.path=/data/set

`model` stays frozen; only the adapter trains, with train/finetune.py's data, objective (task loss,
min-SNR, optional continued KD) and train/kd.py's loop, EMA, checkpoints (the adapter only), resume,
sample grids and trackers. Writes OUTPUT/pytorch_lora_weights.safetensors (diffusers format: plain
diffusers `pipe.load_lora_weights(OUTPUT)` and `eval/sample.py --lora` load it; the base model and
its U-Net layout are in the file's metadata) and, for layouts stable-diffusion.cpp runs,
OUTPUT/lora_sdcpp.safetensors; the model card OUTPUT/README.md beside them.
"""

from __future__ import annotations

import sys

import torch

from sdkd.train import lora_io
from sdkd.train.config import load_trainer_config
from sdkd.cli.errors import run_cli
from sdkd.train.model_files import write_lora_card
from sdkd.train.finetune import prepare_run
from sdkd.train.ldm_layout import UnsupportedLayout
from sdkd.train.loop import Trainer, make_accelerator, weight_dtype
from sdkd.train.objective import BatchEncoder, StepRandom, build_encoder
from sdkd.train.teacher import PipelineSource, freeze


class TokenEncoder(BatchEncoder):
    """Latents and token ids: with a text-encoder LoRA the text encoder runs inside the trained module."""

    def __call__(self, batch: dict, rng: StepRandom) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents(batch, rng), self.tokenize(batch["captions"])


def main() -> None:
    cfg = load_trainer_config(__file__, sys.argv[1:], __doc__)
    acc = make_accelerator(cfg)
    run = prepare_run(cfg, acc)
    unet, text_encoder = run.parts.unet, run.parts.text_encoder if cfg.lora.train_text_encoder else None
    freeze(unet, acc.device, weight_dtype(acc))  # the base weights: frozen, in the mixed-precision dtype
    lora_io.add_adapters(unet, text_encoder, cfg.lora, seed=cfg.train.seed)
    for model in (unet, text_encoder):
        if model is not None:
            for p in model.parameters():  # the adapter trains in fp32 whatever the base's dtype
                if p.requires_grad:
                    p.data = p.data.float()
    unet.train()
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trained = unet if text_encoder is None else lora_io.TextConditionedUNet(unet, text_encoder)
    if text_encoder is not None:
        encoder = TokenEncoder(run.parts.vae, run.parts.text_encoder, run.parts.tokenizer)
    else:
        encoder = build_encoder(cfg.data, run.parts, run.dataset, acc.device)
    n_train = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    acc.print(f"LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.target_modules)}"
              + (" and the text encoder" if text_encoder is not None else "") + f": {n_train:,} trained params")

    def export(model, out):
        files = [lora_io.save_lora(out, unet, text_encoder, cfg.model)]
        if cfg.lora.sdcpp:
            try:
                files.append(lora_io.export_sdcpp(files[0], out / lora_io.SDCPP_FILE))
            except UnsupportedLayout as err:
                print(f"note: no {lora_io.SDCPP_FILE}: {err}", file=sys.stderr)
        write_lora_card(out, files)
        return files

    Trainer(
        cfg=cfg, accelerator=acc, model=trained, objective=run.objective, encoder=encoder,
        dataset=run.dataset, parts=run.parts, export=export,
        reference_unet=run.teacher.unet if run.teacher else None,
        state=lora_io.LoraState(unet, text_encoder, cfg.model), sample_unet=unet,
        frozen_source=PipelineSource.of(cfg, "model"),
    ).fit()


if __name__ == "__main__":
    run_cli(main)
