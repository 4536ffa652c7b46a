"""Turn a student U-Net into a one-step generator: SDXS's stage 3 (arXiv 2403.16627 sec. 3.2), in the form
DMD2 (arXiv 2405.14867) publishes, whose training scheme SDXS's authors call identical.

    accelerate launch train/one_step.py --config configs/sdxs_one_step.yaml [key=value ...]

The student (`model`: a KD run's student/ folder; null: cut from the teacher by `student.preset`) maps
pure noise, read as x_T at t = T-1, to an epsilon prediction and so to clean latents x0 in one step.

1. ODE pairs (eq. 10): for `pairs.count` prompts (the captions of `data`, or `pairs.prompt_file`) the
   frozen teacher solves from fixed noise with `pairs.steps` DPM-Solver++ (or DDIM) steps at
   `pairs.guidance_scale`; made once, cached (`pairs.cache`), reused while the settings match. A
   held-out set (`pairs.eval_count`, the `sample.prompts`, other noise) measures progress.
2. Warm-up (`distill.warmup_steps`): the student alone, on L_FM = Σ_l w_l (1 - SSIM) between feature
   maps of its one-step output and of the teacher's ODE output for the same noise (`fm.extractor`: the
   teacher U-Net's encoder by default; VGG or DINOv2 from local weights).
3. Segmented score distillation (eq. 11, Algorithm 1): an online ("fake") score model starts as the
   offline frozen teacher (`online.kind`: a full copy, or a LoRA on the teacher's U-Net switched off for
   the teacher's own predictions, as SwiftBrush: two U-Nets in memory instead of three) and learns the
   student's samples with the diffusion loss every step; every `distill.student_every`-th step the student
   gets DMD2's normalised score difference (real: the teacher with CFG `distill.real_guidance_scale`;
   fake: the online model) at t ~ U[t_min T, α T], plus λ_FM L_FM in place of the high-noise segment.
   α and λ_FM fall linearly (`distill.alpha`, `distill.lambda_fm`). Optional: DMD2's classifier head on
   the online model's bottleneck, an adversarial term (`gan.weight`, off by default).

`eval.every`: on the held-out pairs, the latent MSE (`eval/ode_mse`), L_FM (`eval/fm`) and image PSNR
(`eval/psnr`) of the one-step student against the teacher's multi-step output. Writes OUTPUT/student/, a
diffusers pipeline folder that samples in one step (scheduler timesteps "trailing": t = 999), with the
teacher's text encoder and the decoder of `decoder` (null: the teacher's VAE; an AutoencoderTiny folder
or TAESD .safetensors, e.g. a train/tiny_decoder.py run's OUTPUT/tiny_decoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import auto
from pathlib import Path
from typing import Optional

from sdkd.cli.errors import require
from sdkd.data.sources.config import Choice
from sdkd.train.engine.config import Config
from sdkd.train.engine.trainer_cli import run_trainer


class OdeSolver(Choice):
    dpmsolver = auto()
    ddim = auto()


class Extractor(Choice):
    unet_encoder = auto()
    vgg = auto()
    dinov2 = auto()


class OnlineKind(Choice):
    copy = auto()
    lora = auto()


@dataclass
class PairsSection:
    count: int = 1024
    """Training pairs (noise, teacher ODE output); their prompts cycle through the prompt set."""
    eval_count: int = 16
    """Held-out pairs for eval.every and the sample grids: the sample.prompts in turn, noise of another stream."""
    prompt_file: Optional[str] = None
    """A text file of prompts, one per line; null: the captions of `data` (its first pairs.count samples)."""
    solver: OdeSolver = OdeSolver.dpmsolver
    """The teacher's multi-step solver: dpmsolver (DPM-Solver++) or ddim; timesteps spaced trailing."""
    steps: int = 25
    """Solver steps per pair."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the teacher's solve."""
    seed: int = 0
    """Pair i's noise is seeded seed + i (held-out pair i: seed + 2**32 + i)."""
    batch_size: int = 8
    """Pairs per teacher call while making them."""
    cache: Optional[str] = None
    """Folder of the pairs (train.* and held_out.* with their JSON manifests), reused by any run whose settings
    match; null: OUTPUT/ode_pairs."""


