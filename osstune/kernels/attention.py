"""Causal attention with one learned sink logit per head, for training: forward and backward.

`sink_flash_attention` runs our Triton flash kernel (`_attention_triton.py`) on CUDA, and on CPU when
TRITON_INTERPRET=1 (the tests); `sink_flash_attention_ref` is the plain-PyTorch definition it must
match: out = softmax([scores, sink])[:-1] @ v, with gradients for q, k, v and the sinks.

Masks: key j is visible to query i iff j <= i, i - j < window (sliding layers; the query itself
counts, so `window` keys in all, as in `osstune.model.attention_allowed`), and i and j lie in the same
document. Documents are contiguous runs of equal `doc_ids` (or given as `cu_seqlens`), as packing
produces; two runs with the same id separated by another are two documents here.

Sink gradient: with p_sink(t) = exp(sink - lse(t)) and delta(t) = rowsum(dO * O)(t),
d sink = -sum_t p_sink(t) * delta(t), since the sink's "value" is zero.

Shape legend: B batch, T tokens, Q query heads, K key/value heads, G = Q / K, D head dim.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from osstune.kernels._backend import triton_usable

LOG2E = 1.4426950408889634
# Stands for "no window": larger than any sequence, small enough that i + window fits in int32.
_NO_WINDOW = 1 << 30


class AttentionInputError(ValueError):
    """q/k/v/sinks/doc_ids that the kernel cannot take; the message says which and what to do."""


@dataclass(frozen=True)
class AttentionBlocks:
    """Tile sizes and launch shape (tuning only; every choice computes the same function).

    fwd_m/fwd_n: query/key tile of the forward; dq_m/dq_n of the dQ kernel; dkdv_n/dkdv_m the key/query
    tile of the dK/dV kernel. All powers of two >= 16. dkdv_loop_group: sum the G query heads of a
    group inside the dK/dV kernel (fewer, longer programs, no float32 partials); None picks it when
    that still fills the GPU twice over, or for sliding windows (short, even work per program).
    """

    fwd_m: int = 128
    fwd_n: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 3
    dq_m: int = 128
    dq_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 2
    dkdv_n: int = 128
    dkdv_m: int = 64
    dkdv_warps: int = 8
    dkdv_stages: int = 2
    dkdv_loop_group: bool | None = None


# Measured on one H100 (docs/KERNELS.md): the wide backward tiles at 2k tokens, 64x64 tiles with
# deeper pipelining from 8k; sliding windows: 64x64 dQ tiles, 128-key dK/dV tiles summing the group.
_SHORT = AttentionBlocks()
_LONG = AttentionBlocks(dq_m=64, dq_n=64, dq_warps=4, dq_stages=3, dkdv_n=64, dkdv_m=64, dkdv_warps=4, dkdv_stages=3)
_SLIDING = AttentionBlocks(dq_m=64, dq_n=64, dq_warps=4, dq_stages=3, dkdv_loop_group=True)


def default_blocks(t: int, window: int | None = None) -> AttentionBlocks:
    if window is not None and window < t:
        return _SLIDING
    return _LONG if t >= 4096 else _SHORT


def sink_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    *,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    blocks: AttentionBlocks | None = None,
) -> torch.Tensor:
    """q (B, T, Q, D), k/v (B, T, K, D), sinks (Q,) -> (B, T, Q, D), causal.

    window: sliding-window length (None: full causal). doc_ids (B, T) or cu_seqlens (n_docs + 1,)
    (B must be 1; document d spans tokens [cu_seqlens[d], cu_seqlens[d+1])): attention stays inside
    each document. Where no Triton kernel can run (CPU without TRITON_INTERPRET=1), this is
    `sink_flash_attention_ref`, which materialises the (B, Q, T, T) scores.
    """
    _check_inputs(q, k, v, sinks, window, doc_ids, cu_seqlens)
    if not triton_usable(q):
        return sink_flash_attention_ref(q, k, v, sinks, window=window, doc_ids=doc_ids, cu_seqlens=cu_seqlens)
    starts = ends = None
    if cu_seqlens is not None:
        doc_ids = cu_seqlens_to_doc_ids(cu_seqlens, q.shape[1])
    if doc_ids is not None:
        starts, ends = document_bounds(doc_ids)
    blocks = blocks or default_blocks(q.shape[1], window)
    return _SinkFlashAttention.apply(q, k, v, sinks, window or _NO_WINDOW, starts, ends, blocks)


def sink_flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    *,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same function in plain PyTorch, float32 inside, the (B, Q, T, T) scores materialised."""
    b, t, n_q, d = q.shape
    g = n_q // k.shape[2]
    if cu_seqlens is not None:
        doc_ids = cu_seqlens_to_doc_ids(cu_seqlens, t)
    i = torch.arange(t, device=q.device)
    allowed = (i[None, :] <= i[:, None])[None]  # (1, T, T) query x key
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    if doc_ids is not None:
        starts, _ = document_bounds(doc_ids)
        allowed = allowed & (i[None, None, :] >= starts[:, :, None])
    kq = k.float().repeat_interleave(g, dim=2)  # (B, T, Q, D)
    vq = v.float().repeat_interleave(g, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), kq) * d**-0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    sink = sinks.float().view(1, n_q, 1, 1).expand(b, n_q, t, 1)
    probs = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("bhij,bjhd->bihd", probs, vq).to(q.dtype)


