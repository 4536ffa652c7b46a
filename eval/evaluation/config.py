"""The config of eval/evaluate.py: the prompt set and how it is sampled, which metrics, where their weights
and reference images are.

A YAML file (configs/eval_*.yaml) plus `key=value` overrides, read and checked with train/engine/config.py's
machinery, as a trainer's config is: unknown keys, wrong types and impossible values stop with one line naming
the key (exit 2). Nothing heavy is imported here, so --help stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import auto
from typing import Optional

from sdkd.cli.errors import require
from sdkd.data.sources.config import Choice, Section
from sdkd.eval.metrics.config import INCEPTION_KEY, REFERENCE_STATS_KEY, MetricsConfig, config_value
from sdkd.train.losses.config import TriplesConfig


class Sampler(Choice):
    """The multi-step sampler; one step (steps: 1) always takes DPM-Solver++ at t=999 (eval/inference/pipeline.py)."""

    dpm_solver = auto()
    pndm = auto()
    ddim = auto()
    euler = auto()


class Checkpoints(Choice):
    all = auto()
    latest = auto()


@dataclass
class AgreementConfig(TriplesConfig):
    """Teacher agreement on held-out (x_t, t, prompt) triples (train/losses/agreement.py): the noise-prediction MSE
    of each model against the teacher. Needs a teacher (the run's, or --teacher)."""

    enabled: bool = True
    """Compute the noise-prediction MSE (the teacher samples teacher_steps per prompt once, to make the triples)."""
    from_run: bool = True
    """Evaluating a run or one of its checkpoints: use the run's own `eval` section instead of this one, and its
    OUTPUT/eval_triples.safetensors when made with the same teacher, so the numbers continue the run's in-loop
    eval/noise_mse curve."""


@dataclass
class LatencyConfig(Section):
    enabled: bool = True
    """Time each model: seconds per image of the whole pipeline (batch 1, text encoding to decoded image) and
    of its U-Net alone (one forward at the guidance batch, times the steps)."""
    warmup: int = 1
    """Untimed runs first (allocations, kernel selection, caches)."""
    repeats: int = 3
    """Timed runs; the median is reported."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.warmup >= 0, f"{at}.warmup", "must be >= 0")
        require(self.repeats > 0, f"{at}.repeats", "must be > 0")


@dataclass
class EvaluateConfig(Section):
    prompts: Optional[list[str]] = None
    """The prompts, one image per prompt per model; null: prompt_file, else the run's sample.prompts."""
    prompt_file: Optional[str] = None
    """A prompt file instead of prompts: .txt with one prompt per line (blank lines skipped), or .csv with a
    header and a prompt_column column (BK-SDM's mscoco_val2014_30k/metadata.csv)."""
    prompt_column: str = "text"
    """The prompt column of a .csv prompt_file."""
    num_images: Optional[int] = None
    """Use only the first N prompts; null: all."""
    seed: int = 1234
    """Image i is seeded seed + i (its initial noise), the same for every model and whatever the batch size."""
    steps: Optional[int] = None
    """Sampler steps; 1 is the one-step mode (DPM-Solver++ at t=999, no guidance); null: each model's recorded
    sampling settings (an export's sdkd_sampling.json, a run's `sample` section), else 25."""
    guidance_scale: Optional[float] = None
    """Classifier-free guidance scale (1 or less: none); null: each model's recorded sampling settings, else 7.5."""
    sampler: Sampler = Sampler.dpm_solver
    """Multi-step sampler: dpm_solver (DPM-Solver++ 2M, sdkd's default), pndm (BK-SDM's protocol), ddim, euler."""
    negative_prompt: Optional[str] = None
    """One negative prompt for every image."""
    resolution: Optional[int] = None
    """Generated image size; null: the run's sample.resolution (else data.resolution), else the teacher's (else the
    model's) native size."""
    resize: Optional[int] = None
    """Resize the generated images to this size (PIL bicubic) before they are saved and scored (BK-SDM: 512 px
    images resized to 256); null: keep them as generated."""
    batch_size: int = 1
    """Images per pipeline call. Seeds are per image, but the batch still shifts the numerics (BK-SDM's FID moved
    16.97-17.16 with it): keep it fixed across compared runs."""
    teacher_steps: Optional[int] = None
    """Sampler steps of the teacher's images; null: steps (sample agreement compares images from the same initial
    noise; set it, e.g. 25, to score a one-step student against its multi-step teacher)."""
    teacher_guidance_scale: Optional[float] = None
    """Guidance of the teacher's images; null: guidance_scale (null: the teacher's recorded settings)."""
    ema: bool = False
    """A run or checkpoint: its EMA weights (unet_ema/)."""
    checkpoints: Checkpoints = Checkpoints.all
    """A run folder: every checkpoint (all), or only the newest (latest)."""
    grid_images: int = 8
    """Images per model in the grids (the first prompts)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:N."""
    dtype: str = "auto"
    """auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16."""
    allow_pickle: bool = False
    """Load .bin (pickle) weights where there are no safetensors; pickle can run code when loaded."""
    log_to_run: bool = False
    """Evaluating a run: also log each checkpoint's row into the run's metrics.jsonl and trackers (log.trackers of
    its config.yaml) at the checkpoint's step, as eval/NAME (the teacher's as eval/teacher/NAME at step 0)."""
    reference_images: Optional[str] = None
    """FID/KID real images: a folder of images (searched recursively; each center-cropped to a square and resized
    to the generated images' saved size). Or set metrics.fid_reference_stats (FID only)."""
    agreement: AgreementConfig = field(default_factory=AgreementConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Weights of the image metrics (local paths; an unset one skips its metric with one line)."""

    def check(self, at: str) -> None:
        super().check(at)
        require(self.prompts is None or bool(self.prompts), "prompts", "at least one prompt, or null")
        require(not (self.prompts and self.prompt_file), "prompt_file", "set prompts or prompt_file, not both")
        require(self.num_images is None or self.num_images > 0, "num_images", "must be > 0 or null")
        require(self.seed >= 0, "seed", "must be >= 0")
        require(self.steps is None or self.steps > 0, "steps", "must be > 0 or null")
        require(self.guidance_scale is None or self.guidance_scale >= 0, "guidance_scale", "must be >= 0 or null")
        require(self.teacher_steps is None or self.teacher_steps > 0, "teacher_steps", "must be > 0 or null")
        require(self.teacher_guidance_scale is None or self.teacher_guidance_scale >= 0, "teacher_guidance_scale",
                "must be >= 0 or null")
        for key in ("resolution", "resize"):
            value = getattr(self, key)
            require(value is None or (value >= 8 and value % 8 == 0), key, "must be a multiple of 8, or null")
        require(self.batch_size > 0, "batch_size", "must be > 0")
        require(self.grid_images >= 0, "grid_images", "must be >= 0")
        require(not (self.reference_images and config_value(self.metrics, "fid_reference_stats")), "reference_images",
                f"set reference_images or {REFERENCE_STATS_KEY}, not both")
        require(not config_value(self.metrics, "inception_weights") or bool(self.reference_images)
                or bool(config_value(self.metrics, "fid_reference_stats")), INCEPTION_KEY,
                f"FID/KID need real images: set reference_images (a folder) or {REFERENCE_STATS_KEY} (a .npz)")
