"""Grouped-GEMM experts (osstune.kernels.moe) against the per-expert loop, forward and backward.

Ragged loads: a random routing, one where an expert receives no token, one where every token picks
the same expert. CPU cases run the grouped-GEMM loop fallback with the SwiGLU under Triton's
interpreter and with the plain-PyTorch SwiGLU; GPU cases run torch's grouped GEMM in bf16.
Truth is the loop reference in float64 on the same (rounded) inputs.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from osstune.kernels._backend import triton_interpreter_problem

# TRITON_INTERPRET=1 on CPU: set for the whole session in conftest.py.

from osstune.kernels.moe import (
    ExpertLoRA,
    MoEInputError,
    clamped_swiglu_ref,
    grouped_mm,
    grouped_mm_loop,
    moe_experts,
    moe_experts_mxfp4,
    moe_experts_ref,
)
from osstune.model import clamped_swiglu

ALPHA, LIMIT = 1.702, 7.0
# (N tokens, H, I, E, k, LoRA rank or None, load)
CPU_CASES = [
    (37, 16, 24, 5, 2, None, "random"),
    (29, 16, 8, 4, 2, 3, "empty_expert"),
    (21, 8, 16, 6, 3, 4, "one_expert_all"),
    (13, 1040, 8, 4, 2, None, "random"),  # H over one 1024-wide combine tile
]
GPU_CASES = [
    (300, 64, 96, 8, 4, 8, "random"),
    (257, 128, 64, 16, 4, 5, "empty_expert"),
    (190, 64, 64, 8, 2, 16, "one_expert_all"),
    (1024, 256, 384, 32, 4, 8, "random"),
]
# Relative L2 error vs float64. float32 stays near 1e-6. In bf16 the gradients that pass through the
# clamped SwiGLU (x, gate_up, its bias, the gate_up LoRA) reach ~5%: a gate or up value rounded to the
# other side of the clamp bound (+-7) switches its derivative on or off. The per-expert loop run in
# bf16 shows the same error, so bf16 results must stay within TOL or within 1.5x that loop's error.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
BF16_VS_LOOP = 1.5


def _params(cpu_cases=None, gpu_cases=None):
    """(device, dtype, case, use_triton): on the CPU the Triton kernels (interpreter) and the
    plain-PyTorch fallback, on CUDA the kernels only (the fallback is the CPU's; a CUDA "torch" case
    would be skipped on every machine)."""
    out = []
    for c in CPU_CASES if cpu_cases is None else cpu_cases:
        out += [pytest.param("cpu", torch.float32, c, t, id=f"cpu-{c}-{'triton' if t else 'torch'}") for t in (True, False)]
    for c in GPU_CASES if gpu_cases is None else gpu_cases:
        out.append(pytest.param("cuda", torch.bfloat16, c, True, marks=pytest.mark.gpu, id=f"cuda-{c}-triton"))
    return out


def _routing(n: int, e: int, k: int, load: str, gen: torch.Generator):
    logits = torch.randn(n, e, generator=gen, dtype=torch.float64)
    if load == "empty_expert":
        logits[:, 1] = float("-inf")
    elif load == "one_expert_all":
        logits[:, e - 1] += 100.0
    top, idx = logits.topk(k, dim=-1)
    return idx, top.softmax(dim=-1)


def _problem(case, gen):
    n, h, i, e, k, rank, load = case
    scale = 0.1
    x = torch.randn(n, h, generator=gen, dtype=torch.float64)
    idx, weights = _routing(n, e, k, load, gen)
    tensors = {
        "x": x,
        "weights": weights,
        # Large enough that some gate/up values leave the clamp range [-7, 7].
        "gate_up": torch.randn(e, h, 2 * i, generator=gen, dtype=torch.float64) * 3 / h**0.5 * 3,
        "gate_up_bias": torch.randn(e, 2 * i, generator=gen, dtype=torch.float64),
        "down": torch.randn(e, i, h, generator=gen, dtype=torch.float64) / i**0.5,
        "down_bias": torch.randn(e, h, generator=gen, dtype=torch.float64),
    }
    if rank:
        tensors |= {
            "a_gu": torch.randn(e, h, rank, generator=gen, dtype=torch.float64) / h**0.5,
            "b_gu": torch.randn(e, rank, 2 * i, generator=gen, dtype=torch.float64),
            "a_d": torch.randn(e, i, rank, generator=gen, dtype=torch.float64) / i**0.5,
            "b_d": torch.randn(e, rank, h, generator=gen, dtype=torch.float64),
        }
    return idx, tensors, scale


def _call(fn, idx, t, scale):
    lora = ExpertLoRA(t["a_gu"], t["b_gu"], t["a_d"], t["b_d"], scale) if "a_gu" in t else None
    return fn(t["x"], idx, t["weights"], t["gate_up"], t["gate_up_bias"], t["down"], t["down_bias"], ALPHA, LIMIT, lora)


def _skip_unless_runnable(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("CPU cases run on machines without a GPU")


@pytest.mark.parametrize("device,dtype,case,use_triton", _params())
def test_matches_loop_reference(device, dtype, case, use_triton, monkeypatch):
    _skip_unless_runnable(device)
    if device == "cpu" and use_triton and triton_interpreter_problem():
        pytest.skip(triton_interpreter_problem())
    if not use_triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    idx, t, scale = _problem(case, gen)
    grad_out = torch.randn(case[0], case[1], generator=gen, dtype=torch.float64)

    want_leaves = {name: x.to(dtype).double().requires_grad_() for name, x in t.items()}
    want = _call(moe_experts_ref, idx, want_leaves, scale)
    want_grads = torch.autograd.grad(want, list(want_leaves.values()), grad_out)

    leaves = {name: x.to(device=device, dtype=dtype).requires_grad_() for name, x in t.items()}
    idx_dev, grad_dev = idx.to(device), grad_out.to(device=device, dtype=dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the fast path must never wait on the device
    try:
        got = _call(moe_experts, idx_dev, leaves, scale)
        grads = torch.autograd.grad(got, list(leaves.values()), grad_dev)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)

    baseline = {}
    if dtype != torch.float32:
        loop_leaves = {name: x.to(device=device, dtype=dtype).requires_grad_() for name, x in t.items()}
        loop_out = _call(moe_experts_ref, idx_dev, loop_leaves, scale)
        loop_grads = torch.autograd.grad(loop_out, list(loop_leaves.values()), grad_dev)
        for name, g, w in zip(["out", *leaves], (loop_out, *loop_grads), (want, *want_grads)):
            baseline[name] = ((g.double().cpu() - w).norm() / w.norm()).item()

    _assert_close_to_float64(["out", *leaves], (got, *grads), (want, *want_grads), dtype, baseline)



def _assert_close_to_float64(names, got, want, dtype, baseline):
    """Each result within TOL[dtype] of the float64 truth, or within BF16_VS_LOOP times the error of
    the per-expert loop run in the same dtype (`baseline`, by name) when that is larger."""
    for name, g, w in zip(names, got, want):
        g = g.double().cpu()
        assert torch.isfinite(g).all(), name
        err = ((g - w).norm() / w.norm()).item()
        bound = max(TOL[dtype], BF16_VS_LOOP * baseline.get(name, 0.0))
        assert err < bound, f"{name}: relative error {err:.2e} >= {bound:.1e} (bf16 loop: {baseline.get(name)})"


def test_ref_equals_model_experts():
    """moe_experts_ref computes what osstune.model's Experts module does (no LoRA), and its SwiGLU
    is the model's."""
    from osstune.config import ModelConfig
    from osstune.model import Experts

    gen = torch.Generator().manual_seed(3)
    cfg = ModelConfig(num_hidden_layers=1, num_local_experts=6, num_experts_per_tok=2, hidden_size=16, intermediate_size=8)
    experts = Experts(cfg).double()
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(19, 16, generator=gen, dtype=torch.float64)
    idx, weights = _routing(19, 6, 2, "random", gen)
    want = experts(x, idx, weights)
    got = moe_experts_ref(x, idx, weights, experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj,
                          experts.down_proj_bias, cfg.swiglu_alpha, cfg.swiglu_limit)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    z = torch.randn(5, 12, generator=gen, dtype=torch.float64) * 8
    torch.testing.assert_close(clamped_swiglu_ref(z, ALPHA, LIMIT), clamped_swiglu(z, ALPHA, LIMIT))