def document_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids (B, T) -> (starts, ends) (B, T) int32: first token and one past the last token of each
    token's document (a run of equal ids). Device ops only, no host sync."""
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.where(first, idx, 0).cummax(dim=1).values
    last = torch.ones_like(doc_ids, dtype=torch.bool)
    last[:, :-1] = doc_ids[:, :-1] != doc_ids[:, 1:]
    ends = torch.where(last, idx + 1, t).flip(1).cummin(dim=1).values.flip(1)
    return starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous()


def cu_seqlens_to_doc_ids(cu_seqlens: torch.Tensor, t: int) -> torch.Tensor:
    """cu_seqlens (n + 1,) -> doc_ids (1, T): token i belongs to document d iff
    cu_seqlens[d] <= i < cu_seqlens[d + 1]; tokens past the last boundary form one more document."""
    i = torch.arange(t, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(i.dtype).contiguous(), i, right=True).unsqueeze(0)


def _check_inputs(q, k, v, sinks, window, doc_ids, cu_seqlens) -> None:
    def bad(msg: str) -> AttentionInputError:
        return AttentionInputError(f"sink_flash_attention: {msg}")

    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise bad(f"expected q (B, T, Q, D) and k, v (B, T, K, D); got q {tuple(q.shape)}, "
                  f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, t, n_q, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise bad(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, length or head dim "
                  "(training attention has no KV cache: keys and queries are the same tokens)")
    if n_q % k.shape[2]:
        raise bad(f"{n_q} query heads are not a multiple of {k.shape[2]} key/value heads")
    if d not in (16, 32, 64):
        raise bad(f"head dim {d} is not supported; use 16, 32 or 64 (gpt-oss uses 64)")
    if sinks.shape != (n_q,):
        raise bad(f"sinks has shape {tuple(sinks.shape)}; expected ({n_q},), one logit per query head")
    if not (q.dtype == k.dtype == v.dtype):
        raise bad(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if window is not None and window < 1:
        raise bad(f"window={window}; a sliding window must hold at least the query itself (>= 1)")
    if doc_ids is not None and cu_seqlens is not None:
        raise bad("pass doc_ids or cu_seqlens, not both")
    if doc_ids is not None and doc_ids.shape != (b, t):
        raise bad(f"doc_ids has shape {tuple(doc_ids.shape)}; expected (B, T) = ({b}, {t})")
    if cu_seqlens is not None and (b != 1 or cu_seqlens.dim() != 1):
        raise bad("cu_seqlens describes one packed row: it needs batch size 1 and a 1-D tensor; "
                  "use doc_ids (B, T) for a batch of packed rows")


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: any grid is one "wave"
    return torch.cuda.get_device_properties(device).multi_processor_count


def _contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _SinkFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, window, starts, ends, blocks):
        from osstune.kernels import _attention_triton as kern  # Triton is imported only when used

        q, k, v = (_contiguous_rows(x) for x in (q, k, v))
        b, t, n_q, d = q.shape
        group = n_q // k.shape[2]
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)  # contiguous, like dO and dQ below
        lse2 = torch.empty(b, n_q, t, device=q.device, dtype=torch.float32)
        has_docs = starts is not None
        grid = (math.ceil(t / blocks.fwd_m), b * n_q)
        kern._attn_fwd[grid](
            q, k, v, sinks, out, lse2, starts if has_docs else q,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            t, window, d**-0.5 * LOG2E,
            N_Q=n_q, GROUP=group, HEAD_DIM=d, BLOCK_M=blocks.fwd_m, BLOCK_N=blocks.fwd_n, HAS_DOCS=has_docs,
            num_warps=blocks.fwd_warps, num_stages=blocks.fwd_stages,
        )
        ctx.save_for_backward(q, k, v, sinks, out, lse2, starts, ends)
        ctx.window, ctx.blocks = window, blocks
        return out

    @staticmethod
    def backward(ctx, dout):
        from osstune.kernels import _attention_triton as kern

        q, k, v, sinks, out, lse2, starts, ends = ctx.saved_tensors
        blocks, window = ctx.blocks, ctx.window
        b, t, n_q, d = q.shape
        n_kv = k.shape[2]
        group = n_q // n_kv
        has_docs = starts is not None
        dout = dout.contiguous()
        dq = torch.empty_like(out)
        delta = torch.empty_like(lse2)
        common = dict(N_Q=n_q, GROUP=group, HEAD_DIM=d, HAS_DOCS=has_docs)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
        kern._attn_bwd_dq[(math.ceil(t / blocks.dq_m), b * n_q)](
            q, k, v, out, dout, dq, lse2, delta, starts if has_docs else q,
            *strides, t, window, d**-0.5 * LOG2E, d**-0.5,
            BLOCK_M=blocks.dq_m, BLOCK_N=blocks.dq_n, num_warps=blocks.dq_warps, num_stages=blocks.dq_stages,
            **common,
        )
        programs_if_looped = math.ceil(t / blocks.dkdv_n) * b * n_kv
        loop_group = blocks.dkdv_loop_group
        if loop_group is None:
            loop_group = window < t or programs_if_looped >= 2 * _sm_count(q.device)
        if loop_group:
            dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)  # contiguous: dk and dv share strides
            dv = torch.empty_like(dk)
            grid_heads = b * n_kv
        else:
            # float32 partial dK/dV per query head, summed over each group of G below.
            dk = torch.empty(b, t, n_q, d, device=q.device, dtype=torch.float32)
            dv = torch.empty_like(dk)
            grid_heads = b * n_q
        kern._attn_bwd_dkdv[(math.ceil(t / blocks.dkdv_n), grid_heads)](
            q, k, v, dout, dk, dv, lse2, delta, starts if has_docs else q, ends if has_docs else q,
            *strides, *dk.stride()[:3], t, window, d**-0.5 * LOG2E, d**-0.5,
            BLOCK_M=blocks.dkdv_m, BLOCK_N=blocks.dkdv_n, num_warps=blocks.dkdv_warps,
            num_stages=blocks.dkdv_stages, LOOP_GROUP=loop_group, **common,
        )
        if not loop_group:
            dk = dk.view(b, t, n_kv, group, d).sum(3).to(k.dtype)
            dv = dv.view(b, t, n_kv, group, d).sum(3).to(v.dtype)
        dsinks = None
        if ctx.needs_input_grad[3]:
            p_sink = torch.exp2(sinks.float().view(1, n_q, 1) * LOG2E - lse2)  # (B, Q, T)
            dsinks = -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None
