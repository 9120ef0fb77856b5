"""Sharded (or replicated) data parallel with FSDP2: `fully_shard` on each decoder layer, then the root.

Each decoder layer is one FSDP unit: its weights are gathered just before its forward (and again
before its backward when resharded after the forward), and its gradients reduce-scattered right
after its backward, so at most a few layers are ever whole on a rank. The root unit holds the
embedding, final norm and lm_head; it stays gathered after the forward because the loss reads
lm_head.weight outside the model (the chunked cross-entropy never builds the logits).

Gradients are summed over ranks, not averaged: the trainer divides each rank's loss by the trained
tokens of the whole global batch, so the sum is the single-process gradient of that batch.

Mixed precision: with a bf16 run, trainable weights are kept as float32 shards (they are then their
own optimizer masters), gathered as bf16 for compute, and their gradients reduced in float32.
Frozen weights stay as loaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    reshard_after_forward: bool,
    compute_dtype: torch.dtype,
    offload: bool = False,
    expert_mesh: DeviceMesh | None = None,
    prepare_layer: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Shard `model` (a GptOss, LoRA or not) in place over `mesh` (1-D, or 2-D (replicate, shard)).

    expert_mesh: where expert parallel already split the experts over ranks, their remaining
    sharding mesh (the experts then form a unit of their own inside each layer).
    prepare_layer: called on each decoder layer just before it is sharded (tensor parallel's split).
    """
    if compute_dtype != torch.float32:
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    placement = CPUOffloadPolicy() if offload else OffloadPolicy()
    common = dict(mp_policy=policy, offload_policy=placement)
    for layer in model.model.layers:
        if prepare_layer is not None:
            prepare_layer(layer)
        if expert_mesh is not None:
            fully_shard(layer.mlp.experts, mesh=expert_mesh, reshard_after_forward=reshard_after_forward, **common)
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, **common)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, **common)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # A plain SUM reduction (no pre- or post-division): gloo has no PREMUL_SUM.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model
