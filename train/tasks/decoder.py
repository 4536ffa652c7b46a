"""The tiny-decoder trainer's task (train/tiny_decoder.py): a tiny decoder and a conditional discriminator,
trained against a frozen teacher VAE decoder; its export (an AutoencoderTiny folder and a TAESD file)."""

from __future__ import annotations

import functools
import json
import shlex
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from safetensors import safe_open
from torch.utils.data import Dataset, IterableDataset, Subset

from sdkd.cli.errors import UserError
from sdkd.cli.files import save_file, save_pretrained
from sdkd.cli.words import counted
from sdkd.data.sources.buckets import sample_buckets
from sdkd.data.sources.core import collate
from sdkd.train.engine.checkpoints import ModelState
from sdkd.train.engine.step_random import StepRandom
from sdkd.train.engine.task import SampleSink, StepContext, Task, TrainedModule, every
from sdkd.train.formats.fingerprint import component_fingerprint
from sdkd.train.formats.model_files import load_parts
from sdkd.train.formats.weight_files import load_strict, read_weights
from sdkd.train.losses.adversarial import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from sdkd.train.models.teacher import PipelineParts, PipelineSource
from sdkd.train.tasks.diffusion import load_dataset
from sdkd.train.tasks.objective import BatchEncoder, CachedEncoder

TAESD_FILE = "taesd.safetensors"
GRID_LATENTS = 8
"""Held-out latents shown in the sample grids (the first ones)."""
UNTRAINED = "untrained (random weights)"
"""What the model card says of an encoder that was never trained (the decoder was, from scratch)."""


def tiny_vae_config(vae_config, channels: int = 64) -> dict:
    """An AutoencoderTiny for a teacher VAE: as many x2 upsamplings as the teacher downsamples (SD: 8x, the
    TAESD layout with 3 blocks per level and nearest upsampling, which stable-diffusion.cpp hard-codes)."""
    levels = len(vae_config["block_out_channels"])
    return dict(in_channels=3, out_channels=3, latent_channels=vae_config["latent_channels"],
                encoder_block_out_channels=[channels] * levels, decoder_block_out_channels=[channels] * levels,
                num_encoder_blocks=[1] + [3] * (levels - 1), num_decoder_blocks=[3] * (levels - 1) + [1],
                upsample_fn="nearest", scaling_factor=1.0)


def sdcpp_problems(config) -> list[str]:
    """Why stable-diffusion.cpp cannot run this AutoencoderTiny's decoder (its TinyDecoder hard-codes the
    TAESD layout: 4 latent channels, width 64, blocks 3-3-3-1, ReLU, nearest x2 upsampling); [] if it can."""
    wanted = dict(latent_channels=4, decoder_block_out_channels=[64] * 4, num_decoder_blocks=[3, 3, 3, 1],
                  act_fn="relu", upsample_fn="nearest", upsampling_scaling_factor=2)
    return [f"{key}={list(config[key]) if isinstance(config[key], (list, tuple)) else config[key]} "
            f"(stable-diffusion.cpp: {value})" for key, value in wanted.items()
            if (list(config[key]) if isinstance(config[key], (list, tuple)) else config[key]) != value]


def _check_layout(vae: AutoencoderTiny, vae_config, path: str) -> AutoencoderTiny:
    """A loaded decoder must take the teacher's latents and upsample as much as the teacher does."""
    levels, ups = len(vae_config["block_out_channels"]), len(vae.config.decoder_block_out_channels)
    factor = vae.config.upsampling_scaling_factor ** (ups - 1)
    if vae.config.latent_channels != vae_config["latent_channels"] or factor != 2 ** (levels - 1):
        raise UserError(f"decoder.init '{path}': an AutoencoderTiny for {vae.config.latent_channels}-channel latents "
                        f"upsampled {factor}x; the teacher's VAE has {vae_config['latent_channels']} channels and "
                        f"downsamples {2 ** (levels - 1)}x")
    return vae


