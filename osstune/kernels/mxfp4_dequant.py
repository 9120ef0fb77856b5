"""MXFP4 -> dense in one Triton launch, and the frozen linear that decodes its weight for each product.

`dequantize_mxfp4_fast` equals `osstune.quant.mxfp4.dequantize_mxfp4` (the plain-PyTorch decoder,
which it falls back to where Triton cannot run) value for value, without the reference's
float32 and index temporaries: it reads the packed bytes once and writes the output once.

`MXFP4DenseLinear`: y = x @ W^T for a frozen MXFP4 W (out, in), decoding W into a temporary bf16
copy, then cuBLAS. Why, beside the GEMM that decodes in registers (`mxfp4_gemm`): that GEMM
decodes every weight once per tile of rows (16 times at 2,048 rows with 128-row tiles), which
costs about as much as the product itself; decoding W once (4.5 bytes of traffic a weight, a few
microseconds for an attention projection) then multiplying at bf16 speed is faster once there are
enough rows. Only for one weight (attention projections, osstune.quant.linear): a whole expert stack
decoded at once would be the dense copy that QLoRA exists to avoid. Nothing is kept between calls;
the backward decodes W again for dx = dy @ W (W is frozen: no weight gradient).

Shape legend: M rows, in / out the weight's sizes, G = in / 32 scale groups.
"""

from __future__ import annotations

import torch

from osstune.kernels._backend import triton_usable
from osstune.quant.mxfp4 import BLOCK, dequantize_mxfp4

_GROUPS = 64  # scale groups a program: 2,048 values


def dequantize_mxfp4_fast(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> values [..., G * 32] in `dtype`."""
    if not (triton_usable(blocks) and blocks.is_contiguous() and scales.is_contiguous()
            and dtype in (torch.bfloat16, torch.float32) and blocks.shape[:-1] == scales.shape
            and blocks.dtype == scales.dtype == torch.uint8 and blocks.shape[-1] == BLOCK // 2):  # fmt: skip
        return dequantize_mxfp4(blocks, scales, dtype)  # also raises on bad shapes and dtypes
    from osstune.kernels import _mxfp4_dequant_triton as kern

    out = torch.empty(*scales.shape[:-1], scales.shape[-1] * BLOCK, dtype=dtype, device=blocks.device)
    t = scales.numel()
    if t:
        kern._dequant_groups[(-(-t // _GROUPS),)](blocks, scales, out, t, GROUPS=_GROUPS, num_warps=4)
    return out


class MXFP4DenseLinear(torch.autograd.Function):
    """`MXFP4DenseLinear.apply(x (M, in), blocks (out, G, 16), scales (out, G))` -> (M, out) in x's
    dtype: W decoded to x's dtype for the product (module docstring); dx only."""

    @staticmethod
    def forward(ctx, x, blocks, scales):
        ctx.save_for_backward(blocks, scales)
        return x @ dequantize_mxfp4_fast(blocks, scales, x.dtype).t()

    @staticmethod
    def backward(ctx, dy):
        blocks, scales = ctx.saved_tensors
        dx = dy @ dequantize_mxfp4_fast(blocks, scales, dy.dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None
