"""Typed configuration: YAML recipes merged into dataclasses, dotted overrides, validation.

Every trainer script declares the schema it reads as `SCHEMA` and loads it with `load_trainer_config`:
`Config` (train/kd.py), `FinetuneConfig` (train/finetune.py: `Config` plus `model`, teacher optional) or
`LoraTrainConfig` (train/lora.py: plus `lora`). A recipe in `configs/` sets what differs from these defaults;
`key=value` arguments after `--config` override it. Unknown keys, wrong types, values outside a `Choice`,
missing required values and impossible combinations raise `ConfigError` with the dotted key.
"""

from __future__ import annotations

import argparse
import ast
import enum
import functools
import inspect
import json
import math
import re
import sys
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from enum import auto
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdkd.cli.errors import ConfigError, first_line, require
from sdkd.data.sources.config import Choice, DataConfig, check_data, expected_one_of

try:
    from omegaconf._yaml import get_yaml_loader  # omegaconf >= 2.4
except ImportError:
    from omegaconf._utils import get_yaml_loader  # omegaconf 2.3


# ---------------------------------------------------------------------------------------------
# Schema


class StudentPreset(Choice):
    """train/models/students.py's PRESETS (a test keeps them equal: that module imports diffusers), or custom."""

    bk_base = auto()
    bk_small = auto()
    bk_tiny = auto()
    sdxs = auto()
    ssd1b = auto()
    vega = auto()
    koala_1b = auto()
    koala_700m = auto()
    custom = auto()


class FeaturePairs(Choice):
    bk = auto()
    segmind = auto()
    custom = auto()


class PredictionType(Choice):
    epsilon = auto()
    v_prediction = auto()


class MixedPrecision(Choice):
    no = auto()
    fp16 = auto()
    bf16 = auto()


class AdamWImplementation(Choice):
    # enum.auto: the member `auto` shadows the bare name in the rest of this class body.
    auto = enum.auto()
    fused = enum.auto()
    foreach = enum.auto()
    loop = enum.auto()


class LRScheduler(Choice):
    """diffusers.optimization.SchedulerType's names (a test pins them: this module imports no diffusers);
    piecewise_constant is left out: it needs step rules this config does not carry."""

    constant = auto()
    constant_with_warmup = auto()
    linear = auto()
    cosine = auto()
    cosine_with_restarts = auto()
    polynomial = auto()


class Tracker(Choice):
    wandb = auto()
    tensorboard = auto()
    none = auto()


@dataclass
class StudentConfig:
    preset: StudentPreset = StudentPreset.bk_small
    """Block-removal preset (bk_base, bk_small, bk_tiny, sdxs: SD-1.x/2.x teachers; ssd1b, vega, koala_1b,
    koala_700m: SDXL teachers); custom: set keep_down/keep_up instead."""
    keep_down: Optional[list[list[int]]] = None
    """custom: per teacher down block, the resnet (and attention) indices the student keeps."""
    keep_up: Optional[list[list[int]]] = None
    """custom: per teacher up block, the resnet (and attention) indices kept; the last one must be kept."""
    mid_block: bool = True
    """custom: keep the mid block."""
    deepest_stage: bool = True
    """custom: keep the deepest down block and its matching up block."""
    drop_attention: list[int] = field(default_factory=list)
    """custom: teacher levels (0 = highest resolution) where the student has no attention (sdxs: [0])."""
    mid_attention: bool = True
    """custom: false replaces the kept mid block by one resnet (diffusers' UNetMidBlock2D, as in SSD-1B and
    Vega), copied from the teacher's first mid resnet."""
    transformer_layers_per_block: Optional[list[Any]] = None
    """custom: per teacher down block, the transformer depth of each kept attention: a depth for all, or a list
    with one per kept index (entries of blocks without attention are ignored); null: the teacher's. The
    deepest entry also sets the mid block's depth, as diffusers builds it."""
    reverse_transformer_layers_per_block: Optional[list[Any]] = None
    """custom: the same per teacher up block; null: the teacher's, or, for a teacher that lists none, each up
    block at its level's depth in transformer_layers_per_block (diffusers' rule)."""
    layer_init: Any = "first"
    """Which teacher transformer layers seed a student attention shallower than its teacher source: first (the
    first k), even (k evenly spaced, first and last included), or {student attention: [teacher layer
    indices]} naming every shallower attention (train/show_student.py lists them)."""
    feature_pairs: FeaturePairs = FeaturePairs.bk
    """Feature-KD pair table: bk (BK-SDM's), segmind (segmind's), or custom (then set pairs)."""
    pairs: Optional[list[list[str]]] = None
    """custom: [teacher_module, student_module] names; checked by shape at start-up."""


