"""gpt-oss experts as grouped GEMMs: every routed token through its top-k experts, no loop over experts.

Routed rows (token, slot) are sorted by expert on the device (argsort; group offsets by searchsorted,
so no host sync), run through one grouped GEMM per projection (`torch.nn.functional.grouped_mm`,
bf16 on CUDA), the bias + clamped SwiGLU fused in one Triton pass, then un-permuted and summed with the
routing weights. Expert LoRA adds two low-rank grouped GEMMs beside each base projection; W + BA is
never formed. `moe_experts_ref` is the plain per-expert loop (the shape of `osstune.model.Experts`).
`moe_experts_mxfp4` is the same with packed MXFP4 base weights (QLoRA): its base projections are the
MXFP4 grouped GEMMs of `osstune.kernels.mxfp4_gemm`, which decode the weights inside the GEMM.

Where `grouped_mm` cannot run (CPU, float32, dims not multiples of 8), a loop over the groups takes
its place (it reads the offsets on the host). Gradients: x, routing weights, biases, LoRA factors and,
when they require it, the base weights (full fine-tuning), all through autograd.

Shape legend: N tokens, k experts per token, M = N * k routed rows, H hidden, I expert intermediate,
E experts, r LoRA rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from osstune.kernels._backend import triton_usable
from osstune.kernels.mxfp4_gemm import MXFP4GroupedLinear

# torch >= 2.10 names it F.grouped_mm; earlier releases only have the private op.
_grouped_mm_op = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class MoEInputError(ValueError):
    """Expert tensors whose shapes or dtypes do not fit together; the message names them."""


@dataclass(frozen=True)
class ExpertLoRA:
    """Low-rank adapters of every expert: gate_up += scale * A_gu @ B_gu, down += scale * A_d @ B_d."""

    a_gu: torch.Tensor  # (E, H, r)
    b_gu: torch.Tensor  # (E, r, 2I)
    a_d: torch.Tensor  # (E, I, r)
    b_d: torch.Tensor  # (E, r, H)
    scale: float


def clamped_swiglu_ref(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """(..., 2I) interleaved [g0, u0, g1, u1, ...] -> (..., I): (up + 1) * gate * sigmoid(alpha * gate)
    with gate clamped to <= limit and up to [-limit, limit] (gpt-oss model card)."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def moe_experts_ref(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    alpha: float,
    limit: float,
    lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """x (N, H), idx/weights (N, k), gate_up (E, H, 2I), gate_up_bias (E, 2I), down (E, I, H),
    down_bias (E, H) -> (N, H). One matmul pair per expert that received tokens."""
    out = torch.zeros_like(x)
    for e in idx.unique().tolist():
        token, slot = (idx == e).nonzero(as_tuple=True)
        xe = x[token]
        gu = xe @ gate_up[e].to(x.dtype) + gate_up_bias[e].to(x.dtype)
        if lora is not None:
            gu = gu + lora.scale * ((xe @ lora.a_gu[e]) @ lora.b_gu[e])
        h = clamped_swiglu_ref(gu, alpha, limit)
        y = h @ down[e].to(x.dtype) + down_bias[e].to(x.dtype)
        if lora is not None:
            y = y + lora.scale * ((h @ lora.a_d[e]) @ lora.b_d[e])
        out = out.index_add(0, token, y * weights[token, slot, None].to(x.dtype))
    return out