@dataclass
class FeatureMatchingSection:
    extractor: Extractor = Extractor.unet_encoder
    """Feature maps L_FM compares: unet_encoder (the teacher U-Net's down and mid blocks on the latents),
    vgg (VGG16's LPIPS taps) or dinov2 (four blocks), both on images decoded by the teacher's VAE."""
    weights_path: Optional[str] = None
    """vgg: a VGG16 / LPIPS weight file or folder (train/losses/perceptual.py); dinov2: a local transformers Dinov2Model
    folder. Never downloaded."""
    layers: Optional[list[str]] = None
    """unet_encoder: the teacher U-Net modules whose outputs are compared; null: each down block's output before
    its downsampler and the mid block."""
    layer_weights: Optional[list[float]] = None
    """w_l, one per layer; null: equal weights summing to 1 (the paper gives none)."""
    timestep: int = 0
    """unet_encoder: the timestep the teacher U-Net sees the clean latents at."""
    window: int = 11
    """SSIM's Gaussian window (sigma 1.5), shrunk to fit smaller maps."""
    image_size: int = 224
    """dinov2: the decoded images are resized to this (a multiple of the patch size)."""


@dataclass
class Ramp:
    """A value that goes linearly from `start` to `end` over the first `steps` score-distillation steps."""

    start: float = 1.0
    """At the first score-distillation step."""
    end: float = 1.0
    """From `steps` on."""
    steps: Optional[int] = None
    """Length of the ramp in steps; null: until train.max_steps."""


@dataclass
class DistillSection:
    warmup_steps: int = 200
    """Feature-matching-only steps of the student before score distillation starts (eq. 10)."""
    student_every: int = 10
    """In score distillation the online model updates every step and the student every this many (DMD2: 10)."""
    lambda_dm: float = 1.0
    """Weight of the distribution-matching (score difference) term."""
    real_guidance_scale: float = 1.75
    """Classifier-free guidance of the offline teacher's ("real") score (DMD2 SD-1.5: 1.75)."""
    t_min: float = 0.02
    """The distribution-matching timestep is drawn from [t_min T, α T] (DMD2: 0.02 to 0.98)."""
    alpha: Ramp = field(default_factory=lambda: Ramp(0.98, 0.5))
    """α of eq. 11: the score difference below α T, λ_FM L_FM in place of the segment above it."""
    lambda_fm: Ramp = field(default_factory=lambda: Ramp(1.0, 0.1))
    """λ_FM of eq. 11 (SDXS: start high, lower it once the distributions overlap)."""


@dataclass
class OnlineSection:
    kind: OnlineKind = OnlineKind.copy
    """copy: a trainable full copy of the teacher U-Net (three U-Nets in memory); lora: a LoRA on the frozen
    teacher's U-Net, off for the teacher's own predictions (SwiftBrush; two U-Nets)."""
    lr: Optional[float] = None
    """The online model's learning rate (its other AdamW settings are optim's); null: optim.lr."""
    lora_rank: int = 64
    """lora: rank (SwiftBrush: 64)."""
    lora_alpha: Optional[float] = None
    """lora: alpha (the update is scaled by alpha / rank; SwiftBrush: 108); null: the rank."""
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """lora: U-Net module names (or name suffixes) to adapt (SwiftBrush: to_q, to_v)."""


@dataclass
class GanSection:
    weight: float = 0.0
    """Weight of the student's adversarial term softplus(-D(x)) (DMD2 SD-1.5: 1e-3); 0: no classifier head."""
    lr: Optional[float] = None
    """The classifier head's learning rate; null: the online model's."""
    start: int = 0
    """Score-distillation step the head and the adversarial term start at."""