@dataclass
class LossConfig:
    lambda_task: float = 1.0
    """Weight of MSE(student prediction, diffusion target)."""
    lambda_out: float = 1.0
    """Weight of MSE(student prediction, teacher prediction)."""
    lambda_feat: float = 1.0
    """Weight of the sum over feature pairs of MSE(student feature, teacher feature)."""
    snr_gamma: Optional[float] = None
    """Min-SNR-gamma weighting applied to every term (5.0 is usual); null disables it."""
    noise_offset: float = 0.0
    """diffusers' noise offset: noise += noise_offset * randn(B, C, 1, 1), a per-sample, per-channel shift
    (lets the model learn very dark and bright images; 0.05-0.1 is usual). Target and teacher see the same noise."""
    input_perturbation: float = 0.0
    """diffusers' input perturbation (arXiv 2301.11706): the U-Nets' input is noised from
    noise + input_perturbation * randn_like(noise), the target from the unperturbed noise (0.1 is usual)."""
    prediction_type: Optional[PredictionType] = None
    """Train to predict this instead of the scheduler's prediction type (diffusers' --prediction_type; sample
    grids and the exported scheduler follow it). Output and feature KD need a teacher predicting the same
    (checked at start-up); null: the scheduler's."""


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None
    """Optimizer steps to train for; null: train.num_epochs' worth when that is set, else 100."""
    num_epochs: Optional[int] = None
    """Train for this many epochs instead of train.max_steps (set one of them): max_steps =
    num_epochs * ceil(batches per process and epoch / grad_accum), as diffusers derives it."""
    seed: int = 0
    """Seed for weights' noise, timesteps, data order and augmentation."""
    batch_size: int = 4
    """Samples per process per micro-step: the global batch is batch_size x grad_accum x processes."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    mixed_precision: MixedPrecision = MixedPrecision.no
    """Autocast for the student (no: float32); frozen models are cast to it."""
    gradient_checkpointing: bool = False
    """Recompute student activations in backward to save memory."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    checkpoint_every: int = 500
    """Write OUTPUT/checkpoint-STEP every this many steps (0: only at the end)."""
    checkpoints_total_limit: Optional[int] = 3
    """Keep at most this many checkpoints (oldest removed); null keeps all."""
    sample_every: int = 500
    """Save a sample grid every this many steps (0: never during training)."""
    log_every: int = 1
    """Write a metrics line every this many steps."""
    num_workers: int = 0
    """DataLoader worker processes per training process."""


@dataclass
class OptimConfig:
    lr: float = 5e-5
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    implementation: AdamWImplementation = AdamWImplementation.auto
    """AdamW kernel; auto: fused where supported, else foreach."""
    lr_scheduler: LRScheduler = LRScheduler.constant
    """diffusers' learning-rate schedule of that name."""
    warmup_steps: int = 0
    """Linear warm-up steps (counted in optimizer steps)."""


@dataclass
class EMAConfig:
    enabled: bool = False
    """Keep an exponential moving average of the student, initialised from it after weight copy."""
    decay: float = 0.9999
    """Maximum EMA decay (diffusers EMAModel, warm-up ramp (1+t)/(10+t))."""


@dataclass
class SampleConfig:
    prompts: list[str] = field(
        default_factory=lambda: ["a red circle on a blue background", "a portrait photo of an astronaut"]
    )
    """Fixed prompts sampled during training."""
    seed: int = 1234
    """Seed of the first prompt; prompt i uses seed + i."""
    steps: int = 25
    """Sampler steps (DPM-Solver++)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale."""
    resolution: Optional[int] = None
    """Image size; null uses data.resolution."""


