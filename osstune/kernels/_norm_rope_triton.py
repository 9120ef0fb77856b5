"""Triton bodies of the decode-step glue (launchers and references in norm_rope.py).

_add_rms_norm: one program per row: s = x + r rounded to the storage dtype (the model adds in that
dtype), then s * rsqrt(mean(s^2) + eps) * w in float32, stored in the storage dtype.
_rope: one program per token: the YaRN angles pos * inv_freq in float32, then q and k rotated in
place (the two halves of each head, gpt-oss's convention), every head of the token in one tile.

Shape legend: N rows (tokens), H hidden, Q query heads, K kv heads, D head dim, D2 = D / 2.
"""

import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(X, R, W, Out, Sum, n_cols, stride_x, stride_r, stride_o, stride_s, eps,
                  HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(Sum + row * stride_s + cols, x, mask=ok)
    x32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (w * (x32 * inv)).to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _rope_heads(X, row, stride_t, stride_h, n_heads, cos, sin, BLOCK_H: tl.constexpr, D2: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, D2)[None, :]
    ok = heads < n_heads
    base = X + row * stride_t + heads * stride_h + j
    x1 = tl.load(base, mask=ok, other=0.0)
    x2 = tl.load(base + D2, mask=ok, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base, (a * cos - b * sin).to(x1.dtype), mask=ok)
    tl.store(base + D2, (b * cos + a * sin).to(x1.dtype), mask=ok)


@triton.jit
def _rope(Q, K, Pos, InvFreq, stride_qt, stride_qh, stride_kt, stride_kh, n_q, n_k, scale,
          BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(Pos + row).to(tl.float32)
    angle = pos * tl.load(InvFreq + tl.arange(0, D2)).to(tl.float32)
    cos = (tl.cos(angle) * scale)[None, :]
    sin = (tl.sin(angle) * scale)[None, :]
    _rope_heads(Q, row, stride_qt, stride_qh, n_q, cos, sin, BLOCK_Q, D2)
    _rope_heads(K, row, stride_kt, stride_kh, n_k, cos, sin, BLOCK_K, D2)
