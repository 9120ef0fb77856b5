"""The reference model's attention and experts through our kernels: the fast path as the model's
execution policy (`osstune.model.ExecutionPolicy`).

`enable_fast_path(model)` fills the policy's `attention`, `qkv`, `experts` and `checkpoint_context`
fields and leaves the others as they are (a `checkpoint` function such as host-memory offload); it
changes no module, parameter or state-dict name, so checkpoints, adapters and `disable_fast_path` work
as before. Where it runs in the trainer's preparation, and why there: osstune/train/prepare.py. The
loss's fused kernel is chosen in `osstune.train.loss` (on CUDA).

- Attention: `sink_flash_attention` with the layer's window and the batch's `doc_ids`; no dense
  (T, T) mask is built. With a KV cache (generation) the reference runs: the kernel trains, it
  does not decode.
- q/k/v over MXFP4 (`quantize_attention`, LoRA on them or not): one MXFP4 GEMM over the three
  weights side by side, forward and input gradient (`fused_mxfp4_linear`), plus each adapter's
  `LoRALinear.delta` (dropout included, drawn in the same order as the unfused wrappers). Enabling
  moves the three packed weights into one buffer first (`fuse_mxfp4_storage`: the same memory and
  state dict); a `.to()` onto another device afterwards ends the sharing, and the projections run one
  by one again, with a warning, until `enable_fast_path` runs again. Decided per call like the experts.
- Experts: `moe_experts` (grouped GEMMs) for dense `Experts`, `moe_experts_mxfp4` (the MXFP4 grouped
  GEMMs, weights kept packed: QLoRA) for `MXFP4Experts`, and either for `LoRAExperts` over them with
  the adapter's per-expert pairs as `ExpertLoRA` (a projection the adapter does not target gets a
  zero pair). Expert LoRA with dropout while training stays on the reference loop (the kernels apply
  none). Each case is decided per call from the module found there, so wrapping the experts after
  enabling stays correct. Experts that already run through another policy (expert parallel's
  dispatch, tensor parallel's split region: osstune.parallel) are refused: enable the fast path
  before parallelizing.
- Router: the reference's top-k and softmax, unchanged.
- Gradient checkpointing, `checkpoint`: "layer" recomputes each decoder layer in the backward (the
  reference policy); "keep_expert_gemms" recomputes the layer but keeps the outputs of its two base
  expert GEMMs (torch's selective checkpointing): 2I + H bf16 values per routed row and layer
  (141 MB a layer at 2,048 tokens) kept, the largest part of the recomputation saved (dense
  `grouped_mm` and packed `osstune::mxfp4_grouped_mm` alike). Its dispatch
  mode costs host time per op, which only a graphed step (graphs.py) hides.
  docs/PERFORMANCE.md has the measurements.

Nothing here reads a GPU value on the host: a step stays free of device-to-host syncs.

Shape legend: B batch, T tokens, Q query heads, K key/value heads, D head dim, N tokens, k experts
per token, H hidden, E experts, I expert intermediate, r LoRA rank.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from osstune.kernels import ExpertLoRA, moe_experts, sink_flash_attention
from osstune.kernels.moe import moe_experts_mxfp4
from osstune.kernels.mxfp4_gemm import MXFP4GroupedLinear, check_scales
from osstune.lora.layers import LoRAExperts, LoRALinear
from osstune.model import Attention, Experts, ForwardContext, GptOss, MoE, MXFP4Experts, sink_attention
from osstune.quant.linear import (
    QKV_PROJECTIONS,
    MXFP4Linear,
    fuse_mxfp4_storage,
    fused_mxfp4_linear,
    packed_qkv,
    shared_mxfp4_weight,
)

CHECKPOINT_POLICIES = ("layer", "keep_expert_gemms")
# Head dims the attention kernel compiles for (osstune.kernels.attention).
KERNEL_HEAD_DIMS = (16, 32, 64)


@dataclass(frozen=True)
class FastPathOptions:
    attention: bool = True
    experts: bool = True
    checkpoint: Literal["layer", "keep_expert_gemms"] = "layer"
    fuse_qkv: bool = True  # q/k/v stored as MXFP4: one GEMM for the three (module docstring)

    def __post_init__(self) -> None:
        if self.checkpoint not in CHECKPOINT_POLICIES:
            raise ValueError(f"FastPathOptions.checkpoint={self.checkpoint!r}; use one of {', '.join(CHECKPOINT_POLICIES)}")


@dataclass(frozen=True)
class FastPathSummary:
    """What runs on kernels after `enable_fast_path`, and what stays on the reference and why."""

    attention_layers: int
    expert_layers: int
    reference: tuple[str, ...]  # "path: reason"
    fused_qkv_layers: int = 0  # attention layers whose MXFP4 q/k/v run as one GEMM


def use_fast_path(mode: str, device: torch.device) -> bool:
    """TrainConfig.fast: "auto" = on CUDA devices; "always" also on the CPU (the kernels' reference
    fallbacks or Triton's interpreter: slow, for tests); "never" = the reference model."""
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"fast={mode!r}; use 'auto', 'always' or 'never'")
    return mode == "always" or (mode == "auto" and device.type == "cuda")