@dataclass
class TriplesConfig:
    """Held-out (x_t, t, prompt) triples for teacher agreement (train/losses/agreement.py): made without data, once,
    from the teacher's own latents for fixed prompts and seeds, noised at fixed timesteps with fixed noise."""

    seed: int = 0
    """Seed of the triples: prompt i's clean latents start from seed + i, the noise added to them comes from a
    generator seeded from seed too (another stream)."""
    prompts: Optional[list[str]] = None
    """Prompts of the triples; null: sample.prompts in a run, the evaluation prompts in eval/evaluate.py."""
    num_prompts: int = 16
    """Use at most this many prompts (the first ones)."""
    timesteps: int = 4
    """Timesteps per prompt, spread evenly over the training schedule's (4 of 1000: 125, 375, 625, 875)."""
    teacher_steps: int = 8
    """Sampler steps (DPM-Solver++) the teacher takes to make each prompt's clean latents x_0."""
    guidance_scale: Optional[float] = None
    """Classifier-free guidance of the teacher's x_0; null: sample.guidance_scale in a run, the evaluation's
    guidance_scale in eval/evaluate.py."""
    resolution: Optional[int] = None
    """Image size of the triples; null: sample.resolution (else data.resolution) in a run, the evaluation's
    resolution in eval/evaluate.py."""
    batch_size: int = 8
    """Triples per U-Net forward."""


@dataclass
class EvalConfig(TriplesConfig):
    """In-loop evaluation: the student's noise predictions against its teacher's on the held-out triples
    (made at the first evaluation, kept in OUTPUT/eval_triples.safetensors with the teacher's predictions),
    logged as eval/noise_mse (and eval/noise_mse_tT per timestep) beside the losses."""

    every: int = 0
    """Evaluate every this many steps, at step 0 of a new run and at the last step; 0: never. Needs a teacher."""


@dataclass
class LogConfig:
    trackers: list[Tracker] = field(default_factory=lambda: [Tracker.tensorboard])
    """Trackers besides OUTPUT/metrics.jsonl; [] or [none] for none."""
    project: str = "sdkd"
    """Tracker project name."""


@dataclass
class Config:
    teacher: str = MISSING
    """Teacher pipeline: hub id, local diffusers folder, or "toy" (built locally from a seed)."""
    teacher_revision: Optional[str] = None
    """Hub revision of the teacher (branch, tag or commit); null: the default branch."""
    teacher_variant: Optional[str] = None
    """Weight files of the teacher to load, e.g. fp16 for *.fp16.safetensors; null: the plain ones."""
    allow_pickle: bool = False
    """Load pickle weights (.bin, .ckpt) of the teacher or model where they have no safetensors. Pickle can run
    code when loaded: set it only for files you trust (diffusers' own conversion script makes safetensors)."""
    output_dir: str = MISSING
    """Run folder: config.yaml, metrics.jsonl, checkpoint-STEP/, samples/, student/."""
    resume: Optional[str] = None
    """latest (the newest checkpoint in output_dir, if any; stops with one line if its contents are incomplete),
    latest_complete (the newest whose contents are complete, naming newer broken ones it passes over) or a
    checkpoint path."""
    overwrite: bool = False
    """Replace the run already in output_dir (its files are removed once the new run has loaded); without
    it, or resume, a non-empty output_dir stops the run."""
    license: str = "creativeml-openrail-m"
    """License named in the model card of what the run writes (a Hugging Face license id). Default: SD-1.x's
    CreativeML OpenRAIL-M, whose use restrictions carry over to derivatives such as distilled students,
    fine-tunes and LoRAs; openrail++ for an SD-2.x teacher or model; your base model's license otherwise."""
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class FinetuneConfig(Config):
    """train/finetune.py: train `model` on its own data with the task loss, optionally continuing KD from
    a teacher (output KD; feature KD when `student` describes `model`'s layout relative to the teacher)."""

    teacher: Optional[str] = None
    """Optional teacher for continued KD (loss.lambda_out, loss.lambda_feat): hub id, diffusers folder or "toy"."""
    model: str = MISSING
    """The pipeline to train: a diffusers folder (e.g. a distilled student's OUTPUT/student), a hub id, or "toy".
    Its VAE, text encoder, tokenizer and scheduler are used for training, sampling and the export."""
    model_revision: Optional[str] = None
    """Hub revision of `model` (branch, tag or commit); null: the default branch."""
    model_variant: Optional[str] = None
    """Weight files of `model` to load, e.g. fp16 for *.fp16.safetensors; null: the plain ones."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """Only read when loss.lambda_feat > 0: the block removal that makes `model`'s layout from the teacher's,
    which gives the feature pairs (checked by shape at start-up)."""
    loss: LossConfig = field(default_factory=lambda: LossConfig(lambda_out=0.0, lambda_feat=0.0))
    """Fine-tuning defaults: task loss only; lambda_out / lambda_feat > 0 need a teacher."""


@dataclass
class LoraSection:
    rank: int = 16
    """LoRA rank r of every adapted layer."""
    alpha: Optional[float] = None
    """LoRA alpha (the update is scaled by alpha / rank); null: equal to rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """U-Net module names (or name suffixes) to adapt. The attention projections exist in every block-removed
    student that keeps attention (bk_base/small/tiny, SDXS); each entry must match at least one module."""
    train_text_encoder: bool = False
    """Also put a LoRA on the text encoder (then data.cache cannot be used: the text encoder runs each step)."""
    text_encoder_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Text-encoder module names (or suffixes) to adapt when train_text_encoder is set."""
    sdcpp: bool = True
    """Also write OUTPUT/lora_sdcpp.safetensors (kohya naming, teacher-slot LDM numbering, alpha tensors) for
    stable-diffusion.cpp when the model's layout runs there (teacher, bk_tiny, SDXS)."""


