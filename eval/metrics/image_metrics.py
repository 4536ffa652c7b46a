"""Image-quality metrics from local weights: FID and KID, CLIP score, LPIPS.

    from sdkd.eval.metrics.image_metrics import image_metrics
    metrics = image_metrics(cfg.metrics, device)      # a MetricsConfig (eval/metrics/config.py) or alike
    for line in metrics.skipped: print(line)          # "skipped FID/KID: set metrics.inception_weights to ..."
    metrics.fid_kid.update(real_uint8, real=True); metrics.fid_kid.update(fake_uint8, real=False)
    metrics.clip.update(fake_uint8, prompts); metrics.lpips.update(student_uint8, teacher_uint8)
    metrics.compute()                                 # {"fid": ..., "kid": ..., "kid_std": ..., "clip_score": ...}

Each metric has torchmetrics' shape (`update(...)`, `compute()`, `reset()`) and runs on the device it was
built for; `compute()` returns a dict of plain numbers. The statistics are torchmetrics' own
(FrechetInceptionDistance, KernelInceptionDistance, CLIPScore); only the networks are ours, loaded from the
user's files (never downloaded, never unpickled beyond tensors). With torchmetrics' states, metrics also
gather across processes when torch.distributed is initialised (not so the injected FID reference
statistics: give them on one process, or compute on one).

- FidKid: the FID Inception-v3 (eval/metrics/inception.py) feeds both metrics, once per batch. The real side is
  real images or a pytorch-fid statistics file (.npz with mu and sigma, read without pickle).
- ClipScore: torchmetrics' CLIPScore, 100 * max(cos(image, prompt), 0) averaged, with a local transformers
  CLIP folder (torchmetrics takes only hub names itself, so the model is handed over already loaded).
- Lpips: LPIPS-VGG (train/losses/perceptual.py), mean distance of image pairs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from sdkd.cli.errors import ConfigError, UserError, first_line
from sdkd.eval.metrics.config import (
    CLIP_KEY,
    INCEPTION_KEY,
    LPIPS_KEY,
    REFERENCE_STATS_KEY,
    MetricsConfig,
    check_metrics,
    config_value,
    skipped_lines,
)
from sdkd.eval.metrics.inception import NUM_FEATURES, load_fid_inception
from sdkd.train.losses.perceptual import load_lpips_vgg

__all__ = ["ClipScore", "FidKid", "ImageMetrics", "Lpips", "MetricsConfig", "image_metrics", "load_clip",
           "read_reference_stats"]


def _check_uint8(images: torch.Tensor, what: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3:
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what}: expected uint8 images [N, 3, H, W], got {got}")


# ---------------------------------------------------------------------------------------------
# FID and KID


def read_reference_stats(path: str | Path, key: str = REFERENCE_STATS_KEY) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu [2048], sigma [2048, 2048]) in float64 from a pytorch-fid statistics .npz (no pickle)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key '{key}': '{path}' does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not a .npz archive")
        with npz:
            if not {"mu", "sigma"} <= set(npz.files):
                raise ConfigError(f"config key '{key}': '{path}' has no 'mu' and 'sigma' arrays "
                                  f"(found: {', '.join(npz.files) or 'none'})")
            mu, sigma = npz["mu"], npz["sigma"]
    except (OSError, ValueError, EOFError) as err:
        raise ConfigError(f"config key '{key}': '{path}' is not a readable .npz file ({first_line(err)})") from None
    if mu.shape != (NUM_FEATURES,) or sigma.shape != (NUM_FEATURES, NUM_FEATURES):
        raise ConfigError(f"config key '{key}': '{path}' holds mu {list(mu.shape)} and sigma {list(sigma.shape)}; "
                          f"expected [{NUM_FEATURES}] and [{NUM_FEATURES}, {NUM_FEATURES}] (Inception pool features)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"config key '{key}': '{path}' holds non-finite statistics")
    return torch.from_numpy(mu.astype(np.float64)), torch.from_numpy(sigma.astype(np.float64))


class _SharedFeatures(nn.Module):
    """The `feature` module torchmetrics' FID and KID both call: the network runs once per batch (the second
    call with the same tensor gets the first call's features)."""

    num_features = NUM_FEATURES

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.last is None or self.last[0] is not images:
            self.last = (images, self.net(images))
        return self.last[1]


