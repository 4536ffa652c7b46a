"""Noise -> teacher ODE output pairs: the (ε, ψ(x_φ(ε))) of SDXS's feature-matching warm-up (arXiv
2403.16627, eq. 10), made once and cached on disk.

Pair i: noise ε_i drawn from a CPU generator seeded `seed + i` (so a pair never depends on how many are
made), its prompt, and the clean latents x_0 the teacher's multi-step solver (DPM-Solver++ or DDIM,
`steps` steps, classifier-free guidance `guidance_scale`) reaches from ε_i. The solver's timesteps are
spaced "trailing", so its first step is at t = T-1, where the one-step student reads the same noise.

A set NAME lives in a cache folder as NAME.safetensors (noise, latents) and NAME.json, the manifest of
what made it (teacher and its weights' fingerprint, prompts, solver, steps, guidance, seed, count,
resolution). A set whose manifest
matches is reused; another is made again, with a one-line notice naming what changed. The manifest is
removed first and written last, each file renamed into place whole, so a run killed while making a set
never leaves one that a later run takes as complete.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import Dataset

from sdkd.cli.files import refuse_links, save_file, write_text
from sdkd.train.engine import console
from sdkd.train.formats.fingerprint import teacher_fingerprint, what_changed

SOLVERS = {"dpmsolver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}), "ddim": (DDIMScheduler, {})}
HELD_OUT_STREAM = 2 ** 32
"""Held-out noise is seeded `seed + HELD_OUT_STREAM + i`: never one of the training pairs' seeds."""


@dataclass(frozen=True)
class PairSettings:
    """Everything that decides a set of pairs; its manifest."""

    teacher: str
    prompts: tuple[str, ...]
    """One per pair."""
    solver: str
    steps: int
    guidance_scale: float
    seed: int
    resolution: int
    teacher_weights: str = ""
    """The fingerprint of the teacher's U-Net and text encoders (train/formats/fingerprint.py): new weights at
    the same path make the set stale."""

    @property
    def count(self) -> int:
        return len(self.prompts)

    def manifest(self) -> dict:
        return {**asdict(self), "prompts": list(self.prompts), "count": self.count}


class Pairs(Dataset):
    """A set of pairs on the CPU; as a data set, item i is {"noise", "latents", "caption", "key"}."""

    def __init__(self, noise: torch.Tensor, latents: torch.Tensor, settings: PairSettings):
        self.noise, self.latents, self.settings = noise, latents, settings

    def __len__(self) -> int:
        return len(self.noise)

    def __getitem__(self, index: int) -> dict:
        return {"noise": self.noise[index], "latents": self.latents[index],
                "caption": self.settings.prompts[index], "key": f"pair/{index}"}


def initial_noise(settings: PairSettings, shape: tuple[int, ...]) -> torch.Tensor:
    """[count, *shape] standard normal, row i from a CPU generator seeded `seed + i`."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(settings.seed + i))
                      for i in range(settings.count)])


@torch.no_grad()
def make_pairs(unet, parts, settings: PairSettings, batch_size: int = 8, autocast=nullcontext,
               desc: str = "ode pairs") -> Pairs:
    """The teacher `unet` (with `parts`' text encoders, tokenizers, VAE config and scheduler) solves from each
    pair's noise; a progress bar counts the pairs."""
    cls, extra = SOLVERS[settings.solver]
    scheduler = cls.from_config(parts.scheduler.config, timestep_spacing="trailing", **extra)
    pipe = parts.family.pipeline(parts, unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    side = settings.resolution // parts.vae_scale_factor
    noise = initial_noise(settings, (unet.config.in_channels, side, side))
    device, dtype = unet.device, unet.dtype
    was_training = unet.training
    unet.eval()
    out = []
    progress = console.progress(settings.count, desc, unit="pair")
    with autocast():
        for start in range(0, settings.count, batch_size):
            rows = slice(start, start + batch_size)
            result = pipe(list(settings.prompts[rows]), num_inference_steps=settings.steps,
                          guidance_scale=settings.guidance_scale, height=settings.resolution,
                          width=settings.resolution, latents=noise[rows].to(device, dtype), output_type="latent")
            out.append(result.images.float().cpu())
            progress.update(len(out[-1]))
    progress.close()
    unet.train(was_training)
    return Pairs(noise, torch.cat(out), settings)


def load(folder: str | Path, name: str, settings: PairSettings) -> tuple[Pairs | None, str | None]:
    """(the stored set, None) when its manifest matches `settings`; else (None, why not), or (None, None) when
    there is none."""
    folder = Path(folder)
    manifest, tensors = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not manifest.is_file():
        return None, None
    try:
        stored = json.loads(manifest.read_text())
    except (OSError, ValueError):
        stored = {}
    wanted = settings.manifest()
    if stored != wanted:
        return None, what_changed(stored if isinstance(stored, dict) else {}, wanted)
    try:
        data = load_file(str(tensors))
        pairs = Pairs(data["noise"], data["latents"], settings)
    except (OSError, SafetensorError, KeyError) as err:
        return None, f"{tensors.name} unreadable ({type(err).__name__})"
    if len(pairs.noise) != settings.count or pairs.noise.shape != pairs.latents.shape:
        return None, f"{tensors.name} holds {len(pairs.noise)} pairs"
    return pairs, None


def save(pairs: Pairs, folder: str | Path, name: str) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest, tensors = folder / f"{name}.json", folder / f"{name}.safetensors"
    manifest.unlink(missing_ok=True)  # from here until the end, the set is not taken as complete
    tmp = folder / f".{name}.safetensors.tmp"
    save_file({"noise": pairs.noise.contiguous(), "latents": pairs.latents.contiguous()}, str(tmp))
    os.replace(tmp, tensors)
    write_text(manifest, json.dumps(pairs.settings.manifest(), indent=1))


def load_or_make(folder: str | Path, name: str, unet, parts, settings: PairSettings, batch_size: int = 8,
                 autocast=nullcontext) -> Pairs:
    """The set NAME in `folder` when it was made with `settings` and this teacher's weights, else made now (with a
    notice) and saved."""
    refuse_links(folder, "ODE-pair folder")
    settings = replace(settings, teacher_weights=teacher_fingerprint(unet, parts))
    pairs, why = load(folder, name, settings)
    if pairs is not None:
        return pairs
    if why is not None:
        print(f"note: ode pairs {Path(folder) / name}: made with other settings ({why}); making them again",
              file=sys.stderr, flush=True)
    pairs = make_pairs(unet, parts, settings, batch_size, autocast, desc=f"ode pairs ({name})")
    save(pairs, folder, name)
    return pairs