@dataclass
class LoraTrainConfig(FinetuneConfig):
    """train/lora.py: a LoRA (peft) on `model`'s U-Net (and optionally its text encoder); everything else as
    train/finetune.py, whose `model` stays frozen."""

    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    """LoRA default: lr 1e-4 (BK-SDM's and segmind's LoRA recipes)."""


# ---------------------------------------------------------------------------------------------
# Loading


# OmegaConf's message for a value outside a `Choice`, reworded as every choice error reads (expected_one_of).
_NOT_A_CHOICE = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]$")


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    if choice := _NOT_A_CHOICE.match(msg):
        value, names = choice.groups()
        return f"config key '{key}': {expected_one_of(names.split(', '), value)}"
    if type(err).__name__ == "ConfigKeyError":
        return f"config key '{key}': unknown key ({msg})"
    if type(err).__name__ == "MissingMandatoryValue":
        return f"config key '{key}': required, but no value was given"
    return f"config key '{key}': {msg}"


class _YamlLoader(get_yaml_loader()):
    """OmegaConf's YAML loader without YAML 1.1 booleans: yes/no/on/off/true/false stay the text typed, so
    `mixed_precision: no` is the string its str key expects; the schema converts them for bool keys."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in _YamlLoader.yaml_implicit_resolvers.items()
}


def _read_yaml(text: str, where: str, in_file: bool = False) -> Any:
    """YAML text -> Python values; a syntax error is one line naming `where` (and, in a file, the line and
    column)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if in_file and mark is not None else ""
        raise ConfigError(f"{where}: YAML syntax error{at}: {getattr(err, 'problem', None) or first_line(err)}") from None


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """A recipe may start from another: `inherit: other.yaml` (relative to the file) is merged first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: inherits from itself")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: cannot be read as text ({first_line(err)})") from None
    data = _read_yaml(text, f"config file {path}", in_file=True) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected keys and values at the top level, got a {type(data).__name__}")
    node = OmegaConf.create(data)
    parent = node.pop("inherit", None)
    if parent is None:
        return node
    return OmegaConf.merge(_load_yaml(path.parent / str(parent), seen + (path.resolve(),)), node)


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type = Config) -> Any:
    """YAML file + `key=value` overrides -> a validated `schema` instance."""
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            merged = OmegaConf.merge(merged, _load_yaml(Path(path)))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override '{bad[0]}' is not of the form key=value")
        dots = OmegaConf.create()
        for override in overrides:
            key, _, text = override.partition("=")
            OmegaConf.update(dots, key, _read_yaml(text, f"override '{override}'"))
        merged = OmegaConf.merge(merged, dots)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    if isinstance(cfg, Config):
        validate(cfg)
    if hasattr(cfg, "validate"):  # a trainer's own sections, another command's schema (eval/evaluation/config.py)
        cfg.validate()
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), path)


def _index(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _depth_entry(entry) -> bool:
    return _index(entry, 1) or (isinstance(entry, list) and all(_index(d, 1) for d in entry))


def _check_layer_init(value) -> None:
    """first, even, or {student attention: [teacher layer indices]}; whether the lists fit is checked against
    the teacher (train/models/students.py)."""
    explicit = isinstance(value, dict) and bool(value) and all(
        isinstance(name, str) and isinstance(layers, list) and layers and all(_index(i, 0) for i in layers)
        for name, layers in value.items())
    require(value in ("first", "even") or explicit, "student.layer_init",
            f"expected first, even, or {{student attention: [teacher layer indices >= 0]}}, got {value!r}")


def check_student(s: StudentConfig) -> None:
    """A preset, or `custom` with its keep_* fields; a preset sets the custom fields itself."""
    # A StudentConfig built in code (train/show_student.py) has not been through the schema's types.
    require(s.preset in StudentPreset.__members__, "student.preset",
            expected_one_of(StudentPreset.__members__, s.preset))
    _check_layer_init(s.layer_init)
    if s.preset == StudentPreset.custom:
        require(s.keep_down is not None and s.keep_up is not None, "student.keep_down",
                "student.keep_down and student.keep_up are required when student.preset=custom")
        require(s.mid_block or s.mid_attention, "student.mid_attention",
                "false replaces the mid block by one resnet, but student.mid_block=false removes it")
        for key in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
            value = getattr(s, key)
            require(value is None or (isinstance(value, list) and all(map(_depth_entry, value))), f"student.{key}",
                    f"expected one entry per teacher block, each a depth >= 1 or a list of them, got {value}")
        return
    require(s.keep_down is None and s.keep_up is None and s.mid_block and s.deepest_stage and not s.drop_attention,
            "student.preset", f"keep_down, keep_up, mid_block, deepest_stage and drop_attention apply only to "
                              f"student.preset=custom; '{s.preset}' sets them itself")
    require(s.mid_attention and s.transformer_layers_per_block is None and s.reverse_transformer_layers_per_block is None,
            "student.preset", f"mid_attention, transformer_layers_per_block and reverse_transformer_layers_per_block "
                              f"apply only to student.preset=custom; '{s.preset}' sets them itself")


def validate(cfg: Config) -> None:
    """Cross-field checks the schema cannot express."""
    t, s = cfg.train, cfg.student
    require(not (cfg.overwrite and cfg.resume is not None), "overwrite",
            "overwrite=true replaces the run in output_dir; resume continues it: set one of them")
    require(t.max_steps is None or t.max_steps > 0, "train.max_steps", "must be > 0 or null")
    require(t.num_epochs is None or t.num_epochs > 0, "train.num_epochs", "must be > 0 or null")
    require(t.max_steps is None or t.num_epochs is None, "train.num_epochs",
            "train.max_steps and train.num_epochs are both set: set one, the other to null")
    require(t.batch_size > 0, "train.batch_size", "must be > 0")
    require(t.grad_accum > 0, "train.grad_accum", "must be > 0")
    require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    require(t.sample_every >= 0, "train.sample_every", "must be >= 0")
    require(t.log_every > 0, "train.log_every", "must be > 0")
    require(t.checkpoints_total_limit is None or t.checkpoints_total_limit > 0,
            "train.checkpoints_total_limit", "must be > 0 or null")
    o = cfg.optim
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "expected two numbers in [0, 1)")
    require(o.lr > 0, "optim.lr", "must be > 0")
    require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    require(o.eps > 0, "optim.eps", "must be > 0")
    require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    require(0 <= cfg.ema.decay <= 1, "ema.decay", "must be in [0, 1]")
    require(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    require(t.seed >= 0, "train.seed", "must be >= 0")
    require(cfg.loss.lambda_task + cfg.loss.lambda_out + cfg.loss.lambda_feat > 0, "loss.lambda_task",
            "every loss weight (loss.lambda_task, lambda_out, lambda_feat) is 0: nothing to train")
    sm = cfg.sample
    require(sm.steps > 0, "sample.steps", "must be > 0")
    require(sm.guidance_scale >= 0, "sample.guidance_scale", "must be >= 0")
    require(sm.resolution is None or (sm.resolution >= 8 and sm.resolution % 8 == 0), "sample.resolution",
            "must be a multiple of 8, or null")
    for name in ("lambda_task", "lambda_out", "lambda_feat"):
        require(getattr(cfg.loss, name) >= 0, f"loss.{name}", "must be >= 0")
    require(cfg.loss.snr_gamma is None or cfg.loss.snr_gamma > 0, "loss.snr_gamma", "must be > 0 or null")
    require(cfg.loss.noise_offset >= 0, "loss.noise_offset", "must be >= 0")
    require(cfg.loss.input_perturbation >= 0, "loss.input_perturbation", "must be >= 0")
    check_student(s)
    require((s.feature_pairs == FeaturePairs.custom) == (s.pairs is not None),
            "student.pairs", "give student.pairs exactly when student.feature_pairs=custom")
    require(s.pairs is None or all(len(p) == 2 for p in s.pairs),
            "student.pairs", "each pair is [teacher_module, student_module]")
    check_data(cfg.data)
    require(t.num_workers >= 0, "train.num_workers", "must be >= 0")
    require(bool(cfg.sample.prompts), "sample.prompts", "at least one prompt")
    check_triples(cfg.eval, "eval")
    require(cfg.eval.every >= 0, "eval.every", "must be >= 0 (0: never)")
    require(cfg.eval.every == 0 or cfg.teacher is not None, "eval.every",
            "in-loop evaluation compares the model with a teacher: set teacher, or eval.every=0")
    if isinstance(cfg, FinetuneConfig):
        _validate_finetune(cfg)


def check_triples(e: TriplesConfig, section: str) -> None:
    """Checks of a held-out triples section (`eval` of a run, `agreement` of eval/evaluate.py)."""
    require(e.seed >= 0, f"{section}.seed", "must be >= 0")
    require(e.prompts is None or bool(e.prompts), f"{section}.prompts", "at least one prompt, or null")
    require(e.num_prompts > 0, f"{section}.num_prompts", "must be > 0")
    require(e.timesteps > 0, f"{section}.timesteps", "must be > 0")
    require(e.teacher_steps > 0, f"{section}.teacher_steps", "must be > 0")
    require(e.guidance_scale is None or e.guidance_scale >= 0, f"{section}.guidance_scale", "must be >= 0 or null")
    require(e.resolution is None or (e.resolution >= 8 and e.resolution % 8 == 0), f"{section}.resolution",
            "must be a multiple of 8, or null")
    require(e.batch_size > 0, f"{section}.batch_size", "must be > 0")


def _validate_finetune(cfg: FinetuneConfig) -> None:
    for name in ("lambda_out", "lambda_feat"):
        require(cfg.teacher is not None or getattr(cfg.loss, name) == 0, f"loss.{name}",
                "continued KD needs a teacher: set teacher, or set this to 0")
    if isinstance(cfg, LoraTrainConfig):
        lo = cfg.lora
        require(lo.rank > 0, "lora.rank", "must be > 0")
        require(lo.alpha is None or lo.alpha > 0, "lora.alpha", "must be > 0 or null")
        require(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        require(bool(lo.target_modules), "lora.target_modules", "at least one module name")
        require(not lo.train_text_encoder or bool(lo.text_encoder_target_modules),
                "lora.text_encoder_target_modules", "at least one module name")
        require(not (lo.train_text_encoder and cfg.data.cache is not None), "data.cache",
                "a latent cache holds text embeddings: it cannot be used with lora.train_text_encoder=true")
        require(not (lo.train_text_encoder and cfg.teacher is not None), "teacher",
                "continued KD with lora.train_text_encoder=true is not supported (the teacher would need the "
                "adapted text embeddings); drop the teacher or the text-encoder LoRA")


def resolve_max_steps(t: TrainConfig, batches_per_epoch: int) -> int:
    """The run's optimizer steps: train.max_steps, else train.num_epochs x the optimizer steps of one epoch
    (rounded up, as diffusers' num_update_steps_per_epoch), else 100."""
    if t.num_epochs is None:
        return t.max_steps or 100
    return t.num_epochs * math.ceil(batches_per_epoch / t.grad_accum)


# ---------------------------------------------------------------------------------------------
# Command line


@functools.cache
def _field_docs(path: str) -> dict[str, dict[str, str]]:
    """{class name: {field: docstring}} of the Python file `path`: the string under each field, read with
    `ast` (importing a trainer to read its schema's docs would load torch)."""
    docs = {}
    for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef):
            docs[node.name] = {a.target.id: " ".join(b.value.value.split())
                               for a, b in zip(node.body, node.body[1:])
                               if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
                               and isinstance(b.value, ast.Constant)}
    return docs


