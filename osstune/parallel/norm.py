"""The gradient norm of a sharded model: each distinct gradient value counted once.

A rank holds parts of each gradient: FSDP and tensor-parallel shards (distinct values), copies
(dp_replicate, or a tensor-parallel Replicate), and under expert parallel the gradients of its own
experts, which other ep ranks do not hold at all. Each rank sums the squares of its local values,
divided by the number of ranks holding the same values, and one all-reduce adds them up.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from osstune.parallel.experts import expert_parameter_names
from osstune.parallel.world import World


def _distinct(p: torch.Tensor, expert: bool, world: World) -> int:
    """How many ranks hold different values of p (the others hold copies)."""
    parts = world.config.ep if expert else 1
    if isinstance(p, DTensor):
        for size, placement in zip(p.device_mesh.shape, p.placements):
            # FSDP's shard over a tp shard of the same dimension is a _StridedShard, not a Shard.
            if not placement.is_replicate():
                parts *= size
    return parts


def grad_norm_fn(model: nn.Module, world: World) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """(parameters with gradients) -> the 2-norm of all their gradients, the same on every rank."""
    experts = {id(p) for n, p in model.named_parameters() if n in expert_parameter_names(model)}

    def total_norm(params: list[torch.Tensor]) -> torch.Tensor:
        sq = torch.zeros((), dtype=torch.float64, device=world.device)
        for p in params:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            copies = world.size / _distinct(p, id(p) in experts, world)
            sq += g.to(world.device).float().pow(2).sum().double() / copies
        dist.all_reduce(sq)
        return sq.sqrt().float()

    return total_norm