def moe_experts(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    alpha: float,
    limit: float,
    lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """Same signature and result as `moe_experts_ref`, as grouped GEMMs over expert-sorted rows."""
    _check_shapes(x, idx, weights, gate_up, gate_up_bias, down, down_bias, lora)
    return _experts(
        x, idx, weights, gate_up.shape[0],
        lambda rows, offs: grouped_mm(rows, gate_up.to(x.dtype), offs),
        lambda rows, offs: grouped_mm(rows, down.to(x.dtype), offs),
        gate_up_bias, down_bias, alpha, limit, lora,
    )


def moe_experts_mxfp4(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up_blocks: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down_blocks: torch.Tensor,
    down_scales: torch.Tensor,
    down_bias: torch.Tensor,
    alpha: float,
    limit: float,
    lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """`moe_experts` with packed MXFP4 base weights (QLoRA), kept packed: x (N, H), idx/weights (N, k),
    gate_up_blocks (E, 2I, H/32, 16) uint8, gate_up_scales (E, 2I, H/32) uint8, gate_up_bias (E, 2I),
    down_blocks (E, H, I/32, 16), down_scales (E, H, I/32), down_bias (E, H) -> (N, H).

    The base projections are `MXFP4GroupedLinear` (decoded tile by tile in the GEMM on CUDA, one
    expert at a time elsewhere): no dense copy of an expert stack is formed. They are frozen: x,
    routing weights, biases and the LoRA factors get gradients, the packed weights none.
    """
    _check_shapes_mxfp4(x, idx, weights, gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks, down_scales,
                        down_bias, lora)
    return _experts(
        x, idx, weights, gate_up_blocks.shape[0],
        lambda rows, offs: MXFP4GroupedLinear.apply(rows, gate_up_blocks, gate_up_scales, offs),
        lambda rows, offs: MXFP4GroupedLinear.apply(rows, down_blocks, down_scales, offs),
        gate_up_bias, down_bias, alpha, limit, lora,
    )


def _experts(x, idx, weights, n_experts, gate_up_mm, down_mm, gate_up_bias, down_bias, alpha, limit, lora):
    """The routed computation shared by both weight formats; gate_up_mm / down_mm (rows (M, in),
    offs (E,)) -> (M, out) are the base grouped GEMMs."""
    n, k = idx.shape
    flat = idx.reshape(-1)  # (M,) row r = token r // k, slot r % k
    order = torch.argsort(flat, stable=True)  # (M,) rows sorted by expert
    expert_of_row = flat[order]  # (M,) non-decreasing
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    # offs[e] = rows of experts <= e: the grouped GEMM's group ends (empty experts repeat an offset).
    offs = torch.searchsorted(expert_of_row, torch.arange(n_experts, device=x.device), right=True).to(torch.int32)

    xs = _GatherRows.apply(x, order // k, inv, k)  # (M, H)
    gu = gate_up_mm(xs, offs)  # (M, 2I)
    if lora is not None:
        gu = gu + _lora_grouped_mm(xs, lora.a_gu, lora.b_gu * lora.scale, offs)
    h = bias_swiglu(gu, gate_up_bias.to(x.dtype), expert_of_row, alpha, limit)  # (M, I)
    y = down_mm(h, offs)  # (M, H)
    if lora is not None:
        y = y + _lora_grouped_mm(h, lora.a_d, lora.b_d * lora.scale, offs)
    out = _Combine.apply(y, inv, order, weights.to(x.dtype))  # (N, H)
    # The down bias enters once per slot with its routing weight: out += W_route (N, E) @ down_bias,
    # a small dense GEMM whose backward gives the bias gradient with float32 accumulation.
    w_route = torch.zeros(n, n_experts, device=x.device, dtype=x.dtype).scatter_add(1, idx, weights.to(x.dtype))
    return out + w_route @ down_bias.to(x.dtype)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a (M, K) rows grouped by offs (G,) int32 (group g = rows [offs[g-1], offs[g])), b (G, K, N)
    -> (M, N). torch's grouped GEMM where it runs (bf16, CUDA, 16-byte aligned), else a loop."""
    if _grouped_mm_fits(a, b):
        return _grouped_mm_op(a, b, offs=offs)
    return grouped_mm_loop(a, b, offs)


def grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The fallback: one matmul per group (reads the offsets on the host)."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    parts = [a[s:e] @ b[g] for g, (s, e) in enumerate(zip(starts, ends))]
    return torch.cat(parts + [a.new_zeros(a.shape[0] - ends[-1], b.shape[-1])])


def _grouped_mm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # grouped_mm's kernels load through TMA: every row stride must be a multiple of 16 bytes.
    return (
        _grouped_mm_op is not None
        and a.is_cuda
        and a.dtype == b.dtype == torch.bfloat16
        and a.shape[-1] % 8 == 0
        and b.shape[-1] % 8 == 0
    )


def _lora_grouped_mm(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(x @ A_e) @ B_e per group: x (M, K), a (E, K, r), b (E, r, N) -> (M, N). Callers fold the LoRA
    scale into the small b rather than scaling the (M, N) result (one pass less each way)."""
    a, b = a.to(x.dtype), b.to(x.dtype)
    pad = -a.shape[-1] % 8
    if pad and _grouped_mm_fits(x, b):
        # Zero rank columns keep the product and make the (M, r) intermediate 16-byte aligned.
        a = F.pad(a, (0, pad))
        b = F.pad(b, (0, 0, 0, pad))
    return grouped_mm(grouped_mm(x, a, offs), b, offs)


def bias_swiglu(gate_up: torch.Tensor, bias: torch.Tensor, expert: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gate_up (M, 2I) + bias[expert] (E, 2I) -> clamped SwiGLU (M, I); fused on Triton devices."""
    return _BiasSwiGLU.apply(gate_up, bias, expert, alpha, limit)


def _check_shapes(x, idx, weights, gate_up, gate_up_bias, down, down_bias, lora) -> None:
    def bad(msg: str) -> MoEInputError:
        return MoEInputError(f"moe_experts: {msg}")

    if x.dim() != 2 or idx.dim() != 2 or weights.shape != idx.shape or idx.shape[0] != x.shape[0]:
        raise bad(f"expected x (N, H), idx and weights (N, k); got x {tuple(x.shape)}, idx {tuple(idx.shape)}, "
                  f"weights {tuple(weights.shape)}")
    e, h, two_i = gate_up.shape
    i = two_i // 2
    expected = {"gate_up_bias": (e, two_i), "down": (e, i, h), "down_bias": (e, h)}
    for name, t in (("gate_up_bias", gate_up_bias), ("down", down), ("down_bias", down_bias)):
        if tuple(t.shape) != expected[name]:
            raise bad(f"{name} has shape {tuple(t.shape)}; with gate_up {tuple(gate_up.shape)} "
                      f"(E, H, 2I) it must be {expected[name]}")
    if x.shape[1] != h or two_i % 2:
        raise bad(f"x has hidden size {x.shape[1]}, gate_up {tuple(gate_up.shape)} expects (E, {x.shape[1]}, 2I)")
    if lora is not None:
        r = lora.a_gu.shape[-1]
        want = {"a_gu": (e, h, r), "b_gu": (e, r, two_i), "a_d": (e, i, r), "b_d": (e, r, h)}
        for name, shape in want.items():
            if tuple(getattr(lora, name).shape) != shape:
                raise bad(f"lora.{name} has shape {tuple(getattr(lora, name).shape)}; expected {shape}")


def _check_shapes_mxfp4(x, idx, weights, gu_blocks, gu_scales, gate_up_bias, d_blocks, d_scales, down_bias,
                        lora) -> None:
    def bad(msg: str) -> MoEInputError:
        return MoEInputError(f"moe_experts_mxfp4: {msg}")

    for name, t in (("gate_up_blocks", gu_blocks), ("gate_up_scales", gu_scales), ("down_blocks", d_blocks),
                    ("down_scales", d_scales)):
        if t.dtype != torch.uint8:
            raise bad(f"{name} must be uint8 (packed MXFP4 as the checkpoint stores it); got {t.dtype}")
    if gu_blocks.dim() != 4 or gu_blocks.shape[3] != 16 or d_blocks.dim() != 4:
        raise bad(f"expected gate_up_blocks (E, 2I, H/32, 16) and down_blocks (E, H, I/32, 16); got "
                  f"{tuple(gu_blocks.shape)} and {tuple(d_blocks.shape)}")
    e, two_i, g_h, _ = gu_blocks.shape
    h, i = g_h * 32, two_i // 2
    expected = {"gate_up_scales": (e, two_i, g_h), "down_blocks": (e, h, i // 32, 16), "down_scales": (e, h, i // 32)}
    for name, t in (("gate_up_scales", gu_scales), ("down_blocks", d_blocks), ("down_scales", d_scales)):
        if tuple(t.shape) != expected[name] or i % 32:
            raise bad(f"{name} has shape {tuple(t.shape)}; with gate_up_blocks {tuple(gu_blocks.shape)} "
                      f"it must be {expected[name]} (I = {i} a multiple of 32)")
    # The rest (biases, routing, LoRA) as for dense weights, against a shape-only stand-in for gate_up.
    gate_up, down = torch.empty(e, h, two_i, device="meta"), torch.empty(e, i, h, device="meta")  # no storage
    _check_shapes(x, idx, weights, gate_up, gate_up_bias, down, down_bias, lora)


class _GatherRows(torch.autograd.Function):
    """xs = x[token] for the expert-sorted rows; the backward sums each token's k row gradients
    (a gather through the inverse permutation, no scatter-add atomics)."""

    @staticmethod
    def forward(ctx, x, token, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        g = grad.index_select(0, inv)  # (M, H) in token-major order
        return g.view(-1, ctx.k, g.shape[-1]).sum(1), None, None, None


class _Combine(torch.autograd.Function):
    """out[n] = sum_s weights[n, s] * y[inv[n * k + s]] for expert-sorted rows y (M, H): one fused
    pass each way on Triton devices (a batched matmul with k = 4 or 1 as the inner size is slow)."""

    @staticmethod
    def forward(ctx, y, inv, order, weights):
        n, k = weights.shape
        y = y.contiguous()
        ctx.save_for_backward(y, inv, order, weights)
        if triton_usable(y):
            from osstune.kernels import _moe_triton as kern

            h = y.shape[1]
            out = torch.empty(n, h, device=y.device, dtype=y.dtype)
            kern._combine_fwd[(n, _cdiv(h, _COMBINE_BLOCK_H))](y, inv, weights.contiguous(), out, h, K=k,
                                                               BLOCK_H=_COMBINE_BLOCK_H)
            return out
        yk = y.index_select(0, inv).view(n, k, -1)  # (N, k, H)
        return (yk.float() * weights.float().unsqueeze(-1)).sum(1).to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, inv, order, weights = ctx.saved_tensors
        n, k = weights.shape
        grad = grad.contiguous()
        if triton_usable(y):
            from osstune.kernels import _moe_triton as kern

            d_y = torch.empty_like(y)
            d_w = torch.empty(n, k, device=y.device, dtype=torch.float32)
            kern._combine_bwd[(n,)](y, inv, weights.contiguous(), grad, d_y, d_w, y.shape[1], K=k,
                                    BLOCK_H=_COMBINE_BLOCK_H)
            return d_y, None, None, d_w.to(weights.dtype)
        dyk = weights.unsqueeze(-1) * grad.unsqueeze(1)  # (N, k, H)
        d_y = dyk.reshape(n * k, -1).index_select(0, order)
        yk = y.index_select(0, inv).view(n, k, -1)
        d_w = (yk.float() * grad.float().unsqueeze(1)).sum(-1).to(weights.dtype)  # (N, k)
        return d_y, None, None, d_w


class _BiasSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, bias, expert, alpha, limit):
        ctx.save_for_backward(gate_up, bias, expert)
        ctx.alpha, ctx.limit = alpha, limit
        if triton_usable(gate_up) and gate_up.stride(1) == 1:
            return _swiglu_triton(gate_up, bias, expert, alpha, limit)
        return clamped_swiglu_ref(gate_up + bias[expert], alpha, limit)

    @staticmethod
    def backward(ctx, grad):
        gate_up, bias, expert = ctx.saved_tensors
        if triton_usable(gate_up) and gate_up.stride(1) == 1:
            d_gate_up = _swiglu_bwd_triton(gate_up, bias, expert, grad.contiguous(), ctx.alpha, ctx.limit)
        else:
            with torch.enable_grad():
                z = (gate_up + bias[expert]).detach().requires_grad_()
                h = clamped_swiglu_ref(z, ctx.alpha, ctx.limit)
            (d_gate_up,) = torch.autograd.grad(h, z, grad)
        d_bias = None
        if ctx.needs_input_grad[1]:
            # Sum of each expert's rows as a GEMM with a one-hot (E, M): float32 accumulation, no atomics.
            # (F.one_hot would check the index range on the host: a sync.)
            experts = torch.arange(bias.shape[0], device=expert.device)
            one_hot = (expert[:, None] == experts[None, :]).to(d_gate_up.dtype)  # (M, E)
            d_bias = one_hot.t() @ d_gate_up
        return d_gate_up, d_bias, None, None, None


_SWIGLU_BLOCK_M, _SWIGLU_BLOCK_I = 32, 128
_COMBINE_BLOCK_H = 1024


def _swiglu_triton(gate_up, bias, expert, alpha, limit):
    from osstune.kernels import _moe_triton as kern

    m, two_i = gate_up.shape
    i = two_i // 2
    h = torch.empty(m, i, device=gate_up.device, dtype=gate_up.dtype)
    grid = (_cdiv(m, _SWIGLU_BLOCK_M), _cdiv(i, _SWIGLU_BLOCK_I))
    kern._swiglu_fwd[grid](gate_up, bias.contiguous(), expert, h, m, i, gate_up.stride(0), alpha, limit,
                           BLOCK_M=_SWIGLU_BLOCK_M, BLOCK_I=_SWIGLU_BLOCK_I)
    return h


def _swiglu_bwd_triton(gate_up, bias, expert, grad, alpha, limit):
    from osstune.kernels import _moe_triton as kern

    m, two_i = gate_up.shape
    i = two_i // 2
    d_gate_up = torch.empty(m, two_i, device=gate_up.device, dtype=gate_up.dtype)
    grid = (_cdiv(m, _SWIGLU_BLOCK_M), _cdiv(i, _SWIGLU_BLOCK_I))
    kern._swiglu_bwd[grid](gate_up, bias.contiguous(), expert, grad, d_gate_up, m, i, gate_up.stride(0), alpha, limit,
                           BLOCK_M=_SWIGLU_BLOCK_M, BLOCK_I=_SWIGLU_BLOCK_I)
    return d_gate_up


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