@pytest.mark.gpu
def test_grouped_mm_matches_loop_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(100, 64, generator=gen).cuda().bfloat16()
    b = torch.randn(5, 64, 40, generator=gen).cuda().bfloat16()
    offs = torch.tensor([0, 30, 30, 99, 100], dtype=torch.int32, device="cuda")  # empty first and third
    torch.testing.assert_close(grouped_mm(a, b, offs).float(), grouped_mm_loop(a, b, offs).float(), rtol=2e-2, atol=2e-2)


def test_bad_shapes_raise():
    x = torch.randn(4, 8)
    idx = torch.zeros(4, 2, dtype=torch.long)
    w = torch.ones(4, 2)
    gu, gub, dn, dnb = torch.randn(3, 8, 12), torch.randn(3, 12), torch.randn(3, 6, 8), torch.randn(3, 8)
    with pytest.raises(MoEInputError, match="down has shape"):
        moe_experts(x, idx, w, gu, gub, torch.randn(3, 5, 8), dnb, ALPHA, LIMIT)
    with pytest.raises(MoEInputError, match="lora.b_d"):
        lora = ExpertLoRA(torch.randn(3, 8, 2), torch.randn(3, 2, 12), torch.randn(3, 6, 2), torch.randn(3, 3, 8), 1.0)
        moe_experts(x, idx, w, gu, gub, dn, dnb, ALPHA, LIMIT, lora)
    with pytest.raises(MoEInputError, match="idx and weights"):
        moe_experts(x, idx[:3], w, gu, gub, dn, dnb, ALPHA, LIMIT)


