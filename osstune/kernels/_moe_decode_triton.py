"""Triton bodies of the small-batch MoE (launcher and reference in moe_decode.py).

Two kernels per MoE call, each over (row tiles, column tiles) of the routed rows sorted by expert:

- `_gate_up`: h = clamped_swiglu(x[token] @ W_gu,e + b_gu,e) for the rows of expert e, bias and
  SwiGLU in the epilogue (the interleaved gate/up columns of one tile split into pairs), h stored in
  x's dtype at the row's sorted position.
- `_down`: y = (h @ W_d,e + b_d,e) * routing weight, stored in float32 at the row's place in
  token-major order (token * k + slot), so that the k slots of a token are summed afterwards in a
  fixed order (deterministic, no atomics).

A program decodes one weight tile per step and multiplies it with at most BLOCK_M rows that share
its expert: at batch 1 only the top-k experts' tiles are read, each once; at larger batches the rows
of one expert share each decoded tile. The row tiles come from `_tile_rows` (the MXFP4 grouped
GEMM's, sync-free: the grid is an upper bound and surplus programs return at once), and the program
id of the row tile varies fastest, so the row tiles of one expert run side by side and read each
weight tile from HBM once, then from L2.

Weights: MXFP4 (blocks (E, N, K/32, 16) u8 output-major, scales (E, N, K/32) u8, decoded in
registers by the MXFP4 GEMM's decoders) or dense ((E, K, N) input-major, the model's layout).
tl.dot needs 16 rows, so one routed row rides in a 16-row tile: the wasted MMA work is free next to
the weight loads, and the MMA does the multiply-adds that would otherwise compete with the decode
for the ALUs. F32_DOT (Triton's CPU interpreter, whose tl.dot multiplies bf16 bit patterns) and
float32 inputs multiply in float32.

Shape legend: M = N * k routed rows, K input features, N output features (per projection),
E experts, H hidden, I expert intermediate.
"""

import triton
import triton.language as tl

from osstune.kernels._mxfp4_gemm_triton import (
    _E2M1_TO_BF16X2,
    _TWO_POW_64,
    _TWO_POW_126,
    _decode,
    _decode_pairs,
    _load_packed,
    _load_scales,
    _tile_rows,
)


@triton.jit
def _mxfp4_tile(W, sc, cols, col_ok, k0, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PAIRS: tl.constexpr, EVEN: tl.constexpr):
    """(BLOCK_N, BLOCK_K) tile of one expert's packed W (output-major) at rows `cols`, inputs
    [k0, k0 + BLOCK_K), with its scales sc already loaded. PAIRS: bf16 holding weight * 2**-64;
    otherwise float32. Past K or N: zeros."""
    packed = _load_packed(W, cols, col_ok, k0, K, stride_wn, BLOCK_K, EVEN)
    if PAIRS:
        w = _decode_pairs(packed, sc, BLOCK_N, BLOCK_K)
    else:
        w = _decode(packed, sc, BLOCK_N, BLOCK_K)
    return w