def _field_doc(cls: type, name: str) -> str:
    """From the class that declares the field, else the nearest base that documents it, each read from its
    own source file (data/sources/config.py, this file, a trainer script)."""
    return next((docs[name] for c in cls.__mro__ if is_dataclass(c)
                 and name in (docs := _field_docs(inspect.getfile(c)).get(c.__name__, {}))), "")


def _allowed(hint: Any) -> str:
    """The values a field typed with a `Choice` takes (C, Optional[C] or list[C]) for --help; else ''."""
    choice = next((t for t in (hint, *get_args(hint)) if isinstance(t, type) and issubclass(t, Choice)), None)
    if choice is None:
        return ""
    names = ", ".join([*choice.__members__, *["null"] * (type(None) in get_args(hint))])
    return f"  ({'each ' if get_origin(hint) is list else ''}one of: {names})"


def config_help(schema: type) -> str:
    """Every key of `schema` with its default and docstring: top-level keys, then section by section."""
    lines = ["config keys (KEY = default):"]

    def walk(obj: Any, prefix: str) -> None:
        hints = get_type_hints(type(obj))
        # Keys before sections: a subclass's new top-level key (model) would otherwise land after `log`.
        for f in sorted(fields(obj), key=lambda f: is_dataclass(getattr(obj, f.name))):
            value, doc = getattr(obj, f.name), _field_doc(type(obj), f.name)
            if is_dataclass(value):
                lines.extend(["", f"{prefix}{f.name}:", *textwrap.wrap(doc, 100, initial_indent="  ",
                                                                       subsequent_indent="  ")])
                walk(value, f"{prefix}{f.name}.")
            else:
                shown = "(required)" if value == MISSING else value if isinstance(value, str) else json.dumps(value)
                lines.append(f"  {prefix}{f.name} = {shown}{_allowed(hints[f.name])}")
                lines.extend(textwrap.wrap(doc, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))

    walk(schema(), "")
    return "\n".join(lines)