def load_tiny_vae(path: str, vae_config) -> tuple[AutoencoderTiny, str | None]:
    """`decoder.init`: an AutoencoderTiny folder (or a pipeline folder's vae/), or a TAESD-format .safetensors
    (diffusers AutoencoderTiny keys; its encoder optional). Returns the model and where its encoder came from
    (None: it has none trained, so it stays as initialised)."""
    folder = Path(path)
    if folder.is_dir():
        if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"
        try:
            kind = json.loads((folder / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != "AutoencoderTiny":  # diffusers would fill an AutoencoderTiny from other weights at random
            raise UserError(f"decoder.init '{path}': not an AutoencoderTiny folder (its config.json names "
                            f"{kind or 'no model class'})")
        try:
            vae = AutoencoderTiny.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, TypeError, RuntimeError) as err:
            raise UserError(f"decoder.init '{path}': not an AutoencoderTiny folder with safetensors weights "
                            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        card = folder / "README.md"
        untrained = card.is_file() and f"| encoder | {UNTRAINED}" in card.read_text(errors="replace")
        return _check_layout(vae, vae_config, path), None if untrained else f"decoder.init ({path})"
    state = read_weights(folder, "decoder.init")
    config = tiny_vae_config(vae_config)
    if folder.suffix == ".safetensors":  # our export stores its AutoencoderTiny config as metadata
        with safe_open(str(folder), "pt") as f:
            text = (f.metadata() or {}).get("config", "null")
        try:
            config = json.loads(text) or config
        except ValueError:
            raise UserError(f"decoder.init '{path}': its config metadata is not JSON") from None
    first = state.get("decoder.layers.0.weight")
    if first is not None and first.dim() == 4:  # a file of another width than TAESD's 64
        levels = len(config["decoder_block_out_channels"])
        config = dict(config, decoder_block_out_channels=[first.shape[0]] * levels,
                      encoder_block_out_channels=[first.shape[0]] * levels)
    try:
        vae = AutoencoderTiny.from_config(config)
    except (TypeError, ValueError, AttributeError) as err:
        raise UserError(f"decoder.init '{path}': its config metadata is no AutoencoderTiny config ({err})") from None
    # A decoder-only file (stable-diffusion.cpp's decode mode needs no encoder) leaves the encoder as initialised.
    load_strict(vae, state, "decoder.init", folder,
                "TAESD weights for the teacher's VAE layout (diffusers AutoencoderTiny keys)", optional=("encoder.",))
    has_encoder = any(name.startswith("encoder.") for name in state)
    return _check_layout(vae, vae_config, path), f"decoder.init ({path})" if has_encoder else None


def export_tiny_decoder(vae: AutoencoderTiny, out: Path, encoder_from: str | None, card: str = "") -> list[Path]:
    """OUTPUT/tiny_decoder/ (the whole AutoencoderTiny, loadable as a pipeline's `vae`, with `card` as its
    README.md) and OUTPUT/taesd.safetensors: the decoder, under the diffusers names stable-diffusion.cpp's
    `--taesd` reads, plus the encoder only when it is a trained one (`encoder_from`; sd.cpp's img2img needs
    it, its txt2img does not). The file's metadata holds the AutoencoderTiny config (read back by
    `decoder.init`)."""
    folder = Path(out) / "tiny_decoder"
    save_pretrained(vae, folder, safe_serialization=True)
    if card:
        (folder / "README.md").write_text(card)
    parts = ("decoder.", "encoder.") if encoder_from else ("decoder.",)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in vae.state_dict().items()
               if name.startswith(parts)}
    taesd = Path(out) / TAESD_FILE
    save_file(tensors, str(taesd), metadata={"format": "pt", "config": json.dumps(
        {key: value for key, value in vae.config.items() if not key.startswith("_")})})
    return [folder, taesd]


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

    def __init__(self, cfg, accelerator, teacher: PipelineParts, tiny: TinyDecoder, encoder, held_out: torch.Tensor,
                 lpips=None, encoder_from: str | None = None):
        """`teacher`: its VAE is distilled; `encoder_from`: where the tiny VAE's encoder (never trained here) came
        from; None: it is random."""
        self.cfg, self.accelerator, self.teacher_vae, self.tiny = cfg, accelerator, teacher.vae, tiny
        self.family, self.eval_every = teacher.family, cfg.eval.every
        self.encoder, self.lpips, self.encoder_from = encoder, lpips, encoder_from
        g = cfg.gan
        self.disc = None
        if g.weight > 0:
            with torch.random.fork_rng(devices=[]):  # its initial weights depend on train.seed only
                torch.manual_seed(cfg.train.seed + 1)
                self.disc = PatchDiscriminator(tiny.vae.config.latent_channels, tuple(g.channels))
        # Checkpointed as the whole AutoencoderTiny: a checkpoint's decoder/ is a loadable folder.
        self.modules = [TrainedModule("decoder", tiny, cfg.optim, cfg.train.max_grad_norm,
                                      cfg.ema.decay if cfg.ema.enabled else None, ModelState(tiny.vae, "decoder"))]
        if self.disc is not None:
            self.modules.append(TrainedModule("discriminator", self.disc, replace(cfg.optim, lr=g.lr),
                                              cfg.train.max_grad_norm, due=every(g.every, start=g.start)))
        self.frozen = {"vae": teacher.vae}  # the teacher's
        self.held_out = held_out
        self._held_out_targets = None
        self.steps, self.last_eval = 0, None  # for the model card

    def target(self, latents: torch.Tensor) -> torch.Tensor:
        """The teacher decoder's image of scaled latents (the KL decoder takes them unscaled)."""
        vae = self.teacher_vae
        with torch.no_grad(), self.accelerator.autocast():
            unscaled = latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
            return vae.decode(unscaled.to(vae.dtype)).sample.float()

    # ---------------------------------------------------------------------------------------------
    # SDXS eq. 5: L1(G(z) down 8x, x~ down 8x) + lambda_GAN L_GAN(G(z), x~, D), x~ the teacher's decoding.

    def train_step(self, ctx: StepContext, batch: dict, rng: StepRandom) -> dict[str, torch.Tensor]:
        d, g = self.cfg.decoder, self.cfg.gan
        latents = self.encoder.latents(batch, rng)
        target = self.target(latents)
        fake = ctx.model("decoder")(latents).float()
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
            # The plain discriminator (no DDP wrapper: it gets no backward from this term; the loop sends the
            # decoder's loss into the decoder's parameters only).
            adversarial = generator_loss(self.disc(fake, latents), g.loss)
            weight = g.weight * (adaptive_weight(loss, adversarial, self.tiny.last_layer) if g.adaptive else 1.0)
            terms["adversarial"] = adversarial
            terms["adversarial_weight"] = torch.as_tensor(weight, dtype=torch.float32, device=loss.device)
            loss = loss + weight * adversarial
        ctx.backward("decoder", loss)
        terms["loss"] = loss
        if self.disc is not None and self.modules[1].due(ctx.step):
            # Real and fake in one forward (one DDP forward per backward; GroupNorm keeps samples apart).
            logits = ctx.model("discriminator")(torch.cat([target, fake.detach()]), torch.cat([latents, latents]))
            real_logits, fake_logits = logits.chunk(2)
            terms["disc_loss"] = discriminator_loss(real_logits, fake_logits, g.loss)
            terms["disc_real"], terms["disc_fake"] = real_logits.mean(), fake_logits.mean()
            ctx.backward("discriminator", terms["disc_loss"])
        self.steps = ctx.step + 1
        return {name: value.detach() for name, value in terms.items()}

    # ---------------------------------------------------------------------------------------------
    # Held-out latents: PSNR / SSIM against the teacher decoder, and the sample grid.

    def _decode_held_out(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The tiny and the teacher decoder's images of the first `n` held-out latents (all: None), decoded
        train.batch_size at a time (64 latents of 512 px at once would not fit a GPU)."""
        size = self.cfg.train.batch_size
        latents = self.held_out.to(self.accelerator.device)
        if self._held_out_targets is None:
            self._held_out_targets = torch.cat([self.target(latents[i:i + size]) for i in range(0, len(latents), size)])
        latents = latents[:n]
        was_training = self.tiny.training
        self.tiny.eval()
        with torch.no_grad():
            images = torch.cat([self.tiny(latents[i:i + size]).float() for i in range(0, len(latents), size)])
        self.tiny.train(was_training)
        return images.clamp(-1, 1), self._held_out_targets[:n].clamp(-1, 1)

    def evaluate(self, step: int) -> dict[str, float]:
        images, targets = self._decode_held_out()
        metrics = {"psnr": psnr(images, targets).mean().item(), "ssim": ssim(images, targets).item()}
        self.last_eval = (step, metrics)
        return metrics

    def sample(self, step: int, sink: SampleSink) -> None:
        images, targets = self._decode_held_out(GRID_LATENTS)
        rows = [[_pil(t) for t in targets], [_pil(i) for i in images]]
        captions = [f"latent {i}" for i in range(len(images))]
        sink.grid(rows, captions, ["teacher decoder", f"tiny step {step}"])
        sink.log("samples/tiny_decoder", rows[1], captions)

    # ---------------------------------------------------------------------------------------------
    # Export

    def export(self, out: Path) -> list[Path]:
        return export_tiny_decoder(self.tiny.vae, out, self.encoder_from, self.card())

    def card(self) -> str:
        """The exported folder's README.md."""
        cfg, vae = self.cfg, self.tiny.vae
        params = sum(p.numel() for p in vae.decoder.parameters())
        teacher_params = sum(p.numel() for p in self.teacher_vae.decoder.parameters())
        problems = sdcpp_problems(vae.config)
        rows = [("teacher", f"`{cfg.teacher}` (its VAE decoder is the target)"), ("steps", self.steps),
                ("started from", f"`{cfg.decoder.init}`" if cfg.decoder.init else "scratch"),
                ("decoder params", f"{params:,} ({params / teacher_params:.1%} of the teacher decoder's "
                                   f"{teacher_params:,})"),
                ("encoder", f"from {self.encoder_from}" if self.encoder_from else UNTRAINED)]
        if self.last_eval:
            step, m = self.last_eval
            rows.append(("PSNR / SSIM vs the teacher decoder",
                         f"{m['psnr']:.2f} dB / {m['ssim']:.4f} (step {step}, {len(self.held_out)} held-out latents)"))
        rows.append(("stable-diffusion.cpp", f"`../{TAESD_FILE}` with `--taesd`" if not problems
                     else "cannot run this layout: " + "; ".join(problems)))
        lines = ["---", f"license: {cfg.license}", "library_name: diffusers", "tags:", "- stable-diffusion",
                 "- taesd", "- sdkd", "---", "", f"# Tiny decoder for `{cfg.teacher}`", "",
                 "A diffusers `AutoencoderTiny` (TAESD layout) whose decoder was distilled from the teacher's VAE "
                 "decoder with sdkd's `train/tiny_decoder.py` (SDXS stage 2). It decodes the scaled latents the "
                 "U-Net makes.", "", "| | |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows], ""]
        if not self.encoder_from:
            lines += ["Only the decoder was trained: do not encode images with this folder (img2img needs an "
                      "encoder; start from `decoder.init` with TAESD weights to carry one over).", ""]
        lines += ["```python", "from diffusers import AutoencoderTiny, StableDiffusionPipeline", "",
                  'vae = AutoencoderTiny.from_pretrained("tiny_decoder")',
                  f'pipe = StableDiffusionPipeline.from_pretrained("{self._teacher_folder()}", vae=vae)', "```", ""]
        return "\n".join(lines)

    def _teacher_folder(self) -> str:
        """The teacher as diffusers' `from_pretrained` takes it: a pipeline folder (toy's, a hub id's snapshot in the
        local cache) or a hub id; a placeholder for a teacher that is no pipeline (a run, a single file)."""
        from sdkd.train.models.names import PIPELINE_KINDS, resolve_model

        try:
            ref = resolve_model(self.cfg.teacher, "teacher", self.cfg.teacher_revision)
        except UserError:  # the hub gone since the run started: say what to put there
            return "TEACHER_FOLDER"
        return ref.path if ref.kind in PIPELINE_KINDS else "TEACHER_FOLDER"

    def next_steps(self, exported: list[Path]) -> list[tuple[str, str]]:
        folder, taesd = exported
        steps = [(f"python eval/sample.py --model {shlex.quote(self._teacher_folder())} --tiny-vae "
                  f"{shlex.quote(str(folder))} --prompt 'a prompt' "
                  f"--out {shlex.quote(str(folder.parent / 'generated'))}", "images decoded by the tiny decoder")]
        if not sdcpp_problems(self.tiny.vae.config):
            steps.append((f"sd -m MODEL.safetensors --taesd {shlex.quote(str(taesd))} -p 'a prompt'",
                          "stable-diffusion.cpp with it"))
        return steps


def _pil(image: torch.Tensor):
    from PIL import Image

    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def split_held_out(dataset: Dataset, n: int) -> tuple[Dataset, list]:
    """The data set less its last `n` samples, and those `n` samples (held out for evaluation). With size
    buckets, the last `n` of the last sample's bucket: the held-out latents are one tensor."""
    if isinstance(dataset, IterableDataset):
        raise UserError("train/tiny_decoder.py holds out decoder.eval_latents samples of the data set: use a "
                        "map-style source (synthetic, imagefolder, hf) or a latent cache, not webdataset")
    buckets = sample_buckets(dataset)
    candidates = np.arange(len(dataset)) if buckets is None else np.flatnonzero(buckets == buckets[-1])
    if len(candidates) <= n:
        raise UserError(f"data: {counted(len(candidates), 'sample')}"
                        f"{'' if buckets is None else ' in the last size bucket'}, "
                        f"but decoder.eval_latents={n} are held out; lower it or add data")
    held = candidates[len(candidates) - n:]
    return (_Training(dataset, np.setdiff1d(np.arange(len(dataset)), held).tolist()),
            [dataset[int(i)] for i in held])


class _Training(Subset):
    """A Subset that passes the epoch on (augmentation randomness per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_decoder_task(cfg, acc):
    dataset = load_dataset(cfg, acc)
    teacher = load_parts(PipelineSource.of(cfg), with_unet=False)
    if teacher.vae is None or not hasattr(teacher.vae, "encode") or "block_out_channels" not in teacher.vae.config:
        raise UserError(f"teacher '{cfg.teacher}': its VAE is no AutoencoderKL to distil from")
    teacher.components |= dict.fromkeys(teacher.family.text_encoders)  # only the VAE is used
    dataset, held_out = split_held_out(dataset, cfg.decoder.eval_latents)
    encoder = CachedEncoder(teacher, acc.device) if cfg.data.cache else BatchEncoder(teacher)
    if cfg.data.cache:
        dataset.dataset.check_teacher(teacher, cfg.data.resolution, functools.partial(component_fingerprint, teacher))
    teacher.vae.to(acc.device)
    # Fixed latents for evaluation and grids: the held-out samples with their own draw.
    held_out_latents = encoder.latents(collate(held_out), StepRandom(cfg.eval.seed, acc.device, len(held_out)))
    if cfg.decoder.init:
        vae, encoder_from = load_tiny_vae(cfg.decoder.init, teacher.vae.config)
    else:
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only
            torch.manual_seed(cfg.train.seed)
            vae, encoder_from = AutoencoderTiny(**tiny_vae_config(teacher.vae.config, cfg.decoder.channels)), None
    tiny = TinyDecoder(vae.float())
    tiny.train()
    lpips = None
    if cfg.decoder.lambda_lpips:
        from sdkd.train.losses.perceptual import load_lpips_vgg

        lpips = load_lpips_vgg(cfg.decoder.lpips_weights, "decoder.lpips_weights", acc.device)
    params = sum(p.numel() for p in vae.decoder.parameters())
    teacher_params = sum(p.numel() for p in teacher.vae.decoder.parameters())
    problems = sdcpp_problems(vae.config)
    acc.print(f"teacher decoder {teacher_params:,} params -> tiny decoder {params:,} "
              f"({params / teacher_params:.1%}); "
              + (f"discriminator from step {cfg.gan.start}" if cfg.gan.weight else "no discriminator")
              + f"; {len(held_out_latents)} held-out latents; encoder "
              + (f"from {encoder_from}" if encoder_from else f"{UNTRAINED}, left out of {TAESD_FILE}")
              + ("" if not problems else f"; stable-diffusion.cpp cannot run this layout ({problems[0]})"))
    return DecoderTask(cfg, acc, teacher, tiny, encoder, held_out_latents.cpu(), lpips, encoder_from), dataset
