"""Attention with learned sinks over a paged KV cache, for serving: decodes and prefill chunks in one call.

`paged_attention` runs our Triton kernel (`_paged_attention_triton.py`) on CUDA, and on CPU when
TRITON_INTERPRET=1 (the tests); `paged_attention_ref` is the plain-PyTorch definition it must match.

The cache of one layer is `num_blocks` fixed-size blocks; sequence s owns the blocks listed in row s of
`block_tables` (entry j holds positions [j * block_size, (j + 1) * block_size)). This step's keys and
values are already in the cache (`write_kv_cache`), so sequence s with context length L = seq_lens[s]
and n = cu_seqlens_q[s+1] - cu_seqlens_q[s] queries has queries at positions L - n .. L - 1, and the
query at position p sees keys j <= p, and only p - window < j on sliding layers (the query itself
counts: `window` keys in all, as in `osstune.model.attention_allowed`). The sink joins each head's
softmax denominator and contributes no value: out = softmax([scores, sink])[:-1] @ v.

Sliding layers: table entries for blocks wholly before the window of a sequence's first query may be
anything (freed blocks, -1); the kernel reads no table entry and no key outside [first key a query of
the step needs, L).

Launches: sequences whose n * G rows fit one 16-row tile (decodes) run in 16-row tiles, the others
(prefill chunks) in 64/128-row tiles, each launch skipping the other's sequences on the device; a
batch with max_query_len * G <= 16 makes only the first.

CUDA graphs: no host sync. The grid depends only on shapes, `max_query_len` and the split count (host
ints); lengths and tables are read on the device. Rows of q past cu_seqlens_q[-1] (graph padding) are
left unwritten in the output (torch.empty): the caller ignores them.

Split-K (decodes at long contexts, when the decode launch has under two waves of programs): each
(sequence, kv head) runs on several programs, each over one contiguous share of its keys, writing its
normalised partial output and log-sum-exp in float32; a second kernel merges them and adds the sink
(counted once, there).

Shape legend: N query tokens of all sequences, S sequences, Q query heads, K key/value heads,
G = Q / K, D head dim, NB cache blocks, BS block size, MB max blocks per sequence, P splits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from osstune.kernels._backend import triton_usable

LOG2E = 1.4426950408889634
# Stands for "no window": larger than any context, small enough that p - window fits in int32.
_NO_WINDOW = 1 << 30


class PagedAttentionInputError(ValueError):
    """Inputs that the paged attention cannot take; the message names the tensor and what to do."""


@dataclass(frozen=True)
class PagedAttentionBlocks:
    """Tile sizes and launch shapes (tuning only; every choice computes the same function).

    A tile row is one (query token, query head of the kv head's group) pair: the G heads of a group
    share the K/V loads. Sequences whose n * G rows fit `decode_m` (decodes) run in the decode launch,
    with split-K over `num_splits` programs per (sequence, kv head) (None: picked from the grid size
    and the table width); the others (prefill chunks) in the prefill launch with `prefill_m`-row
    tiles (None: 64 or 128 by max_query_len). *_n: keys per inner step, a power of two >= 16 (it
    may span several cache blocks or part of one).
    """

    decode_m: int = 16
    decode_n: int = 64
    decode_warps: int = 4
    decode_stages: int = 2
    num_splits: int | None = None
    prefill_m: int | None = None
    prefill_n: int = 64
    prefill_warps: int = 4
    prefill_stages: int = 2


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_query_len: int,
    window: int | None,
    scale: float | None = None,
    *,
    blocks: PagedAttentionBlocks | None = None,
) -> torch.Tensor:
    """q (N, Q, D), k_cache/v_cache (NB, BS, K, D), sinks (Q,), block_tables (S, MB) int32,
    seq_lens (S,) int32, cu_seqlens_q (S + 1,) int32 -> (N, Q, D) in q's dtype.

    max_query_len: a host int >= every sequence's query count (it sizes the grid; queries past it
    would be left uncomputed, which cannot be checked without a sync; likewise each seq_lens[s] must
    be <= max_blocks * block_size and >= its query count). window: the
    sliding-window length, None for full attention. scale: of the scores, default D ** -0.5.
    Where no Triton kernel can run (CPU without TRITON_INTERPRET=1), this is `paged_attention_ref`.
    """
    _check_inputs(q, k_cache, v_cache, sinks, block_tables, seq_lens, cu_seqlens_q, max_query_len, window)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not triton_usable(q):
        return paged_attention_ref(q, k_cache, v_cache, sinks, block_tables, seq_lens, cu_seqlens_q,
                                   max_query_len, window, scale)
    from osstune.kernels import _paged_attention_triton as kern  # Triton is imported only when used

    # Rows may be strided (q a view of a fused qkv buffer); elements of a row must be adjacent.
    # .contiguous() is a no-op on the usual inputs and stays graph-capturable otherwise.
    q = q if q.stride(-1) == 1 else q.contiguous()
    # A table may be a column slice of a wider preallocated one: only its rows need adjacent entries.
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    sinks, seq_lens, cu_seqlens_q = (x.contiguous() for x in (sinks, seq_lens, cu_seqlens_q))
    n_tok, n_q, d = q.shape
    n_seq = block_tables.shape[0]
    n_kv = k_cache.shape[2]
    group = n_q // n_kv
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if n_tok == 0 or n_seq == 0 or max_query_len == 0:
        return out
    blocks = blocks or PagedAttentionBlocks()
    kernel_args = (
        k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
        *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        window or _NO_WINDOW, scale * LOG2E,
    )
    common = dict(BS=k_cache.shape[1], GROUP=group, HEAD_DIM=d)
    decode_rows = blocks.decode_m  # a sequence of at most this many rows is a decode (one tile)

    # Decode launch: sequences of 1..decode_m rows, one tile each, split-K over the keys.
    splits = blocks.num_splits or decode_splits(n_seq, n_kv, block_tables.shape[1] * k_cache.shape[1], window,
                                                blocks, _sm_count(q.device))
    tiles = dict(BLOCK_M=blocks.decode_m, BLOCK_N=blocks.decode_n, num_warps=blocks.decode_warps,
                 num_stages=blocks.decode_stages)
    grid = (splits, n_seq, n_kv)
    if splits == 1:
        kern._paged_attn_fwd[grid](q, sinks, out, out, *kernel_args, 0, *out.stride()[:2], 0, 0, 0, decode_rows,
                                   SPLITS=1, **common, **tiles)
    else:
        # Partials per (split, query token, query head): normalised output and log2-sum-exp, float32.
        part_o = torch.empty(splits, n_tok, n_q, d, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(splits, n_tok, n_q, device=q.device, dtype=torch.float32)
        kern._paged_attn_fwd[grid](q, sinks, part_o, part_lse, *kernel_args, *part_o.stride()[:3],
                                   *part_lse.stride()[:2], 0, decode_rows, SPLITS=splits, **common, **tiles)
        kern._paged_attn_merge[(n_seq, n_kv)](
            part_o, part_lse, sinks, out, cu_seqlens_q, *part_o.stride()[:3], *part_lse.stride()[:2],
            *out.stride()[:2], decode_rows, SPLITS=splits, GROUP=group, HEAD_DIM=d, BLOCK_M=blocks.decode_m,
            num_warps=4,
        )
    if max_query_len * group <= decode_rows:
        return out

    # Prefill launch: sequences of more rows, in large tiles, one pass over the keys.
    block_m = blocks.prefill_m or (64 if max_query_len * group <= 64 else 128)
    grid = (math.ceil(max_query_len * group / block_m), n_seq, n_kv)
    kern._paged_attn_fwd[grid](q, sinks, out, out, *kernel_args, 0, *out.stride()[:2], 0, 0, decode_rows, 1 << 30,
                               SPLITS=1, BLOCK_M=block_m, BLOCK_N=blocks.prefill_n, num_warps=blocks.prefill_warps,
                               num_stages=blocks.prefill_stages, **common)
    return out


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_query_len: int,
    window: int | None,
    scale: float | None = None,
) -> torch.Tensor:
    """The same function in plain PyTorch, one sequence at a time, float32 inside (float64 stays
    float64). Rows past cu_seqlens_q[-1] are zero. Reads the lengths on the host (not graph-safe)."""
    del max_query_len  # the reference loops over the real query counts
    n_tok, n_q, d = q.shape
    bs, n_kv = k_cache.shape[1], k_cache.shape[2]
    g = n_q // n_kv
    scale = d**-0.5 if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, device=q.device, dtype=q.dtype)
    cu = cu_seqlens_q.tolist()
    for s, length in enumerate(seq_lens.tolist()):
        n = cu[s + 1] - cu[s]
        if n == 0:
            continue
        first_key = 0 if window is None else max(0, length - n - window + 1)
        key_pos = torch.arange(first_key, length, device=q.device)  # only blocks the step may read
        slots = block_tables[s, key_pos // bs].long() * bs + key_pos % bs
        k = k_cache.flatten(0, 1)[slots].to(work)  # (L', K, D)
        v = v_cache.flatten(0, 1)[slots].to(work)
        q_pos = torch.arange(length - n, length, device=q.device)
        allowed = key_pos[None, :] <= q_pos[:, None]  # (n, L')
        if window is not None:
            allowed &= q_pos[:, None] - key_pos[None, :] < window
        qg = q[cu[s]:cu[s + 1]].to(work).view(n, n_kv, g, d)
        scores = torch.einsum("tkgd,skd->kgts", qg, k) * scale  # (K, G, n, L')
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = sinks.to(work).view(n_kv, g, 1, 1).expand(-1, -1, n, 1)
        probs = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :-1]
        out[cu[s]:cu[s + 1]] = torch.einsum("kgts,skd->tkgd", probs, v).reshape(n, n_q, d).to(q.dtype)
    return out


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k/v (N, K, D) into the caches (NB, BS, K, D) at flat slots (N,) int64
    (slot = block * BS + offset); a negative slot skips its row (graph padding).

    On a GPU one Triton program per row (no host sync: graph-capturable); elsewhere plain PyTorch
    indexing, which reads the kept rows' count on the host.
    """
    nb, bs, n_kv, d = k_cache.shape
    if k.shape != v.shape or k.shape[1:] != (n_kv, d) or slot_mapping.shape != k.shape[:1] or v_cache.shape != k_cache.shape:
        raise PagedAttentionInputError(
            f"write_kv_cache: k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping {tuple(slot_mapping.shape)} "
            f"must be (N, {n_kv}, {d}), (N, {n_kv}, {d}) and (N,) for caches of shape {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}")
    k_flat = k_cache.view(nb * bs, n_kv, d)
    v_flat = v_cache.view(nb * bs, n_kv, d)
    if k.shape[0] == 0:
        return
    if triton_usable(k):
        from osstune.kernels import _paged_attention_triton as kern

        kern._write_kv[(k.shape[0],)](
            k, v, k_flat, v_flat, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            *k_flat.stride()[:2], *v_flat.stride()[:2], N_KV=n_kv, BLOCK_H=_next_pow2(n_kv), HEAD_DIM=d,
            num_warps=1,
        )
        return
    write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)


