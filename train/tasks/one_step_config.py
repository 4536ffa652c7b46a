"""The schema of train/one_step.py: the teacher, the student to start from (`model`, or `student` cut from
the teacher), the exported decoder, and the sections of its phases: the ODE pairs (`pairs`), feature
matching (`fm`), warm-up and score distillation (`distill`), the online score model (`online`) and the
optional adversarial term (`gan`).

Nothing heavy is imported here: config loading and --help stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import auto
from pathlib import Path
from typing import Optional

from sdkd.cli.errors import require
from sdkd.data.sources.config import Choice, Section
from sdkd.train.engine.config import EvalConfig
from sdkd.train.models.student_config import BlockRemovalConfig
from sdkd.train.tasks.diffusion_config import SamplePromptsConfig, TeacherRunConfig, UNetTrainConfig


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
class PairsSection(Section):
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

    def check(self, at: str) -> None:
        super().check(at)
        require(self.prompt_file is None or Path(self.prompt_file).exists(), f"{at}.prompt_file",
                f"'{self.prompt_file}' not found")
        require(self.count > 0, f"{at}.count", "must be > 0")
        require(self.eval_count > 0, f"{at}.eval_count", "must be > 0")
        require(self.steps > 0, f"{at}.steps", "must be > 0")
        require(self.guidance_scale >= 0, f"{at}.guidance_scale", "must be >= 0")
        require(self.seed >= 0, f"{at}.seed", "must be >= 0")
        require(self.batch_size > 0, f"{at}.batch_size", "must be > 0")


@dataclass
class FeatureMatchingSection(Section):
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

    def check(self, at: str) -> None:
        super().check(at)
        require(self.weights_path is None or Path(self.weights_path).exists(), f"{at}.weights_path",
                f"'{self.weights_path}' not found")
        require(self.extractor == Extractor.unet_encoder or self.weights_path is not None, f"{at}.weights_path",
                f"{at}.extractor={self.extractor} needs local weights (nothing is downloaded)")
        require(self.layers is None or (bool(self.layers) and self.extractor == Extractor.unet_encoder), f"{at}.layers",
                f"a non-empty list of U-Net module names, for {at}.extractor=unet_encoder only")
        require(self.layer_weights is None or all(w >= 0 for w in self.layer_weights), f"{at}.layer_weights",
                "weights must be >= 0")
        require(0 <= self.timestep < 1000, f"{at}.timestep", "must be in [0, 1000)")
        require(self.window >= 1 and self.window % 2 == 1, f"{at}.window", "an odd number >= 1")
        require(self.image_size > 0, f"{at}.image_size", "must be > 0")


@dataclass
class Ramp(Section):
    """A value that goes linearly from `start` to `end` over the first `steps` score-distillation steps."""

    start: float = 1.0
    """At the first score-distillation step."""
    end: float = 1.0
    """From `steps` on."""
    steps: Optional[int] = None
    """Length of the ramp in steps; null: until train.max_steps."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.steps is None or self.steps >= 0, f"{at}.steps", "must be >= 0 or null")


@dataclass
class DistillSection(Section):
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

    def check(self, at: str) -> None:
        super().check(at)
        require(self.warmup_steps >= 0, f"{at}.warmup_steps", "must be >= 0")
        require(self.student_every > 0, f"{at}.student_every", "must be > 0")
        require(self.lambda_dm >= 0, f"{at}.lambda_dm", "must be >= 0")
        require(self.real_guidance_scale >= 0, f"{at}.real_guidance_scale", "must be >= 0")
        require(0 <= self.t_min < 1, f"{at}.t_min", "must be in [0, 1)")
        for end in ("start", "end"):
            require(self.t_min < getattr(self.alpha, end) <= 1, f"{at}.alpha.{end}",
                    f"must be in ({at}.t_min, 1] = ({self.t_min}, 1]")
            require(getattr(self.lambda_fm, end) >= 0, f"{at}.lambda_fm.{end}", "must be >= 0")


@dataclass
class OnlineSection(Section):
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

    def check(self, at: str) -> None:
        super().check(at)
        require(self.lr is None or self.lr > 0, f"{at}.lr", "must be > 0 or null")
        require(self.lora_rank > 0, f"{at}.lora_rank", "must be > 0")
        require(self.lora_alpha is None or self.lora_alpha > 0, f"{at}.lora_alpha", "must be > 0 or null")
        require(bool(self.lora_targets), f"{at}.lora_targets", "at least one module name")


@dataclass
class GanSection(Section):
    weight: float = 0.0
    """Weight of the student's adversarial term softplus(-D(x)) (DMD2 SD-1.5: 1e-3); 0: no classifier head."""
    lr: Optional[float] = None
    """The classifier head's learning rate; null: the online model's."""
    start: int = 0
    """Score-distillation step the head and the adversarial term start at."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.weight >= 0, f"{at}.weight", "must be >= 0 (0: no classifier head)")
        require(self.lr is None or self.lr > 0, f"{at}.lr", "must be > 0 or null")
        require(self.start >= 0, f"{at}.start", "must be >= 0")


@dataclass
class OneStepConfig(TeacherRunConfig):
    """train/one_step.py: a one-step student from the teacher's ODE pairs and score distillation."""

    train: UNetTrainConfig = field(default_factory=UNetTrainConfig)
    model: Optional[str] = None
    """The student to start from: a diffusers pipeline folder (a train/kd.py run's OUTPUT/student); null: cut from
    the teacher by student.preset (its weights copied, no KD)."""
    decoder: Optional[str] = None
    """The exported pipeline's decoder: an AutoencoderTiny folder (train/tiny_decoder.py's OUTPUT/tiny_decoder) or
    a TAESD-format .safetensors; null: the teacher's VAE."""
    student: BlockRemovalConfig = field(default_factory=BlockRemovalConfig)
    """Only read when `model` is null: how the student is cut from the teacher's U-Net."""
    sample: SamplePromptsConfig = field(default_factory=SamplePromptsConfig)
    """The held-out pairs' prompts (pairs.eval_count of them, the prompts in turn), shown in the sample grids, and
    the image size of every pair."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """On the held-out pairs: the latent MSE (eval/ode_mse), L_FM (eval/fm) and image PSNR (eval/psnr) of the
    one-step student against the teacher's multi-step output."""
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

    def check(self, at: str) -> None:
        super().check(at)
        # `model` and `decoder` may be the outputs of runs still to come: checked when the run starts.
        require(self.train.num_epochs is None, "train.num_epochs",
                "the one-step trainer's phases count steps: set train.max_steps and train.num_epochs=null")