def enable_fast_path(model: GptOss, options: FastPathOptions = FastPathOptions()) -> FastPathSummary:
    """Route `model`'s attention and experts through the kernels (see the module docstring): install
    the fast path's fields of `model.execution`, keeping the rest. Warns when a layer stays on the
    reference.

    Call it after `apply_lora` (the "keep_expert_gemms" policy tells base from LoRA GEMMs by the
    adapters' rank), after `quantize_attention` and once the model has its device (q/k/v share one
    buffer from here on), and before expert parallel (whose dispatch owns the experts).
    """
    current = model.execution
    if current.experts not in (None, fast_experts):
        raise ValueError(
            f"enable_fast_path: the experts already run through {current.describe()} (a parallel plan's, "
            "installed by osstune.parallel); enable the fast path first, then parallelize "
            "(osstune.train.prepare runs them in that order)"
        )
    reference = []
    n_attention = n_experts = n_qkv = 0
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            layers = packed_qkv(module) if options.fuse_qkv else None
            if layers is not None:
                fuse_mxfp4_storage(layers)
                n_qkv += 1
            if options.attention and module.d in KERNEL_HEAD_DIMS:
                n_attention += 1
            elif options.attention:
                reference.append(f"{name}: head dim {module.d} (the kernel takes {KERNEL_HEAD_DIMS})")
        elif isinstance(module, MoE) and options.experts:
            why = reference_reason(module.experts, training=True)
            if why:
                reference.append(f"{name}.experts: {why}")
            else:
                _check_packed_scales(module.experts, f"{name}.experts")
                n_experts += 1
    context = None
    if options.checkpoint == "keep_expert_gemms":
        policy = functools.partial(_keep_expert_gemms, max_rank=_max_expert_rank(model))
        context = functools.partial(create_selective_checkpoint_contexts, policy)
    model.set_execution(
        current.replace(
            qkv=fast_qkv if n_qkv else None,
            attention=fast_attention if options.attention else None,
            experts=fast_experts if options.experts else None,
            checkpoint_context=context,
        )
    )
    if reference:
        shown = "; ".join(reference[:3]) + (f"; and {len(reference) - 3} more" if len(reference) > 3 else "")
        warnings.warn(f"fast path: {len(reference)} module(s) stay on the reference path: {shown}", stacklevel=2)
    return FastPathSummary(n_attention, n_experts, tuple(reference), n_qkv)


def _check_packed_scales(experts: nn.Module, name: str) -> None:
    """Packed experts must fit the MXFP4 GEMMs' scale range (checked once here, not every step)."""
    base = getattr(experts, "base_layer", experts)
    if isinstance(base, MXFP4Experts):
        for proj in ("gate_up_proj", "down_proj"):
            check_scales(getattr(base, f"{proj}_scales"), f"{name}.{proj}_scales")


def disable_fast_path(model: GptOss) -> None:
    """Back to the reference for what `enable_fast_path` installed; other fields of the policy (an
    offloaded checkpoint, expert parallel's dispatch) stay. q/k/v keep sharing one buffer: harmless."""
    current = model.execution
    model.set_execution(
        current.replace(
            qkv=None if current.qkv is fast_qkv else current.qkv,
            attention=None if current.attention is fast_attention else current.attention,
            experts=None if current.experts is fast_experts else current.experts,
            checkpoint_context=None,
        )
    )


def fast_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, window: int | None, ctx: ForwardContext
) -> torch.Tensor:
    """`ExecutionPolicy.attention`: q (B, T, Q, D), k/v (B, S, K, D) -> (B, T, Q, D). The reference
    runs with a KV cache (generation) and for head dims the kernel does not compile for."""
    if ctx.cache is not None or q.shape[-1] not in KERNEL_HEAD_DIMS:
        return sink_attention(q, k, v, sinks, ctx.sliding_allowed if window is not None else ctx.full_allowed)
    return sink_flash_attention(q, k, v, sinks, window=window, doc_ids=ctx.doc_ids)


