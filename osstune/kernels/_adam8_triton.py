"""Triton body of the 8-bit AdamW step (launcher and plain-PyTorch reference in osstune/kernels/adam8.py).

One launch updates every tensor of the optimizer: one program per quantization block of BLOCK
values. A program finds its tensor through a block -> tensor table, reads that tensor's master and
gradient through 64-bit addresses (the pointer table of Triton's grouped-GEMM tutorial: the tensors
are separate allocations), decodes both moments, does the AdamW step in float32 (the gradient
widened and scaled by the clipping factor as it is read), writes the master and re-encodes the
moments to the nearest code of their maps. Tensors with no gradient this step
have a null gradient address: their programs store nothing.

Shape legend: B blocks over all tensors, T tensors, BLOCK values a block, 256 codes, 255 midpoints.
"""

import triton
import triton.language as tl


@triton.jit
def _nearest_code(x, Mid, BLOCK: tl.constexpr):
    """The number of midpoints below x: the nearest code of a sorted 256-entry map whose midpoints
    between neighbours are Mid (255,), the lower code at an exact tie (torch.bucketize's rule)."""
    code = tl.zeros([BLOCK], dtype=tl.int32)
    for s in tl.static_range(8):
        cand = code + (128 >> s)
        code = tl.where(tl.load(Mid + cand - 1) < x, cand, code)
    return code


@triton.jit
def _adamw8_blocks(
    Owner, FirstBlock, Numel, MasterAddr, GradAddr, GradScale, StepSize, Bc2Sqrt,  # (B,) int32, (T,) x2, (), (T,) x2
    MCodes, MAbsmax, VCodes, VAbsmax,  # (B * BLOCK,) int8, (B,) float32, (B * BLOCK,) uint8, (B,) float32
    SignedMap, SignedMid, UnsignedMap, UnsignedMid,  # (256,), (255,) float32
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    GRAD_KIND: tl.constexpr,  # the gradients' element type: 0 float32, 1 bf16, 2 fp16
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(Owner + pid)
    grad_addr = tl.load(GradAddr + t)
    live = grad_addr != 0
    w_ptr = tl.load(MasterAddr + t).to(tl.pointer_type(tl.float32))
    if GRAD_KIND == 1:
        g_ptr = grad_addr.to(tl.pointer_type(tl.bfloat16))
    elif GRAD_KIND == 2:
        g_ptr = grad_addr.to(tl.pointer_type(tl.float16))
    else:
        g_ptr = grad_addr.to(tl.pointer_type(tl.float32))
    lanes = tl.arange(0, BLOCK)
    offs = (pid - tl.load(FirstBlock + t)) * BLOCK + lanes  # int64: positions in the tensor
    # A tensor without a gradient has no live lanes (a bound of 0, not `& live`: Triton 3.9's CPU
    # interpreter makes int64 of a tensor-and-scalar `&`, which its masked load refuses).
    in_tensor = offs < tl.where(live, tl.load(Numel + t), 0)
    w = tl.load(w_ptr + offs, mask=in_tensor, other=0.0)
    # Widened, then scaled by the clipping factor: what scaling a float32 copy first gives.
    g = tl.load(g_ptr + offs, mask=in_tensor, other=0.0).to(tl.float32) * tl.load(GradScale)

    codes = pid.to(tl.int64) * BLOCK + lanes
    # The padding past a tensor's end holds code 0 (= 0.0) in both maps and a zero gradient: it
    # stays zero, so it never sets a block's absmax.
    m = tl.load(SignedMap + (tl.load(MCodes + codes).to(tl.int32) + 128)) * tl.load(MAbsmax + pid)
    v = tl.load(UnsignedMap + tl.load(VCodes + codes).to(tl.int32)) * tl.load(VAbsmax + pid)

    # torch.optim.AdamW's order: decoupled decay, moments, bias-corrected step. sqrt_rn/div_rn: the
    # correctly rounded operations of the CPU path (Triton's default ones are approximate on CUDA).
    w = w * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), tl.load(Bc2Sqrt + t)) + eps
    w = w - tl.load(StepSize + t) * tl.math.div_rn(m, denom)
    tl.store(w_ptr + offs, w, mask=in_tensor)

    m_absmax = tl.max(tl.abs(m), 0)
    v_absmax = tl.max(v, 0)
    m_code = _nearest_code(tl.math.div_rn(m, tl.where(m_absmax > 0, m_absmax, 1.0)), SignedMid, BLOCK)
    v_code = _nearest_code(tl.math.div_rn(v, tl.where(v_absmax > 0, v_absmax, 1.0)), UnsignedMid, BLOCK)
    # A positive second moment never rounds to 0: that would divide its first moment by eps alone
    # (the zero-point problem of Li et al. 2023, "Memory Efficient Optimizers with 4-bit States").
    v_code = tl.where((v > 0) & (v_code == 0), 1, v_code)
    keep = lanes < tl.where(live, BLOCK, 0)  # (see in_tensor)
    tl.store(MCodes + codes, (m_code - 128).to(tl.int8), mask=keep)
    tl.store(VCodes + codes, v_code.to(tl.uint8), mask=keep)
    tl.store(MAbsmax + pid, m_absmax, mask=live)
    tl.store(VAbsmax + pid, v_absmax, mask=live)