class FidKid:
    """FID and KID (torchmetrics) on the FID Inception-v3's pool features.

    `update(images, real)`: uint8 [N, 3, H, W] of any size (resized to 299). `compute()`:
    {"fid", "kid", "kid_std", "kid_subset_size"}; with `reference_stats` (a pytorch-fid .npz standing for the
    real images) only {"fid"}, and real images are refused. KID's subset size is lowered to the number of
    images when there are fewer; torchmetrics draws KID's subsets from torch's global random generator.
    """

    def __init__(self, inception_weights: str | Path, device: str | torch.device = "cpu",
                 kid_subset_size: int = 1000, kid_subsets: int = 100, reference_stats: str | Path | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.device = torch.device(device)
        self.reference = read_reference_stats(reference_stats) if reference_stats is not None else None
        self.network = load_fid_inception(inception_weights, INCEPTION_KEY, self.device)
        self.features = _SharedFeatures(self.network)
        self.fid = FrechetInceptionDistance(feature=self.features).to(self.device)
        with warnings.catch_warnings():  # "will save all extracted features": 8 KiB an image, as intended
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            self.kid = KernelInceptionDistance(feature=self.features, subsets=kid_subsets,
                                               subset_size=kid_subset_size).to(self.device)
        self.kid_subset_size = kid_subset_size
        self._set_reference()

    def _set_reference(self) -> None:
        """Write (mu, sigma) into torchmetrics' real-image sums so that its compute() returns them: with n
        samples, sum = n mu and sum of outer products = (n - 1) sigma + n mu mu^T (any n >= 2)."""
        if self.reference is None:
            return
        mu, sigma = (t.to(self.device) for t in self.reference)
        n = 2
        self.fid.real_features_sum = n * mu
        self.fid.real_features_cov_sum = (n - 1) * sigma + n * torch.outer(mu, mu)
        self.fid.real_features_num_samples = torch.tensor(n, device=self.device)

    def update(self, images: torch.Tensor, real: bool) -> None:
        _check_uint8(images, "FidKid.update")
        if real and self.reference is not None:
            raise ValueError("FidKid.update(real=True): the reference statistics stand for the real images")
        images = images.to(self.device)
        try:
            self.fid.update(images, real=real)
            if self.reference is None:
                self.kid.update(images, real=real)
        finally:
            self.features.last = None

    def counts(self) -> tuple[int, int]:
        """(real, generated) images seen (the real count is meaningless with reference statistics)."""
        return int(self.fid.real_features_num_samples), int(self.fid.fake_features_num_samples)

    def compute(self) -> dict[str, float]:
        n_real, n_fake = self.counts()
        if n_fake < 2 or n_real < 2:
            raise UserError(f"FID needs at least 2 real and 2 generated images, got {n_real} and {n_fake}")
        out = {"fid": float(self.fid.compute())}
        if self.reference is None:
            self.kid.subset_size = min(self.kid_subset_size, n_real, n_fake)
            kid, kid_std = self.kid.compute()
            out |= {"kid": float(kid), "kid_std": float(kid_std), "kid_subset_size": self.kid.subset_size}
        return out

    def reset(self, keep_real: bool = False) -> None:
        """Forget the generated images, and the real ones unless `keep_real` (to score several models against
        the same real images); reference statistics always stay."""
        for metric in (self.fid, self.kid):
            metric.reset_real_features = not keep_real  # torchmetrics' own switch, read by its reset()
            metric.reset()
        self._set_reference()

    def save_reference_stats(self, path: str | Path) -> Path:
        """The real images' (mu, sigma) as a pytorch-fid .npz, to use as `reference_stats` later."""
        n = self.fid.real_features_num_samples
        if self.reference is not None or n < 2:
            raise ValueError("save_reference_stats needs at least 2 real images (and no reference statistics)")
        mu = self.fid.real_features_sum / n
        sigma = (self.fid.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
        path = Path(path)
        np.savez(path, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy())
        return path


# ---------------------------------------------------------------------------------------------
# CLIP score


def load_clip(folder: str | Path, key: str = CLIP_KEY):
    """(CLIPModel, CLIPProcessor) from a local transformers folder; nothing is downloaded."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "is not a transformers model folder (no config.json)"
        raise ConfigError(f"config key '{key}': '{folder}' {what}")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers reports a bad folder in many exception types
        raise ConfigError(f"config key '{key}': '{folder}' is not a usable CLIP model folder "
                          f"({first_line(err)})") from None
    return model.eval().requires_grad_(False), processor


class _ClipEmbeddings(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings as tensors:
    transformers >= 5 returns model outputs (the embedding in `pooler_output`), which torchmetrics 1.9's
    CLIPScore does not unwrap (Lightning-AI/torchmetrics#3407, fixed after 1.9.0)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class ClipScore:
    """torchmetrics' CLIPScore: mean over images of 100 * cos(image, prompt), clamped at 0 (torchmetrics'
    scale; BK-SDM's numbers are plain cosines). `update(images, prompts)`: uint8 [N, 3, H, W] and N prompts."""

    def __init__(self, clip_folder: str | Path, device: str | torch.device = "cpu"):
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.device = torch.device(device)
        model, processor = load_clip(clip_folder)
        model = _ClipEmbeddings(model)
        # torchmetrics loads only hub names by itself; a callable hands it the local model.
        self.metric = CLIPScore(model_name_or_path=lambda: (model, processor)).to(self.device)

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        _check_uint8(images, "ClipScore.update")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"ClipScore.update: {len(images)} images but {len(prompts)} prompts")
        with torch.no_grad():
            self.metric.update(images.to(self.device), prompts)

    def compute(self) -> dict[str, float]:
        return {"clip_score": float(self.metric.compute())}

    def reset(self) -> None:
        self.metric.reset()


# ---------------------------------------------------------------------------------------------
# LPIPS


def _signed(images: torch.Tensor, what: str) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images [N, 3, H, W] -> float32 [-1, 1]."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what}: expected images [N, 3, H, W]")
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    if not images.is_floating_point():
        raise ValueError(f"{what}: expected uint8 or float images, got {images.dtype}")
    if images.numel() and (images.min() < -1 or images.max() > 1):
        raise ValueError(f"{what}: float images must lie in [-1, 1] (got {float(images.min()):.3g} .. "
                         f"{float(images.max()):.3g}); pass uint8 for [0, 255]")
    return images.float()


