"""Typed configuration: YAML recipes merged into dataclasses, dotted overrides, validation.

Every trainer reads one schema: `Config` (train/kd.py), `FinetuneConfig` (train/finetune.py: `Config`
plus `model`, teacher optional) or `LoraTrainConfig` (train/lora.py: plus `lora`). A recipe in `configs/`
sets what differs from these defaults; `key=value` arguments after `--config` override it. Unknown keys, wrong types,
missing required values and impossible combinations raise `ConfigError` with the dotted key.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


class ConfigError(UserError):
    pass


def first_line(err: BaseException) -> str:
    """An exception's message cut to one line, for wrapping library errors into a UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# Schema


@dataclass
class StudentConfig:
    preset: str = "bk_small"
    """Block-removal preset: bk_base, bk_small, bk_tiny, or custom (then set keep_down/keep_up)."""
    keep_down: Optional[list[list[int]]] = None
    """custom: per teacher down block, the resnet (and attention) indices the student keeps."""
    keep_up: Optional[list[list[int]]] = None
    """custom: per teacher up block, the resnet (and attention) indices kept; the last one must be kept."""
    mid_block: bool = True
    """custom: keep the mid block."""
    deepest_stage: bool = True
    """custom: keep the deepest down block and its matching up block."""
    feature_pairs: str = "bk"
    """Feature-KD pair table: bk (BK-SDM's), segmind, or custom (then set pairs)."""
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


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps to train for."""
    seed: int = 0
    """Seed for weights' noise, timesteps, data order and augmentation."""
    batch_size: int = 4
    """Samples per process per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    mixed_precision: str = "no"
    """no, fp16 or bf16: autocast for the student; frozen models are cast to it."""
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
    implementation: str = "auto"
    """AdamW kernel: auto (fused where supported, else foreach), fused, foreach or loop."""
    lr_scheduler: str = "constant"
    """diffusers schedule name: constant, linear, cosine, cosine_with_restarts, polynomial."""
    warmup_steps: int = 0
    """Linear warm-up steps (counted in optimizer steps)."""


@dataclass
class EMAConfig:
    enabled: bool = False
    """Keep an exponential moving average of the student, initialised from it after weight copy."""
    decay: float = 0.9999
    """Maximum EMA decay (diffusers EMAModel, warm-up ramp (1+t)/(10+t))."""


@dataclass
class DataConfig:
    source: str = "synthetic"
    """synthetic (built-in captioned shapes), imagefolder (images + metadata.jsonl or metadata.csv),
    hf (a Hugging Face data set: hub name or local parquet/arrow path) or webdataset (tar shards)."""
    path: Optional[str] = None
    """imagefolder: the folder; hf: hub name, local folder or .parquet/.arrow file; webdataset: a
    folder of shards with manifest.json, brace-expanded names (shard-{000000..000099}.tar) or a glob."""
    split: str = "train"
    """hf: the split to read."""
    manifest: Optional[str] = None
    """webdataset: manifest.json with per-shard sample counts (data/make_shards.py writes it); null:
    manifest.json beside the shards."""
    image_column: Optional[str] = None
    """Field naming or holding the image; null: the source's default (imagefolder file_name, hf image,
    webdataset jpg;jpeg;png;webp). Several candidates as 'a;b': the first present one is used."""
    caption_column: str = "text;txt;caption"
    """Field(s) holding the caption, several as 'a;b;c' (a webdataset field is a file extension or a key
    of the sample's .json). A field may hold a list of captions. See caption_pick."""
    caption_pick: str = "first"
    """first: the first caption field present (one of its captions at random if it holds a list);
    random: one at random from all captions of all fields present. Drawn per sample and epoch."""
    caption_dropout: float = 0.0
    """Probability of replacing the caption with the empty prompt (for classifier-free guidance)."""
    resolution: int = 512
    """Training image size in pixels (shorter side resized, then cropped square)."""
    center_crop: bool = True
    """Center crop; false takes a random crop."""
    random_flip: bool = True
    """Flip horizontally with probability 0.5."""
    min_size: int = 0
    """Skip images whose shorter side is below this many pixels (0: keep all)."""
    strict: bool = False
    """Stop the run at the first bad sample (unreadable image, missing caption, image below min_size)
    instead of skipping it (skips are counted as data_skipped in metrics.jsonl and named in a warning)."""
    num_samples: int = 256
    """synthetic: number of samples in the set."""
    resampled: bool = True
    """webdataset: every process and worker draws shards with replacement (an endless stream cut into
    epochs of manifest-many samples); false: shards split by process then by worker, each read once
    per epoch (needs at least processes x workers shards)."""
    shuffle_buffer: int = 1000
    """webdataset: samples held in the shuffle buffer of each worker (0: no sample shuffle)."""
    cache: Optional[str] = None
    """Folder of precomputed latents and text embeddings (data/cache_latents.py writes it); trainers then
    read it instead of `source` and load no VAE or text encoder for the step."""


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
class LogConfig:
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers besides OUTPUT/metrics.jsonl: wandb, tensorboard; [] or [none] for none."""
    project: str = "sdkd"
    """Tracker project name."""


@dataclass
class Config:
    teacher: str = MISSING
    """Teacher pipeline: hub id, local diffusers folder, or "toy" (built locally from a seed)."""
    output_dir: str = MISSING
    """Run folder: config.yaml, metrics.jsonl, checkpoint-STEP/, samples/, student/."""
    resume: Optional[str] = None
    """latest (the newest complete checkpoint in output_dir, if any) or a checkpoint path."""
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
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


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    if type(err).__name__ == "ConfigKeyError":
        return f"config key '{key}': unknown key ({msg})"
    if type(err).__name__ == "MissingMandatoryValue":
        return f"config key '{key}': required, but no value was given"
    return f"config key '{key}': {msg}"


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """A recipe may start from another: `inherit: other.yaml` (relative to the file) is merged first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: inherits from itself")
    node = OmegaConf.load(path)
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
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    validate(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), path)


