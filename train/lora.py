"""Train a LoRA (peft) on a student's U-Net, and optionally its text encoders.

    accelerate launch train/lora.py --config configs/lora.yaml model=runs/tiny/student data.path=/data/set

`model` stays frozen; only the adapter trains, with train/finetune.py's data and objective (task loss,
min-SNR, optional continued KD) and the shared loop's EMA, checkpoints (the adapter only), resume,
sample grids and trackers. Writes OUTPUT/pytorch_lora_weights.safetensors (diffusers format: plain
diffusers `pipe.load_lora_weights(OUTPUT)` and `eval/sample.py --lora` load it; the base model and
its U-Net layout are in the file's metadata) and, for layouts stable-diffusion.cpp runs,
OUTPUT/lora_sdcpp.safetensors; the model card OUTPUT/README.md beside them.
"""

from __future__ import annotations

from sdkd.train.engine.trainer_cli import run_trainer
from sdkd.train.tasks.diffusion_config import LoraTrainConfig

SCHEMA = LoraTrainConfig


def build(cfg: LoraTrainConfig, acc):
    # Imported here, after the arguments are read: --help and launch.sh's config check stay fast.
    import sys

    from sdkd.train.engine.loop import weight_dtype
    from sdkd.train.formats import lora_io
    from sdkd.train.formats.ldm_layout import UnsupportedLayout
    from sdkd.train.formats.model_files import write_lora_card
    from sdkd.train.models.teacher import PipelineSource
    from sdkd.train.tasks.diffusion import (
        DiffusionTask,
        frozen_parts,
        load_dataset,
        load_finetune_parts,
        trained_module,
    )
    from sdkd.train.tasks.lora import TextConditionedUNet, TokenEncoder
    from sdkd.train.tasks.objective import build_encoder

    dataset = load_dataset(cfg, acc)
    run = load_finetune_parts(cfg, acc)
    family, unet = run.parts.family, run.parts.unet
    names = family.text_encoders if cfg.lora.train_text_encoder else ()
    text = {name: run.parts.components[name] for name in names}
    run.parts.freeze(acc.device, weight_dtype(acc), ("unet", *names))  # the base weights, as frozen models are
    lora_io.add_adapters(unet, text, cfg.lora, seed=cfg.train.seed)
    for model in (unet, *text.values()):
        for p in model.parameters():  # the adapter trains in fp32 whatever the base's dtype
            if p.requires_grad:
                p.data = p.data.float()
    unet.train()
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if text:
        # The text encoders run inside the trained module, on what they read of the batch.
        trained = TextConditionedUNet(unet, family, text)
        encoder = TokenEncoder(run.parts)
    else:
        trained, encoder = unet, build_encoder(cfg.data, run.parts, dataset, acc.device)
    n_train = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    acc.print(f"LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.target_modules)}"
              + (" and the text encoder" + "s" * (len(text) > 1) if text else "") + f": {n_train:,} trained params")

    def export(out):
        files = [lora_io.save_lora(out, unet, text, cfg.model)]
        if cfg.lora.sdcpp:
            try:
                files.append(lora_io.export_sdcpp(files[0], out / lora_io.SDCPP_FILE))
            except UnsupportedLayout as err:
                print(f"note: no {lora_io.SDCPP_FILE}: {err}", file=sys.stderr)
        write_lora_card(out, files, family)
        return files

    task = DiffusionTask(
        cfg, acc, trained_module(cfg, trained, lora_io.LoraState(unet, text, cfg.model)), encoder,
        run.objective, run.parts, export,
        # A text encoder with an adapter is trained, not frozen: the loop must not cast it.
        frozen=dict(teacher=run.teacher and run.teacher.unet, **frozen_parts(run.parts, *text.values())),
        reference_unet=run.teacher.unet if run.teacher else None, sample_unet=unet,
        frozen_source=PipelineSource.of(cfg, "model"),
    )
    return task, dataset


if __name__ == "__main__":
    run_trainer(SCHEMA, build, __doc__, __file__)