@dataclass
class OneStepConfig(Config):
    model: Optional[str] = None
    """The student to start from: a diffusers pipeline folder (a train/kd.py run's OUTPUT/student); null: cut from
    the teacher by student.preset (its weights copied, no KD)."""
    decoder: Optional[str] = None
    """The exported pipeline's decoder: an AutoencoderTiny folder (train/tiny_decoder.py's OUTPUT/tiny_decoder) or
    a TAESD-format .safetensors; null: the teacher's VAE."""
    pairs: PairsSection = field(default_factory=PairsSection)
    """The noise -> teacher ODE output pairs (eq. 10) the student learns from, and the held-out ones."""
    fm: FeatureMatchingSection = field(default_factory=FeatureMatchingSection)
    """The feature-matching loss L_FM: the warm-up's, and λ_FM's term in score distillation."""
    distill: DistillSection = field(default_factory=DistillSection)
    """The phases: warm-up, then segmented score distillation (eq. 11, Algorithm 1; DMD2's update)."""
    online: OnlineSection = field(default_factory=OnlineSection)
    """The online ("fake") score model, initialised as the frozen teacher."""
    gan: GanSection = field(default_factory=GanSection)
    """Optional adversarial term: DMD2's classifier head on the online model's bottleneck."""

    def validate(self) -> None:
        p, f, d, o, g = self.pairs, self.fm, self.distill, self.online, self.gan
        require(self.train.num_epochs is None, "train.num_epochs",
                "the one-step trainer's phases count steps: set train.max_steps and train.num_epochs=null")
        # `model` and `decoder` may be the outputs of runs still to come: checked when the run starts.
        for key, path in (("pairs.prompt_file", p.prompt_file), ("fm.weights_path", f.weights_path)):
            require(path is None or Path(path).exists(), key, f"'{path}' not found")
        require(p.count > 0, "pairs.count", "must be > 0")
        require(p.eval_count > 0, "pairs.eval_count", "must be > 0")
        require(p.steps > 0, "pairs.steps", "must be > 0")
        require(p.guidance_scale >= 0, "pairs.guidance_scale", "must be >= 0")
        require(p.seed >= 0, "pairs.seed", "must be >= 0")
        require(p.batch_size > 0, "pairs.batch_size", "must be > 0")
        require(f.extractor == Extractor.unet_encoder or f.weights_path is not None, "fm.weights_path",
                f"fm.extractor={f.extractor} needs local weights (nothing is downloaded)")
        require(f.layers is None or (bool(f.layers) and f.extractor == Extractor.unet_encoder), "fm.layers",
                "a non-empty list of U-Net module names, for fm.extractor=unet_encoder only")
        require(f.layer_weights is None or all(w >= 0 for w in f.layer_weights), "fm.layer_weights",
                "weights must be >= 0")
        require(0 <= f.timestep < 1000, "fm.timestep", "must be in [0, 1000)")
        require(f.window >= 1 and f.window % 2 == 1, "fm.window", "an odd number >= 1")
        require(f.image_size > 0, "fm.image_size", "must be > 0")
        require(d.warmup_steps >= 0, "distill.warmup_steps", "must be >= 0")
        require(d.student_every > 0, "distill.student_every", "must be > 0")
        require(d.lambda_dm >= 0, "distill.lambda_dm", "must be >= 0")
        require(d.real_guidance_scale >= 0, "distill.real_guidance_scale", "must be >= 0")
        require(0 <= d.t_min < 1, "distill.t_min", "must be in [0, 1)")
        for name in ("alpha", "lambda_fm"):
            ramp = getattr(d, name)
            require(ramp.steps is None or ramp.steps >= 0, f"distill.{name}.steps", "must be >= 0 or null")
        for end in ("start", "end"):
            require(d.t_min < getattr(d.alpha, end) <= 1, f"distill.alpha.{end}",
                    f"must be in (distill.t_min, 1] = ({d.t_min}, 1]")
            require(getattr(d.lambda_fm, end) >= 0, f"distill.lambda_fm.{end}", "must be >= 0")
        require(o.lr is None or o.lr > 0, "online.lr", "must be > 0 or null")
        require(o.lora_rank > 0, "online.lora_rank", "must be > 0")
        require(o.lora_alpha is None or o.lora_alpha > 0, "online.lora_alpha", "must be > 0 or null")
        require(bool(o.lora_targets), "online.lora_targets", "at least one module name")
        require(g.weight >= 0, "gan.weight", "must be >= 0 (0: no classifier head)")
        require(g.lr is None or g.lr > 0, "gan.lr", "must be > 0 or null")
        require(g.start >= 0, "gan.start", "must be >= 0")


SCHEMA = OneStepConfig


def build(cfg: OneStepConfig, acc):
    # Imported here, after the arguments are read: --help and launch.sh's config check stay fast.
    from sdkd.train.tasks.one_step import build_one_step_task

    return build_one_step_task(cfg, acc)


if __name__ == "__main__":
    run_trainer(SCHEMA, build, __doc__, __file__)