OVERRIDES_HELP = """\
overrides: after --config, any key above as KEY=VALUE, dotted inside a section (train.max_steps=20
optim.betas=[0.9,0.99] resume=null); values are YAML and win over the recipe and its inherit: chain.
train.batch_size is per process: the global batch is batch_size x grad_accum x processes."""


CHECK_CONFIG_HELP = ("load and validate the config, print nothing and exit 0 (a bad config: its one-line error, "
                     "exit 2); launch.sh runs this once before it starts any process")


def parse_args(argv: list[str], description: str | None, schema: type = Config,
               prog: str | None = None) -> argparse.Namespace:
    """`[--print-config | --check-config] --config FILE key=value ...` -> the parsed arguments (config,
    overrides, print_config, check_config); --help lists `schema`."""
    # allow_abbrev=False: launch.sh recognises --help and --print-config by their full names.
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     epilog=f"{config_help(schema)}\n\n{OVERRIDES_HELP}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (recipe, inherit:, overrides; validated) as YAML and exit")
    parser.add_argument("--check-config", action="store_true", help=CHECK_CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    return parser.parse_intermixed_args(argv)


def load_trainer_config(schema: type, argv: list[str], description: str | None, prog: str) -> Config:
    """`--config FILE key=value ...` for a trainer script, validated against the schema it declares
    (`SCHEMA`). With --print-config the config is printed as YAML, with --check-config nothing; either
    way the process then exits 0 before anything starts."""
    # A subclass without @dataclass would silently drop the fields it declares.
    if not (isinstance(schema, type) and issubclass(schema, Config) and "__dataclass_fields__" in vars(schema)):
        raise TypeError(f"load_trainer_config: the schema must be Config or a @dataclass subclass of it, "
                        f"got {schema!r}")
    args = parse_args(argv, description, schema, prog)
    cfg = load_config(args.config, args.overrides, schema)
    if args.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
    if args.print_config or args.check_config:
        sys.exit(0)
    return cfg