@triton.jit
def _dense_tile(W, cols, col_ok, k0, K, stride_wn, stride_wk, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """(BLOCK_N, BLOCK_K) tile of one expert's W^T, W stored (in, out) as the model has it."""
    ks = k0 + tl.arange(0, BLOCK_K)
    if EVEN:
        ok = col_ok[:, None]
    else:
        ok = col_ok[:, None] & (ks < K)[None, :]
    return tl.load(W + ks.to(tl.int64)[None, :] * stride_wk + cols[:, None] * stride_wn, mask=ok, other=0.0)


@triton.jit
def _project(A, a_rows, stride_a, row_ok, W, Scales, cols, col_ok, k_end, K, stride_wn, stride_wk, stride_sn,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr,
             PAIRS: tl.constexpr, SWAP: tl.constexpr, EVEN: tl.constexpr, F32_DOT: tl.constexpr,
             PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 = A[a_rows] (rows of K inputs) @ W_e^T[:, cols], over inputs [0, k_end).
    W and Scales point at expert e."""
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MXFP4:
        # Scales one step ahead: a byte load is too small for Triton's asynchronous copies, so it
        # would stall every step (as in the MXFP4 GEMM).
        sc_next = _load_scales(Scales, cols, col_ok, 0, K, stride_sn, BLOCK_K)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN:
            a_ok = row_ok[:, None]
        else:
            a_ok = row_ok[:, None] & (ks < K)[None, :]
        a = tl.load(A + a_rows[:, None] * stride_a + ks[None, :], mask=a_ok, other=0.0)  # (BLOCK_M, BLOCK_K)
        if MXFP4:
            sc = sc_next
            sc_next = _load_scales(Scales, cols, col_ok, k0 + BLOCK_K, K, stride_sn, BLOCK_K)
            w = _mxfp4_tile(W, sc, cols, col_ok, k0, K, stride_wn, BLOCK_N, BLOCK_K, PAIRS, EVEN)
        else:
            w = _dense_tile(W, cols, col_ok, k0, K, stride_wn, stride_wk, BLOCK_K, EVEN)
        if not PAIRS:
            w = w.to(a.dtype)  # the model multiplies in x's dtype (exact for decoded MXFP4)
        if F32_DOT:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP:
            # The decoded tile is the left operand: Hopper's wgmma can take it from registers.
            acc = tl.dot(w, tl.trans(a), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    if SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    if PAIRS:
        out = out * _TWO_POW_64
    return out


@triton.jit
def _decode_halves(packed, sc, ROWS: tl.constexpr, COLS: tl.constexpr, PAIRS: tl.constexpr):
    """packed (ROWS, COLS / 2) u8 and scales (ROWS, COLS / 32) u8 -> (even, odd), each (ROWS, COLS / 2):
    the weights at inputs 2j (low nibbles) and 2j + 1, left apart (joining them would cost a layout
    change per tile). PAIRS: bf16 holding weight * 2**-64 (the MXFP4 GEMM's pair decoder); otherwise
    float32 (its float32 decoder's arithmetic)."""
    sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (ROWS, COLS // 32, 16)), (ROWS, COLS // 2))
    if PAIRS:
        even, odd = tl.inline_asm_elementwise(_E2M1_TO_BF16X2, "=r,=r,=r,=r,r,r", [packed, sc],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        packed = packed.to(tl.int32)
        scale = (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2**(s - 127)
        even = (((packed & 7) << 22) | ((packed & 8) << 28)).to(tl.float32, bitcast=True) * _TWO_POW_126 * scale
        odd = (((packed & 0x70) << 18) | ((packed & 0x80) << 24)).to(tl.float32, bitcast=True) * _TWO_POW_126 * scale
    return even, odd


@triton.jit
def _project_row(A, a_row, stride_a, W, Scales, cols, col_ok, k_end, K, stride_wn, stride_wk, stride_sn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr, PAIRS: tl.constexpr,
                 EVEN: tl.constexpr):
    """(BLOCK_N,) float32 = A[a_row] (K inputs) @ W_e^T[:, cols] over inputs [0, k_end), for one row by
    FMAs rather than an MMA: the decoded tile stays in the registers and layout it was decoded in
    (feeding an MMA moves every weight through shared memory, which costs more than the decode at
    one row), products accumulate per input in registers and are summed over K once at the end."""
    a_ptr = A + a_row.to(tl.int64) * stride_a
    if MXFP4:
        acc_even = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        # The packed tile and its scales one step ahead: Triton pipelines only the loads that feed an
        # MMA, so this keeps two tiles in flight per program.
        sc_next = _load_scales(Scales, cols, col_ok, 0, K, stride_sn, BLOCK_K)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        if MXFP4:
            sc = sc_next
            sc_next = _load_scales(Scales, cols, col_ok, k0 + BLOCK_K, K, stride_sn, BLOCK_K)
            packed = _load_packed(W, cols, col_ok, k0, K, stride_wn, BLOCK_K, EVEN)
            w_even, w_odd = _decode_halves(packed, sc, BLOCK_N, BLOCK_K, PAIRS)
            # Inputs 2j and 2j + 1 loaded apart, straight into the layout the products need.
            ks = k0 + 2 * tl.arange(0, BLOCK_K // 2)
            a_even = tl.load(a_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
            a_odd = tl.load(a_ptr + ks + 1, mask=ks < K, other=0.0).to(tl.float32)
            acc_even += w_even.to(tl.float32) * a_even[None, :]
            acc_odd += w_odd.to(tl.float32) * a_odd[None, :]
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            if EVEN:
                a = tl.load(a_ptr + ks)
            else:
                a = tl.load(a_ptr + ks, mask=ks < K, other=0.0)
            a = a.to(tl.float32)  # (BLOCK_K,)
            w = _dense_tile(W, cols, col_ok, k0, K, stride_wn, stride_wk, BLOCK_K, EVEN)
            acc += w.to(A.dtype.element_ty).to(tl.float32) * a[None, :]  # weights in x's dtype, as the model
    if MXFP4:
        out = tl.sum(acc_even + acc_odd, axis=1)
    else:
        out = tl.sum(acc, axis=1)
    if PAIRS:
        out = out * _TWO_POW_64
    return out


@triton.jit
def _row_tile(Ids, Offs, M, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, SORTED: tl.constexpr):
    """-> (expert, row0, row_end, valid) of this program's rows. SORTED: a tile of the expert-sorted
    rows (`_tile_rows`; ids >= E form the tail group, invalid). Otherwise program r takes routed row r
    alone (no sort at all: for a handful of rows the sort's launches cost more than the few weight
    tiles two rows of one expert would share); ids outside [0, E) are invalid."""
    if SORTED:
        expert, row0, row_end = _tile_rows(Offs, tl.program_id(0), M, E, BLOCK_M, E_PAD)
        valid = expert < E
    else:
        row0 = tl.program_id(0)
        row_end = row0 + 1
        expert = tl.load(Ids + row0).to(tl.int32)
        valid = (expert >= 0) & (expert < E)
    expert = tl.minimum(tl.maximum(expert, 0), E - 1).to(tl.int64)
    return expert, row0, row_end, valid


@triton.jit
def _gate_up(X, Ids, Order, Offs, W, Scales, Bias, Hout, M, K, N, E, TOPK, alpha, limit,
             stride_x, stride_h, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_be,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
             SORTED: tl.constexpr, MXFP4: tl.constexpr, PAIRS: tl.constexpr, SWAP: tl.constexpr,
             EVEN: tl.constexpr, F32_DOT: tl.constexpr, PRECISION: tl.constexpr, GEMV: tl.constexpr):
    """Hout[r, :] = clamped SwiGLU of x[src(r) // TOPK] @ W_e + b_e for the rows r of expert e, where
    src(r) = Order[r] (SORTED) or r. K = H, N = 2I (gate/up interleaved), Hout (M, I). Invalid ids: zeros."""
    expert, row0, row_end, valid = _row_tile(Ids, Offs, M, E, BLOCK_M, E_PAD, SORTED)
    if row0 >= row_end:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    if SORTED:
        src = tl.load(Order + rows, mask=row_ok, other=0)
    else:
        src = rows
    token = src.to(tl.int64) // TOPK
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k_end = tl.where(valid, K, 0)  # a loop bound, not an `if`, keeps the loop where the pipeliner finds it
    if GEMV:  # one row (BLOCK_M = 1, unsorted)
        out = _project_row(X, row0 // TOPK, stride_x, W + expert * stride_we, Scales + expert * stride_se, cols,
                           col_ok, k_end, K, stride_wn, stride_wk, stride_sn, BLOCK_N, BLOCK_K, MXFP4, PAIRS,
                           EVEN)[None, :]
    else:
        out = _project(X, token, stride_x, row_ok, W + expert * stride_we, Scales + expert * stride_se, cols,
                       col_ok, k_end, K, stride_wn, stride_wk, stride_sn, BLOCK_M, BLOCK_N, BLOCK_K, MXFP4, PAIRS,
                       SWAP, EVEN, F32_DOT, PRECISION)  # (BLOCK_M, BLOCK_N)
    bias = tl.load(Bias + expert * stride_be + cols, mask=col_ok, other=0.0)
    # The model adds the bias in x's dtype; rounding it there keeps the two equal for float32 biases too.
    bias = tl.where(valid, bias.to(X.dtype.element_ty).to(tl.float32), 0.0)
    out = out + bias[None, :]
    gate, up = tl.split(tl.reshape(out, (BLOCK_M, BLOCK_N // 2, 2)))  # interleaved [g0, u0, g1, u1, ...]
    # NaN propagates as through torch's clamp (Triton's min/max drop it by default).
    gate = tl.minimum(gate, limit, propagate_nan=tl.PropagateNan.ALL)
    up = tl.minimum(tl.maximum(up, -limit, propagate_nan=tl.PropagateNan.ALL), limit, propagate_nan=tl.PropagateNan.ALL)
    h = (up + 1.0) * gate * tl.sigmoid(alpha * gate)  # invalid rows: gate = 0, so h = 0
    hcols = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(Hout + rows.to(tl.int64)[:, None] * stride_h + hcols[None, :], h.to(Hout.dtype.element_ty),
             mask=row_ok[:, None] & (hcols < N // 2)[None, :])


@triton.jit
def _down(Hin, Ids, Order, Offs, W, Scales, Bias, RouteW, Y, M, K, N, E,
          stride_h, stride_y, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_be,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
          SORTED: tl.constexpr, MXFP4: tl.constexpr, PAIRS: tl.constexpr, SWAP: tl.constexpr,
          EVEN: tl.constexpr, F32_DOT: tl.constexpr, PRECISION: tl.constexpr, GEMV: tl.constexpr):
    """Y[src(r), :] = (Hin[r] @ W_e + b_e) * RouteW[src(r)] in float32 for the rows r of expert e.
    K = I, N = H, Y (M, H) in token-major row order (token * k + slot). Invalid ids: zeros."""
    expert, row0, row_end, valid = _row_tile(Ids, Offs, M, E, BLOCK_M, E_PAD, SORTED)
    if row0 >= row_end:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    if SORTED:
        src = tl.load(Order + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k_end = tl.where(valid, K, 0)
    if GEMV:  # one row (BLOCK_M = 1, unsorted)
        out = _project_row(Hin, row0, stride_h, W + expert * stride_we, Scales + expert * stride_se, cols, col_ok,
                           k_end, K, stride_wn, stride_wk, stride_sn, BLOCK_N, BLOCK_K, MXFP4, PAIRS, EVEN)[None, :]
    else:
        out = _project(Hin, rows, stride_h, row_ok, W + expert * stride_we, Scales + expert * stride_se, cols,
                       col_ok, k_end, K, stride_wn, stride_wk, stride_sn, BLOCK_M, BLOCK_N, BLOCK_K, MXFP4, PAIRS,
                       SWAP, EVEN, F32_DOT, PRECISION)  # (BLOCK_M, BLOCK_N)
    bias = tl.load(Bias + expert * stride_be + cols, mask=col_ok, other=0.0)
    bias = tl.where(valid, bias.to(Hin.dtype.element_ty).to(tl.float32), 0.0)
    out = out + bias[None, :]
    route = tl.load(RouteW + src, mask=row_ok, other=0.0).to(Hin.dtype.element_ty).to(tl.float32)  # as the model
    out = out * route[:, None]
    tl.store(Y + src[:, None] * stride_y + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine(Y, Out, N, TOPK: tl.constexpr, BLOCK: tl.constexpr):
    """Out[t] = sum over the slots s of Y[t * TOPK + s] in slot order (float32), Y (T * TOPK, N) and
    Out (T, N) contiguous."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(TOPK):
        acc += tl.load(Y + (t * TOPK + s) * N + cols, mask=ok, other=0.0)
    tl.store(Out + t * N + cols, acc.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _route(Ids, Order, Offs, M, E, M_PAD: tl.constexpr, E_PAD: tl.constexpr):
    """One program: a counting sort of the M routed rows by expert. Offs[e] = rows of experts <= e
    (E,) int32; Order[j] = the routed row (token * k + slot) at sorted position j, rows of one expert in
    row order. Ids outside [0, E) go after every expert (the tail group, whose rows give zeros)."""
    r = tl.arange(0, M_PAD)
    ok = r < M
    ids = tl.load(Ids + r, mask=ok, other=E).to(tl.int32)
    ids = tl.where((ids < 0) | (ids > E), E, ids)
    e = tl.arange(0, E_PAD)
    onehot = (ids[:, None] == e[None, :]).to(tl.int32)  # (M_PAD, E_PAD)
    counts = tl.sum(onehot, 0)
    ends = tl.cumsum(counts, 0)
    rank = tl.cumsum(onehot, 0) - onehot  # rows of the same expert before this one
    pos = tl.sum(onehot * (ends - counts + rank), 1)  # (M_PAD,) sorted position of each row
    tl.store(Order + pos, r, mask=ok)
    tl.store(Offs + e, ends, mask=e < E)
