"""The schemas of the U-Net trainers: `KDConfig` (train/kd.py), `FinetuneConfig` (train/finetune.py: KD's
keys plus `model`, the teacher optional) and `LoraTrainConfig` (train/lora.py: plus `lora`), and what the
other trainers with a teacher take from them: `TeacherRunConfig` (the teacher and the license of what
the run writes), and `UNetTrainConfig` and `SamplePromptsConfig` for train/one_step.py's U-Net.

Nothing heavy is imported here: config loading and --help stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from sdkd.cli.errors import require
from sdkd.data.sources.config import Section
from sdkd.train.engine.config import EvalConfig, OptimConfig, RunConfig, TrainConfig
from sdkd.train.formats.lora_config import LoraSection
from sdkd.train.losses.config import LossConfig, TriplesConfig
from sdkd.train.models.student_config import StudentConfig


@dataclass
class TeacherRunConfig(RunConfig):
    """A run that learns from a teacher pipeline, and writes a model card (every trainer's but the VAE's)."""

    teacher: str = MISSING
    """Teacher: hub id, local diffusers folder, "toy" / "toy_sdxl" (the trained toy teachers committed with sdkd), or
    any other model name (train/models/names.py: a run, a checkpoint, an sdkd single file)."""
    teacher_revision: Optional[str] = None
    """Hub revision of the teacher (branch, tag or commit); null: the default branch."""
    teacher_variant: Optional[str] = None
    """Weight files of the teacher to load, e.g. fp16 for *.fp16.safetensors; null: the plain ones."""
    license: str = "creativeml-openrail-m"
    """License named in the model card of what the run writes (a Hugging Face license id). Default: SD-1.x's
    CreativeML OpenRAIL-M, whose use restrictions carry over to derivatives such as distilled students,
    fine-tunes and LoRAs; openrail++ for an SD-2.x teacher or model; your base model's license otherwise."""

    def check_inputs(self) -> None:
        """The data's path, and the models the config names (`teacher`, and `model` where a trainer has one),
        resolved without loading them (train/models/names.py: a hub id not in the cache is looked up once)."""
        super().check_inputs()
        from sdkd.train.models.names import resolve_model

        for key in ("teacher", "model"):
            if name := getattr(self, key, None):
                resolve_model(name, key, getattr(self, f"{key}_revision", None))


@dataclass
class UNetTrainConfig(TrainConfig):
    gradient_checkpointing: bool = False
    """Recompute student activations in backward to save memory."""


@dataclass
class SamplePromptsConfig(Section):
    """The fixed prompts a run samples and their image size; train/one_step.py's whole `sample` section."""

    prompts: list[str] = field(
        default_factory=lambda: ["a red circle on a blue background", "a portrait photo of an astronaut"]
    )
    """Fixed prompts sampled during training."""
    resolution: Optional[int] = None
    """Image size; null uses data.resolution."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0), f"{at}.resolution",
                "must be a multiple of 8, or null")
        require(bool(self.prompts), f"{at}.prompts", "at least one prompt")


@dataclass
class SampleConfig(SamplePromptsConfig):
    seed: int = 1234
    """Seed of the first prompt; prompt i uses seed + i."""
    steps: int = 25
    """Sampler steps (DPM-Solver++)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.steps > 0, f"{at}.steps", "must be > 0")
        require(self.guidance_scale >= 0, f"{at}.guidance_scale", "must be >= 0")


@dataclass
class TriplesEvalConfig(EvalConfig, TriplesConfig):
    """Teacher agreement on held-out triples, every eval.every steps."""


@dataclass
class KDConfig(TeacherRunConfig):
    """train/kd.py: a block-removed student distilled from the teacher (task loss, output and feature KD)."""

    train: UNetTrainConfig = field(default_factory=UNetTrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: TriplesEvalConfig = field(default_factory=TriplesEvalConfig)
    """In-loop evaluation (needs a teacher): the student's noise predictions against its teacher's on the held-out
    triples (made at the first evaluation, kept in OUTPUT/eval_triples.safetensors with the teacher's
    predictions), logged as eval/noise_mse (and eval/noise_mse_tT per timestep) beside the losses."""


@dataclass
class FinetuneConfig(KDConfig):
    """train/finetune.py: train `model` on its own data with the task loss, optionally continuing KD from
    a teacher (output KD; feature KD when `student` describes `model`'s layout relative to the teacher)."""

    teacher: Optional[str] = None
    """Optional teacher for continued KD (loss.lambda_out, loss.lambda_feat): hub id, diffusers folder, "toy" or
    "toy_sdxl"."""
    model: str = MISSING
    """The pipeline to train: a diffusers folder (e.g. a distilled student's OUTPUT/student), a hub id, "toy" or
    "toy_sdxl". Its VAE, text encoder, tokenizer and scheduler are used for training, sampling and the export."""
    model_revision: Optional[str] = None
    """Hub revision of `model` (branch, tag or commit); null: the default branch."""
    model_variant: Optional[str] = None
    """Weight files of `model` to load, e.g. fp16 for *.fp16.safetensors; null: the plain ones."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """Only read when loss.lambda_feat > 0: the block removal that makes `model`'s layout from the teacher's,
    which gives the feature pairs (checked by shape at start-up)."""
    loss: LossConfig = field(default_factory=lambda: LossConfig(lambda_out=0.0, lambda_feat=0.0))
    """Fine-tuning defaults: task loss only; lambda_out / lambda_feat > 0 need a teacher."""

    def check(self, at: str) -> None:
        super().check(at)
        for name in ("lambda_out", "lambda_feat"):
            require(self.teacher is not None or getattr(self.loss, name) == 0, f"loss.{name}",
                    "continued KD needs a teacher: set teacher, or set this to 0")
        require(self.eval.every == 0 or self.teacher is not None, "eval.every",
                "in-loop evaluation compares the model with a teacher: set teacher, or eval.every=0")


@dataclass
class LoraTrainConfig(FinetuneConfig):
    """train/lora.py: a LoRA (peft) on `model`'s U-Net (and optionally its text encoder); everything else as
    train/finetune.py, whose `model` stays frozen."""

    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    """LoRA default: lr 1e-4 (BK-SDM's and segmind's LoRA recipes)."""

    def check(self, at: str) -> None:
        super().check(at)
        te = self.lora.train_text_encoder
        require(not (te and self.data.cache is not None), "data.cache",
                "a latent cache holds text embeddings: it cannot be used with lora.train_text_encoder=true")
        require(not (te and self.teacher is not None), "teacher",
                "continued KD with lora.train_text_encoder=true is not supported (the teacher would need the "
                "adapted text embeddings); drop the teacher or the text-encoder LoRA")
