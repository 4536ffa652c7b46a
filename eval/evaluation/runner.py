"""One evaluation (eval/evaluate.py): the teacher, then each model, sampled on the fixed prompt set and scored.

Per model, one at a time on the device: parameters, MACs and latency (eval/evaluation/cost.py); the prompt set sampled
(image i seeded seed + i) into OUT/images/NAME/00000.png ...; the image metrics whose weights are given
(eval/metrics/image_metrics.py: FID and KID against the reference, CLIP score, LPIPS against the teacher's image);
and teacher agreement (train/losses/agreement.py): noise-prediction MSE on the held-out triples, sample MSE and
PSNR against the teacher's image from the same initial noise; when every prompt is a synthetic-shapes caption
(the toy world's), how often the colours read from the images are those their captions name (fg_colour,
bg_colour: data/sources/colour_check.py). The teacher goes first, so its images are on
disk when the models are compared with them; it is loaded once.
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdkd.cli.errors import ConfigError
from sdkd.data.sources.colour_check import hits, is_check_caption
from sdkd.eval.evaluation import cost
from sdkd.eval.evaluation.config import EvaluateConfig, Sampler
from sdkd.eval.evaluation.targets import TEACHER, Target, TeacherSpec, load_teacher_model
from sdkd.eval.inference.pipeline import Pipeline, load_pipeline
from sdkd.eval.metrics.image_metrics import ImageMetrics, image_metrics
from sdkd.train.engine import console
from sdkd.train.losses import agreement

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _samplers() -> dict:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    # PNDM as SD-1.x's own scheduler_config (BK-SDM's protocol samples with it): PLMS steps only.
    return {Sampler.pndm: (PNDMScheduler, dict(skip_prk_steps=True, set_alpha_to_one=False)),
            Sampler.ddim: (DDIMScheduler, dict(set_alpha_to_one=False)),
            Sampler.euler: (EulerDiscreteScheduler, {})}


def to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> uint8 [N, 3, H, W], as the image metrics take them."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def square(image: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square, then resize (bicubic) to size x size."""
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return image.convert("RGB").crop(box).resize((size, size), Image.BICUBIC)


