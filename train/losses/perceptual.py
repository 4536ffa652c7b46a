"""LPIPS (VGG variant) in plain torch: a perceptual distance between two image batches.

Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", version 0.1
of richzhang/PerceptualSimilarity (the `lpips` package) with `net="vgg"`: the five ReLU outputs
relu1_2 ... relu5_3 of an ImageNet VGG16, each unit-normalised over channels, squared differences
weighted per channel by a learned 1x1 conv ("linear head"), averaged over space and summed over layers.
No torchvision: the VGG16 feature stack is built here with torchvision's layer numbering, so its
weight files load unchanged. eval/metrics/image_metrics.py wraps it as a metric; a trainer may use it as a loss
(the forward is differentiable; `load_lpips_vgg` freezes the weights).

Weights (`metrics.lpips_weights`): a file or a folder of files holding
- the VGG16 backbone: torchvision's `vgg16-397923af.pth` (download.pytorch.org/models/), keys
  `features.N.weight/bias` (`classifier.*` is ignored), or an `lpips.LPIPS(net="vgg")` state dict
  (`net.sliceK.N.*`, converted here);
- the linear heads `lin0.model.1.weight` ... `lin4.model.1.weight`: lpips' `lpips/weights/v0.1/vgg.pth`.
  torchmetrics ships the same file (`torchmetrics/functional/image/lpips_models/vgg.pth`); it is used
  when the given files have no heads.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from sdkd.train.formats.weight_files import load_strict, read_weights

# VGG16 (configuration "D") up to relu5_3: channels, "M" = 2x2 max pool. Layer indices follow torchvision.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# lpips' ScalingLayer: inputs in [-1, 1] -> ImageNet-normalised.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features[:30]` (conv 3x3 + ReLU, max pools), randomly initialised."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU()]
            channels = v
    return nn.Sequential(*layers)


class _Head(nn.Module):
    """lpips' NetLinLayer (dropout + 1x1 conv to one channel, no bias); the attribute names match its files."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LpipsVgg(nn.Module):
    """LPIPS-VGG distance: `forward(a, b)` with float images [N, 3, H, W] in [-1, 1] -> [N] distances
    (0 for identical images). Random weights until loaded (`load_lpips_vgg`)."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        for k, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{k}", _Head(channels))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs of [-1, 1] images."""
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0
        for k, (fa, fb) in enumerate(zip(self.taps(a), self.taps(b))):
            # unit length over channels (lpips' normalize_tensor, eps outside the root)
            fa = fa / (fa.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}")((fa - fb).square()).mean(dim=(2, 3))
        return total.flatten()


def torchmetrics_lpips_heads() -> Path | None:
    """The LPIPS v0.1 VGG heads that the torchmetrics package ships, if installed."""
    try:
        import torchmetrics
    except ImportError:
        return None
    file = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "vgg.pth"
    return file if file.is_file() else None


def _lpips_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lpips.LPIPS state-dict names (net.sliceK.N.weight) -> torchvision's (features.N.weight)."""
    return {re.sub(r"^net\.slice\d\.", "features.", name): t for name, t in state.items()}


def _not_used(name: str) -> bool:
    """VGG16's classifier and lpips' constant scaling buffers (kept by some exports)."""
    return name.startswith(("classifier.", "scaling_layer."))


def load_lpips_vgg(path: str | Path, key: str = "metrics.lpips_weights",
                   device: str | torch.device = "cpu") -> LpipsVgg:
    """LpipsVgg with the weights of `path` (a file or a folder; see the module docstring), frozen, in eval
    mode. A file without heads takes them from torchmetrics' copy of lpips' vgg.pth."""
    state = _lpips_names(read_weights(path, key))
    if not any(name.startswith("lin") for name in state) and (heads := torchmetrics_lpips_heads()):
        state |= read_weights(heads, key)
    net = LpipsVgg()
    load_strict(net, state, key, path, "an LPIPS-VGG / VGG16 weight file", ignore=_not_used)
    return net.requires_grad_(False).eval().to(device)
