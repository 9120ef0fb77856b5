"""Tensor parallel: each attention and expert matrix split over the `tp` ranks of a group, which read
the same batch (Megatron-LM, arXiv:1909.08053, section 3: a column-parallel matrix, then a
row-parallel one, one all-reduce of the output in the forward and one of the input's gradient in
the backward).

What rank r of tp holds (Q query heads, K key-value heads, I expert intermediate):
- attention: q/k/v rows (their outputs) split by head, rank r the query heads [r*Q/tp, (r+1)*Q/tp)
  and the K/tp key-value heads those read (tp divides K, so GQA groups stay whole); their biases
  and the sinks of its query heads likewise; o_proj's columns (its input) split the same way.
- experts: gate_up (E, H, 2I) split along 2I in contiguous chunks. Its columns interleave gate and
  up ([g0, u0, g1, u1, ...]), so a chunk of 2I/tp columns holds the whole pairs of intermediates
  [r*I/tp, (r+1)*I/tp); down (E, I, H) split along I to match. Packed MXFP4 experts (QLoRA) are
  split the same way (their 32-value blocks whole, so tp must divide I/32).
- LoRA: over a column-parallel base B is split by output and A whole; over a row-parallel base A is
  split by input and B whole.
- the router, norms, embedding and lm_head: whole on every rank, computed by each.

Every parameter of a split module is a DTensor on the tp mesh (Shard or Replicate), so FSDP2 then
shards it over the data ranks (a 2-D mesh), torch.distributed.checkpoint saves it and the export
gathers it whole. The split module runs its own forward on the local tensors (torch.func's
functional_call): the input enters through `copy_in` (identity; its gradient summed over the tp
ranks) and the partial output leaves through `sum_out` (summed over the tp ranks), both DTensor
redistributions. A whole parameter used inside (the LoRA factor beside a split one) gets only this
rank's part of its gradient: its local view says so (Partial), and FSDP sums it over the tp ranks
before reducing over the data ranks. The output biases of the row-parallel matrices (o_proj,
experts' down) are added after the sum, once.

Shape legend: N tokens, k experts per token, E experts, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.func import functional_call

from osstune.config import ModelConfig
from osstune.model import Attention, MXFP4Experts

# Parameter name inside the split module ("base_layer." of a LoRA wrapper left out) -> the
# dimension split over tp ranks; None: whole on every rank.
ATTENTION = {
    **{f"{p}.{leaf}": dim for p in ("q_proj", "k_proj", "v_proj")
       for leaf, dim in (("weight", 0), ("bias", 0), ("lora_A", None), ("lora_B", 0))},
    "o_proj.weight": 1, "o_proj.bias": None, "o_proj.lora_A": 1, "o_proj.lora_B": None,
    "sinks": 0,
}  # fmt: skip
EXPERTS = {
    "gate_up_proj": 2, "gate_up_proj_bias": 1, "down_proj": 1, "down_proj_bias": None,
    "gate_up_proj_lora_A": None, "gate_up_proj_lora_B": 2, "down_proj_lora_A": 1, "down_proj_lora_B": None,
}  # fmt: skip
# Packed MXFP4 experts, output-major: gate_up (E, 2I, H/32, ...), down (E, H, I/32, ...).
PACKED = {"gate_up_proj_blocks": 1, "gate_up_proj_scales": 1, "down_proj_blocks": 2, "down_proj_scales": 2}
# Biases of row-parallel outputs: added once, after the sum over tp ranks.
OUTPUT_BIAS = {"attention": "o_proj.bias", "experts": "down_proj_bias"}


def check_tensor_parallel(cfg: ModelConfig, tp: int, *, packed_experts: bool, quantized_attention: bool) -> None:
    """Refuse a `tp` that does not split `cfg`'s heads and experts evenly, before any compute."""
    if tp == 1:
        return
    if quantized_attention:
        raise ValueError(
            f"parallel.tp={tp} splits the attention projections, which attention_weights='mxfp4' keeps packed; "
            "use attention_weights='bf16' with tensor parallel"
        )
    if cfg.num_key_value_heads % tp:
        raise ValueError(
            f"parallel.tp={tp} must divide num_key_value_heads={cfg.num_key_value_heads} of the model (each rank "
            f"holds whole key-value heads and the query heads that read them); pick a divisor of "
            f"{cfg.num_key_value_heads}"
        )
    if cfg.intermediate_size % tp:
        raise ValueError(f"parallel.tp={tp} must divide the experts' intermediate_size={cfg.intermediate_size}")
    if packed_experts and (cfg.intermediate_size // 32) % tp:
        raise ValueError(
            f"parallel.tp={tp} must divide the {cfg.intermediate_size // 32} MXFP4 blocks of 32 values along the "
            f"experts' intermediate_size={cfg.intermediate_size} (packed experts are split between blocks)"
        )


def copy_in(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The same tensor on every tp rank, entering a split region: identity forward; the backward sums
    the ranks' partial gradients."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def sum_out(y: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Each rank's partial output, summed over the tp ranks (all-reduce); the gradient passes through."""
    return DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()


def _local_view(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor parameter, differentiable; a whole one's gradient is partial here."""
    if not isinstance(p, DTensor):
        return p
    whole = all(pl.is_replicate() for pl in p.placements)
    return p.to_local(grad_placements=[Partial()] * p.device_mesh.ndim if whole else None)


class _Call(nn.Module):
    """`fn(inner, *args)` as a module, so functional_call can put local tensors in `inner` while it
    runs (never part of the model)."""

    def __init__(self, inner: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *args):
        return self.fn(self.inner, *args)


class SplitRegion:
    """A split module's forward on local tensors: copy_in, the module's own code, sum_out, the output
    bias once. The output bias is a parameter name (attention's o_proj) or a function of the routing
    (experts: sum over the k chosen experts of weight * bias)."""

    def __init__(self, module: nn.Module, mesh: DeviceMesh, fn: Callable, bias: str, add_bias: Callable) -> None:
        self.mesh, self.bias, self.add_bias = mesh, bias, add_bias
        self.call = _Call(module, fn)

    def __call__(self, x: torch.Tensor, *args) -> torch.Tensor:
        tensors, bias = {}, None
        for name, p in self.call.inner.named_parameters():
            if name.replace("base_layer.", "") == self.bias:
                bias = p.to_local() if isinstance(p, DTensor) else p  # added to the summed output: a whole gradient
                tensors[f"inner.{name}"] = torch.zeros_like(bias)  # inside: nothing
            else:
                tensors[f"inner.{name}"] = _local_view(p)
        # Every differentiable input enters by copy_in: the routing weights too (their gradient
        # inside is this rank's intermediates' share).
        inside = [copy_in(a, self.mesh) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in (x, *args)]
        y = functional_call(self.call, tensors, tuple(inside))
        return self.add_bias(sum_out(y, self.mesh), bias, *args)


def _split(module: nn.Module, plan: dict[str, int | None], mesh: DeviceMesh) -> None:
    """Replace each parameter of `module` by a DTensor on `mesh` holding this rank's part (the rank's
    slice of the whole tensor every rank loaded: no communication); packed buffers by their slice."""
    size, rank = mesh.size(), mesh.get_local_rank()
    for path, sub in module.named_modules():
        for leaf, p in list(sub._parameters.items()):
            if p is None:
                continue
            key = f"{path}.{leaf}".removeprefix(".").replace("base_layer.", "")
            assert key in plan, f"tensor parallel has no plan for {key!r} in {type(module).__name__}"
            dim = plan[key]
            local = p.data if dim is None else p.data.chunk(size, dim)[rank].clone()
            placement = Replicate() if dim is None else Shard(dim)
            dt = DTensor.from_local(local, mesh, [placement], run_check=False)
            sub._parameters[leaf] = nn.Parameter(dt, requires_grad=p.requires_grad)
        if isinstance(sub, MXFP4Experts):
            for leaf, dim in PACKED.items():
                sub._buffers[leaf] = sub._buffers[leaf].chunk(size, dim)[rank].clone()
            sub.tp_packed = (mesh, PACKED)  # osstune.parallel.gather puts them back together


_SPLIT_CLASSES: dict[type, type] = {}


def _split_class(cls: type) -> type:
    """A subclass whose forward is the SplitRegion (as fully_shard swaps a module's class): the module
    keeps its name, parameters and isinstance checks."""
    if cls not in _SPLIT_CLASSES:
        _SPLIT_CLASSES[cls] = type(f"TensorParallel{cls.__name__}", (cls,), {"forward": _region_forward})
    return _SPLIT_CLASSES[cls]


def _region_forward(self, *args):
    return self.tp_region(*args)


def _attention_bias(y: torch.Tensor, bias: torch.Tensor, *_) -> torch.Tensor:
    return y + bias.to(y.dtype)


def _experts_bias(y: torch.Tensor, bias: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y (N, H) + sum over the k chosen experts of weight * down bias (E, H)."""
    return y + (weights[..., None].to(y.dtype) * bias[idx].to(y.dtype)).sum(1)


def check_model(model: nn.Module, tp: int) -> None:
    """check_tensor_parallel on a built model (its config, packed experts, MXFP4 attention)."""
    packed = any(isinstance(m, MXFP4Experts) for m in model.modules())
    quantized = getattr(model, "quantized_attention", False)
    check_tensor_parallel(model.config, tp, packed_experts=packed, quantized_attention=quantized)


def split_layer(layer: nn.Module, mesh: DeviceMesh, experts_run: Callable | None = None) -> None:
    """Split one decoder layer's attention and experts over `mesh` (1-D, the tp ranks of a group).

    experts_run: the execution policy's experts function before the split (a fused kernel, or None:
    the module's forward); it runs on the local tensors, called by `split_experts`.
    On a GPU the split tensors move to it (DTensor.from_local): osstune.parallel.fsdp calls this
    layer by layer, just before sharding the layer, so at most one layer's tp share is whole there.
    """
    attn = layer.self_attn
    _split(attn, ATTENTION, mesh)
    attn.tp_region = SplitRegion(attn, mesh, type(attn).forward, OUTPUT_BIAS["attention"], _attention_bias)
    attn.__class__ = _split_class(type(attn))
    experts = layer.mlp.experts
    _split(experts, EXPERTS, mesh)
    run = experts_run if experts_run is not None else (lambda module, *a: module(*a))
    experts.tp_region = SplitRegion(experts, mesh, run, OUTPUT_BIAS["experts"], _experts_bias)


def split_experts(experts: nn.Module, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`ExecutionPolicy.experts` under tensor parallel: (experts, x (N, H), idx (N, k), weights (N, k)) -> (N, H),
    through the split region `split_layer` left on the experts module."""
    region = getattr(experts, "tp_region", None)
    assert region is not None and region.call.inner is experts, (
        "the experts module was replaced after tensor parallel split it"
    )
    return region(x, idx, weights)


@torch.no_grad()
def gather_packed(module: nn.Module) -> dict[str, torch.Tensor]:
    """Whole packed MXFP4 buffers of split experts (a collective over the tp ranks)."""
    mesh, plan = module.tp_packed
    out = {}
    for leaf, dim in plan.items():
        t = module._buffers[leaf].contiguous()
        parts = [torch.empty_like(t) for _ in range(mesh.size())]
        dist.all_gather(parts, t, group=mesh.get_group())
        out[leaf] = torch.cat(parts, dim)
    return out