# ------------------------------------------------------------------ MXFP4 (QLoRA) experts

# OCP MX v1.0 e2m1 values by 4-bit code (sign bit 3), decoded here independently of osstune.quant.
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
_E2M1 = torch.tensor(_E2M1 + [-v for v in _E2M1], dtype=torch.float64)
# (N tokens, H, I, E, k, LoRA rank or None, load); H and I multiples of the 32-value MXFP4 block.
MXFP4_CPU_CASES = [
    (23, 64, 32, 4, 2, 3, "random"),
    (17, 32, 64, 5, 2, None, "empty_expert"),
    (11, 32, 32, 3, 2, 4, "one_expert_all"),
]
MXFP4_GPU_CASES = [(1024, 256, 384, 32, 4, 8, "random"), (300, 128, 96, 8, 4, 5, "empty_expert")]


def _decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(E, N, G, 16) uint8 + (E, N, G) uint8 -> (E, N, 32 G) float64: low nibble first, x 2**(s - 127)."""
    b = blocks.long()
    codes = torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)  # (E, N, G, 32)
    w = _E2M1[codes] * torch.exp2(scales.double() - 127)[..., None]
    return w.flatten(-2)


def _mxfp4_problem(case, gen):
    n, h, i, e, k, rank, load = case
    idx, t, scale = _problem(case, gen)
    packed = {
        "gate_up_blocks": torch.randint(0, 256, (e, 2 * i, h // 32, 16), generator=gen, dtype=torch.uint8),
        # Scales 2**-6..2**-2: some gate/up values leave the clamp range [-7, 7].
        "gate_up_scales": torch.randint(121, 126, (e, 2 * i, h // 32), generator=gen, dtype=torch.uint8),
        "down_blocks": torch.randint(0, 256, (e, h, i // 32, 16), generator=gen, dtype=torch.uint8),
        "down_scales": torch.randint(118, 123, (e, h, i // 32), generator=gen, dtype=torch.uint8),
    }
    del t["gate_up"], t["down"]
    return idx, t, packed, scale


def _call_mxfp4(fn, idx, t, packed, scale, dtype):
    lora = ExpertLoRA(t["a_gu"], t["b_gu"], t["a_d"], t["b_d"], scale) if "a_gu" in t else None
    if fn is moe_experts_ref:  # the loop over the decoded weights, in (in, out) orientation
        gate_up = _decode(packed["gate_up_blocks"].cpu(), packed["gate_up_scales"].cpu()).transpose(1, 2)
        down = _decode(packed["down_blocks"].cpu(), packed["down_scales"].cpu()).transpose(1, 2)
        device = t["x"].device
        return fn(t["x"], idx, t["weights"], gate_up.to(device, dtype), t["gate_up_bias"], down.to(device, dtype),
                  t["down_bias"], ALPHA, LIMIT, lora)
    return fn(t["x"], idx, t["weights"], packed["gate_up_blocks"], packed["gate_up_scales"], t["gate_up_bias"],
              packed["down_blocks"], packed["down_scales"], t["down_bias"], ALPHA, LIMIT, lora)


@pytest.mark.parametrize("device,dtype,case,use_triton", _params(MXFP4_CPU_CASES, MXFP4_GPU_CASES))
def test_mxfp4_matches_loop_over_decoded_weights(device, dtype, case, use_triton, monkeypatch):
    """moe_experts_mxfp4 vs the per-expert loop over independently decoded weights: output and the
    gradients of x, routing weights, biases and LoRA factors."""
    _skip_unless_runnable(device)
    if device == "cpu" and use_triton and triton_interpreter_problem():
        pytest.skip(triton_interpreter_problem())
    if not use_triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    idx, t, packed, scale = _mxfp4_problem(case, gen)
    grad_out = torch.randn(case[0], case[1], generator=gen, dtype=torch.float64)

    want_leaves = {name: x.to(dtype).double().requires_grad_() for name, x in t.items()}
    want = _call_mxfp4(moe_experts_ref, idx, want_leaves, packed, scale, torch.float64)
    want_grads = torch.autograd.grad(want, list(want_leaves.values()), grad_out)

    leaves = {name: x.to(device=device, dtype=dtype).requires_grad_() for name, x in t.items()}
    packed_dev = {name: p.to(device) for name, p in packed.items()}
    idx_dev, grad_dev = idx.to(device), grad_out.to(device=device, dtype=dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the fast path must never wait on the device
    try:
        got = _call_mxfp4(moe_experts_mxfp4, idx_dev, leaves, packed_dev, scale, dtype)
        grads = torch.autograd.grad(got, list(leaves.values()), grad_dev)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)

    baseline = {}
    if dtype != torch.float32:  # the same loop in bf16 on the device: the error bf16 itself costs
        loop_leaves = {name: x.to(device=device, dtype=dtype).requires_grad_() for name, x in t.items()}
        loop_out = _call_mxfp4(moe_experts_ref, idx_dev, loop_leaves, packed, scale, dtype)
        loop_grads = torch.autograd.grad(loop_out, list(loop_leaves.values()), grad_dev)
        for name, g, w in zip(["out", *leaves], (loop_out, *loop_grads), (want, *want_grads)):
            baseline[name] = ((g.double().cpu() - w).norm() / w.norm()).item()

    _assert_close_to_float64(["out", *leaves], (got, *grads), (want, *want_grads), dtype, baseline)


def test_mxfp4_bad_shapes_raise():
    x, idx, w = torch.randn(4, 64), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2)
    u8 = dict(dtype=torch.uint8)
    gub, gus = torch.zeros(3, 64, 2, 16, **u8), torch.zeros(3, 64, 2, **u8)  # I = 32
    db, ds = torch.zeros(3, 64, 1, 16, **u8), torch.zeros(3, 64, 1, **u8)
    gu_bias, d_bias = torch.zeros(3, 64), torch.zeros(3, 64)
    moe_experts_mxfp4(x, idx, w, gub, gus, gu_bias, db, ds, d_bias, ALPHA, LIMIT)  # fits
    with pytest.raises(MoEInputError, match="down_scales has shape"):
        moe_experts_mxfp4(x, idx, w, gub, gus, gu_bias, db, ds[:, :32], d_bias, ALPHA, LIMIT)
    with pytest.raises(MoEInputError, match="must be uint8"):
        moe_experts_mxfp4(x, idx, w, gub.float(), gus, gu_bias, db, ds, d_bias, ALPHA, LIMIT)
    with pytest.raises(MoEInputError, match="down_bias"):
        moe_experts_mxfp4(x, idx, w, gub, gus, gu_bias, db, ds, d_bias[:, :8], ALPHA, LIMIT)