def write_kv_cache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """`write_kv_cache` in plain PyTorch (boolean indexing: one host sync)."""
    nb, bs, n_kv, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(nb * bs, n_kv, d)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(nb * bs, n_kv, d)[slots] = v[keep].to(v_cache.dtype)


def decode_splits(n_seq: int, n_kv: int, max_keys: int, window: int | None, blocks: PagedAttentionBlocks,
                  sm_count: int) -> int:
    """Split-K programs per (sequence, kv head) of the decode launch: enough to bring the grid to
    about two waves of SMs, each split keeping >= 4 key tiles of the longest possible context.

    Decided from host ints only (graph-safe): the table width (max_keys) bounds the context, a window
    bounds it further; each program reads the real length on the device and takes its share, so a
    short sequence's extra splits are empty.
    """
    target = 2 * sm_count
    programs = n_seq * n_kv
    if programs >= target:
        return 1
    if window is not None:  # a decode row reads at most its window
        max_keys = min(max_keys, window + blocks.decode_m)
    by_len = max(1, max_keys // (4 * blocks.decode_n))
    return max(1, min(math.ceil(target / programs), by_len, 64))


@functools.cache
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: no split unless asked for
    return _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())


def _check_inputs(q, k_cache, v_cache, sinks, block_tables, seq_lens, cu_seqlens_q, max_query_len, window) -> None:
    def bad(msg: str) -> PagedAttentionInputError:
        return PagedAttentionInputError(f"paged_attention: {msg}")

    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise bad(f"expected q (N, Q, D) and k_cache, v_cache (num_blocks, block_size, K, D); got q "
                  f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    n_q, d = q.shape[1:]
    n_kv = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise bad(f"k_cache head dim {k_cache.shape[3]} differs from q's {d}")
    if n_q % n_kv:
        raise bad(f"{n_q} query heads are not a multiple of {n_kv} key/value heads")
    if d not in (16, 32, 64, 128):
        raise bad(f"head dim {d} is not supported; use 16, 32, 64 or 128 (gpt-oss uses 64)")
    if sinks.shape != (n_q,):
        raise bad(f"sinks has shape {tuple(sinks.shape)}; expected ({n_q},), one logit per query head")
    if k_cache.dtype != v_cache.dtype:
        raise bad(f"k_cache and v_cache dtypes differ ({k_cache.dtype}, {v_cache.dtype})")
    if block_tables.dim() != 2 or seq_lens.shape != block_tables.shape[:1] or cu_seqlens_q.shape != (block_tables.shape[0] + 1,):
        raise bad(f"expected block_tables (S, max_blocks), seq_lens (S,), cu_seqlens_q (S + 1,); got "
                  f"{tuple(block_tables.shape)}, {tuple(seq_lens.shape)}, {tuple(cu_seqlens_q.shape)}")
    for name, x in (("block_tables", block_tables), ("seq_lens", seq_lens), ("cu_seqlens_q", cu_seqlens_q)):
        if x.dtype != torch.int32:
            raise bad(f"{name} has dtype {x.dtype}; expected torch.int32")
        if x.device != q.device:
            raise bad(f"{name} is on {x.device}, q on {q.device}; keep them on one device")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise bad("k_cache and v_cache need a head dim of stride 1 (the layout (num_blocks, block_size, K, D))")
    if k_cache.device != q.device:
        raise bad(f"k_cache is on {k_cache.device}, q on {q.device}; keep them on one device")
    if max_query_len < 0:
        raise bad(f"max_query_len={max_query_len} is negative")
    if window is not None and window < 1:
        raise bad(f"window={window}; a sliding window must hold at least the query itself (>= 1)")
