"""`parallelize`: apply the plans a World's config asks for, in the order they compose (tensor or
expert parallel, then data parallel over what is left), torchtitan's order."""

from __future__ import annotations

import functools
from typing import TypeVar

import torch
from torch import nn

from osstune.parallel.fsdp import apply_fsdp
from osstune.parallel.world import World

T = TypeVar("T")


def parallelize(model: nn.Module, world: World, compute_dtype: torch.dtype) -> nn.Module:
    """`model` (a GptOss whose trainable parameters are chosen) sharded in place for `world`."""
    if not world.distributed:
        return model
    cfg, mesh = world.config, world.meshes
    expert_mesh, prepare_layer = None, None
    if cfg.tp > 1:
        from osstune.parallel.tensor import check_model, split_experts, split_layer

        check_model(model, cfg.tp)
        # The policy's experts function (a fused kernel, or None) runs inside each split region.
        prepare_layer = functools.partial(split_layer, mesh=mesh["tp"], experts_run=model.execution.experts)
        model.set_execution(model.execution.replace(experts=split_experts))
    if cfg.ep > 1:
        from osstune.parallel.experts import apply_ep

        apply_ep(model, mesh["ep"])
        expert_mesh = mesh["efsdp"]
    apply_fsdp(
        model,
        mesh["fsdp"],
        reshard_after_forward=cfg.reshard_after_forward,
        compute_dtype=compute_dtype,
        offload=cfg.offload,
        expert_mesh=expert_mesh,
        prepare_layer=prepare_layer,
    )
    return model


def share(batches: list[T], world: World) -> list[T]:
    """This rank's batches of one global step: every dp_size-th, from its dp rank on. Every rank reads
    the same deterministic stream, so together they see each batch once, in the order one process
    accumulating all of them would, and the stream's position is the same on every rank."""
    return batches[world.dp_rank :: world.dp_size]
