"""SDXS's feature-matching loss (arXiv 2403.16627, eq. 10), "inspired by the DISTS loss":

    L_FM = Σ_l w_l · (1 - SSIM(f_l(x_θ(ε)), f_l(ψ(x_φ(ε)))))

between feature maps of the one-step student's output and of the teacher's ODE output for the same
noise ε. SSIM is the usual Gaussian-window structural similarity (Wang et al. 2004) computed per channel
of each feature map and averaged; its stabilising constants follow each target map's range (a feature
map has no fixed [0, 1] range like an image). The paper names three extractors that "all yield
favorable results" and gives no layers or weights; each is here, none downloads anything:

- `unet_encoder` (default): the frozen teacher U-Net's encoder on the latents themselves, at a fixed
  timestep: the output of each down block before its downsampler, and of the mid block. The forward
  stops after the last of them (the decoder half never runs). `UNetEncoder` also gives the online
  score model's bottleneck to the optional adversarial head (DMD2's classifier).
- `vgg`: VGG16's five LPIPS taps (relu1_2 ... relu5_3, train/losses/perceptual.py's network and weight loading)
  of the images the teacher's VAE decodes.
- `dinov2`: four evenly spaced blocks of a local transformers DINOv2 folder, patch tokens as maps, on
  the decoded images resized to `image_size`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from sdkd.cli.errors import ConfigError, first_line
from sdkd.train.models.families import Conditioning
from sdkd.train.models.features import FeatureHooks

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# SSIM on feature maps


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian of `size` taps."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
         data_range: float | torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample SSIM of [B, C, H, W] maps, averaged over channels and the valid (unpadded) positions.

    The window shrinks to the largest odd size that fits the map (a 2x2 map: 1, where SSIM reduces to its
    luminance term); its sigma shrinks with it. `data_range` sets C1 = (0.01 L)², C2 = (0.03 L)²; None: L is
    each sample's range of `y` (the target), detached."""
    x, y = x.float(), y.float()
    b, c, h, w = x.shape
    size = min(window, h, w)
    size -= 1 - size % 2
    g = gaussian_window(size, sigma * size / window).to(x.device)
    kernel_h, kernel_w = g.view(1, 1, size, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, size).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kernel_h, groups=c), kernel_w, groups=c)

    if data_range is None:
        flat = y.detach().flatten(1)
        data_range = (flat.amax(1) - flat.amin(1)).clamp_min(1e-6).view(b, 1, 1, 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    value = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return value.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# Extractors: (latents [B, C, h, w], conditioning) -> feature maps


class _Stop(Exception):
    """Raised by the hook after the last wanted module: the rest of the U-Net need not run."""


def encoder_layers(unet) -> list[str]:
    """The default `unet_encoder` layers: each down block's output before its downsampler (its last attention,
    else its last resnet) and the mid block."""
    names = []
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        kind, count = ("attentions", len(attentions)) if attentions else ("resnets", len(block.resnets))
        names.append(f"down_blocks.{i}.{kind}.{count - 1}")
    if unet.mid_block is not None:
        names.append("mid_block")
    return names


class UNetEncoder:
    """Named intermediate outputs of a U-Net at a fixed timestep, running it only as far as needed.

    `context` is entered around each forward (for a U-Net carrying the online LoRA: its adapters off, so it
    is the frozen teacher). Gradients flow to the input, not into the (frozen) weights."""

    def __init__(self, unet, names: Sequence[str], timestep: int = 0,
                 context: Callable[[], object] = nullcontext, autocast: Callable[[], object] = nullcontext):
        self.unet, self.names, self.timestep = unet, list(names), timestep
        self.layers = len(self.names)
        self.context, self.autocast = context, autocast
        self.hooks = FeatureHooks(unet, self.names)
        modules = dict(unet.named_modules())
        # Only an encoder-side list (down blocks, mid block) can stop early; the mid block, else the last down
        # block, runs last of those.
        encoder_side = all(n.startswith(("conv_in", "time_", "down_blocks", "mid_block")) for n in self.names)
        stop = "mid_block" if unet.mid_block is not None else f"down_blocks.{len(unet.down_blocks) - 1}"
        self._stopping = False
        if encoder_side:
            modules[stop].register_forward_hook(self._stop)

    def _stop(self, module, args, output):
        if self._stopping:
            raise _Stop

    def __call__(self, latents: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        dtype = self.unet.dtype
        timesteps = torch.full((len(latents),), self.timestep, device=latents.device, dtype=torch.long)
        with self.context(), self.autocast(), self.hooks.capture():
            self._stopping = True
            try:
                self.unet(latents.to(dtype), timesteps, **cond.to(dtype=dtype).unet_kwargs())
            except _Stop:
                pass
            finally:
                self._stopping = False
        return [f.float() for f in self.hooks.features]


def _decoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scaled latents -> images in [-1, 1] through the (frozen) VAE, differentiable in the latents."""
    def decode(latents: torch.Tensor) -> torch.Tensor:
        unscaled = latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
        return vae.decode(unscaled.to(vae.dtype)).sample.float()
    return decode


class VggFeatures:
    """LPIPS' five VGG16 taps of the decoded images (weights from a local file: train/losses/perceptual.py)."""

    def __init__(self, path: str, vae, device, autocast=nullcontext):
        from sdkd.train.losses.perceptual import LPIPS_TAPS, load_lpips_vgg

        self.net, self.layers = load_lpips_vgg(path, "fm.weights_path", device), len(LPIPS_TAPS)
        self.decode, self.autocast = _decoder(vae), autocast

    def __call__(self, latents: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        with self.autocast():
            return [f.float() for f in self.net.taps(self.decode(latents))]


class DinoFeatures:
    """Four evenly spaced blocks of a DINOv2 (transformers folder, local) on the decoded images, each block's
    patch tokens as a [B, width, H/patch, W/patch] map."""

    def __init__(self, path: str, vae, device, image_size: int = 224, autocast=nullcontext):
        from transformers import Dinov2Model

        try:
            self.net = Dinov2Model.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"config key 'fm.weights_path': '{path}' is no DINOv2 folder with safetensors "
                              f"weights ({first_line(err)})") from None
        self.net.requires_grad_(False).eval().to(device)
        depth = self.net.config.num_hidden_layers
        self.blocks = sorted({max(1, round(depth * k / 4)) for k in range(1, 5)})
        self.layers = len(self.blocks)
        patch = self.net.config.patch_size
        self.size = max(patch, image_size // patch * patch)
        self.skip = 1 + getattr(self.net.config, "num_register_tokens", 0)  # the CLS (and register) tokens
        self.decode, self.autocast = _decoder(vae), autocast
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, latents: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        with self.autocast():
            images = (self.decode(latents) + 1) / 2
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
            hidden = self.net((images - self.mean) / self.std, output_hidden_states=True).hidden_states
        side = self.size // self.net.config.patch_size
        maps = []
        for k in self.blocks:
            tokens = hidden[k][:, self.skip:].float()
            maps.append(tokens.transpose(1, 2).reshape(len(tokens), -1, side, side))
        return maps


# ---------------------------------------------------------------------------------------------
# The loss


class FeatureMatching:
    """L_FM(x, target) = Σ_l w_l (1 - SSIM(f_l(x), f_l(target))), mean over the batch; `extractor` maps
    latents and their conditioning to a list of feature maps. The target's features carry no gradient."""

    def __init__(self, extractor, weights: Sequence[float] | None = None, window: int = 11):
        """`extractor`: one of the above (its `layers` says how many maps it gives); `weights`: one per map."""
        layers = extractor.layers
        if weights is not None and len(weights) != layers:
            raise ConfigError(f"config key 'fm.layer_weights': {len(weights)} weights for {layers} feature layers")
        self.extractor, self.window = extractor, window
        self.weights = list(weights) if weights is not None else [1 / layers] * layers

    def per_sample(self, x: torch.Tensor, target: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        with torch.no_grad():
            wanted = self.extractor(target, cond)
        got = self.extractor(x, cond)
        return sum(w * (1 - ssim(f, t, self.window)) for w, f, t in zip(self.weights, got, wanted, strict=True))

    def __call__(self, x: torch.Tensor, target: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.per_sample(x, target, cond).mean()