def _require(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {expected}")


STUDENT_PRESETS = ("bk_base", "bk_small", "bk_tiny")


def check_student(s: StudentConfig) -> None:
    """A preset, or `custom` with its keep_* fields; a preset sets the custom fields itself."""
    if s.preset == "custom":
        _require(s.keep_down is not None and s.keep_up is not None, "student.keep_down",
                 "student.keep_down and student.keep_up are required when student.preset=custom")
        return
    _require(s.preset in STUDENT_PRESETS, "student.preset",
             f"expected {', '.join(STUDENT_PRESETS)} or custom, got '{s.preset}'")
    _require(s.keep_down is None and s.keep_up is None and s.mid_block and s.deepest_stage, "student.preset",
             f"keep_down, keep_up, mid_block and deepest_stage apply only to student.preset=custom; "
             f"'{s.preset}' sets them itself")


def validate(cfg: Config) -> None:
    """Cross-field checks the schema cannot express."""
    t, s = cfg.train, cfg.student
    _require(t.max_steps > 0, "train.max_steps", "must be > 0")
    _require(t.batch_size > 0, "train.batch_size", "must be > 0")
    _require(t.grad_accum > 0, "train.grad_accum", "must be > 0")
    _require(t.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision", "expected no, fp16 or bf16")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    _require(t.sample_every >= 0, "train.sample_every", "must be >= 0")
    _require(t.log_every > 0, "train.log_every", "must be > 0")
    _require(t.checkpoints_total_limit is None or t.checkpoints_total_limit > 0,
             "train.checkpoints_total_limit", "must be > 0 or null")
    _require(cfg.optim.implementation in ("auto", "fused", "foreach", "loop"),
             "optim.implementation", "expected auto, fused, foreach or loop")
    _require(len(cfg.optim.betas) == 2, "optim.betas", "expected two numbers")
    for name in ("lambda_task", "lambda_out", "lambda_feat"):
        _require(getattr(cfg.loss, name) >= 0, f"loss.{name}", "must be >= 0")
    _require(cfg.loss.snr_gamma is None or cfg.loss.snr_gamma > 0, "loss.snr_gamma", "must be > 0 or null")
    check_student(s)
    _require(s.feature_pairs in ("bk", "segmind", "custom"), "student.feature_pairs", "expected bk, segmind or custom")
    _require((s.feature_pairs == "custom") == (s.pairs is not None),
             "student.pairs", "give student.pairs exactly when student.feature_pairs=custom")
    _require(s.pairs is None or all(len(p) == 2 for p in s.pairs),
             "student.pairs", "each pair is [teacher_module, student_module]")
    d = cfg.data
    from sdkd.data.sources import SOURCES  # lazy: the data package imports this module

    _require(d.source in SOURCES, "data.source", f"expected {', '.join(SOURCES)}, got '{d.source}'")
    _require(d.source == "synthetic" or d.cache is not None or d.path is not None, "data.path",
             f"required when data.source={d.source}")
    _require(d.resolution >= 8 and d.resolution % 8 == 0, "data.resolution", "must be a multiple of 8")
    _require(d.caption_pick in ("first", "random"), "data.caption_pick", "expected first or random")
    _require(bool(d.caption_column.strip(";")), "data.caption_column", "at least one field name")
    _require(0.0 <= d.caption_dropout <= 1.0, "data.caption_dropout", "must be in [0, 1]")
    _require(d.min_size >= 0, "data.min_size", "must be >= 0")
    _require(d.num_samples > 0, "data.num_samples", "must be > 0")
    _require(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    _require(t.num_workers >= 0, "train.num_workers", "must be >= 0")
    for name in cfg.log.trackers:
        _require(name in ("wandb", "tensorboard", "none"), "log.trackers", f"unknown tracker '{name}' (wandb, tensorboard, none)")
    _require(bool(cfg.sample.prompts), "sample.prompts", "at least one prompt")
    if isinstance(cfg, FinetuneConfig):
        _validate_finetune(cfg)


def _validate_finetune(cfg: FinetuneConfig) -> None:
    for name in ("lambda_out", "lambda_feat"):
        _require(cfg.teacher is not None or getattr(cfg.loss, name) == 0, f"loss.{name}",
                 "continued KD needs a teacher: set teacher, or set this to 0")
    _require(cfg.loss.lambda_task + cfg.loss.lambda_out + cfg.loss.lambda_feat > 0, "loss.lambda_task",
             "every loss weight is 0: nothing to train")
    if isinstance(cfg, LoraTrainConfig):
        lo = cfg.lora
        _require(lo.rank > 0, "lora.rank", "must be > 0")
        _require(lo.alpha is None or lo.alpha > 0, "lora.alpha", "must be > 0 or null")
        _require(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        _require(bool(lo.target_modules), "lora.target_modules", "at least one module name")
        _require(not lo.train_text_encoder or bool(lo.text_encoder_target_modules),
                 "lora.text_encoder_target_modules", "at least one module name")
        _require(not (lo.train_text_encoder and cfg.data.cache is not None), "data.cache",
                 "a latent cache holds text embeddings: it cannot be used with lora.train_text_encoder=true")
        _require(not (lo.train_text_encoder and cfg.teacher is not None), "teacher",
                 "continued KD with lora.train_text_encoder=true is not supported (the teacher would need the "
                 "adapted text embeddings); drop the teacher or the text-encoder LoRA")


def parse_args(argv: list[str], description: str) -> tuple[str | None, list[str]]:
    """`--config FILE key=value ...` -> (file, overrides)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    args = parser.parse_args(argv)
    return args.config, args.overrides


# The schema each trainer script reads (by file name), so launch.sh can check a config before it
# starts any process.
TRAINER_SCHEMAS = {"kd": Config, "finetune": FinetuneConfig, "lora": LoraTrainConfig}


def load_trainer_config(script: str, argv: list[str], description: str) -> Config:
    """`--config FILE key=value ...` for the trainer `script`, validated against its schema."""
    return load_config(*parse_args(argv, description), schema=TRAINER_SCHEMAS[Path(script).stem])


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point; user mistakes become one line on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _check_launch() -> None:
    """`python -m sdkd.train.config SCRIPT ARGS...`: fail on a bad config once, before a multi-process
    launch (where every rank would report it and the launcher add its own failure report)."""
    if len(sys.argv) > 1 and Path(sys.argv[1]).stem in TRAINER_SCHEMAS:
        load_trainer_config(sys.argv[1], sys.argv[2:], "config check")


if __name__ == "__main__":
    run_cli(_check_launch)
