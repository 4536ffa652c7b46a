"""Per-process peak GPU memory of KD training under each distribution strategy, computed on the meta device
(eval/memory_table.py prints it): nothing is allocated, so SDXL-size models cost no memory.

What one process holds, at batch 1, with the latent cache (no VAE or text encoder: they are listed apart):

- student states, P_s trained parameters: fp32 weights (4 B) + fp32 gradients (4 B) + AdamW's two fp32 moments
  (8 B), or bitsandbytes' two 8-bit moments (2 B) with `optim.name=adamw_8bit`;
- DDP's gradient buckets: accelerate's DDP keeps `gradient_as_bucket_view=False`, a second fp32 copy of the
  gradients (4 B per parameter);
- the frozen teacher in bf16 (2 B per parameter), replicated on every process;
- activations: the bytes of the distinct tensors autograd saves for backward in one forward of the fp32 student
  under bf16 autocast, counted with `torch.autograd.graph.saved_tensors_hooks` on the meta device: autocast's rules
  are applied by `AutocastBF16` (bf16 matrix products and convolutions, whose bf16 weight copies are saved too:
  2 B per parameter; fp32 norms and softmax), attention is counted as a fused kernel saves it (flash /
  memory-efficient SDPA: q, k, v, output and an fp32 log-sum-exp, not the score matrix). Parameters (and views
  of them) are not activations. No gradient checkpointing (it cuts this term to roughly each block's input).
- sharded gather: under FSDP and ZeRO-3 a process holds the full fp32 weights and gradients of the wrap units in
  flight: the largest unit (a module of a class in diffusers' `_no_split_modules`, less its nested units) twice
  (the one running, the one prefetched).

Strategy on N processes (S = the 16 B, or 10 B with 8-bit AdamW, per student parameter): DDP: S + 4 (buckets;
none in one process), all replicated; FSDP (full shard): S / N + gather; FSDP + CPU offload: the gather only
(weights, gradients and optimizer states live in CPU memory); ZeRO-2: weights 4 B replicated + (gradients +
optimizer states) / N; ZeRO-3: S / N + gather. Every strategy adds the teacher and the activations. Left out: the
CUDA context and kernels' workspaces, allocator fragmentation, the teacher forward's transient intermediates (it
saves nothing), EMA (4 B per parameter where `ema.enabled`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.overrides import TorchFunctionMode
from transformers import CLIPTextConfig

from sdkd.eval.bench.students import VAE_SCALE, teacher_config
from sdkd.eval.bench.timing import unet_inputs
from sdkd.train.models.families import family_of
from sdkd.train.models.students import PRESETS, student_unet_config
from sdkd.train.models.toy import RANDOM_WIDTHS

GiB = 2**30
CARDS_GIB = (24, 48, 80)
PROCESSES = (1, 2, 4, 8)
ADAMW_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2}
# model -> (its teacher's family in eval/bench/students.py's FAMILIES, resolution in px, encoder widths)
MODELS = {"ssd1b": ("sdxl", 1024, "sdxl"), "vega": ("sdxl", 1024, "sdxl"), "bk_small": ("sd", 512, "sd15")}
STRATEGIES = ("ddp", "fsdp", "fsdp_offload", "zero2", "zero3")


def meta_module(build):
    """`build()` on the meta device: a module with shapes and dtypes, no storage."""
    with torch.device("meta"):
        return build()


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def largest_wrap_unit(unet: torch.nn.Module) -> int:
    """Parameters of the largest FSDP wrap unit: a module of a class in the model's `_no_split_modules` (what
    transformer-based auto-wrap wraps), less the units nested in it, which are wrapped on their own."""
    classes = set(getattr(unet, "_no_split_modules", None) or ())
    units = [m for m in unet.modules() if type(m).__name__ in classes]

    def own(unit):
        nested = {id(p) for m in unit.modules() if m is not unit and type(m).__name__ in classes
                  for p in m.parameters()}
        return sum(p.numel() for p in unit.parameters() if id(p) not in nested)

    return max(map(own, units), default=params(unet))


class _FusedAttention(torch.autograd.Function):
    """SDPA as a fused kernel keeps it for backward: q, k, v, the output and the fp32 log-sum-exp per query, not
    the (queries x keys) score matrix that the decomposed math path saves. Only ever counted, never backpropagated."""

    @staticmethod
    def forward(ctx, query, key, value, kwargs):
        # In the fused kernels' memory layout, (batch, queries, heads, dim): the processor's reshape after is a view.
        out = _sdpa(query, key, value, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("activation counting only")


_sdpa = F.scaled_dot_product_attention


class AutocastBF16(TorchFunctionMode):
    """CUDA autocast's rules for the ops a U-Net runs, on any device (meta has no autocast): matrix products and
    convolutions take bf16 inputs (an fp32 weight becomes a bf16 copy, which is saved for backward), norms and
    softmax fp32 ones; the rest run in the dtype they are given."""

    BF16 = {F.linear, F.conv2d, torch.conv2d, torch.matmul, torch.bmm, torch.baddbmm, torch.Tensor.matmul,
            torch.Tensor.__matmul__}
    FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        dtype = torch.bfloat16 if func in self.BF16 else torch.float32 if func in self.FP32 else None
        if dtype is not None:
            cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
            args, kwargs = tuple(map(cast, args)), {k: cast(v) for k, v in (kwargs or {}).items()}
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fused_attention():
    """diffusers' attention processors call `F.scaled_dot_product_attention`: route it through `_FusedAttention`."""
    F.scaled_dot_product_attention = lambda q, k, v, **kw: _FusedAttention.apply(q, k, v, kw)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _sdpa


