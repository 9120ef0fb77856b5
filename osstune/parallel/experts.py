"""Expert parallel: the experts of each layer split over `ep` ranks, tokens sent to the rank that
holds their expert by all-to-all and the results sent back (GShard, arXiv:2006.16668, section 3.2).

Each rank of an ep group keeps experts [r*L, (r+1)*L) (L = E / ep) as plain tensors: parameters,
LoRA factors and packed MXFP4 blocks alike, so QLoRA's packed experts are split too. FSDP may shard
them further over the ranks that hold the same experts (osstune/parallel/fsdp.py, "efsdp").

One MoE call, on every rank of the group (N tokens, k experts each, H hidden, A = N*k assignments):
1. sort the A (token, expert) assignments by expert, so each destination rank's rows are contiguous;
2. exchange the per-rank counts, then the rows (uneven all_to_all_single) and their local expert ids;
3. run the local experts on what arrived, each row as a top-1 token of weight 1 (the experts
   module's own forward, so FSDP gathers and reduces its weights as for any module);
4. send the outputs back (the reverse all-to-all) and add w * y into each token's output, in the
   expert order one process uses, so the sums match it.
The backward of an all-to-all is the all-to-all with the splits swapped.

Shape legend: N tokens, k experts per token, A assignments (N*k), R rows received, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class ExpertShard:
    """Which experts a module holds: [rank*local, (rank+1)*local) of num_experts, over `group`."""

    rank: int
    size: int
    num_experts: int
    group: dist.ProcessGroup

    @property
    def local(self) -> int:
        return self.num_experts // self.size


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows x[sum(in_splits[:r]) : ...] go to rank r; returns the rows received, rank by rank."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertDispatch:
    """`ExecutionPolicy.experts` under expert parallel: (experts, x (N, H), idx (N, k), weights (N, k)) -> (N, H)."""

    def __init__(self, shard: ExpertShard) -> None:
        self.shard = shard

    def __call__(self, experts: nn.Module, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        s = self.shard
        n, k = idx.shape
        flat = idx.reshape(-1)  # (A,)
        order = torch.sort(flat, stable=True).indices  # expert-major, tokens in order within an expert
        token = order // k  # (A,) the token of each sorted assignment
        expert = flat[order]
        send = torch.bincount(expert // s.local, minlength=s.size)  # (ep,) rows for each rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=s.group)
        send_splits, recv_splits = send.tolist(), recv.tolist()
        rows = all_to_all(x[token], recv_splits, send_splits, s.group)  # (R, H)
        local_ids = all_to_all((expert % s.local).unsqueeze(1), recv_splits, send_splits, s.group)  # (R, 1)
        ones = torch.ones(local_ids.shape, dtype=weights.dtype, device=x.device)
        y = experts(rows, local_ids, ones)  # (R, H)
        back = all_to_all(y, send_splits, recv_splits, s.group)  # (A, H) in sorted order
        w = weights.reshape(-1)[order].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, back * w[:, None])


def _local_experts(module: nn.Module, shard: ExpertShard) -> None:
    """Keep only this rank's experts in every parameter and buffer (dim 0 is the expert)."""
    lo, hi = shard.rank * shard.local, (shard.rank + 1) * shard.local
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(p.data[lo:hi].clone(), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = b[lo:hi].clone()
        if hasattr(sub, "num_experts"):
            sub.num_experts = shard.local
    module.expert_shard = shard


def apply_ep(model: nn.Module, mesh: DeviceMesh) -> None:
    """Split each layer's experts over `mesh` (1-D) and route tokens through ExpertDispatch (the
    `experts` field of `model.execution`; the policy's other fields stay)."""
    size, rank = mesh.size(), mesh.get_local_rank()
    num_experts = model.config.num_local_experts
    if num_experts % size:
        raise ValueError(f"parallel.ep={size} must divide the {num_experts} experts per layer")
    shard = ExpertShard(rank, size, num_experts, mesh.get_group())
    for layer in model.model.layers:
        _local_experts(layer.mlp.experts, shard)
    # The fused kernels (osstune.fast) would bypass the experts module's forward, where FSDP
    # gathers the expert weights; the local experts run their own forward here instead.
    model.set_execution(model.execution.replace(experts=ExpertDispatch(shard)))


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that hold only this rank's experts (their content differs per ep rank)."""
    names = set()
    for path, module in model.named_modules():
        if hasattr(module, "expert_shard"):
            names.update(f"{path}.{n}" for n, _ in module.named_parameters())
    return names


@torch.no_grad()
def gather_experts(module: nn.Module, whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: this ep rank's tensor (local experts, already whole over FSDP)} -> every expert's,
    concatenated in expert order; a collective over the ep group."""
    shard: ExpertShard = module.expert_shard
    out = {}
    for name, t in whole.items():
        parts = [torch.empty_like(t) for _ in range(shard.size)]
        dist.all_gather(parts, t.contiguous(), group=shard.group)
        out[name] = torch.cat(parts)
    return out
