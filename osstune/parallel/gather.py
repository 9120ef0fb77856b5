"""Whole tensors from sharded ones, for the artifacts a run writes once (adapter or model)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from osstune.parallel.world import World


@torch.no_grad()
def gather_parameters(model: nn.Module, world: World, dtype: torch.dtype, names: set[str] | None = None) -> None:
    """Put whole parameters back in place of sharded ones on the main rank (host memory; floating ones
    cast to `dtype`, the run's compute dtype, which is what a one-process run holds). Every rank must
    call it (each tensor is one all-gather); the other ranks keep their shards. After this the model
    is for saving only. names: only these parameters (default all sharded ones)."""
    for module_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            full_name = f"{module_name}.{name}" if module_name else name
            if not isinstance(p, DTensor) or (names is not None and full_name not in names):
                continue
            local = p.to_local()
            if local.device != world.device:  # offloaded shards: NCCL gathers device tensors only
                p = DTensor.from_local(local.to(world.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            whole = p.full_tensor()
            if world.is_main:
                if whole.is_floating_point():
                    whole = whole.to(dtype)
                module._parameters[name] = nn.Parameter(whole.cpu(), requires_grad=False)
