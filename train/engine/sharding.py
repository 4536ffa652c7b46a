"""What the launch strategy (launch.sh --strategy, an accelerate config in configs/accelerate/) means for the
loop: FSDP2 shards each trained module in place (its parameters become DTensors, 1/N on each process);
DeepSpeed wraps one model per run. Frozen models are never prepared: every process holds them whole.

Under FSDP a checkpoint keeps accelerate's sharded files (torch.distributed.checkpoint, which loads into
another number of processes) and, gathered, the model and its EMA as safetensors; the EMA is kept per shard
and gathered only to save. At the end of a run the trained module is gathered and made an ordinary module
again, so the task's export writes it as it does without FSDP.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from sdkd.cli.errors import UserError


def launched_with(name: str) -> bool:
    """Whether `accelerate launch` was told to use FSDP (`name` "FSDP") or DeepSpeed ("DEEPSPEED")."""
    return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"


def check_launch() -> None:
    """Before the accelerator exists: a strategy this machine cannot run stops with one line. accelerate
    starts DeepSpeed only off the CPU; on a CPU it would run as plain DDP without a word."""
    if launched_with("DEEPSPEED") and not torch.cuda.is_available():
        raise UserError("launch.sh --strategy zero2/zero3: DeepSpeed needs CUDA GPUs, and this machine has none; "
                        "use --strategy ddp or fsdp")


def fsdp_on_cpu(acc) -> None:
    """accelerate 1.15 turns FSDP on only for accelerator devices: on the CPU a launch with FSDP becomes gloo
    DDP (MULTI_CPU) without a word. torch's FSDP2 itself runs on gloo, so here the state is switched to
    FSDP with the plugin accelerate builds from the launcher's settings, as it does on a GPU."""
    if not launched_with("FSDP") or acc.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    # AcceleratorState copies PartialState's shared fields when it is made again: both are set.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin


def is_fsdp(acc) -> bool:
    return acc.distributed_type == DistributedType.FSDP


def is_deepspeed(acc) -> bool:
    return acc.distributed_type == DistributedType.DEEPSPEED


def check_config(acc, cfg) -> None:
    """What this run's strategy cannot do with the run's config, in one line, before any model is built."""
    if not is_fsdp(acc):
        return
    eval_every = getattr(getattr(cfg, "eval", None), "every", 0)
    for key, every in (("train.sample_every", cfg.train.sample_every), ("eval.every", eval_every)):
        if every:
            raise UserError(f"{key}={every}: it runs the trained model on the main process alone, which under FSDP "
                            f"holds only its shard; set {key}=0 (the exported model samples as usual)")


def check_task(acc, task) -> None:
    """What this run's strategy cannot do with `task`, in one line."""
    names = [m.name for m in task.modules]
    several = f"this trainer trains {len(names)} modules ({', '.join(names)})"
    if is_deepspeed(acc):
        if len(names) > 1:
            raise UserError(f"launch.sh --strategy zero2/zero3 (DeepSpeed): {several}; accelerate gives DeepSpeed "
                            f"one model per run; use --strategy ddp")
        if acc.state.deepspeed_plugin.zero_stage == 3:
            raise UserError("launch.sh --strategy zero3: ZeRO-3 partitions the trained weights, which the EMA, "
                            "checkpoints and export read whole here; use --strategy zero2 or fsdp")
    if not is_fsdp(acc):
        return
    if len(names) > 1:
        raise UserError(f"launch.sh --strategy fsdp: {several}; FSDP here shards one trained module; "
                        f"use --strategy ddp")
    if not task.modules[0].state.shardable:
        raise UserError(f"launch.sh --strategy fsdp: module '{names[0]}' is checkpointed in part (a LoRA "
                        f"adapter), which FSDP here does not gather; use --strategy ddp")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (collective: every process calls it, in the same order); a tensor as it is."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    mesh_device = t.device_mesh.device_type
    # Shards offloaded to the CPU gather over the mesh's own device.
    return (t if t.device.type == mesh_device else t.to(mesh_device)).full_tensor().to(t.device)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict with every sharded tensor gathered whole (collective)."""
    return {name: full_tensor(t).detach() for name, t in module.state_dict().items()}


def sharded_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` split as the DTensor `like` is (collective); a tensor `like` that is not sharded takes it whole."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full.to(like.device)
    return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements).to(like.device)


class ShardedModule:
    """A trained module about to be prepared under FSDP, and how to undo that at the end: `fully_shard` gives
    each wrapped part a subclass and forward and state-dict hooks of its own, and turns its parameters into
    DTensors. The classes and hooks the parts have now are recorded (not their weights)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._before = [(part, type(part), {name: dict(hooks) for name, hooks in vars(part).items()
                                            if "hooks" in name and isinstance(hooks, dict)})
                        for part in module.modules()]

    def unshard(self, ema=None) -> None:
        """Gather the module (and `ema`'s averages) whole on every process (collective), then make it the
        module it was before prepare, with these weights."""
        weights = full_state_dict(self.module)
        if ema is not None:
            ema.shadow_params = [full_tensor(s) for s in ema.shadow_params]
        for part, cls, hooks in self._before:
            part.__class__ = cls
            for name, saved in hooks.items():
                live = getattr(part, name)
                live.clear()
                live.update(saved)
        self.module.load_state_dict(weights, assign=True)


@contextmanager
def whole_ema(ema):
    """While open, `ema`'s averages are gathered whole (collective; None: nothing to gather)."""
    if ema is None:
        yield
        return
    shards = ema.shadow_params
    ema.shadow_params = [full_tensor(s) for s in shards]
    try:
        yield
    finally:
        ema.shadow_params = shards


def reshard_ema(ema, params: list[torch.Tensor]) -> None:
    """`ema`'s whole averages (as a checkpoint gives them back) split as the live `params` are (collective)."""
    ema.shadow_params = [sharded_like(full, p) for full, p in zip(ema.shadow_params, params)]
