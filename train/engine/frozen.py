"""Frozen models: the teacher and the encoders a trainer runs but never trains."""

from __future__ import annotations

import torch


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen models never enter accelerator.prepare: no DDP, no fp32 master copy, no grads."""
    module.requires_grad_(False)
    module.eval()
    module.to(device)
    # A no-op cast would still make diffusers warn about modules kept in fp32.
    return module.to(dtype=dtype) if module.dtype != dtype else module
