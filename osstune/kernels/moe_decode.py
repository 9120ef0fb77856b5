"""gpt-oss experts for few tokens (decode steps, small batches): read only the experts the tokens chose.

    moe_decode(experts, x, idx, weights) == experts(x, idx, weights)   (osstune.model.Experts.forward)

for dense `Experts` and packed `MXFP4Experts` alike, inference only, safe to record in a CUDA graph:
no host sync, and the launch grids depend only on shapes. Two Triton kernels (_moe_decode_triton.py)
each decode a weight tile once per step for the rows of its expert (at batch 1: the k chosen experts,
every weight read once) with bias + clamped SwiGLU fused into the first and bias + routing weight
into the second; a third sums the k slots of each token in float32 in slot order. Above
UNSORTED_MAX_ROWS routed rows (N * k), a one-program counting sort groups them by expert first, so
that the rows of one expert share each decoded tile. Weights stay packed; MXFP4 scale bytes must be
at most 192 (`mxfp4_gemm.check_scales`, once at load, as for the training GEMMs). Expert ids outside
[0, E) are not checked (that would need a host sync): their slots contribute zeros (a router never
makes them; the grouped path below does not take them).

From `GROUPED_FROM_TOKENS` tokens on, `moe_experts` / `moe_experts_mxfp4` (the training grouped
GEMMs, 128-row tiles) take over: there every expert gets enough rows to fill a large tile
(`python bench/moe_decode.py` times both sides of the crossover).

Arithmetic: products and sums in float32; inputs rounded as the model rounds them (weights, biases and
routing weights to x's dtype); h, the SwiGLU output, is rounded to x's dtype between the two
projections (the model's bf16 forward rounds after every operation). `moe_decode_ref` is the same
arithmetic in plain PyTorch; on CPU without Triton's interpreter `moe_decode` runs it.

The experts are read by their checkpoint attribute names (gate_up_proj or gate_up_proj_blocks/_scales,
...): this layer does not import the model.

Shape legend: N tokens, k experts per token, M = N * k routed rows, H hidden, I expert intermediate,
E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from osstune.kernels._backend import triton_usable
from osstune.kernels.moe import clamped_swiglu_ref, moe_experts, moe_experts_mxfp4
from osstune.quant.mxfp4 import dequantize_mxfp4


class MoEDecodeInputError(ValueError):
    """Inputs or expert tensors that do not fit together; the message names them."""


@dataclass(frozen=True)
class DecodeTiles:
    """Tile shape of one projection's launch. block_m rows of one expert share each decoded weight tile
    (16 is tl.dot's minimum); swap puts the weight tile on the MMA's left side. row: with unsorted rows,
    each program takes its one row through FMAs instead of an MMA (block_m and swap then unused)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    swap: bool = True
    row: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise MoEDecodeInputError(f"DecodeTiles.{name}={v}: tile sizes must be powers of two >= 16")
        if self.block_k % 32:
            raise MoEDecodeInputError(f"DecodeTiles.block_k={self.block_k}: must be a multiple of 32 (one MXFP4 group)")


# From this many tokens on the training grouped GEMMs run instead (see the module docstring).
# 128: the device sort (`_route`) holds a (rows, E) int32 tile in shared memory, 128 KiB at 512 rows
# and 256 KiB at 1,024, over the H200's 227 KiB (seen: OutOfResources at 256 tokens, top-4; the sm_90
# build reports 65,536 / 131,072 / 262,144 bytes at 256 / 512 / 1,024 rows). At 256 tokens the two
# paths took 531 and 558 us (H200 sweep), so nothing is lost by stopping earlier.
GROUPED_FROM_TOKENS = 128
SORT_MAX_ROWS = 512
# Up to this many routed rows (N * k) each row gets its own programs and nothing is sorted: the sort
# costs launches, and the few rows that share an expert then read its tiles at the same time (from L2).
UNSORTED_MAX_ROWS = 16
# float32 inputs on a GPU: float32 products, smaller tiles (or registers spill).
FLOAT32_TILES = DecodeTiles(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2, swap=False)
# Triton's interpreter (CPU tests) pays per program and per operation, not per element: few, large tiles.
INTERPRETER_TILES = DecodeTiles(block_m=16, block_n=64, block_k=64, swap=False)
# bf16 on a GPU, by routed rows. Measured (H200, MXFP4, bench/moe_decode.py --sweep, 2026-12-02): with
# the MMA, 16x64x128 is the fastest tile from 1 to 64 tokens (batch 1: 59.8 us, 885 GB/s; the copy
# roof is ~3.2-4.2 TB/s). Feeding an MMA moves every decoded weight through shared memory; with one
# row per program the FMA path (row=True) keeps the weights in registers: ~6 instructions a weight in
# the sm_90 build, no barrier in the loop. Not yet timed on a GPU: if bench/moe_decode.py --sweep shows
# "decode 16x64x128 w4 s3 swap" (the MMA) ahead of "decode" at 1 and 4 tokens, set row=False here.
FEW_ROWS_TILES = DecodeTiles(block_m=16, block_n=64, block_k=128, row=False)
ROW_TILES = {512: DecodeTiles(block_m=16), 1024: DecodeTiles(block_m=32)}  # up to this many rows
MANY_ROWS_TILES = DecodeTiles(block_m=64)
_DTYPES = (torch.bfloat16, torch.float32)


def default_tiles(rows: int, x: torch.Tensor) -> DecodeTiles:
    """Tiles for M = rows routed rows: more rows per tile as the experts get more rows each."""
    if not x.is_cuda:
        return INTERPRETER_TILES
    if x.dtype == torch.float32:
        return FLOAT32_TILES
    if rows <= UNSORTED_MAX_ROWS:
        return FEW_ROWS_TILES
    return next((t for bound, t in ROW_TILES.items() if rows <= bound), MANY_ROWS_TILES)


@torch.no_grad()
def moe_decode(experts: nn.Module, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
               tiles: DecodeTiles | None = None, grouped_from_tokens: int = GROUPED_FROM_TOKENS,
               sort_rows: bool | None = None) -> torch.Tensor:
    """experts: an osstune.model.Experts or MXFP4Experts; x (N, H) bf16 or float32, idx (N, k) integer
    expert ids, weights (N, k) routing weights -> (N, H) in x's dtype, = experts(x, idx, weights).

    tiles: both projections' launch shape (default: `default_tiles`). From grouped_from_tokens tokens
    on (on a GPU) the training grouped GEMMs run instead. sort_rows: group the rows by expert first
    (default: above UNSORTED_MAX_ROWS rows)."""
    w = _expert_tensors(experts)
    _check(w, x, idx, weights)
    if not triton_usable(x):
        return moe_decode_ref(experts, x, idx, weights)
    n = x.shape[0]
    if x.is_cuda and (n >= grouped_from_tokens or idx.numel() > SORT_MAX_ROWS):
        return _grouped(experts, w, x, idx, weights)
    if sort_rows is None:
        sort_rows = idx.numel() > UNSORTED_MAX_ROWS
    return _launch(w, x, idx, weights, experts.alpha, experts.limit, tiles or default_tiles(idx.numel(), x),
                   sort_rows)


@torch.no_grad()
def moe_decode_ref(experts: nn.Module, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch with the kernels' arithmetic: one float32 matmul pair per expert that received tokens,
    h rounded to x's dtype, the slots summed in float32."""
    w = _expert_tensors(experts)
    dt = x.dtype
    out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    for e in idx.unique().tolist():
        if not 0 <= e < w.gate_up_bias.shape[0]:
            continue  # as the kernels: an invalid id's slot adds nothing
        token, slot = (idx == e).nonzero(as_tuple=True)
        gu = x[token].float() @ w.gate_up(e).to(dt).float() + w.gate_up_bias[e].to(dt).float()
        h = clamped_swiglu_ref(gu, experts.alpha, experts.limit).to(dt).float()
        y = h @ w.down(e).to(dt).float() + w.down_bias[e].to(dt).float()
        out.index_add_(0, token, y * weights[token, slot, None].to(dt).float())
    return out.to(dt)


@dataclass(frozen=True)
class _Weights:
    """One experts module's tensors. Dense: gu/d are (E, H, 2I) / (E, I, H) and the scales None.
    MXFP4: gu/d are the blocks (E, 2I, H/32, 16) / (E, H, I/32, 16) with their scales."""

    gu: torch.Tensor
    gu_scales: torch.Tensor | None
    gate_up_bias: torch.Tensor  # (E, 2I)
    d: torch.Tensor
    d_scales: torch.Tensor | None
    down_bias: torch.Tensor  # (E, H)

    @property
    def mxfp4(self) -> bool:
        return self.gu_scales is not None

    @property
    def hidden(self) -> int:
        return self.down_bias.shape[1]

    def gate_up(self, e: int) -> torch.Tensor:
        """(H, 2I) float32 (dense: the stored dtype)."""
        if self.mxfp4:
            return dequantize_mxfp4(self.gu[e], self.gu_scales[e], torch.float32).t()
        return self.gu[e]

    def down(self, e: int) -> torch.Tensor:
        """(I, H)."""
        if self.mxfp4:
            return dequantize_mxfp4(self.d[e], self.d_scales[e], torch.float32).t()
        return self.d[e]


def _expert_tensors(experts: nn.Module) -> _Weights:
    names = ("gate_up_proj_bias", "down_proj_bias", "alpha", "limit")
    if hasattr(experts, "gate_up_proj_blocks"):
        names += ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")
    else:
        names += ("gate_up_proj", "down_proj")
    missing = [n for n in names if not hasattr(experts, n)]
    if missing:
        raise MoEDecodeInputError(
            f"moe_decode: {type(experts).__name__} has no {', '.join(missing)}; pass an osstune.model.Experts or "
            f"MXFP4Experts (a LoRA wrapper is not supported here)")
    if hasattr(experts, "gate_up_proj_blocks"):
        return _Weights(experts.gate_up_proj_blocks, experts.gate_up_proj_scales, experts.gate_up_proj_bias,
                        experts.down_proj_blocks, experts.down_proj_scales, experts.down_proj_bias)
    return _Weights(experts.gate_up_proj, None, experts.gate_up_proj_bias, experts.down_proj, None,
                    experts.down_proj_bias)


def _check(w: _Weights, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> None:
    def bad(msg: str) -> MoEDecodeInputError:
        return MoEDecodeInputError(f"moe_decode: {msg}")

    if x.dim() != 2 or idx.dim() != 2 or weights.shape != idx.shape or idx.shape[0] != x.shape[0]:
        raise bad(f"expected x (N, H), idx and weights (N, k); got x {tuple(x.shape)}, idx {tuple(idx.shape)}, "
                  f"weights {tuple(weights.shape)}")
    if x.dtype not in _DTYPES:
        raise bad(f"x must be bfloat16 or float32; got {x.dtype}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise bad(f"idx must hold int64 or int32 expert ids; got {idx.dtype}")
    if not weights.is_floating_point():
        raise bad(f"weights must be floating point routing weights; got {weights.dtype}")
    e, two_i = w.gate_up_bias.shape
    h = x.shape[1]
    if w.mxfp4:
        want = {"gate_up_proj_blocks": (e, two_i, h // 32, 16), "gate_up_proj_scales": (e, two_i, h // 32),
                "down_proj_blocks": (e, h, two_i // 64, 16), "down_proj_scales": (e, h, two_i // 64)}
        got = {"gate_up_proj_blocks": w.gu, "gate_up_proj_scales": w.gu_scales, "down_proj_blocks": w.d,
               "down_proj_scales": w.d_scales}
        for name, t in got.items():
            if t.dtype != torch.uint8:
                raise bad(f"experts.{name} must be uint8 (packed MXFP4); got {t.dtype}")
    else:
        want = {"gate_up_proj": (e, h, two_i), "down_proj": (e, two_i // 2, h)}
        got = {"gate_up_proj": w.gu, "down_proj": w.d}
    want["down_proj_bias"] = (e, h)
    got["down_proj_bias"] = w.down_bias
    odd = w.mxfp4 and (h % 32 or two_i % 64)
    for name, t in got.items():
        if tuple(t.shape) != want[name] or odd or two_i % 2:
            raise bad(f"experts.{name} has shape {tuple(t.shape)}; for x of hidden size {h} and gate_up_proj_bias "
                      f"{tuple(w.gate_up_bias.shape)} (E, 2I) it must be {want[name]}"
                      + (" (MXFP4: H and I multiples of 32)" if w.mxfp4 else ""))
    devices = {str(t.device) for t in (x, idx, weights, w.gu, w.d, w.gate_up_bias, w.down_bias)}
    if len(devices) > 1:
        raise bad(f"x, idx, weights and the experts must be on one device; got {sorted(devices)}")


def _grouped(experts, w: _Weights, x, idx, weights) -> torch.Tensor:
    if w.mxfp4:
        return moe_experts_mxfp4(x, idx, weights, w.gu, w.gu_scales, w.gate_up_bias, w.d, w.d_scales, w.down_bias,
                                 experts.alpha, experts.limit)
    return moe_experts(x, idx, weights, w.gu, w.gate_up_bias, w.d, w.down_bias, experts.alpha, experts.limit)


def _launch(w: _Weights, x, idx, weights, alpha: float, limit: float, tiles: DecodeTiles,
            sort_rows: bool) -> torch.Tensor:
    from osstune.kernels import _moe_decode_triton as kern

    n, k = idx.shape
    m = n * k
    n_experts, two_i = w.gate_up_bias.shape
    h_dim, i_dim = x.shape[1], two_i // 2
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if m == 0:
        return out.zero_()
    x = x if x.stride(1) == 1 else x.contiguous()
    ids = idx.reshape(-1)  # (M,) row r = token r // k, slot r % k
    ids = ids if ids.stride(0) == 1 else ids.contiguous()  # (a top-1 column of a wider tensor is strided)
    route = weights.reshape(-1)
    route = route if route.stride(0) == 1 else route.contiguous()
    if sort_rows:
        order, offs = _sort_rows(ids, n_experts)
        # Each expert that has rows adds at most one partial row tile: a bound without a host sync.
        row_tiles = m // tiles.block_m + min(n_experts, m) + 1
    else:
        order = offs = ids  # unused
        row_tiles = m
    hid = torch.empty(m, i_dim, device=x.device, dtype=x.dtype)  # (M, I), rows in `order`
    y = torch.empty(m, h_dim, device=x.device, dtype=torch.float32)  # (M, H), token-major rows
    gemv = tiles.row and not sort_rows
    common = dict(
        BLOCK_M=1 if gemv else tiles.block_m, GEMV=gemv, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        E_PAD=_next_pow2(n_experts + 1),
        SORTED=sort_rows, MXFP4=w.mxfp4, PAIRS=w.mxfp4 and x.is_cuda and x.dtype == torch.bfloat16,
        SWAP=tiles.swap, F32_DOT=not x.is_cuda,
        PRECISION="ieee" if x.dtype == torch.float32 or not x.is_cuda else None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    gu_strides, gu, gu_scales = _weight_strides(w.gu, w.gu_scales)
    kern._gate_up[(row_tiles, _cdiv(two_i, tiles.block_n))](
        x, ids, order, offs, gu, gu_scales, w.gate_up_bias, hid, m, h_dim, two_i, n_experts, k, float(alpha),
        float(limit), x.stride(0), hid.stride(0), *gu_strides, w.gate_up_bias.stride(0),
        EVEN=h_dim % tiles.block_k == 0, **common)
    d_strides, d, d_scales = _weight_strides(w.d, w.d_scales)
    kern._down[(row_tiles, _cdiv(h_dim, tiles.block_n))](
        hid, ids, order, offs, d, d_scales, w.down_bias, route, y, m, i_dim, h_dim, n_experts,
        hid.stride(0), y.stride(0), *d_strides, w.down_bias.stride(0),
        EVEN=i_dim % tiles.block_k == 0, **common)
    kern._combine[(n, _cdiv(h_dim, _COMBINE_BLOCK))](y, out, h_dim, TOPK=k, BLOCK=_COMBINE_BLOCK)
    return out


_COMBINE_BLOCK = 1024
# The one-program counting sort holds an (M, E) one-hot in registers: up to this many elements
# (1,024 rows at E = 32, 256 at E = 128), then torch.sort + searchsorted (4 launches instead of 1).
ROUTE_MAX_ELEMENTS = 1 << 16


def _sort_rows(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (M,) -> order (M,) (sorted position -> routed row), offs (E,) int32 (rows of experts <= e, the
    grouped GEMM's convention); on the device, without a host sync."""
    m = ids.shape[0]
    m_pad, e_pad = max(_next_pow2(m), 16), max(_next_pow2(n_experts + 1), 16)
    if m_pad * e_pad <= ROUTE_MAX_ELEMENTS:
        from osstune.kernels import _moe_decode_triton as kern

        order = torch.empty(m, device=ids.device, dtype=torch.int32)
        offs = torch.empty(n_experts, device=ids.device, dtype=torch.int32)
        kern._route[(1,)](ids, order, offs, m, n_experts, M_PAD=m_pad, E_PAD=e_pad, num_warps=4)
        return order, offs
    ids = torch.where(ids < 0, n_experts, ids)  # invalid ids after every expert, as the kernel puts them
    sorted_ids, order = torch.sort(ids)
    offs = torch.searchsorted(sorted_ids, torch.arange(n_experts, device=ids.device, dtype=sorted_ids.dtype),
                              right=True).to(torch.int32)
    return order, offs


def _weight_strides(wt: torch.Tensor, scales: torch.Tensor | None):
    """-> (stride_e, stride_out, stride_in, scale stride_e, scale stride_out), weights, scales (a dummy
    for dense).
    MXFP4 blocks (E, out, in/32, 16): the kernels read in/2 contiguous bytes per output row. Dense
    (E, in, out): any strides."""
    if scales is None:
        return (wt.stride(0), wt.stride(2), wt.stride(1), 0, 0), wt, wt
    # A checkpoint's buffers already are; a copy here would copy the whole stack on every call.
    wt = wt if wt.stride(3) == 1 and wt.stride(2) == 16 else wt.contiguous()
    scales = scales if scales.stride(2) == 1 else scales.contiguous()
    return (wt.stride(0), wt.stride(1), 1, scales.stride(0), scales.stride(1)), wt, scales


def _next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
