"""One-launch MXFP4 decoding (osstune.kernels.mxfp4_dequant) against the plain-PyTorch decoder
`osstune.quant.mxfp4.dequantize_mxfp4`, and MXFP4DenseLinear against F.linear on that decoded weight.

CPU cases run the Triton kernel under the interpreter (conftest sets TRITON_INTERPRET=1); GPU cases
compile it, at the gpt-oss-20b attention shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from osstune.kernels._backend import triton_interpreter_problem
from osstune.kernels.mxfp4_dequant import MXFP4DenseLinear, dequantize_mxfp4_fast
from osstune.quant.mxfp4 import dequantize_mxfp4


def _packed(shape, gen, device="cpu", scale_range=(0, 255)):
    """Random packed weights over every code, scales over `scale_range` (255, E8M0's NaN, left out)."""
    *lead, g = shape
    blocks = torch.randint(0, 256, (*lead, g, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(*scale_range, (*lead, g), generator=gen, dtype=torch.uint8)
    return blocks.to(device), scales.to(device)


@pytest.mark.skipif(triton_interpreter_problem() is not None, reason=str(triton_interpreter_problem()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equals_the_reference_cpu(dtype):
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter case")
    gen = torch.Generator().manual_seed(3)
    # The interpreter's float32 -> bf16 conversion flushes subnormals to zero (a compiled kernel's does
    # not: the GPU case covers every scale), so bf16 outputs here start at scale 2, the normal range.
    low = 0 if dtype == torch.float32 else 2
    blocks, scales = _packed((3, 5, 67), gen, scale_range=(low, 255))  # 1,005 groups: not whole programs
    scales[0, 0, :2] = torch.tensor([low, 254], dtype=torch.uint8)  # the extremes (0: a subnormal scale)
    got = dequantize_mxfp4_fast(blocks, scales, dtype)
    want = dequantize_mxfp4(blocks, scales, dtype)
    assert got.shape == want.shape == (3, 5, 67 * 32) and got.dtype == dtype
    assert torch.equal(got, want)


def test_bad_inputs_fall_back_to_the_reference_and_its_errors():
    blocks, scales = torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not match scales"):
        dequantize_mxfp4_fast(blocks, scales)


@pytest.mark.skipif(triton_interpreter_problem() is not None, reason=str(triton_interpreter_problem()))
def test_dense_linear_forward_and_input_gradient_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter case")
    gen = torch.Generator().manual_seed(4)
    blocks, scales = _packed((24, 3), gen, scale_range=(118, 130))  # W (24, 96)
    x = torch.randn(10, 96, generator=gen, requires_grad=True)
    dy = torch.randn(10, 24, generator=gen)
    y = MXFP4DenseLinear.apply(x, blocks, scales)
    (dx,) = torch.autograd.grad(y, x, dy)
    x_ref = x.detach().clone().requires_grad_()
    w = dequantize_mxfp4(blocks, scales, torch.float64)
    y_ref = F.linear(x_ref.double(), w)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx_ref.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_decode_and_dense_linear_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(5)
    blocks, scales = _packed((5120, 90), gen)  # gpt-oss-20b's q/k/v side by side, in = 2,880
    blocks, scales = blocks.cuda(), scales.cuda()
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(dequantize_mxfp4_fast(blocks, scales, dtype), dequantize_mxfp4(blocks, scales, dtype))
    blocks, scales = _packed((5120, 90), gen, scale_range=(118, 124))
    blocks, scales = blocks.cuda(), scales.cuda()
    x = torch.randn(2048, 2880, generator=gen).cuda().bfloat16().requires_grad_()
    dy = torch.randn(2048, 5120, generator=gen).cuda().bfloat16()
    y = MXFP4DenseLinear.apply(x, blocks, scales)
    (dx,) = torch.autograd.grad(y, x, dy)
    w = dequantize_mxfp4(blocks, scales, torch.float32)
    y_ref, dx_ref = x.float() @ w.t(), dy.float() @ w
    for got, ref in ((y, y_ref), (dx, dx_ref)):  # bf16 operands, float32 accumulation, bf16 result
        assert ((got.float() - ref).norm() / ref.norm()).item() < 1e-2