@dataclass
class Evaluation:
    """The teacher, then each model, scored into report rows; images under `out`."""

    cfg: EvaluateConfig
    out: Path
    prompts: list[str]
    teacher: TeacherSpec | None
    """None: no teacher row and no agreement metrics."""
    resolution: int | None = None
    """Image size; None: the first model's (the teacher's) native size."""
    run_cfg: object = None
    """The evaluated run's config (eval/evaluation/targets.py's read_run_config), when a run or its checkpoint is
    evaluated."""
    run: Path | None = None
    device: torch.device | None = field(default=None, init=False)
    """The models' device and dtype, once the first has loaded."""
    dtype: torch.dtype | None = field(default=None, init=False)
    metrics: ImageMetrics | None = field(default=None, init=False)
    triples: agreement.Triples | None = field(default=None, init=False)

    def run_all(self, targets: list[Target]) -> list[dict]:
        """The report's rows, the teacher's first."""
        cfg = self.cfg
        self.progress = console.progress(len(self.prompts) * (len(targets) + (self.teacher is not None)), "evaluate",
                                         unit="img")
        rows = []
        if self.teacher is not None:
            pipe = load_teacher_model(self.teacher, cfg.device, cfg.dtype, cfg.allow_pickle)
            self._start(pipe)
            if cfg.agreement.enabled:
                settings, stored = self._triple_settings(pipe)
                self.triples = agreement.load_or_make(stored or self.out / agreement.TRIPLES_FILE, pipe.unet, pipe.pipe,
                                                      settings, cfg.agreement.batch_size,
                                                      save_to=self.out / agreement.TRIPLES_FILE)
            rows.append(self._score(pipe, Target(TEACHER, self.teacher.path), cfg.teacher_steps or cfg.steps,
                                    _first(cfg.teacher_guidance_scale, cfg.guidance_scale), teacher=True))
            del pipe
            _release()
        for target in targets:
            pipe = load_pipeline(target.path, device=cfg.device, dtype=cfg.dtype, ema=cfg.ema,
                                 allow_pickle=cfg.allow_pickle)
            self._start(pipe)
            rows.append(self._score(pipe, target, cfg.steps, cfg.guidance_scale, teacher=False))
            del pipe
            _release()
        self.progress.close()
        return rows

    def _triple_settings(self, teacher_pipe: Pipeline) -> tuple[agreement.TripleSettings, Path | None]:
        """The held-out triples' settings, and where triples made with them may already be stored: a run's own
        (agreement.from_run: its `eval` section and OUTPUT/eval_triples.safetensors), else the `agreement` section
        (guidance: guidance_scale, else the teacher's default)."""
        a, teacher = self.cfg.agreement, self.teacher.path
        if a.from_run and self.run_cfg is not None:
            settings = replace(agreement.run_settings(self.run_cfg), teacher=teacher)
            return settings, self.run / agreement.TRIPLES_FILE
        guidance = _first(self.cfg.guidance_scale, teacher_pipe.default_guidance)
        return agreement.resolve_settings(a, self.prompts, guidance, self.resolution, teacher), None

    def triple_record(self) -> dict | None:
        """The held-out triples' settings for the report (None: no noise MSE was computed)."""
        return None if self.triples is None else json.loads(self.triples.settings.to_json())

    def _start(self, pipe: Pipeline) -> None:
        """The first model fixes the resolution and device; the image metrics are built then (their weights load
        once) and fed the reference images."""
        if self.resolution is None:
            self.resolution = pipe.settings()["height"]
        if self.cfg.sampler != Sampler.dpm_solver:
            scheduler_class, config = _samplers()[self.cfg.sampler]
            pipe.set_sampler(scheduler_class, **config)
        if self.metrics is None:
            self.device, self.dtype = pipe.device, pipe.dtype
            self.metrics = image_metrics(self.cfg.metrics, pipe.device)
            if self.metrics.fid_kid is not None and self.cfg.reference_images:
                self._feed_reference(Path(self.cfg.reference_images))

    def _feed_reference(self, folder: Path) -> None:
        """The real images of FID and KID, fed once (kept when the generated side is reset between models)."""
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if len(files) < 2:
            raise ConfigError(f"config key 'reference_images': '{folder}' "
                              + ("holds fewer than 2 images" if folder.is_dir() else "is not a folder"))
        fid_kid = self.metrics.fid_kid
        size = self.cfg.resize or self.resolution
        bar = console.progress(len(files), "reference images", unit="img")
        for start in range(0, len(files), 32):
            batch = []
            for path in files[start:start + 32]:
                try:
                    with Image.open(path) as im:
                        batch.append(square(im, size))
                except OSError as err:
                    print(f"warning: reference image {path} skipped: {err}", file=sys.stderr)
            if batch:
                fid_kid.update(to_uint8(batch), real=True)
            bar.update(len(files[start:start + 32]))
        bar.close()

    def _score(self, pipe: Pipeline, target: Target, steps: int | None, guidance: float | None,
               teacher: bool) -> dict:
        """`steps`, `guidance`: None takes the model's defaults (its recorded sampling settings, else 25 and 7.5)."""
        cfg = self.cfg
        used = pipe.settings(steps, guidance)
        steps, guidance = used["steps"], used["guidance_scale"]
        print(f"{target.name}: {steps} steps, guidance {guidance:g}"
              + ("" if cfg.steps is not None and cfg.guidance_scale is not None else
                 f" (defaults: {pipe.describe_defaults()})"), flush=True)
        row = {"name": target.name, "step": target.step, "model": pipe.loaded.get("unet") or target.path,
               "steps": steps, "guidance_scale": guidance}
        row |= cost.pipeline_params(pipe.pipe)
        row["unet_macs"] = cost.unet_macs(pipe.pipe, self.resolution, pipe.device, pipe.dtype)
        if cfg.latency.enabled:
            row |= cost.latency(pipe, self.prompts[0], steps, guidance, self.resolution, cfg.seed, cfg.negative_prompt,
                                cfg.latency.warmup, cfg.latency.repeats)
        if self.triples is not None:
            row |= agreement.noise_mse(pipe.unet, self.triples, cfg.agreement.batch_size)
        row |= self._sample(pipe, target.name, steps, guidance, compare=self.teacher is not None and not teacher)
        return row

    def _sample(self, pipe: Pipeline, name: str, steps: int, guidance: float, compare: bool) -> dict:
        """Sample the prompt set into OUT/images/NAME/, updating the image metrics and the comparison with the
        teacher's images; the metrics' results."""
        cfg, m = self.cfg, self.metrics
        folder = self.out / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        mses, lpips_fed, colour_hits = [], False, []
        # The toy world's check that images follow their captions, when every prompt is a synthetic-shapes one.
        check_colours = all(is_check_caption(prompt) for prompt in self.prompts)
        for start in range(0, len(self.prompts), cfg.batch_size):
            chunk = self.prompts[start:start + cfg.batch_size]
            images = pipe(chunk, negative_prompt=cfg.negative_prompt, steps=steps, guidance_scale=guidance,
                          seed=cfg.seed + start, batch_size=len(chunk), height=self.resolution, width=self.resolution)
            if cfg.resize:
                images = [im.resize((cfg.resize, cfg.resize), Image.BICUBIC) for im in images]
            for i, im in enumerate(images, start):
                im.save(folder / f"{i:05d}.png")
                if check_colours:
                    colour_hits.append(hits(im, self.prompts[i]))
            pixels = to_uint8(images)
            if m.fid_kid is not None:
                m.fid_kid.update(pixels, real=False)
            if m.clip is not None:
                m.clip.update(pixels, chunk)
            if compare:
                reference = to_uint8([_read(self.out / "images" / TEACHER / f"{i:05d}.png")
                                      for i in range(start, start + len(chunk))])
                mses += [agreement.image_mse(a.float() / 255, b.float() / 255) for a, b in zip(pixels, reference)]
                if m.lpips is not None:
                    m.lpips.update(pixels, reference)
                    lpips_fed = True
            self.progress.update(len(chunk))
        result = {}
        if colour_hits:
            result |= dict(zip(("fg_colour", "bg_colour"), np.mean(colour_hits, axis=0).tolist()))
        if mses:
            result |= {"sample_mse": float(np.mean(mses)),
                       "sample_psnr": float(np.mean([agreement.psnr(e) for e in mses]))}
        if m.fid_kid is not None:
            result |= m.fid_kid.compute()
        if m.clip is not None:
            result |= m.clip.compute()
        if lpips_fed:
            result |= m.lpips.compute()
        for metric in (m.clip, m.lpips):
            if metric is not None:
                metric.reset()
        if m.fid_kid is not None:
            m.fid_kid.reset(keep_real=True)  # the next model is scored against the same real images
        return result


def _read(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _release() -> None:
    """Give back the memory of the model just scored before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first(*values):
    return next((v for v in values if v is not None), None)
