"""Triton body of the chunked cross-entropy (launcher in cross_entropy.py).

One program per token row of a float32 logits chunk: pass 1 keeps a per-lane running max and sum
(online softmax, Milakov & Gimelshein 2018) and reduces them to the row's log-sum-exp; pass 2 writes
the gradient of the summed loss wrt the logits, softmax - onehot(label), in the matmul dtype.

In place: the launcher may point Grad at the row's own logits (a bf16 gradient takes the first half
of the row's float32 bytes). Block b of pass 2 then writes bytes that pass 1 and blocks <= b of
pass 2 have read, and no later block reads; the barrier between a block's loads and its stores
keeps every warp's reads of the block ahead of any warp's writes (the first block's stores land on
its own logits).

Shape legend: C rows in the chunk, V vocabulary; logits (C, V) float32, labels/loss (C,), grad (C, V).
"""

import triton
import triton.language as tl


@triton.jit
def _ce_rows(Logits, Labels, Loss, Grad, V, stride_l, stride_g, ignore_index,
             BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * stride_l
    cols = tl.arange(0, BLOCK_V)
    # A finite start keeps exp(m_old - m_new) defined in lanes that only ever see masked (-inf) columns.
    m_lane = tl.zeros([BLOCK_V], dtype=tl.float32) - 1e30
    s_lane = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(logits + start + cols, mask=start + cols < V, other=float("-inf"))
        m_new = tl.maximum(m_lane, x)
        s_lane = s_lane * tl.exp(m_lane - m_new) + tl.exp(x - m_new)
        m_lane = m_new
    m = tl.max(m_lane, 0)
    lse = m + tl.log(tl.sum(s_lane * tl.exp(m_lane - m), 0))

    label = tl.load(Labels + row)
    valid = label != ignore_index
    target = tl.load(logits + label, mask=valid, other=0.0)
    tl.store(Loss + row, tl.where(valid, lse - target, 0.0))

    if WRITE_GRAD:
        grad = Grad + row * stride_g
        for start in range(0, V, BLOCK_V):
            c = start + cols
            x = tl.load(logits + c, mask=c < V, other=0.0)
            g = tl.exp(x - lse) - tl.where(c == label, 1.0, 0.0)
            g = tl.where(valid, g, 0.0)
            tl.debug_barrier()
            tl.store(grad + c, g.to(Grad.dtype.element_ty), mask=c < V)
