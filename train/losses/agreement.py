"""Teacher agreement: how close a model is to its teacher, measured without data or external weights.

Held-out triples (x_t, t, prompt), the same for in-loop evaluation (train/engine/loop.py, `eval.every`) and
eval/evaluate.py:

- x_0: the teacher's own latents, sampled for each prompt (prompt i from initial noise seeded `seed + i`,
  DPM-Solver++, `teacher_steps` steps, the settings' guidance), so no image data is needed;
- t: `timesteps` timesteps spread evenly over the training schedule;
- x_t = add_noise(x_0, noise, t) with fixed noise (a generator seeded from `seed`, another stream);
- the prompt's conditioning from the teacher pipeline's text encoder.

They are made once and stored with the teacher's predictions on them and the fingerprint of its weights (a
run keeps them in OUTPUT/eval_triples.safetensors), so a later evaluation only runs the model. The noise-prediction MSE
is the mean squared difference between the model's and the teacher's U-Net outputs on the triples
(lower is closer; 0 for the teacher itself), overall and per timestep.

Sample agreement compares images the model and the teacher generate from the same initial noise (same
prompts, seeds, sampler, steps and guidance): MSE of the images in [0, 1] and PSNR = 10 log10(1 / MSE),
capped at `MAX_PSNR` for identical images.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from sdkd.cli.files import save_file
from sdkd.train.formats.fingerprint import teacher_fingerprint, what_changed
from sdkd.train.models.families import Conditioning, family_of, prompt_batch

TRIPLES_FILE = "eval_triples.safetensors"  # in a run folder, and in an evaluation's output folder
NOISE_STREAM = 2 ** 32  # the added noise's generator is seeded seed + this: never one of the x_0 seeds (seed + i)
MAX_PSNR = 100.0  # dB, for identical images (MSE 0)
_COND = "cond."  # prefix of the conditioning's tensors in the triples file


@dataclass(frozen=True)
class TripleSettings:
    """Everything that decides the triples; stored beside them, and compared before a stored set is reused."""

    prompts: tuple[str, ...]
    seed: int
    timesteps: int
    teacher_steps: int
    guidance_scale: float
    resolution: int
    teacher: str
    """Names the teacher whose latents and predictions they hold (a run's `teacher`, eval/evaluate.py's --teacher)."""
    teacher_weights: str = ""
    """The fingerprint of that teacher's U-Net and text encoders (train/formats/fingerprint.py): new weights at the
    same path make stored triples stale."""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "prompts": list(self.prompts)}, sort_keys=True)


def resolve_settings(section, prompts: list[str], guidance_scale: float, resolution: int,
                     teacher: str) -> TripleSettings:
    """A triples config section (`TriplesConfig`, or the same keys read from a config.yaml) with its nulls
    taken from the given defaults."""
    chosen = list(section.prompts) if section.prompts else list(prompts)
    guidance = section.guidance_scale if section.guidance_scale is not None else guidance_scale
    return TripleSettings(tuple(chosen[:section.num_prompts]), int(section.seed), int(section.timesteps),
                          int(section.teacher_steps), float(guidance), int(section.resolution or resolution),
                          str(teacher))


def run_settings(cfg) -> TripleSettings:
    """A run's triples: its `eval` section, nulls from `sample` and `data` (cfg: a Config, or a run's
    config.yaml read with OmegaConf)."""
    return resolve_settings(cfg.eval, list(cfg.sample.prompts), cfg.sample.guidance_scale,
                            cfg.sample.resolution or cfg.data.resolution, cfg.teacher)


def spread_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    """`count` timesteps at the centres of equal slices of [0, num_train_timesteps): 4 of 1000 -> 125 ... 875."""
    return [(2 * k + 1) * num_train_timesteps // (2 * count) for k in range(count)]


# ---------------------------------------------------------------------------------------------
# The triples


@dataclass
class Triples:
    """N = prompts x timesteps held-out inputs (prompt-major) and the teacher's predictions, on the CPU."""

    noisy: torch.Tensor          # x_t [N, C, h, w], float32
    timesteps: torch.Tensor      # t [N], int64
    cond: Conditioning           # the prompts' conditioning [N, ...], float32
    teacher_pred: torch.Tensor   # the teacher's U-Net output on them [N, C, h, w], float32
    settings: TripleSettings

    def __len__(self) -> int:
        return len(self.timesteps)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {"noisy": self.noisy, "timesteps": self.timesteps, "teacher_pred": self.teacher_pred,
                   **{_COND + name: t for name, t in self.cond.tensors().items()}}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"sdkd.triples": self.settings.to_json()})
        tmp.replace(path)  # never a half-written file under the real name
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Triples | None":
        """The stored triples, or None when the file is missing or unreadable."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["sdkd.triples"])
            tensors = load_file(str(path))
            cond = Conditioning.from_tensors({k[len(_COND):]: v for k, v in tensors.items() if k.startswith(_COND)})
            settings = TripleSettings(**{**meta, "prompts": tuple(meta["prompts"])})
            return cls(tensors["noisy"], tensors["timesteps"], cond, tensors["teacher_pred"], settings)
        except (OSError, SafetensorError, KeyError, TypeError, ValueError):
            return None


def _device_dtype(unet) -> tuple[torch.device, torch.dtype]:
    p = next(unet.parameters())
    return p.device, p.dtype


@torch.no_grad()
def teacher_latents(teacher_unet, parts, settings: TripleSettings, autocast=nullcontext) -> torch.Tensor:
    """The teacher's clean latents x_0 [P, C, h, w] (float32, CPU), one per prompt: prompt i from initial noise
    drawn on the CPU with seed + i (the same on every device). `parts` holds the VAE, text encoders, tokenizers
    and scheduler as its family's `components` (a `PipelineParts` or a diffusers pipeline)."""
    family = family_of(teacher_unet.config, "teacher")
    pipe = family.pipeline(parts, teacher_unet, DPMSolverMultistepScheduler.from_config(parts.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    device, dtype = _device_dtype(teacher_unet)
    side = settings.resolution // parts.vae_scale_factor
    shape = (1, teacher_unet.config.in_channels, side, side)
    latents = []
    was_training = teacher_unet.training
    teacher_unet.eval()
    with autocast():
        for i, prompt in enumerate(settings.prompts):
            start = torch.randn(shape, generator=torch.Generator().manual_seed(settings.seed + i))
            out = pipe(prompt, num_inference_steps=settings.teacher_steps, guidance_scale=settings.guidance_scale,
                       height=settings.resolution, width=settings.resolution, output_type="latent",
                       latents=start.to(device, dtype))
            latents.append(out.images.float().cpu())
    teacher_unet.train(was_training)
    return torch.cat(latents)


@torch.no_grad()
def make_triples(teacher_unet, parts, settings: TripleSettings, batch_size: int = 8,
                 autocast=nullcontext) -> Triples:
    """The held-out triples of `settings` and the teacher's predictions on them."""
    x0 = teacher_latents(teacher_unet, parts, settings, autocast)
    noise_schedule = DDPMScheduler.from_config(parts.scheduler.config)
    ts = spread_timesteps(settings.timesteps, noise_schedule.config.num_train_timesteps)
    per_prompt = len(ts)
    x0 = x0.repeat_interleave(per_prompt, dim=0)  # prompt-major: triple i * K + k is prompt i at timestep k
    timesteps = torch.tensor(ts * len(settings.prompts), dtype=torch.long)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(settings.seed + NOISE_STREAM))
    noisy = noise_schedule.add_noise(x0, noise, timesteps)
    family = family_of(teacher_unet.config, "teacher")
    with autocast():
        cond = family.encode(parts, prompt_batch(list(settings.prompts), settings.resolution))
    cond = Conditioning.from_tensors({name: t.float().cpu().repeat_interleave(per_prompt, dim=0)
                                      for name, t in cond.tensors().items()})
    triples = Triples(noisy, timesteps, cond, torch.empty(0), settings)
    triples.teacher_pred = predict(teacher_unet, triples, batch_size, autocast)
    return triples


def load_or_make(path: str | Path, teacher_unet, parts, settings: TripleSettings, batch_size: int = 8,
                 autocast=nullcontext, save_to: str | Path | None = None) -> Triples:
    """The triples stored at `path` when they were made with `settings` and this teacher's weights; else made now
    (with a notice naming what changed, when stored ones differ) and saved to `save_to` (default: `path`)."""
    settings = replace(settings, teacher_weights=teacher_fingerprint(teacher_unet, parts))
    stored = Triples.load(path) if Path(path).is_file() else None
    if stored is not None and stored.settings == settings:
        return stored
    if stored is not None:
        print(f"note: held-out triples {path}: made with other settings "
              f"({what_changed(json.loads(stored.settings.to_json()), json.loads(settings.to_json()))}); "
              f"making them again", file=sys.stderr, flush=True)
    triples = make_triples(teacher_unet, parts, settings, batch_size, autocast)
    triples.save(save_to or path)
    return triples


# ---------------------------------------------------------------------------------------------
# Agreement


@torch.no_grad()
def predict(unet, triples: Triples, batch_size: int = 8, autocast=nullcontext) -> torch.Tensor:
    """`unet`'s output on every triple, float32 on the CPU; run in eval mode, its mode restored after."""
    device, dtype = _device_dtype(unet)
    was_training = unet.training
    unet.eval()
    out = []
    with autocast():
        for start in range(0, len(triples), batch_size):
            rows = slice(start, start + batch_size)
            cond = Conditioning.from_tensors({k: v[rows] for k, v in triples.cond.tensors().items()})
            pred = unet(triples.noisy[rows].to(device, dtype), triples.timesteps[rows].to(device),
                        **cond.to(device, dtype).unet_kwargs()).sample
            out.append(pred.float().cpu())
    unet.train(was_training)
    return torch.cat(out)


def noise_mse(unet, triples: Triples, batch_size: int = 8, autocast=nullcontext) -> dict[str, float]:
    """`noise_mse`: mean squared difference between `unet`'s and the teacher's predictions on the triples; and
    `noise_mse_tT` for each timestep T."""
    err = (predict(unet, triples, batch_size, autocast) - triples.teacher_pred).pow(2).flatten(1).mean(1)
    result = {"noise_mse": err.mean().item()}
    for t in triples.timesteps.unique().tolist():
        result[f"noise_mse_t{t}"] = err[triples.timesteps == t].mean().item()
    return result


def image_mse(a, b) -> float:
    """Mean squared difference of two images (arrays or tensors of the same shape, values in [0, 1])."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes: {a.shape} and {b.shape}")
    return float(np.mean((a - b) ** 2))


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio (dB) of images in [0, 1] from their MSE, `MAX_PSNR` for identical ones."""
    return MAX_PSNR if mse <= 0 else min(MAX_PSNR, 10 * math.log10(1.0 / mse))
