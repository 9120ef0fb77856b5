"""Grouped GEMMs whose weights stay MXFP4: QLoRA's frozen gpt-oss experts, forward and input gradient.

Rows are sorted by expert as in `osstune.kernels.moe` (`offs` int32 (E,) cumulative row ends, the
convention of `torch._grouped_mm`; empty experts repeat an offset). Each expert's weight W_e (N, K)
is stored output-major as the checkpoint has it: blocks (E, N, K/32, 16) uint8, 32 e2m1 values per
16 bytes along K, low nibble first; scales (E, N, K/32) uint8, value * 2**(scale - 127).

  mxfp4_grouped_mm    y  = x  @ W_e^T  (M, K) -> (M, N)   the projection's forward
  mxfp4_grouped_mm_t  dx = dy @ W_e    (M, N) -> (M, K)   its input gradient

On CUDA the Triton kernels decode the packed weights tile by tile in registers (design notes in
docs/QLORA.md); no dense copy of an expert stack is ever formed. bf16 inputs take the pair decoder,
exact for scale bytes in PAIR_DECODE_SCALES (weights of magnitude 2**-61 to 6 * 2**65): above it
the result overflows, so whatever hands packed weights to these GEMMs on a GPU checks them once with
`check_scales` (the fast path and `quantize_attention` do). Elsewhere (CPU) the `*_ref` loop
runs: it decodes one expert at a time, so memory holds one expert's dense weight at most. Both
accumulate in float32. Rows past offs[E - 1] come out as zeros.

Shape legend: M rows, K input features, N output features, E experts, G = K / 32 scale groups.
For gpt-oss gate_up: N = 2I, K = H; for down: N = H, K = I.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osstune.kernels._backend import triton_usable
from osstune.quant.mxfp4 import dequantize_mxfp4


class MXFP4InputError(ValueError):
    """Tensors whose shapes, dtypes or devices do not fit an MXFP4 grouped GEMM; the message names them."""


@dataclass(frozen=True)
class MXFP4Tiles:
    """Tile shape of one kernel launch. block_k is a multiple of 32 (one scale group). swap computes
    the transposed tile so that the decoded weights are the MMA's left operand (Hopper's wgmma reads
    that one from registers; see docs/QLORA.md)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    swap: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise MXFP4InputError(f"MXFP4Tiles.{name}={v}: tile sizes must be powers of two >= 16")
        if self.block_k % 32:
            raise MXFP4InputError(
                f"MXFP4Tiles.block_k={self.block_k}: must be a multiple of 32 (one MXFP4 scale group)")


# The best tile shapes of the pair decoder timed on an H100 at the gpt-oss-20b expert shapes, 2,048
# and 8,192 tokens (`python bench/kernels.py --only mxfp4 --sweep`; docs/QLORA.md has the table): 128
# rows share each decoded weight tile, which keeps the decode's ALU work below the MMA time.
FORWARD_TILES = MXFP4Tiles(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3)
BACKWARD_TILES = MXFP4Tiles(block_m=128, block_n=64, block_k=128, num_warps=8, num_stages=3)
# One group (a frozen attention projection, osstune.quant.linear), both directions: over q/k/v/o of
# gpt-oss-20b at 2,048 tokens 13% faster than the expert tiles, the same at 8,192
# (`python bench/kernels.py --only mxfp4-attention`, docs/QLORA.md).
ONE_GROUP_TILES = MXFP4Tiles(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=3)
# float32 inputs take a float32 FMA product (tests, CPU interpreter): small tiles, or registers spill.
FLOAT32_TILES = MXFP4Tiles(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=2)
_DTYPES = (torch.bfloat16, torch.float32)
# Scale bytes for which the bf16 pair decoder is exact (it multiplies by 2**(s - 65); see
# _mxfp4_gemm_triton.py). gpt-oss checkpoints sit around 115-130.
PAIR_DECODE_SCALES = (66, 192)


def check_scales(scales: torch.Tensor, name: str) -> None:
    """Raise MXFP4InputError when a scale byte is above PAIR_DECODE_SCALES (weights above 2**65, which
    the bf16 GEMMs would turn into inf). One device sync: call once per weight, not per step."""
    top = int(scales.max()) if scales.numel() else 0
    if top > PAIR_DECODE_SCALES[1]:
        raise MXFP4InputError(
            f"{name}: an MXFP4 scale byte is {top} (a block scale of 2**{top - 127}); the MXFP4 GEMMs take "
            f"scales up to {PAIR_DECODE_SCALES[1]} (weights up to 6 * 2**{PAIR_DECODE_SCALES[1] - 127}). Such a "
            f"weight is almost certainly corrupt: check the checkpoint, or train on bf16 weights (--method lora).")


def mxfp4_grouped_mm(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor,
                     tiles: MXFP4Tiles | None = None) -> torch.Tensor:
    """x (M, K) bf16/fp32 sorted by expert, blocks (E, N, K/32, 16) u8, scales (E, N, K/32) u8,
    offs (E,) int32 -> y (M, N) in x's dtype: y[rows of e] = x[rows of e] @ W_e^T.
    offs must be non-decreasing with offs[E - 1] <= M (as `moe_experts` builds it; not checked, that
    would need a host sync)."""
    _check(x, blocks, scales, offs, "x", transpose=False)
    if not _use_triton(x):
        return mxfp4_grouped_mm_ref(x, blocks, scales, offs)
    return _launch(x, blocks, scales, offs, tiles or _default_tiles(x, blocks, FORWARD_TILES), transpose=False)


def mxfp4_grouped_mm_t(dy: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor,
                       tiles: MXFP4Tiles | None = None) -> torch.Tensor:
    """dy (M, N) sorted by expert -> dx (M, K) in dy's dtype: dx[rows of e] = dy[rows of e] @ W_e.
    Same layouts and preconditions as `mxfp4_grouped_mm`."""
    _check(dy, blocks, scales, offs, "dy", transpose=True)
    if not _use_triton(dy):
        return mxfp4_grouped_mm_t_ref(dy, blocks, scales, offs)
    return _launch(dy, blocks, scales, offs, tiles or _default_tiles(dy, blocks, BACKWARD_TILES), transpose=True)


def mxfp4_grouped_mm_ref(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                         offs: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: decode W_e with `dequantize_mxfp4` (float32), one expert at a time, and matmul."""
    return _ref_loop(x, blocks, scales, offs, lambda rows, w: rows @ w.t(), blocks.shape[1])


def mxfp4_grouped_mm_t_ref(dy: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                           offs: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch transpose product: dx[rows of e] = dy[rows of e] @ W_e, W_e decoded per expert."""
    return _ref_loop(dy, blocks, scales, offs, lambda rows, w: rows @ w, blocks.shape[2] * 32)


@torch.library.custom_op("osstune::mxfp4_grouped_mm", mutates_args=())
def _mxfp4_linear(x_sorted: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return mxfp4_grouped_mm(x_sorted, blocks, scales, offs)


@_mxfp4_linear.register_fake
def _(x_sorted, blocks, scales, offs):
    return x_sorted.new_empty(x_sorted.shape[0], blocks.shape[1])


def _linear_setup(ctx, inputs, output) -> None:
    _, blocks, scales, offs = inputs
    ctx.save_for_backward(blocks, scales, offs)


def _linear_backward(ctx, dy):
    blocks, scales, offs = ctx.saved_tensors
    dx = mxfp4_grouped_mm_t(dy.contiguous(), blocks, scales, offs) if ctx.needs_input_grad[0] else None
    return dx, None, None, None


_mxfp4_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


class MXFP4GroupedLinear:
    """y = mxfp4_grouped_mm(x_sorted, blocks, scales, offs) with autograd: `MXFP4GroupedLinear.apply(...)`.
    The base weights are frozen, so the backward returns dx only (QLoRA trains adapters beside them).

    A registered torch op (`torch.ops.osstune.mxfp4_grouped_mm`), not a Python autograd Function, so
    that selective-checkpointing policies see it and may keep its output (osstune.fast's
    "keep_expert_gemms")."""

    apply = staticmethod(_mxfp4_linear)
    op = torch.ops.osstune.mxfp4_grouped_mm.default


def _use_triton(a: torch.Tensor) -> bool:
    # Triton's CPU interpreter (3.7) runs tl.dot on bf16 as a product of the raw 16-bit patterns:
    # there, bf16 inputs take the reference.
    return triton_usable(a) and (a.is_cuda or a.dtype == torch.float32)


def _default_tiles(a: torch.Tensor, blocks: torch.Tensor, bf16_tiles: MXFP4Tiles) -> MXFP4Tiles:
    if a.dtype == torch.float32:
        return FLOAT32_TILES
    return ONE_GROUP_TILES if blocks.shape[0] == 1 else bf16_tiles


def _ref_loop(a, blocks, scales, offs, product, out_cols) -> torch.Tensor:
    out = a.new_zeros(a.shape[0], out_cols)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            w = dequantize_mxfp4(blocks[e], scales[e], torch.float32)  # (N, K): this expert only
            out[start:end] = product(a[start:end].float(), w).to(a.dtype)
        start = end
    return out


def _launch(a, blocks, scales, offs, tiles: MXFP4Tiles, transpose: bool) -> torch.Tensor:
    from osstune.kernels import _mxfp4_gemm_triton as kern

    a = a.contiguous() if a.stride(1) != 1 else a
    # The kernels index K / 2 contiguous bytes per weight row (a checkpoint's buffers already are).
    blocks = blocks if blocks.stride(3) == 1 and blocks.stride(2) == 16 else blocks.contiguous()
    scales = scales if scales.stride(2) == 1 else scales.contiguous()
    n_experts, n, g, _ = blocks.shape
    k = g * 32
    m = a.shape[0]
    out = torch.empty(m, n if not transpose else k, device=a.device, dtype=a.dtype)
    if m == 0:
        return out
    # A tile bound that needs no host sync: each of the E + 1 groups (experts, then the rows after
    # offs[E - 1]) adds at most one partial tile to the M // block_m full ones.
    row_tiles = m // tiles.block_m + n_experts + 1
    out_tiles = -(-(k if transpose else n) // (tiles.block_k if transpose else tiles.block_n))
    # The reduction axis (N for the transpose product, K otherwise) in whole tiles: no masks on it.
    even = n % tiles.block_n == 0 if transpose else k % tiles.block_k == 0
    body = kern._mxfp4_mm_t if transpose else kern._mxfp4_mm
    body[(out_tiles, row_tiles)](
        a, blocks, scales, offs, out, m, n, k, n_experts,
        a.stride(0), out.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        E_PAD=_next_pow2(n_experts + 1), SWAP=tiles.swap,
        PAIRS=a.is_cuda and a.dtype == torch.bfloat16, EVEN=even,
        # float32 inputs get a float32 product (not TF32), so the float32 path matches the reference.
        PRECISION="ieee" if a.dtype == torch.float32 else None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def _check(a, blocks, scales, offs, name: str, transpose: bool) -> None:
    fn = "mxfp4_grouped_mm_t" if transpose else "mxfp4_grouped_mm"

    def bad(msg: str) -> MXFP4InputError:
        return MXFP4InputError(f"{fn}: {msg}")

    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise bad(f"blocks and scales must be uint8 (packed MXFP4 as the checkpoint stores it); got "
                  f"{blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[3] != 16 or tuple(scales.shape) != tuple(blocks.shape[:3]):
        raise bad(f"expected blocks (E, N, K/32, 16) and scales (E, N, K/32); got blocks "
                  f"{tuple(blocks.shape)} and scales {tuple(scales.shape)}")
    n_experts, n, g, _ = blocks.shape
    if a.dim() != 2 or a.dtype not in _DTYPES:
        raise bad(f"{name} must be a 2-D bfloat16 or float32 tensor; got {a.dtype} of shape {tuple(a.shape)}")
    want = n if transpose else g * 32
    if a.shape[1] != want:
        what = "N (blocks.shape[1])" if transpose else "K = 32 * blocks.shape[2]"
        raise bad(f"{name} has {a.shape[1]} columns but the weights have {what} = {want}; "
                  f"blocks {tuple(blocks.shape)}")
    if offs.dim() != 1 or offs.shape[0] != n_experts or offs.dtype != torch.int32:
        raise bad(f"offs must be int32 of shape (E,) = ({n_experts},), the cumulative row end of each expert; "
                  f"got {offs.dtype} of shape {tuple(offs.shape)}")
    devices = {t.device for t in (a, blocks, scales, offs)}
    if len(devices) > 1:
        raise bad(f"{name}, blocks, scales and offs must be on one device; got {sorted(map(str, devices))}")


def _next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()
