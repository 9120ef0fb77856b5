"""Triton bodies of the paged attention with learned sinks (launchers live in paged_attention.py).

One program takes one (query tile, split, sequence, kv head). A tile row is one (query token, query
head) pair of the kv head's group, token-major (row r: token r // G, head r % G), so the G heads that
share a kv head share every K/V load, and a decode token fills 8 rows of a 16-row tile at G = 8. Keys
go BLOCK_N at a time; each key's cache row is found through the block table (a gather: BLOCK_N need
not equal the cache block size).

The launcher runs the kernel twice on a mixed batch: with 16-row tiles (and split-K) for sequences
whose rows fit one tile (decodes), with 64/128-row tiles for the others (prefill chunks); each launch
skips the other's sequences by a test on the device (rows_lo < n * G <= rows_hi), so nothing syncs.
A decode row in a 128-row tile would waste 15/16 of its matmuls.

Softmax as in FlashAttention-2 (arXiv:2307.08691), in base 2 (scores scaled by scale * log2(e)). Without
split-K the running max and sum start at the head's sink logit (m0 = sink, l0 = 1), so the sink joins
the denominator and adds no value (as in _attention_triton.py). With split-K each program starts at
(-inf, 0) over its share of the keys and stores a normalised partial and its log2-sum-exp; the merge
kernel adds the sink once.

Shape legend: N query tokens, S sequences, Q query heads, K kv heads, G = Q / K, D head dim,
BS cache block size, P splits; q/out (N, Q, D), caches (NB, BS, K, D), part_o (P, N, Q, D) and
part_lse (P, N, Q) float32.
"""

import triton
import triton.language as tl


