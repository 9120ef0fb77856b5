"""The small operations between a decode step's matrix products, fused: residual add + RMSNorm, and
rotary embedding of q and k in place.

In the reference model each is a chain of elementwise kernels (upcast, square, mean, rsqrt, two
products, downcast; chunk, four products, two sums, concatenation): ~40 launches a layer that, at
batch 1, cost more GPU time than the layer's attention. `add_rms_norm` and `rope_qk_` do each in one
launch, graph-capturable; `add_rms_norm_ref` and `rope_qk_ref` are their plain-PyTorch definitions,
the same arithmetic as `osstune.model.RMSNorm` and `osstune.model.apply_rotary`.

Shape legend: N tokens, H hidden, Q query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import torch

from osstune.kernels._backend import triton_usable


def add_rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x (N, H) [+ residual (N, H), added in x's dtype] -> (normed (N, H), the sum or x)."""
    s = x if residual is None else x + residual
    s32 = s.float()
    normed = weight.float() * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps))
    return normed.to(x.dtype), s


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """`add_rms_norm_ref` in one launch where Triton runs."""
    if not triton_usable(x) or x.dim() != 2 or x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        return add_rms_norm_ref(x, weight, eps, residual)
    from osstune.kernels import _norm_rope_triton as kern

    n, h = x.shape
    out = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x
    if n:
        r = residual if residual is not None else x
        kern._add_rms_norm[(n,)](x, r, weight, out, s, h, x.stride(0), r.stride(0), out.stride(0), s.stride(0), eps,
                                 HAS_RES=residual is not None, BLOCK=_pow2(h),
                                 num_warps=4 if h >= 1024 else 1)
    return out, s


def rope_qk_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float):
    """q (N, Q, D), k (N, K, D) rotated in place by positions (N,); returns (q, k)."""
    angles = positions.float()[:, None] * inv_freq.float()  # (N, D/2)
    cos, sin = (angles.cos() * scale)[:, None], (angles.sin() * scale)[:, None]
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype))
    return q, k


def rope_qk_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float):
    """`rope_qk_ref` in one launch where Triton runs (heads may be strided, their dims contiguous)."""
    n, n_q, d = q.shape
    if not triton_usable(q) or q.stride(-1) != 1 or k.stride(-1) != 1 or d & (d - 1):
        return rope_qk_ref(q, k, positions, inv_freq, scale)
    from osstune.kernels import _norm_rope_triton as kern

    if n:
        kern._rope[(n,)](q, k, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1), n_q,
                         k.shape[1], scale, BLOCK_Q=_pow2(n_q), BLOCK_K=_pow2(k.shape[1]), D2=d // 2, num_warps=4)
    return q, k


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())
