"""Triton bodies of the flash attention with learned sinks (launchers live in attention.py).

FlashAttention-2 (arXiv:2307.08691) with one change: the running max and sum of each query row start
at the head's sink logit (m0 = sink, l0 = exp(sink - m0) = 1) instead of (-inf, 0), so the sink joins
the softmax denominator and contributes no value. Everything runs in base 2: scores are scaled by
D^-0.5 * log2(e) and the stored log-sum-exp (LSE2) is in bits.

Masks. Key j is allowed for query i iff  lb(i) <= j <= i, where lb(i) = max(i - window + 1, start(i))
and start(i) is the first token of i's document (0 without documents). lb is non-decreasing in i, so
for one query block the allowed keys of all rows form one band, and inside that band only the edge
blocks need an element mask: the middle blocks run the unmasked loop. Blocks wholly outside the band
are never visited (this is where sliding windows and packed documents save work).

Shape legend: B batch, T tokens, Q query heads, K key/value heads, G = Q / K, D head dim;
q/o/do (B, T, Q, D), k/v (B, T, K, D), lse2/delta (B, Q, T) float32, starts/ends (B, T) int32.
"""

import triton
import triton.language as tl


@triton.jit
def _fwd_band(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lb_m, lo, hi, T,
              qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs += lo * stride_kt
    v_ptrs += lo * stride_vt
    for _ in range(lo, hi, BLOCK_N):
        if MASK:
            k = tl.load(k_ptrs, mask=offs_n[None, :] < T, other=0.0)  # (D, BN)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, k) * qk_scale  # (BM, BN)
        if MASK:
            ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= lb_m[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASK:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)  # (BN, D)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
        offs_n += BLOCK_N
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit
def _row_bounds(Starts, b, offs_m, i0, i_last, T, window, HAS_DOCS: tl.constexpr):
    """Per-row lower bound lb(i) (BM,), and lb of the block's first and last row (scalars)."""
    lb_m = tl.maximum(offs_m - window + 1, 0)
    lb_first = tl.maximum(i0 - window + 1, 0)
    lb_last = tl.maximum(i_last - window + 1, 0)
    if HAS_DOCS:
        lb_m = tl.maximum(lb_m, tl.load(Starts + b * T + offs_m, mask=offs_m < T, other=0))
        lb_first = tl.maximum(lb_first, tl.load(Starts + b * T + i0))
        lb_last = tl.maximum(lb_last, tl.load(Starts + b * T + i_last))
    return lb_m, lb_first, lb_last


@triton.jit
def _key_ranges(i0, i_last, lb_first, lb_last, BLOCK_N: tl.constexpr):
    """Key-block boundaries lo <= mid_lo <= mid_hi <= hi for query rows [i0, i_last]:
    [lo, mid_lo) and [mid_hi, hi) need the element mask, [mid_lo, mid_hi) does not."""
    lo = (lb_first // BLOCK_N) * BLOCK_N
    hi = i_last + 1
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(lb_last, BLOCK_N) * BLOCK_N, lo), hi)
    mid_hi = tl.minimum(tl.maximum(((i0 + 1) // BLOCK_N) * BLOCK_N, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _attn_fwd(Q, K, V, Sinks, Out, LSE2, Starts,
              stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
              stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
              T, window, qk_scale,
              N_Q: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    # Longest causal rows first: the last query blocks carry the most keys.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // N_Q
    h = pid_bh % N_Q
    kvh = h // GROUP
    i0 = pid_m * BLOCK_M
    i_last = tl.minimum(i0 + BLOCK_M, T) - 1
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)  # (BM, D)
    k_ptrs = K + b * stride_kb + kvh * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BN)
    v_ptrs = V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BN, D)

    lb_m, lb_first, lb_last = _row_bounds(Starts, b, offs_m, i0, i_last, T, window, HAS_DOCS)
    lo, mid_lo, mid_hi, hi = _key_ranges(i0, i_last, lb_first, lb_last, BLOCK_N)

    sink2 = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = _fwd_band(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lb_m,
                              lo, mid_lo, T, qk_scale, BLOCK_N, True)
    acc, m_i, l_i = _fwd_band(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lb_m,
                              mid_lo, mid_hi, T, qk_scale, BLOCK_N, False)
    acc, m_i, l_i = _fwd_band(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lb_m,
                              mid_hi, hi, T, qk_scale, BLOCK_N, True)

    o = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=offs_m[:, None] < T)
    tl.store(LSE2 + pid_bh * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


@triton.jit
def _dq_band(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lb_m, lo, hi, T,
             qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs += lo * stride_kt
    v_ptrs += lo * stride_vt
    for _ in range(lo, hi, BLOCK_N):
        if MASK:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)  # (BN, D)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BM, BN)
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= lb_m[:, None])
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
        offs_n += BLOCK_N
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, Out, dOut, dQ, LSE2, Delta, Starts,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                 stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                 T, window, qk_scale, sm_scale,
                 N_Q: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    """dQ for one (batch, query head, query block); also writes delta = rowsum(dO * O), which the
    dK/dV kernel (launched after) and the sink gradient read. dO and dQ share O's strides."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // N_Q
    h = pid_bh % N_Q
    kvh = h // GROUP
    i0 = pid_m * BLOCK_M
    i_last = tl.minimum(i0 + BLOCK_M, T) - 1
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m[:, None] < T

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok, other=0.0)
    o_off = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    do = tl.load(dOut + o_off, mask=row_ok, other=0.0)
    o = tl.load(Out + o_off, mask=row_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + pid_bh * T + offs_m, delta, mask=offs_m < T)
    lse2 = tl.load(LSE2 + pid_bh * T + offs_m, mask=offs_m < T, other=0.0)

    k_ptrs = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    lb_m, lb_first, lb_last = _row_bounds(Starts, b, offs_m, i0, i_last, T, window, HAS_DOCS)
    lo, mid_lo, mid_hi, hi = _key_ranges(i0, i_last, lb_first, lb_last, BLOCK_N)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_band(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lb_m,
                  lo, mid_lo, T, qk_scale, BLOCK_N, True)
    dq = _dq_band(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lb_m,
                  mid_lo, mid_hi, T, qk_scale, BLOCK_N, False)
    dq = _dq_band(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lb_m,
                  mid_hi, hi, T, qk_scale, BLOCK_N, True)
    tl.store(dQ + o_off, (dq * sm_scale).to(dQ.dtype.element_ty), mask=row_ok)


@triton.jit
def _dkdv_band(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, Starts, b, stride_qt, stride_ot,
               offs_n, lo, hi, T, window, qk_scale,
               BLOCK_M: tl.constexpr, HAS_DOCS: tl.constexpr, MASK: tl.constexpr):
    offs_m = lo + tl.arange(0, BLOCK_M)
    q_ptrs += lo * stride_qt
    do_ptrs += lo * stride_ot
    lse_ptrs += lo
    delta_ptrs += lo
    for _ in range(lo, hi, BLOCK_M):
        if MASK:
            row_ok = offs_m < T
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BM, D)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(lse_ptrs, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse2 = tl.load(lse_ptrs)
            delta = tl.load(delta_ptrs)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BN, BM)
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASK:
            lb_m = tl.maximum(offs_m - window + 1, 0)
            if HAS_DOCS:
                lb_m = tl.maximum(lb_m, tl.load(Starts + b * T + offs_m, mask=row_ok, other=0))
            ok = (offs_n[:, None] <= offs_m[None, :]) & (offs_n[:, None] >= lb_m[None, :]) & row_ok[None, :]
            p_t = tl.where(ok, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))  # (BN, BM)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
        offs_m += BLOCK_M
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_ot
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, dOut, dK, dV, LSE2, Delta, Starts, Ends,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                   stride_gb, stride_gt, stride_gh,
                   T, window, qk_scale, sm_scale,
                   N_Q: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr,
                   LOOP_GROUP: tl.constexpr):
    """dK, dV of one key block. LOOP_GROUP: one program per (batch, kv head) sums the G query heads
    of its group itself and writes dK/dV (B, T, K, D) in the input dtype. Otherwise one program per
    (batch, query head) writes its share to float32 buffers dK/dV (B, T, Q, D) that the launcher sums
    over each group: more programs (a fuller GPU at short sequences) for extra memory traffic.
    stride_g* are the strides of dK/dV either way."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if LOOP_GROUP:
        b = pid_bh // (N_Q // GROUP)
        kvh = pid_bh % (N_Q // GROUP)
        h_first = kvh * GROUP
        out_head = kvh
        n_heads = GROUP
    else:
        b = pid_bh // N_Q
        h_first = pid_bh % N_Q
        kvh = h_first // GROUP
        out_head = h_first
        n_heads = 1
    j0 = pid_n * BLOCK_N
    j_last = tl.minimum(j0 + BLOCK_N, T) - 1
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    col_ok = offs_n[:, None] < T

    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok, other=0.0)  # (BN, D)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=col_ok, other=0.0)

    # Query rows that see some key of this block: i in [j0, min(j_last + window, end(j_last), T)).
    # Rows that see every key of it (no element mask): i >= j_last and lb(i) <= j0, i.e.
    # i < min(j0 + window, end(j0)).
    q_hi = tl.minimum(j_last + window, T)
    u_hi = tl.minimum(j0 + window, T)
    if HAS_DOCS:
        q_hi = tl.minimum(q_hi, tl.load(Ends + b * T + j_last))
        u_hi = tl.minimum(u_hi, tl.load(Ends + b * T + j0))
    lo = (j0 // BLOCK_M) * BLOCK_M
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(j_last, BLOCK_M) * BLOCK_M, lo), q_hi)
    mid_hi = tl.minimum(tl.maximum((u_hi // BLOCK_M) * BLOCK_M, mid_lo), q_hi)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for h in range(h_first, h_first + n_heads):
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = dOut + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
        lse_ptrs = LSE2 + (b * N_Q + h) * T + offs_m
        delta_ptrs = Delta + (b * N_Q + h) * T + offs_m
        dk, dv = _dkdv_band(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, Starts, b, stride_qt, stride_ot,
                            offs_n, lo, mid_lo, T, window, qk_scale, BLOCK_M, HAS_DOCS, True)
        dk, dv = _dkdv_band(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, Starts, b, stride_qt, stride_ot,
                            offs_n, mid_lo, mid_hi, T, window, qk_scale, BLOCK_M, HAS_DOCS, False)
        dk, dv = _dkdv_band(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, Starts, b, stride_qt, stride_ot,
                            offs_n, mid_hi, q_hi, T, window, qk_scale, BLOCK_M, HAS_DOCS, True)

    g_off = b * stride_gb + out_head * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :]
    tl.store(dK + g_off, (dk * sm_scale).to(dK.dtype.element_ty), mask=col_ok)
    tl.store(dV + g_off, dv.to(dV.dtype.element_ty), mask=col_ok)