@triton.jit
def _paged_band(acc, m_i, l_i, q, table, k_base, v_base, stride_kb, stride_kt, stride_vb, stride_vt,
                pos, window, lo, hi, band_lo, band_hi, qk_scale, BS: tl.constexpr,
                SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Online softmax over key tiles [band_lo, band_hi) (band_lo a multiple of BLOCK_N). MASK: the
    band's tiles hold keys outside [lo, hi) or keys some row must not see."""
    offs_d = tl.arange(0, HEAD_DIM)
    for j0 in range(band_lo, band_hi, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        in_blk = offs_n % BS
        if MASK:
            key_ok = (offs_n >= lo) & (offs_n < hi)
            blk = tl.load(table + offs_n // BS, mask=key_ok, other=0).to(tl.int64)
            k = tl.load(k_base + blk[None, :] * stride_kb + in_blk[None, :] * stride_kt + offs_d[:, None],
                        mask=key_ok[None, :], other=0.0)  # (D, BN)
        else:
            blk = tl.load(table + offs_n // BS).to(tl.int64)
            k = tl.load(k_base + blk[None, :] * stride_kb + in_blk[None, :] * stride_kt + offs_d[:, None])
        scores = tl.dot(q, k.to(q.dtype)) * qk_scale  # (BM, BN)
        if MASK:
            ok = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] > pos[:, None] - window)
            scores = tl.where(ok, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_use = m_new
        if SPLITS > 1 and MASK:
            # A row may have seen no key of this split yet (m = -inf): keep exp2 off (-inf) - (-inf).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(v_base + blk[:, None] * stride_vb + in_blk[:, None] * stride_vt + offs_d[None, :],
                        mask=key_ok[:, None], other=0.0)  # (BN, D)
        else:
            v = tl.load(v_base + blk[:, None] * stride_vb + in_blk[:, None] * stride_vt + offs_d[None, :])
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _paged_attn_fwd(Q, Sinks, Out, LSE, K, V, Tables, SeqLens, CuQ,
                    stride_qn, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                    stride_tab, window, qk_scale,
                    stride_os, stride_on, stride_oh, stride_ls, stride_ln, rows_lo, rows_hi,
                    BS: tl.constexpr, SPLITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0) // SPLITS
    split = tl.program_id(0) % SPLITS
    s = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(CuQ + s)
    n_rows = (tl.load(CuQ + s + 1) - q_start) * GROUP
    m0 = pid_m * BLOCK_M
    # Past this sequence's queries (max_query_len pads the grid), or a sequence the other launch takes.
    if (m0 >= n_rows) | (n_rows <= rows_lo) | (n_rows > rows_hi):
        return
    length = tl.load(SeqLens + s)
    n_q_tok = n_rows // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_rows
    tok = offs_m // GROUP
    head = kvh * GROUP + offs_m % GROUP
    pos = length - n_q_tok + tok  # (BM,) position of each row's query

    # Keys the tile needs: from the first row's window start to the last row's position. Nothing
    # before `lo` is read, table entries included (sliding layers may have freed those blocks).
    p_first = length - n_q_tok + m0 // GROUP
    p_last = length - n_q_tok + (tl.minimum(m0 + BLOCK_M, n_rows) - 1) // GROUP
    lo = tl.maximum(p_first - window + 1, 0)
    hi = p_last + 1
    lo_tile = (lo // BLOCK_N) * BLOCK_N
    tiles_per_split = tl.cdiv(tl.cdiv(hi - lo_tile, BLOCK_N), SPLITS)
    start = lo_tile + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, hi)

    q = tl.load(Q + (q_start + tok)[:, None].to(tl.int64) * stride_qn + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # (BM, D)
    if SPLITS == 1:
        m_i = tl.load(Sinks + head).to(tl.float32) * 1.4426950408889634
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys every row of the tile sees, [lb(p_last), p_first], need no element mask: only the edge
    # tiles [lo_tile, mid_lo) and [mid_hi, hi) do (as in _attention_triton._key_ranges).
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(p_last - window + 1, 0), BLOCK_N) * BLOCK_N, lo_tile), hi)
    mid_hi = tl.minimum(tl.maximum(((p_first + 1) // BLOCK_N) * BLOCK_N, mid_lo), hi)
    table = Tables + s.to(tl.int64) * stride_tab
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    acc, m_i, l_i = _paged_band(acc, m_i, l_i, q, table, k_base, v_base, stride_kb, stride_kt, stride_vb, stride_vt,
                                pos, window, lo, hi, tl.maximum(start, lo_tile), tl.minimum(end, mid_lo),
                                qk_scale, BS, SPLITS, HEAD_DIM, BLOCK_N, True)
    acc, m_i, l_i = _paged_band(acc, m_i, l_i, q, table, k_base, v_base, stride_kb, stride_kt, stride_vb, stride_vt,
                                pos, window, lo, hi, tl.maximum(start, mid_lo), tl.minimum(end, mid_hi),
                                qk_scale, BS, SPLITS, HEAD_DIM, BLOCK_N, False)
    acc, m_i, l_i = _paged_band(acc, m_i, l_i, q, table, k_base, v_base, stride_kb, stride_kt, stride_vb, stride_vt,
                                pos, window, lo, hi, tl.maximum(start, mid_hi), end,
                                qk_scale, BS, SPLITS, HEAD_DIM, BLOCK_N, True)

    out_rows = (q_start + tok)[:, None].to(tl.int64) * stride_on + head[:, None] * stride_oh + offs_d[None, :]
    if SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(Out + out_rows, o.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        o = acc / l_safe[:, None]
        lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(Out + split * stride_os + out_rows, o, mask=row_ok[:, None])
        tl.store(LSE + split * stride_ls + (q_start + tok).to(tl.int64) * stride_ln + head, lse, mask=row_ok)


@triton.jit
def _paged_attn_merge(PartO, PartLSE, Sinks, Out, CuQ,
                      stride_ps, stride_pn, stride_ph, stride_ls, stride_ln, stride_on, stride_oh, rows_hi,
                      SPLITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """The split-K partials of one (sequence, kv head) whose rows fit one tile (n * G <= rows_hi <=
    BLOCK_M): out = sum_p exp(lse_p) o_p / (sum_p exp(lse_p) + exp(sink)), the sink counted once,
    combined one split at a time with a running max."""
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    q_start = tl.load(CuQ + s)
    n_rows = (tl.load(CuQ + s + 1) - q_start) * GROUP
    if (n_rows == 0) | (n_rows > rows_hi):
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_rows
    tok = (q_start + offs_m // GROUP).to(tl.int64)
    head = kvh * GROUP + offs_m % GROUP
    m = tl.load(Sinks + head).to(tl.float32) * 1.4426950408889634  # (BM,) the sink: l = 1 at m = sink
    l = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for p in range(SPLITS):
        lse = tl.load(PartLSE + p * stride_ls + tok * stride_ln + head, mask=row_ok, other=float("-inf"))
        o = tl.load(PartO + p * stride_ps + tok[:, None] * stride_pn + head[:, None] * stride_ph + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)  # (BM, D)
        m_new = tl.maximum(m, lse)
        alpha = tl.math.exp2(m - m_new)
        w = tl.math.exp2(lse - m_new)
        acc = acc * alpha[:, None] + o * w[:, None]
        l = l * alpha + w
        m = m_new
    out = acc / l[:, None]
    tl.store(Out + tok[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _write_kv(K, V, KCache, VCache, Slots, stride_kn, stride_kh, stride_vn, stride_vh,
              stride_cs, stride_ch, stride_vcs, stride_vch,
              N_KV: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Row i of k/v (K, D) to flat cache slot Slots[i]; a negative slot (padding) is skipped."""
    i = tl.program_id(0)
    slot = tl.load(Slots + i)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, HEAD_DIM)[None, :]
    ok = offs_h < N_KV
    k = tl.load(K + i * stride_kn + offs_h * stride_kh + offs_d, mask=ok)
    v = tl.load(V + i * stride_vn + offs_h * stride_vh + offs_d, mask=ok)
    tl.store(KCache + slot * stride_cs + offs_h * stride_ch + offs_d, k.to(KCache.dtype.element_ty), mask=ok)
    tl.store(VCache + slot * stride_vcs + offs_h * stride_vch + offs_d, v.to(VCache.dtype.element_ty), mask=ok)
