"""Triton body of `osstune.kernels.mxfp4_dequant.dequantize_mxfp4_fast`.

One program decodes GROUPS scale groups (32 values each, 16 packed bytes and one scale byte) into
the output's contiguous rows. Value k of a group is the low (k even) or high nibble of byte k // 2;
e2m1 code c = sign bit 3, exponent bits 2-1, mantissa bit 0: 0, 0.5, 1, 1.5, 2, 3, 4, 6. The scale
2**(s - 127) is built from its float32 bits (s << 23; s = 0 is the subnormal 2**-127), so every
product is exact in float32 and, for the scales checkpoints use, in bf16.

Shape legend: T groups in all, GROUPS groups a program, 32 values a group.
"""

import triton
import triton.language as tl


@triton.jit
def _dequant_groups(Blocks, Scales, Out, T, GROUPS: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)  # (GROUPS,) group indices
    k = tl.arange(0, 32)
    live = g < T
    byte = tl.load(Blocks + g[:, None] * 16 + k[None, :] // 2, mask=live[:, None], other=0).to(tl.int32)
    code = (byte >> ((k[None, :] % 2) * 4)) & 15  # (GROUPS, 32)
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    magnitude = tl.where(e == 0, 0.5 * m, (2.0 + m) * (1 << tl.maximum(e - 1, 0)).to(tl.float32) * 0.5)
    value = tl.where(code >= 8, -magnitude, magnitude)
    s = tl.load(Scales + g, mask=live, other=127).to(tl.int32)
    scale = tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)
    out = value * scale[:, None]
    tl.store(Out + g[:, None] * 32 + k[None, :], out.to(Out.dtype.element_ty), mask=live[:, None])