def saved_activation_bytes(unet: torch.nn.Module, batch: int, resolution: int, vae_scale: int = VAE_SCALE) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward of the fp32 `unet` (on its device)
    under bf16 autocast's rules (`AutocastBF16`), parameters and their views left out, attention as a fused kernel
    saves it (`_FusedAttention`)."""
    param_ids = {id(p) for p in unet.parameters()}
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in param_ids:
            saved[id(base)] = base  # held, so that no id is reused while counting
        return t

    sample, t, cond = unet_inputs(unet, batch, resolution, vae_scale, unet.device, unet.dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused_attention(), AutocastBF16(), \
            torch.enable_grad():
        unet(sample, t, **cond)
    return sum(b.untyped_storage().nbytes() for b in saved.values())


def encoder_params(unet_config: dict, widths: str) -> int:
    """The VAE's and text encoders' parameters at `widths` (train/models/toy.py RANDOM_WIDTHS), which a run
    without the latent cache holds in half precision."""
    family = family_of(unet_config)
    vae_cfg, text_cfgs = RANDOM_WIDTHS[widths]
    models = [meta_module(lambda: AutoencoderKL(**vae_cfg))]
    models += [meta_module(lambda c=c, n=n: family.components[n].cls(CLIPTextConfig(**c)))
               for n, c in zip(family.text_encoders, text_cfgs, strict=True)]
    return sum(map(params, models))


@dataclass
class Sizes:
    """What the memory of one KD setup is made of (parameters and bytes)."""

    model: str
    resolution: int
    student_params: int
    teacher_params: int
    wrap_unit_params: int
    activation_bytes: int
    encoder_params: int


def sizes(student: dict, teacher: dict, resolution: int, name: str = "", encoders: int = 0,
          device: str | torch.device = "meta") -> Sizes:
    """The counts of a student and teacher U-Net config, built on `device` ("meta": nothing allocated)."""
    with torch.device(device):
        s = UNet2DConditionModel.from_config(student)
        t = UNet2DConditionModel.from_config(teacher)
    s.train().requires_grad_(True)
    student_params = params(s)
    activations = saved_activation_bytes(s, 1, resolution)
    return Sizes(name, resolution, student_params, params(t), largest_wrap_unit(s), activations, encoders)


def model_sizes(model: str) -> Sizes:
    """`model`'s preset student, its family's real-width teacher and encoders, at the model's resolution."""
    family, resolution, widths = MODELS[model]
    teacher = teacher_config(family, "real")
    return sizes(student_unet_config(teacher, PRESETS[model]), teacher, resolution, model,
                 encoder_params(teacher, widths))


def per_process_bytes(s: Sizes, strategy: str, processes: int, optimizer: str = "adamw") -> dict[str, float]:
    """Each term of one process's peak (bytes) under `strategy` on `processes` processes; "total" sums them."""
    p, n = s.student_params, processes
    weights, grads, states = 4 * p, 4 * p, ADAMW_STATE_BYTES[optimizer] * p
    gather = 2 * 8 * s.wrap_unit_params  # two units' fp32 weights and gradients
    student = {
        "ddp": weights + grads + states + (4 * p if n > 1 else 0),  # one process: no DDP wrapper
        "fsdp": (weights + grads + states) / n + gather,
        "fsdp_offload": gather,
        "zero2": weights + (grads + states) / n,
        "zero3": (weights + grads + states) / n + gather,
    }[strategy]
    terms = dict(student=student, teacher=2 * s.teacher_params, activations=s.activation_bytes)
    return terms | {"total": sum(terms.values())}


def smallest_card(total_bytes: float) -> int | None:
    """The smallest of the 24, 48 and 80 GiB cards that holds `total_bytes`; None: none does."""
    return next((gib for gib in CARDS_GIB if total_bytes <= gib * GiB), None)


def rows(models=tuple(MODELS)) -> list[dict]:
    """One row per model and strategy with AdamW, and DDP with 8-bit AdamW (the one-GPU remedy; its states under
    the sharding strategies were not tried): GiB per process on 1, 2, 4 and 8 processes (FSDP, ZeRO: from 2),
    the smallest card each fits, and the model's sizes."""
    out = []
    for model in models:
        s = model_sizes(model)
        for optimizer, strategies in (("adamw", STRATEGIES), ("adamw_8bit", ("ddp",))):
            for strategy in strategies:
                counts = (1,) + PROCESSES[1:] if strategy == "ddp" else PROCESSES[1:]
                gib = {n: per_process_bytes(s, strategy, n, optimizer)["total"] / GiB for n in counts}
                out.append(dict(model=model, resolution=s.resolution, optimizer=optimizer, strategy=strategy,
                                gib_per_process=gib,
                                smallest_card_gib={n: smallest_card(v * GiB) for n, v in gib.items()},
                                student_params=s.student_params, teacher_params=s.teacher_params,
                                wrap_unit_params=s.wrap_unit_params, activation_gib=s.activation_bytes / GiB,
                                encoders_fp16_gib=2 * s.encoder_params / GiB))
    return out
