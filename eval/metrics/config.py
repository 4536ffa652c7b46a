"""The `metrics` section of the evaluate config: where the image-quality metrics' weights are.

Nothing heavy is imported here (config loading and --help stay fast); eval/metrics/image_metrics.py builds the
metrics. Every weight is a local path the user gives: nothing is downloaded at run time, and a metric
whose path is unset is skipped with one line naming the key to set (`skipped_lines`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from sdkd.cli.errors import require
from sdkd.data.sources.config import Section

SECTION = "metrics"
INCEPTION_KEY = f"{SECTION}.inception_weights"
REFERENCE_STATS_KEY = f"{SECTION}.fid_reference_stats"
KID_SUBSET_KEY = f"{SECTION}.kid_subset_size"
CLIP_KEY = f"{SECTION}.clip_model"
LPIPS_KEY = f"{SECTION}.lpips_weights"


@dataclass
class MetricsConfig(Section):
    inception_weights: Optional[str] = None
    """FID/KID: the FID Inception-v3 weights ("pt_inception-2015-12-05", 2048-d pool features) as a local
    .safetensors or .pth file: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's
    weights-inception-2015-12-05-6726825d.pth (eval/metrics/inception.py says where to get them). null: FID and
    KID are skipped."""
    fid_reference_stats: Optional[str] = None
    """FID against precomputed real-image statistics instead of real images: a .npz with `mu` (2048) and
    `sigma` (2048x2048), as pytorch-fid's --save-stats writes (BK-SDM's MS-COCO statistics are such a
    file). KID needs the real images themselves and is skipped then."""
    kid_subset_size: int = 1000
    """KID: images per random subset (100 subsets); lowered to the number of images when there are fewer."""
    clip_model: Optional[str] = None
    """CLIP score: a local transformers CLIP model folder (config.json, weights, tokenizer and preprocessor
    files), e.g. a copy of openai/clip-vit-large-patch14 (torchmetrics' default). Reported on torchmetrics'
    scale, 100 * max(cosine, 0); BK-SDM reports the plain mean cosine of open_clip ViT-g-14. null: skipped."""
    lpips_weights: Optional[str] = None
    """LPIPS (VGG): a local file or folder with the VGG16 backbone (torchvision's vgg16-397923af.pth) and,
    optionally, lpips' v0.1 linear heads (vgg.pth; torchmetrics' copy is used when absent); see
    train/losses/perceptual.py. null: LPIPS is skipped."""

    def check(self, at: str) -> None:
        super().check(at)
        check_metrics(self)  # its keys are metrics.*: the section's place in eval/evaluate.py's config


# metric -> (config field, key, what to put there): the skip line of each metric without weights.
WEIGHTS = {
    "FID/KID": ("inception_weights", INCEPTION_KEY, "a local Inception file"),
    "CLIP score": ("clip_model", CLIP_KEY, "a local CLIP model folder"),
    "LPIPS": ("lpips_weights", LPIPS_KEY, "a local LPIPS-VGG weight file"),
}


def config_value(cfg: Any, name: str, default: Any = None) -> Any:
    """`cfg.name` of a MetricsConfig, any object with such attributes, or a mapping (dict, DictConfig);
    an empty string counts as unset."""
    if cfg is None:
        return default
    value = cfg.get(name, default) if hasattr(cfg, "keys") else getattr(cfg, name, default)
    return default if value is None or value == "" else value


def skipped_lines(cfg: Any) -> list[str]:
    """One line per metric whose weight path is unset, naming the key to set."""
    return [f"skipped {metric}: set {key} to {what}" for metric, (name, key, what) in WEIGHTS.items()
            if config_value(cfg, name) is None]


def check_metrics(cfg: Any) -> None:
    """Config checks that need no files (the files are checked when the metrics are built)."""
    subset = config_value(cfg, "kid_subset_size", 1000)
    require(isinstance(subset, int) and subset >= 2, KID_SUBSET_KEY, f"must be an integer >= 2, got {subset!r}")
    require(not (config_value(cfg, "fid_reference_stats") and config_value(cfg, "inception_weights") is None),
            REFERENCE_STATS_KEY, f"needs {INCEPTION_KEY} too (the generated images' features)")
