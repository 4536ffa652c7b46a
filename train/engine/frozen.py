"""Frozen models: the teacher and the encoders a trainer runs but never trains."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen models never enter accelerator.prepare: no DDP, no fp32 master copy, no grads."""
    module.requires_grad_(False)
    module.eval()
    module.to(device)
    # A no-op cast would still make diffusers warn about modules kept in fp32.
    return module.to(dtype=dtype) if module.dtype != dtype else module


@contextmanager
def own_dtype(module: torch.nn.Module):
    """While open, `module`'s direct children (a VAE's encoder, decoder and the convolutions around them) take their
    inputs in `module`'s dtype and run outside any autocast. A model its family keeps fp32 under fp16 (SDXL's VAE,
    which overflows in fp16) then decodes an fp16 pipeline's latents, and stays fp32 inside an autocast region,
    which would run its convolutions in fp16."""
    param = next(module.parameters())
    cast = lambda x: x.to(param.dtype) if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
    opened = []

    def enter(child, args, kwargs):
        opened.append(torch.autocast(param.device.type, enabled=False))
        opened[-1].__enter__()
        return tuple(map(cast, args)), {name: cast(value) for name, value in kwargs.items()}

    def leave(child, args, output):
        opened.pop().__exit__(None, None, None)

    handles = [hook for child in module.children()
               for hook in (child.register_forward_pre_hook(enter, with_kwargs=True),
                            child.register_forward_hook(leave, always_call=True))]
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()
