"""Triton bodies of the MoE's fused elementwise passes (launchers in moe.py).

bias + clamped SwiGLU: one pass over the grouped GEMM's output instead of the ~8 that the same
arithmetic takes as separate PyTorch ops. Each program loads a contiguous (BLOCK_M, 2 * BLOCK_I) tile
of the interleaved [g0, u0, g1, u1, ...] columns and splits it in registers: reading or writing gate
and up as two stride-2 streams made the backward ~10x slower than its byte count (measured, H100).

combine: out[n] = sum_s weights[n, s] * y[inv[n * k + s]], and its backward, each one pass.

Shape legend: M routed rows (tokens x top-k, sorted by expert), N tokens, k slots, H hidden,
I expert intermediate, E experts; gate_up (M, 2I), bias (E, 2I), expert (M,), h (M, I), y (M, H).
"""

import triton
import triton.language as tl


@triton.jit
def _load_gate_up(GateUp, Bias, Expert, rows, pair_cols, M, I, stride_gu, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """gate, up (BLOCK_M, BLOCK_I) float32 with the row's expert bias added; pair_cols are the 2*BLOCK_I
    interleaved column indices of the tile."""
    ok = (rows[:, None] < M) & (pair_cols[None, :] < 2 * I)
    e = tl.load(Expert + rows, mask=rows < M, other=0)
    x = tl.load(GateUp + rows[:, None] * stride_gu + pair_cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x += tl.load(Bias + e[:, None] * (2 * I) + pair_cols[None, :], mask=ok, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_I, 2)))
    return gate, up


@triton.jit
def _swiglu_fwd(GateUp, Bias, Expert, H, M, I, stride_gu, alpha, limit,
                BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    pair_cols = tl.program_id(1) * 2 * BLOCK_I + tl.arange(0, 2 * BLOCK_I)
    gate, up = _load_gate_up(GateUp, Bias, Expert, rows, pair_cols, M, I, stride_gu, BLOCK_M, BLOCK_I)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    h = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
    ok = (rows[:, None] < M) & (cols[None, :] < I)
    tl.store(H + rows[:, None] * I + cols[None, :], h.to(H.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd(GateUp, Bias, Expert, dH, dGateUp, M, I, stride_gu, alpha, limit,
                BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """dGateUp (M, 2I) = d h / d (gate_up + bias), interleaved like the input; clamp gradients pass
    where the input lies inside the clamp range, bounds included (as torch.clamp's backward)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    pair_cols = tl.program_id(1) * 2 * BLOCK_I + tl.arange(0, 2 * BLOCK_I)
    gate, up = _load_gate_up(GateUp, Bias, Expert, rows, pair_cols, M, I, stride_gu, BLOCK_M, BLOCK_I)
    ok = (rows[:, None] < M) & (cols[None, :] < I)
    dh = tl.load(dH + rows[:, None] * I + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    gate_in = gate <= limit
    up_in = (up >= -limit) & (up <= limit)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    sig = tl.sigmoid(alpha * gate)
    d_gate = tl.where(gate_in, dh * (up + 1.0) * (sig + alpha * gate * sig * (1.0 - sig)), 0.0)
    d_up = tl.where(up_in, dh * gate * sig, 0.0)
    d = tl.reshape(tl.join(d_gate, d_up), (BLOCK_M, 2 * BLOCK_I))
    pair_ok = (rows[:, None] < M) & (pair_cols[None, :] < 2 * I)
    tl.store(dGateUp + rows[:, None] * (2 * I) + pair_cols[None, :], d.to(dGateUp.dtype.element_ty), mask=pair_ok)


@triton.jit
def _combine_fwd(Y, Inv, W, Out, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s in tl.static_range(K):
        r = tl.load(Inv + n * K + s).to(tl.int64)
        w = tl.load(W + n * K + s).to(tl.float32)
        acc += w * tl.load(Y + r * H + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + n * H + cols, acc.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _combine_bwd(Y, Inv, W, dOut, dY, dW, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
    """dY[inv[n*k+s]] = weights[n, s] * dOut[n]; dW[n, s] = dOut[n] . y[inv[n*k+s]] (float32)."""
    n = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    for s in tl.static_range(K):
        r = tl.load(Inv + n * K + s).to(tl.int64)
        w = tl.load(W + n * K + s).to(tl.float32)
        dot = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + offs
            ok = cols < H
            g = tl.load(dOut + n * H + cols, mask=ok, other=0.0).to(tl.float32)
            dot += g * tl.load(Y + r * H + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(dY + r * H + cols, (w * g).to(dY.dtype.element_ty), mask=ok)
        tl.store(dW + n * K + s, tl.sum(dot, 0))
