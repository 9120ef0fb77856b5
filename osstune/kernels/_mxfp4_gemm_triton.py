"""Triton bodies of the MXFP4 grouped GEMMs (launchers and references in mxfp4_gemm.py).

Weights stay packed: each program loads a (rows, BLOCK_K / 2) byte tile plus its (rows, BLOCK_K / 32)
scales and decodes it in registers right before the MMA; no dense copy of any expert exists.

Two decoders, both exact (design notes and measurements in docs/QLORA.md):

- `_decode_pairs` (bf16 inputs on CUDA: the training path). Inline PTX turns four packed bytes into
  eight bf16 weights, two per 32-bit register: per register one byte permute, one integer multiply
  that places the sign and the exponent/mantissa bits of both nibbles at once, one mask and one
  bf16x2 multiply by the scale. The bits land on value(c) * 2**-126 (codes 0 and +-0.5 on bf16
  subnormals, as e2m1 encodes them); the multiplier is 2**(s - 65), so the tile holds
  weight * 2**-64 and the accumulator is multiplied by 2**64 at the end (powers of two: exact).
  Exact for 66 <= s <= 192 (`PAIR_DECODE_SCALES`; the launcher's callers check the upper bound, above
  which the multiplier overflows). About 4 instructions per weight against 9 for the float32 decoder.
- `_decode` (float32 inputs, and Triton's CPU interpreter, which has no inline assembly). Per nibble:
  sign to bit 31 and the other three bits to bits 24-22 of a float32, which is then exactly
  value(c) * 2**-126; two float32 multiplies, by 2**126 and by 2**(s - 127) = bitcast(s << 23), give
  the weight. Exact for 2 <= s <= 252. Relies on `mul.f32` without `.ftz` (checked in the sm_90 PTX).

Both rely on multiplies that keep subnormal inputs; `test_decode_is_exact_gpu` checks every code.

The bf16 path also loads each tile's scales one iteration ahead (a byte load is too small for
Triton's asynchronous copies, so it would otherwise stall every iteration), and drops the masks on
the reduction axis when it divides into whole tiles (EVEN).

Grouping without a host sync: the grid is an upper bound on the row tiles (M // BLOCK_M + E + 1) and
every program finds its expert and row range from `offs` with a vectorised prefix sum over the
experts (`_tile_rows`); surplus programs return at once. Rows past offs[E - 1] form one more group
whose output is written as zeros (what the loop fallback in moe.py returns for them).

Shape legend: M rows (sorted by expert), K input features, N output features, E experts,
G = K / 32 scale groups; x (M, K), dy (M, N), blocks (E, N, G, 16) uint8, scales (E, N, G) uint8.
"""

import triton
import triton.language as tl

_TWO_POW_126 = tl.constexpr(2.0**126)


@triton.jit
def _tile_rows(Offs, tile, M, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """-> (group, row0, row_end) of row tile `tile`: group E is the tail after offs[E - 1]; a tile
    beyond the last one gets row0 >= row_end."""
    g = tl.arange(0, E_PAD)
    end = tl.load(Offs + g, mask=g < E, other=M)  # the tail group and the padding end at M
    start = tl.load(Offs + g - 1, mask=(g > 0) & (g <= E), other=0)
    start = tl.where(g > E, M, start)
    n_tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)
    last = tl.cumsum(n_tiles, 0)  # tiles of groups <= g
    group = tl.sum((last <= tile).to(tl.int32), 0)
    sel = g == group
    first = tl.sum(tl.where(sel, last - n_tiles, 0), 0)
    row0 = tl.sum(tl.where(sel, start, 0), 0) + (tile - first) * BLOCK_M
    row_end = tl.sum(tl.where(sel, end, 0), 0)
    return group, row0, row_end


@triton.jit
def _load_packed(Blocks, n_idx, n_ok, k0, K, stride_bn, COLS: tl.constexpr, EVEN_K: tl.constexpr):
    """Bytes of rows n_idx, columns [k0, k0 + COLS) -> (ROWS, COLS / 2) u8 (masked: 0, the code +0)."""
    byte = k0 // 2 + tl.arange(0, COLS // 2)  # a row's K / 2 bytes are contiguous: coalesced loads
    if EVEN_K:
        ok = n_ok[:, None]
    else:
        ok = n_ok[:, None] & (byte < K // 2)[None, :]
    return tl.load(Blocks + n_idx.to(tl.int64)[:, None] * stride_bn + byte[None, :], mask=ok, other=0)


@triton.jit
def _load_scales(Scales, n_idx, n_ok, k0, K, stride_sn, COLS: tl.constexpr):
    """Scale bytes of rows n_idx for columns [k0, k0 + COLS) -> (ROWS, COLS / 32) u8; past K: 0."""
    g = k0 // 32 + tl.arange(0, COLS // 32)
    ok = n_ok[:, None] & (g < K // 32)[None, :]
    return tl.load(Scales + n_idx.to(tl.int64)[:, None] * stride_sn + g[None, :], mask=ok, other=0)


@triton.jit
def _decode(packed, sc, ROWS: tl.constexpr, COLS: tl.constexpr):
    """packed (ROWS, COLS / 2) u8 and their scales (ROWS, COLS / 32) u8 -> (ROWS, COLS) float32
    holding the bf16-exact weights in k order (masked bytes are the code +0)."""
    packed = packed.to(tl.int32)
    # One scale per 32 values, broadcast over the 16 bytes of each group (a per-byte gather of the
    # scale costs 16x the load instructions).
    sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (ROWS, COLS // 32, 16)), (ROWS, COLS // 2))
    scale = (sc.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2**(s - 127)
    # e2m1 bits (sign 3, exponent 2-1, mantissa 0) moved to float32's sign, lowest exponent bits
    # and top mantissa bit: the float32 is value * 2**-126, a subnormal for the codes 0 and +-0.5.
    lo = (((packed & 7) << 22) | ((packed & 8) << 28)).to(tl.float32, bitcast=True)  # even k (low nibble)
    hi = (((packed & 0x70) << 18) | ((packed & 0x80) << 24)).to(tl.float32, bitcast=True)  # odd k
    lo = lo * _TWO_POW_126 * scale
    hi = hi * _TWO_POW_126 * scale
    return tl.reshape(tl.join(lo, hi), (ROWS, COLS))  # (ROWS, COLS / 2, 2) -> k order


# $4: four packed bytes b0..b3, $5: their scale bytes. Outputs: $0 = (low nibble of b0, of b1),
# $1 = (low of b2, of b3), $2/$3 = the high nibbles likewise; one bf16 per half register.
# Per output register: prmt spreads two bytes to bits 0-7 and 16-23; the multiply by 0x1040 (low
# nibbles: << 6 and << 12) or 0x104 (high nibbles: << 2 and << 8) puts each nibble's e1 e0 m bits at
# 8..6 and its sign at 15 of its half (the two shifted copies do not overlap, so the product is
# their OR); the mask keeps those bits. The scale pair: prmt puts s at bits 8-15 and 24-31, >> 1
# makes it a bf16 exponent field, + 62 per half makes it 2**(s - 65).
_E2M1_TO_BF16X2 = tl.constexpr("""
{
.reg .b32 ql, qh, s, t, neg0;
mov.b32 neg0, 0x80008000;
and.b32 ql, $4, 0x0F0F0F0F;
and.b32 qh, $4, 0xF0F0F0F0;
prmt.b32 s, $5, 0, 0x1404;
shr.b32 s, s, 1;
add.u32 s, s, 0x1F001F00;
prmt.b32 t, ql, 0, 0x4140;
mul.lo.u32 t, t, 0x1040;
and.b32 t, t, 0x81C081C0;
fma.rn.bf16x2 $0, t, s, neg0;
prmt.b32 t, qh, 0, 0x4140;
mul.lo.u32 t, t, 0x104;
and.b32 t, t, 0x81C081C0;
fma.rn.bf16x2 $2, t, s, neg0;
prmt.b32 s, $5, 0, 0x3424;
shr.b32 s, s, 1;
add.u32 s, s, 0x1F001F00;
prmt.b32 t, ql, 0, 0x4342;
mul.lo.u32 t, t, 0x1040;
and.b32 t, t, 0x81C081C0;
fma.rn.bf16x2 $1, t, s, neg0;
prmt.b32 t, qh, 0, 0x4342;
mul.lo.u32 t, t, 0x104;
and.b32 t, t, 0x81C081C0;
fma.rn.bf16x2 $3, t, s, neg0;
}
""")
_TWO_POW_64 = tl.constexpr(2.0**64)  # undoes the pair decoder's 2**-64


@triton.jit
def _decode_pairs(packed, sc, ROWS: tl.constexpr, COLS: tl.constexpr):
    """packed (ROWS, COLS / 2) u8 and their scales (ROWS, COLS / 32) u8 -> (ROWS, COLS) bf16 holding
    weight * 2**-64 in k order (CUDA only: inline PTX)."""
    sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (ROWS, COLS // 32, 16)), (ROWS, COLS // 2))
    lo, hi = tl.inline_asm_elementwise(_E2M1_TO_BF16X2, "=r,=r,=r,=r,r,r", [packed, sc],
                                       dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    return tl.reshape(tl.join(lo, hi), (ROWS, COLS))  # (ROWS, COLS / 2, 2) -> k order


@triton.jit
def _mxfp4_mm(X, Blocks, Scales, Offs, Y, M, N, K, E,
              stride_xm, stride_ym, stride_be, stride_bn, stride_se, stride_sn,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              E_PAD: tl.constexpr, SWAP: tl.constexpr, PRECISION: tl.constexpr,
              PAIRS: tl.constexpr, EVEN: tl.constexpr):
    """y[m, n] = sum_k x[m, k] * W_e[n, k] for the rows m of expert e. Grid (N tiles, row tiles): the
    N tiles of one row tile run side by side, so its x tile is read from HBM once and then from L2.
    PAIRS: the bf16 pair decoder; EVEN: K % BLOCK_K == 0."""
    pid_n = tl.program_id(0)
    expert, row0, row_end = _tile_rows(Offs, tl.program_id(1), M, E, BLOCK_M, E_PAD)
    if row0 >= row_end:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y tile transposed
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Group E holds the rows past offs[E - 1]: no K steps, zeros. (A loop bound rather than an `if`
    # around the loop keeps the loop at the top level, where Triton's software pipeliner finds it.)
    k_end = tl.where(expert < E, K, 0)
    expert = tl.minimum(expert, E - 1).to(tl.int64)
    blocks = Blocks + expert * stride_be
    scales = Scales + expert * stride_se
    if PAIRS:
        sc_next = _load_scales(scales, cols, col_ok, 0, K, stride_sn, BLOCK_K)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN:
            x_ok = row_ok[:, None]
        else:
            x_ok = row_ok[:, None] & (ks < K)[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=x_ok, other=0.0)  # (BLOCK_M, BLOCK_K)
        packed = _load_packed(blocks, cols, col_ok, k0, K, stride_bn, BLOCK_K, EVEN)
        if PAIRS:
            sc = sc_next
            sc_next = _load_scales(scales, cols, col_ok, k0 + BLOCK_K, K, stride_sn, BLOCK_K)  # one step ahead
            w = _decode_pairs(packed, sc, BLOCK_N, BLOCK_K)  # (BLOCK_N, BLOCK_K), weight * 2**-64
        else:
            sc = _load_scales(scales, cols, col_ok, k0, K, stride_sn, BLOCK_K)
            w = _decode(packed, sc, BLOCK_N, BLOCK_K).to(x.dtype)  # (BLOCK_N, BLOCK_K), exact in bf16
        if SWAP:
            # The decoded tile is the left operand: Hopper's wgmma can take that one from registers.
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    if PAIRS:
        out = out * _TWO_POW_64
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], out.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _mxfp4_mm_t(DY, Blocks, Scales, Offs, DX, M, N, K, E,
                stride_dym, stride_dxm, stride_be, stride_bn, stride_se, stride_sn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                E_PAD: tl.constexpr, SWAP: tl.constexpr, PRECISION: tl.constexpr,
                PAIRS: tl.constexpr, EVEN: tl.constexpr):
    """dx[m, k] = sum_n dy[m, n] * W_e[n, k]: the reduction runs over N, and the (BLOCK_N, BLOCK_K)
    byte tile of W_e is already the right operand's layout (no transpose of the decoded tile).
    Grid (K tiles, row tiles). PAIRS: the bf16 pair decoder; EVEN: N % BLOCK_N == 0."""
    pid_k = tl.program_id(0)
    expert, row0, row_end = _tile_rows(Offs, tl.program_id(1), M, E, BLOCK_M, E_PAD)
    if row0 >= row_end:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    rows = rows.to(tl.int64)
    k0 = pid_k * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    if SWAP:
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)  # dx tile transposed
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    n_end = tl.where(expert < E, N, 0)  # the tail group: zeros
    expert = tl.minimum(expert, E - 1).to(tl.int64)
    blocks = Blocks + expert * stride_be
    scales = Scales + expert * stride_se
    if PAIRS:
        sc_next = _load_scales(scales, tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_N) < N, k0, K, stride_sn, BLOCK_K)
    for n0 in range(0, n_end, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        if EVEN:
            n_ok = tl.full((BLOCK_N,), 1, tl.int1)
        else:
            n_ok = ns < N
        dy = tl.load(DY + rows[:, None] * stride_dym + ns[None, :], mask=row_ok[:, None] & n_ok[None, :],
                     other=0.0)  # (BLOCK_M, BLOCK_N)
        packed = _load_packed(blocks, ns, n_ok, k0, K, stride_bn, BLOCK_K, False)
        if PAIRS:
            sc = sc_next
            sc_next = _load_scales(scales, ns + BLOCK_N, ns + BLOCK_N < N, k0, K, stride_sn, BLOCK_K)  # one step ahead
            w = _decode_pairs(packed, sc, BLOCK_N, BLOCK_K)  # (BLOCK_N, BLOCK_K), weight * 2**-64
        else:
            sc = _load_scales(scales, ns, n_ok, k0, K, stride_sn, BLOCK_K)
            w = _decode(packed, sc, BLOCK_N, BLOCK_K).to(dy.dtype)  # (BLOCK_N, BLOCK_K), exact in bf16
        if SWAP:
            acc = tl.dot(tl.trans(w), tl.trans(dy), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    if SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    if PAIRS:
        out = out * _TWO_POW_64
    tl.store(DX + rows[:, None] * stride_dxm + ks[None, :], out.to(DX.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])
