"""The training step's random draws (noise, timesteps), the same whatever the number of processes."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor


class StepRandom:
    """The random draws of the training step, the same whatever the number of processes.

    Every process seeds the same generator and draws each tensor for the whole global batch
    (`num_processes` x `batch_size` rows), then keeps its own rows: two processes of batch B get the
    noise and timesteps one process of batch 2B gets for the same samples, so their runs match (up to
    float summation order). The draws cost next to nothing beside the U-Nets.
    """

    def __init__(self, seed: int, device: torch.device | str, batch_size: int, num_processes: int = 1,
                 process_index: int = 0):
        self.device, self.batch_size = torch.device(device), batch_size
        self.rows, self.start = num_processes * batch_size, process_index * batch_size
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def manual_seed(self, seed: int) -> "StepRandom":
        self.generator.manual_seed(seed)
        return self

    def randn(self, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal of `shape`, whose first dimension is this process's batch (at most batch_size: a
        batch that lost bad samples is shorter)."""
        full = randn_tensor((self.rows, *shape[1:]), generator=self.generator, device=self.device, dtype=dtype)
        return full[self.start:self.start + shape[0]]

    def randint(self, high: int, n: int) -> torch.Tensor:
        """`n` integers in [0, high) for this process's batch."""
        full = torch.randint(0, high, (self.rows,), generator=self.generator, device=self.device)
        return full[self.start:self.start + n]