def fast_qkv(attention: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ExecutionPolicy.qkv`: x (B, T, H) -> q (B, T, Q*D), k, v (B, T, K*D), the base projections as
    one MXFP4 GEMM and each LoRA wrapper's delta on top; the projections one by one where they cannot
    (another kind of module there, or their weights no longer share a buffer)."""
    modules = [getattr(attention, kind) for kind in QKV_PROJECTIONS]
    bases = [m.base_layer if isinstance(m, LoRALinear) else m for m in modules]
    ys = None
    if all(type(b) is MXFP4Linear for b in bases):
        ys = fused_mxfp4_linear(x, bases)
        # Only a fallback looks again at why: the fused call already checked the sharing.
        if ys is None and shared_mxfp4_weight(bases) is None:
            warnings.warn(
                f"attention layer {attention.layer}: the MXFP4 q/k/v weights no longer share one buffer (moved "
                "with .to() after enable_fast_path?); they run as three GEMMs. Call enable_fast_path again",
                stacklevel=2,
            )
    if ys is None:
        return tuple(m(x) for m in modules)
    return tuple(y + m.delta(x) if isinstance(m, LoRALinear) else y for m, y in zip(modules, ys))


def fast_experts(experts: nn.Module, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`ExecutionPolicy.experts`: x (N, H), idx/weights (N, k) -> (N, H)."""
    if reference_reason(experts, experts.training):
        return experts(x, idx, weights)
    base, lora = experts, None
    if isinstance(experts, LoRAExperts):
        base, lora = experts.base_layer, expert_lora(experts)
    if isinstance(base, MXFP4Experts):
        return moe_experts_mxfp4(
            x, idx, weights, base.gate_up_proj_blocks, base.gate_up_proj_scales, base.gate_up_proj_bias,
            base.down_proj_blocks, base.down_proj_scales, base.down_proj_bias, base.alpha, base.limit, lora,
        )
    return moe_experts(
        x, idx, weights, base.gate_up_proj, base.gate_up_proj_bias, base.down_proj, base.down_proj_bias,
        base.alpha, base.limit, lora,
    )


def reference_reason(experts: nn.Module, training: bool) -> str | None:
    """Why these experts cannot run on `moe_experts` / `moe_experts_mxfp4`, or None when they can."""
    base = experts.base_layer if isinstance(experts, LoRAExperts) else experts
    if not isinstance(base, Experts):  # MXFP4Experts is an Experts
        return f"unknown experts module {type(base).__name__}"
    if isinstance(experts, LoRAExperts) and training and isinstance(experts.dropout, nn.Dropout):
        return f"LoRA dropout {experts.dropout.p} (the kernel applies no dropout)"
    return None


def expert_lora(experts: LoRAExperts) -> ExpertLoRA:
    """The adapter's pairs as the kernel takes them: A (E, in, r), B (E, r, out), both projections;
    an untargeted projection gets zeros (a no-op that costs two rank-r GEMMs)."""
    pairs = {}
    some = next(p for kind in experts.kinds for p in experts.pair(kind))
    e, r = experts.num_experts, experts.r
    # (in, out) from the biases: present in both the dense and the packed MXFP4 layout.
    two_i, h = experts.base_layer.gate_up_proj_bias.shape[1], experts.base_layer.down_proj_bias.shape[1]
    dims = {"gate_up_proj": (h, two_i), "down_proj": (two_i // 2, h)}
    for kind, (n_in, n_out) in dims.items():
        pair = experts.pair(kind)
        if pair is None:
            zeros = functools.partial(torch.zeros, device=some.device, dtype=some.dtype)
            pair = (zeros(e, n_in, r), zeros(e, r, n_out))
        pairs[kind] = pair
    (a_gu, b_gu), (a_d, b_d) = pairs["gate_up_proj"], pairs["down_proj"]
    return ExpertLoRA(a_gu=a_gu, b_gu=b_gu, a_d=a_d, b_d=b_d, scale=experts.scale)


def _max_expert_rank(model: nn.Module) -> int:
    # moe_experts pads the rank to a multiple of 8 for the grouped GEMM's alignment.
    ranks = [m.r + (-m.r % 8) for m in model.modules() if isinstance(m, LoRAExperts)]
    return max(ranks, default=0)


def _keep_expert_gemms(ctx, op, *args, max_rank: int, **kwargs) -> CheckpointPolicy:
    """Selective-checkpointing policy: keep the outputs of base-weight grouped GEMMs (E, in, out),
    recompute everything else. LoRA's grouped GEMMs have a rank-sized operand dimension; the MXFP4
    op also serves frozen attention projections, as one group (blocks (1, out, in/32, 16))."""
    if op is torch.ops.aten._grouped_mm.default and min(args[1].shape[-2:]) > max_rank:
        return CheckpointPolicy.MUST_SAVE
    if op is MXFP4GroupedLinear.op and args[1].shape[0] > 1:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE
