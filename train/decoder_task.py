"""The tiny-decoder trainer's task (train/tiny_decoder.py): a tiny decoder and a conditional discriminator,
trained against a frozen teacher VAE decoder."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from torch.utils.data import Dataset, IterableDataset, Subset

from sdkd.cli.errors import UserError
from sdkd.data.sources import collate
from sdkd.train.checkpoints import ModelState
from sdkd.train.adversarial import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from sdkd.train.diffusion_task import load_dataset
from sdkd.train.objective import BatchEncoder, CachedEncoder, StepRandom
from sdkd.train.task import SampleSink, StepContext, Task, TrainedModule, every
from sdkd.train.teacher import PipelineSource, load_teacher
from sdkd.train.weight_files import load_strict, read_weights

TAESD_FILE = "taesd.safetensors"


def tiny_vae_config(vae_config, channels: int = 64) -> dict:
    """An AutoencoderTiny for a teacher VAE: as many x2 upsamplings as the teacher downsamples (SD: 8x, the
    TAESD layout with 3 blocks per level and nearest upsampling, which stable-diffusion.cpp hard-codes)."""
    levels = len(vae_config["block_out_channels"])
    return dict(in_channels=3, out_channels=3, latent_channels=vae_config["latent_channels"],
                encoder_block_out_channels=[channels] * levels, decoder_block_out_channels=[channels] * levels,
                num_encoder_blocks=[1] + [3] * (levels - 1), num_decoder_blocks=[3] * (levels - 1) + [1],
                upsample_fn="nearest", scaling_factor=1.0)


def load_tiny_vae(path: str, vae_config) -> AutoencoderTiny:
    """`decoder.init`: an AutoencoderTiny folder, or a TAESD-format file for the teacher's layout."""
    folder = Path(path)
    if folder.is_dir():
        try:
            return AutoencoderTiny.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as err:
            raise UserError(f"decoder.init '{path}': not an AutoencoderTiny folder ({err})") from None
    vae = AutoencoderTiny(**tiny_vae_config(vae_config))
    # A decoder-only file (sd.cpp's decode mode needs no encoder) leaves the encoder as initialised.
    return load_strict(vae, read_weights(folder, "decoder.init"), "decoder.init", folder,
                       "TAESD weights for the teacher's VAE layout (diffusers AutoencoderTiny keys)",
                       optional=("encoder.",))


class TinyDecoder(torch.nn.Module):
    """The trained module: decodes scaled latents with an AutoencoderTiny's decoder (its encoder stays
    frozen). Its forward is the decode, so a DDP wrapper runs the decoder."""

    def __init__(self, vae: AutoencoderTiny):
        super().__init__()
        self.vae = vae
        vae.encoder.requires_grad_(False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample

    @property
    def last_layer(self) -> torch.nn.Parameter:
        return self.vae.decoder.layers[-1].weight


def psnr(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per image, for images in [-1, 1]."""
    mse = ((images - targets) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    size = min(11, min(images.shape[-2:]) // 2 * 2 - 1)  # an odd Gaussian window no larger than the image
    return structural_similarity_index_measure((images + 1) / 2, (targets + 1) / 2, data_range=1.0,
                                               kernel_size=size)


class DecoderTask(Task):
    """Decoder every step; discriminator from `gan.start` every `gan.every` steps."""

    def __init__(self, cfg, accelerator, teacher_vae, tiny: TinyDecoder, encoder, held_out: torch.Tensor,
                 lpips=None):
        self.cfg, self.accelerator, self.teacher_vae, self.tiny, self.encoder = cfg, accelerator, teacher_vae, tiny, encoder
        self.lpips = lpips
        g = cfg.gan
        self.disc = PatchDiscriminator(tiny.vae.config.latent_channels, tuple(g.channels)) if g.weight > 0 else None
        # Checkpointed as the whole AutoencoderTiny: a checkpoint's decoder/ is a loadable folder.
        self.modules = [TrainedModule("decoder", tiny, cfg.optim, cfg.train.max_grad_norm,
                                      cfg.ema.decay if cfg.ema.enabled else None, ModelState(tiny.vae, "decoder"))]
        if self.disc is not None:
            self.modules.append(TrainedModule("discriminator", self.disc, replace(cfg.optim, lr=g.lr),
                                              cfg.train.max_grad_norm, due=every(g.every, start=g.start)))
        self.frozen = {"teacher_vae": teacher_vae}
        self.held_out = held_out
        self._held_out_targets = None

    def target(self, latents: torch.Tensor) -> torch.Tensor:
        """The teacher decoder's image of scaled latents (the KL decoder takes them unscaled)."""
        vae = self.teacher_vae
        with torch.no_grad(), self.accelerator.autocast():
            unscaled = latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
            return vae.decode(unscaled.to(vae.dtype)).sample.float()

    def train_step(self, ctx: StepContext, batch: dict, rng: StepRandom) -> dict[str, torch.Tensor]:
        d, g = self.cfg.decoder, self.cfg.gan
        latents = self.encoder.latents(batch, rng)
        target = self.target(latents)
        fake = ctx.model("decoder")(latents)
        terms = {}
        if d.lambda_l1_down:
            terms["l1_down"] = F.l1_loss(F.avg_pool2d(fake, d.downsample), F.avg_pool2d(target, d.downsample))
        if d.lambda_l1:
            terms["l1"] = F.l1_loss(fake, target)
        if d.lambda_l2:
            terms["l2"] = F.mse_loss(fake, target)
        if d.lambda_lpips:
            terms["lpips"] = self.lpips(fake, target).mean()
        weights = {"l1_down": d.lambda_l1_down, "l1": d.lambda_l1, "l2": d.lambda_l2, "lpips": d.lambda_lpips}
        loss = sum(weights[name] * value for name, value in terms.items())
        if self.disc is not None and ctx.step >= g.start:
            # The plain discriminator: it gets no loss from the decoder's term.
            adversarial = generator_loss(self.disc(fake, latents), g.loss)
            weight = g.weight * (adaptive_weight(loss, adversarial, self.tiny.last_layer) if g.adaptive else 1.0)
            terms["adversarial"], terms["adversarial_weight"] = adversarial, torch.as_tensor(weight)
            loss = loss + weight * adversarial
        ctx.backward("decoder", loss)
        terms["loss"] = loss
        if self.disc is not None and self.modules[1].due(ctx.step):
            disc = ctx.model("discriminator")
            real_logits, fake_logits = disc(target, latents), disc(fake.detach(), latents)
            terms["disc_loss"] = discriminator_loss(real_logits, fake_logits, g.loss)
            terms["disc_real"], terms["disc_fake"] = real_logits.mean(), fake_logits.mean()
            ctx.backward("discriminator", terms["disc_loss"])
        return {name: value.detach() for name, value in terms.items()}

    def _decode_held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.held_out.to(self.accelerator.device)
        if self._held_out_targets is None:
            self._held_out_targets = self.target(latents)
        was_training = self.tiny.training
        self.tiny.eval()
        with torch.no_grad():
            images = self.tiny(latents).float().clamp(-1, 1)
        self.tiny.train(was_training)
        return images, self._held_out_targets.clamp(-1, 1)

    def evaluate(self, step: int) -> dict[str, float]:
        images, targets = self._decode_held_out()
        return {"psnr": psnr(images, targets).mean().item(), "ssim": ssim(images, targets).item()}

    def sample(self, step: int, sink: SampleSink) -> None:
        images, targets = self._decode_held_out()
        rows = [[_pil(t) for t in targets], [_pil(i) for i in images]]
        captions = [f"latent {i}" for i in range(len(images))]
        sink.grid(rows, captions, ["teacher decoder", f"tiny step {step}"])
        sink.log("samples/tiny_decoder", rows[1], captions)

    def export(self, out: Path) -> list[Path]:
        folder = out / "tiny_decoder"
        self.tiny.vae.save_pretrained(folder, safe_serialization=True)
        # The same tensors (diffusers' AutoencoderTiny names) are what stable-diffusion.cpp's --taesd reads.
        taesd = shutil.copyfile(folder / "diffusion_pytorch_model.safetensors", out / TAESD_FILE)
        return [folder, Path(taesd)]

    def next_steps(self, exported: list[Path]) -> list[tuple[str, str]]:
        folder, taesd = exported
        model = self.cfg.teacher
        return [(f"python eval/sample.py --model {model} --tiny-vae {folder} --prompt 'a prompt' "
                 f"--out {folder.parent / 'generated'}", "images decoded by the tiny decoder"),
                (f"sd -m MODEL.safetensors --taesd {taesd} -p 'a prompt'", "stable-diffusion.cpp with it")]


def _pil(image: torch.Tensor):
    from PIL import Image

    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def split_held_out(dataset: Dataset, n: int) -> tuple[Dataset, list]:
    """The data set less its last `n` samples, and those `n` samples (held out for evaluation)."""
    if isinstance(dataset, IterableDataset):
        raise UserError("train/tiny_decoder.py holds out decoder.eval_latents samples of the data set: use a "
                        "map-style source (synthetic, imagefolder, hf) or a latent cache, not webdataset")
    if len(dataset) <= n:
        raise UserError(f"data: {len(dataset)} samples, but decoder.eval_latents={n} are held out; lower it "
                        f"or add data")
    keep = len(dataset) - n
    return _Training(dataset, range(keep)), [dataset[i] for i in range(keep, len(dataset))]


class _Training(Subset):
    """A Subset that passes the epoch on (augmentation randomness per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_decoder_task(cfg, acc):
    dataset = load_dataset(cfg, acc)
    teacher = load_teacher(PipelineSource.of(cfg), with_unet=False)
    if teacher.vae is None or not hasattr(teacher.vae, "encode") or "block_out_channels" not in teacher.vae.config:
        raise UserError(f"teacher '{cfg.teacher}': its VAE is no AutoencoderKL to distil from")
    dataset, held_out = split_held_out(dataset, cfg.decoder.eval_latents)
    encoder = CachedEncoder(teacher, acc.device) if cfg.data.cache else BatchEncoder(teacher)
    if cfg.data.cache:
        dataset.dataset.check_teacher(teacher, cfg.data.resolution)
    teacher.vae.to(acc.device)
    # Fixed latents for evaluation and grids: the held-out samples with their own draw.
    held_out_latents = encoder.latents(collate(held_out), StepRandom(cfg.eval.seed, acc.device, len(held_out)))
    vae = (load_tiny_vae(cfg.decoder.init, teacher.vae.config) if cfg.decoder.init
           else AutoencoderTiny(**tiny_vae_config(teacher.vae.config, cfg.decoder.channels)))
    tiny = TinyDecoder(vae.float())
    tiny.train()
    lpips = None
    if cfg.decoder.lambda_lpips:
        from sdkd.train.perceptual import load_lpips_vgg

        lpips = load_lpips_vgg(cfg.decoder.lpips_weights, "decoder.lpips_weights", acc.device)
    params = sum(p.numel() for p in vae.decoder.parameters())
    teacher_params = sum(p.numel() for p in teacher.vae.decoder.parameters())
    acc.print(f"teacher decoder {teacher_params:,} params -> tiny decoder {params:,} "
              f"({params / teacher_params:.1%}); "
              + (f"discriminator from step {cfg.gan.start}" if cfg.gan.weight else "no discriminator")
              + f"; {len(held_out_latents)} held-out latents")
    return DecoderTask(cfg, acc, teacher.vae, tiny, encoder, held_out_latents.cpu(), lpips), dataset
