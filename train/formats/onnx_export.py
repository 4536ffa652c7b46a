"""ONNX export of a student: its U-Net (`unet.onnx`), its tiny decoder (`vae_decoder.onnx`) when its VAE is an
AutoencoderTiny, and `onnx.json` saying each file's inputs, outputs, shapes, dtype and opset.

The U-Net's inputs are `sample` [batch, C, height, width], `timestep` [batch] (float32: fractional timesteps of
Euler-type schedulers pass as they are), `encoder_hidden_states` [batch, tokens, width] and the added
conditioning its model family gives it (SDXL: `text_embeds`, `time_ids`; train/models/families.py); its output
is `out_sample`. The tiny decoder maps `latent_sample` (scaled by the VAE's `scaling_factor`, as a diffusers
pipeline divides) to `sample`. Batch, height and width are dynamic axes. Weights stay fp32: fp16 ONNX U-Nets gave
black images and NaNs in several runtimes (diffusers #1083, #4321; Olive #1223), so a half-precision file is
left to onnxruntime's converters. A file whose weights pass protobuf's 2 GB limit (SD-1.5's U-Net: 3.4 GB) keeps
its weights in one external-data file beside it (`unet.onnx.data`).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderTiny

from sdkd.cli.errors import require_package
from sdkd.cli.files import user_mode
from sdkd.train.models.families import HIDDEN, random_conditioning

# optimum-onnx's default opset (reference §5); every operator of the SD U-Nets and TAESD exports at it.
OPSET = 18
# A protobuf message cannot pass 2 GiB; the graph itself (nodes, shapes) takes a few MB beside the weights.
PROTOBUF_LIMIT = 2**31 - 2**26
UNET_FILE, DECODER_FILE, INFO_FILE = "unet.onnx", "vae_decoder.onnx", "onnx.json"
HIDDEN_INPUT = "encoder_hidden_states"


def require(module: str, what: str):
    """The optional package `module` (onnx, onnxruntime: the `onnx` extra), or one line saying how to get it."""
    return require_package(module, what, "onnx")


class _UNetGraph(torch.nn.Module):
    """The U-Net with positional inputs and one tensor out, as the exporter traces it."""

    def __init__(self, unet, added: list[str]):
        super().__init__()
        self.unet, self.added = unet, added

    def forward(self, sample, timestep, encoder_hidden_states, *added):
        kwargs = {"added_cond_kwargs": dict(zip(self.added, added, strict=True))} if self.added else {}
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]


class _DecoderGraph(torch.nn.Module):
    """The VAE's decode (an AutoencoderTiny's: its decoder and output clamp), one tensor out."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def unet_example(unet, batch: int = 1, latent: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 inputs of the exported U-Net by input name (its model family's conditioning included)."""
    g = torch.Generator().manual_seed(seed)
    latent = latent or unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, latent, latent, generator=g)
    cond = {HIDDEN_INPUT if name == HIDDEN else name: t
            for name, t in random_conditioning(unet.config, batch, g).tensors().items()}
    return {"sample": sample, "timestep": torch.full((batch,), 500.0), **cond}


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _describe(t: torch.Tensor, axes: dict[int, str]) -> dict:
    return {"dims": [axes.get(i, size) for i, size in enumerate(t.shape)], "dtype": str(t.dtype).removeprefix("torch.")}


def _export(module: torch.nn.Module, inputs: dict[str, torch.Tensor], output: str, dynamic: dict[str, dict],
            path: Path, external_above: int) -> dict:
    """Trace `module` on `inputs` into `path`; the weights go to `path`.data when they pass `external_above`
    bytes. Returns the file's entry of onnx.json."""
    import onnx

    weights = _weight_bytes(module)
    external = weights > external_above
    # The TorchScript exporter (dynamo=False), not torch.export's: it needs no onnxscript, names dynamic axes
    # freely, works on every torch sdkd supports, and traced the toy U-Net 3x faster. Past 2 GB it writes one
    # file per tensor, so it writes into a scratch folder and onnx re-saves the model as one or two files.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on the U-Net's shape checks, the exporter's deprecation
        result = module(*inputs.values())
        traced = Path(tmp) / path.name
        torch.onnx.export(module, tuple(inputs.values()), str(traced), input_names=list(inputs),
                          output_names=[output], dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        model = onnx.load(str(traced))
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=0)
    for written in (path, data) if external else (path,):
        user_mode(written)
    return {"file": path.name, "external_data": data.name if external else None, "weight_bytes": weights,
            "inputs": {name: _describe(t, dynamic.get(name, {})) for name, t in inputs.items()},
            "outputs": {output: _describe(result, dynamic[output])}}


def export_onnx(unet, vae, out: str | Path, external_above: int = PROTOBUF_LIMIT) -> Path:
    """Write `unet`, and `vae`'s decoder when it is an AutoencoderTiny, as ONNX into the folder `out`, with
    onnx.json; both are moved to the CPU in fp32 (in place) to be traced. `external_above`: weight bytes past
    which a file's weights go to an external-data file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (UNET_FILE, DECODER_FILE):  # an earlier export's (--overwrite): none may outlive this one
        for stale in (out / name, out / (name + ".data")):
            stale.unlink(missing_ok=True)
    unet = unet.to("cpu", torch.float32).eval()
    inputs = unet_example(unet, batch=1)
    spatial = {0: "batch", 2: "height", 3: "width"}
    dynamic = {name: {0: "batch"} for name in inputs} | {"sample": spatial, "out_sample": spatial}
    files = {"unet": _export(_UNetGraph(unet, list(inputs)[3:]), inputs, "out_sample", dynamic, out / UNET_FILE,
                             external_above)}
    if isinstance(vae, AutoencoderTiny):
        vae = vae.to("cpu", torch.float32).eval()
        latent = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        files["vae_decoder"] = _export(_DecoderGraph(vae), {"latent_sample": latent}, "sample",
                                       {"latent_sample": spatial, "sample": spatial}, out / DECODER_FILE,
                                       external_above)
        files["vae_decoder"]["scaling_factor"] = vae.config.scaling_factor
    info = {"opset": OPSET, "dtype": "float32", "files": files}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return out