class Lpips:
    """Mean LPIPS-VGG distance of image pairs. `update(images_a, images_b)`: two batches of the same shape,
    each uint8 in [0, 255] or float in [-1, 1] (lpips' convention). `compute()`: {"lpips": mean}."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu"):
        from torchmetrics.aggregation import MeanMetric

        self.device = torch.device(device)
        self.network = load_lpips_vgg(weights, LPIPS_KEY, self.device)
        self.mean = MeanMetric().to(self.device)

    def update(self, images_a: torch.Tensor, images_b: torch.Tensor) -> None:
        a, b = _signed(images_a, "Lpips.update"), _signed(images_b, "Lpips.update")
        if a.shape != b.shape:
            raise ValueError(f"Lpips.update: shapes differ, {list(a.shape)} and {list(b.shape)}")
        with torch.no_grad():
            self.mean.update(self.network(a.to(self.device), b.to(self.device)))

    def compute(self) -> dict[str, float]:
        return {"lpips": float(self.mean.compute())}

    def reset(self) -> None:
        self.mean.reset()


# ---------------------------------------------------------------------------------------------
# All of them from the config


@dataclass
class ImageMetrics:
    """The metrics whose weights are set (None for the others) and one line per skipped metric."""

    fid_kid: Optional[FidKid] = None
    clip: Optional[ClipScore] = None
    lpips: Optional[Lpips] = None
    skipped: list[str] = field(default_factory=list)

    def compute(self) -> dict[str, float]:
        """Every built metric's results in one dict."""
        out: dict[str, float] = {}
        for metric in (self.fid_kid, self.clip, self.lpips):
            if metric is not None:
                out |= metric.compute()
        return out

    def reset(self) -> None:
        for metric in (self.fid_kid, self.clip, self.lpips):
            if metric is not None:
                metric.reset()


def image_metrics(cfg: Any, device: str | torch.device = "cpu") -> ImageMetrics:
    """Build the metrics whose weight path `cfg` sets (a MetricsConfig, an object with its fields, or a
    mapping); a bad path or file is a ConfigError naming the key and the file."""
    check_metrics(cfg)
    inception, clip, lpips = (config_value(cfg, name) for name in ("inception_weights", "clip_model",
                                                                   "lpips_weights"))
    return ImageMetrics(
        fid_kid=FidKid(inception, device, kid_subset_size=config_value(cfg, "kid_subset_size", 1000),
                       reference_stats=config_value(cfg, "fid_reference_stats")) if inception else None,
        clip=ClipScore(clip, device) if clip else None,
        lpips=Lpips(lpips, device) if lpips else None,
        skipped=skipped_lines(cfg))
