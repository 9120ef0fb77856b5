"""Whole tensors from sharded ones, for the artifacts a run writes once (adapter or model)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from osstune.parallel.experts import gather_experts
from osstune.parallel.world import World


def _whole(p: torch.Tensor, world: World) -> torch.Tensor:
    """A parameter whole over FSDP (and tensor parallel); a collective when it is a DTensor."""
    if not isinstance(p, DTensor):
        return p.detach()
    local = p.to_local()
    if local.device != world.device:  # offloaded shards: NCCL gathers device tensors only
        p = DTensor.from_local(local.to(world.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return p.full_tensor()


@torch.no_grad()
def gather_parameters(model: nn.Module, world: World, dtype: torch.dtype, names: set[str] | None = None) -> None:
    """Put whole parameters back in place of sharded ones on the main rank (host memory; floating ones
    cast to `dtype`, the run's compute dtype, which is what a one-process run holds). Every rank must
    call it (each tensor is one or two collectives); the other ranks keep their shards. After this
    the model is for saving only. names: only these parameters (default all)."""
    # Layers left gathered (an eval forward, reshard_after_forward off) hold their whole tensors as
    # plain parameters; FSDP would put the shards back at the next state_dict() over what is set here.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    done: set[str] = set()
    # Experts split by expert parallel: whole over FSDP, then every ep rank's experts concatenated.
    for path, module in model.named_modules():
        shard = getattr(module, "expert_shard", None)
        if shard is None:
            continue
        params = {n: p for n, p in module.named_parameters() if names is None or f"{path}.{n}" in names}
        whole = gather_experts(module, {n: _whole(p, world) for n, p in params.items()})
        if names is None:  # a whole model is written: the packed MXFP4 blocks too
            whole.update(gather_experts(module, dict(module.named_buffers())))
        done.update(f"{path}.{n}" for n in params)
        if world.is_main:
            for n, t in whole.items():
                owner_path, _, leaf = n.rpartition(".")
                owner = module.get_submodule(owner_path)
                t = t.to(dtype) if t.is_floating_point() else t
                if leaf in owner._parameters:
                    owner._parameters[leaf] = nn.Parameter(t.cpu(), requires_grad=False)
                else:
                    owner._buffers[leaf] = t.cpu()
            for sub in module.modules():
                if hasattr(sub, "num_experts"):
                    sub.num_experts = shard.num_experts
    if names is None:  # a whole model is written: packed MXFP4 experts split by tensor parallel too
        from osstune.parallel.tensor import gather_packed

        for module in model.modules():
            if hasattr(module, "tp_packed"):
                whole = gather_packed(module)
                if world.is_main:
                    module._buffers.update({k: t.cpu() for k, t in whole.items()})
    for module_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            full_name = f"{module_name}.{name}" if module_name else name
            if not isinstance(p, DTensor) or full_name in done or (names is not None and full_name not in names):
                continue
            whole = _whole(p, world)
            if world.is_main:
                if whole.is_floating_point():
                    whole = whole.to(dtype)
                module._parameters[name] = nn.Parameter(whole.cpu(), requires_grad=False)
