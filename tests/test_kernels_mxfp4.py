"""MXFP4 grouped GEMMs (osstune.kernels.mxfp4_gemm) against dequantize-then-matmul, forward and input
gradient.

Truth: the weights decoded here from the e2m1 table and E8M0 rule of the OCP MX spec (float64, not
through osstune's decoder, which is checked against it), then one float64 matmul per expert. Random
bytes cover every e2m1 code; scales are drawn from 115..130 (what gpt-oss checkpoints hold). Ragged
loads: random, experts with no row (first and last included), every row on one expert, rows past
offs[E - 1]; M, N and K are not multiples of the tiles. CPU cases run the Triton kernels under
Triton's interpreter (float32 only: its tl.dot multiplies bf16 bit patterns) and the plain-PyTorch
reference; GPU cases run gpt-oss-20b's real expert shapes in bf16.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from osstune.kernels._backend import triton_interpreter_problem, triton_interpreting

# TRITON_INTERPRET=1 on CPU: set for the whole session in conftest.py.

from osstune.kernels import mxfp4_gemm as mx
from osstune.kernels.mxfp4_gemm import (
    MXFP4GroupedLinear,
    MXFP4InputError,
    MXFP4Tiles,
    PAIR_DECODE_SCALES,
    check_scales,
    mxfp4_grouped_mm,
    mxfp4_grouped_mm_t,
)
from osstune.quant.mxfp4 import dequantize_mxfp4

# OCP MX v1.0, e2m1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1 = E2M1 + [-v for v in E2M1]

# Relative L2 error vs float64. float32: float32 accumulation only. bf16: the inputs are exact in
# bf16, so the error is the output's rounding to bf16 (<= 2**-9 relative per element) plus float32
# accumulation.
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3}

# (name, E, N, K, M, load, tiles): tiles None = the launcher's default for the dtype.
CPU_CASES = [
    ("random", 4, 80, 96, 45, "random", None),  # N = 2.5 tiles of 32
    ("empty", 5, 48, 160, 37, "empty", MXFP4Tiles(16, 32, 64, num_warps=4, swap=True)),  # K = 2.5 tiles
    ("one_expert", 3, 64, 64, 29, "one_expert_all", MXFP4Tiles(16, 16, 32, num_warps=4)),
    ("tail", 4, 32, 96, 30, "tail", MXFP4Tiles(16, 32, 64, num_warps=4)),
    ("swap_t", 3, 96, 64, 33, "random", MXFP4Tiles(16, 64, 32, num_warps=4, swap=True)),  # N = 1.5 tiles
]
H_20B = I_20B = 2880
E_20B, ROWS_20B = 32, 2048 * 4  # 2048 tokens x top-4
GPU_CASES = [
    ("gate_up", E_20B, 2 * I_20B, H_20B, ROWS_20B, "router"),
    ("down", E_20B, H_20B, I_20B, ROWS_20B, "router"),
    ("down_empty", E_20B, H_20B, I_20B, ROWS_20B, "empty"),
    ("small_odd", 8, 96, 160, 1000, "tail"),
]


def _packed(e: int, n: int, k: int, gen: torch.Generator, device="cpu", lo: int = 115, hi: int = 130):
    blocks = torch.randint(0, 256, (e, n, k // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(lo, hi + 1, (e, n, k // 32), generator=gen, dtype=torch.uint8)
    return blocks.to(device), scales.to(device)


def _dense_truth(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(E, N, K/32, 16) bytes + (E, N, K/32) scales -> (E, N, K) float64, low nibble first."""
    table = torch.tensor(E2M1, dtype=torch.float64, device=blocks.device)
    b = blocks.long()
    codes = torch.stack((b % 16, b // 16), dim=-1).flatten(-2)  # (E, N, G, 32)
    values = table[codes] * torch.exp2(scales.double() - 127).unsqueeze(-1)
    return values.flatten(-2)


def _counts(m: int, e: int, load: str, gen: torch.Generator) -> list[int]:
    if load == "one_expert_all":
        return [m if i == e // 2 else 0 for i in range(e)]
    if load == "router":  # top-4 of random router logits, as gpt-oss routes
        idx = torch.randn(m // 4, e, generator=gen).topk(4, dim=-1).indices
        return torch.bincount(idx.flatten(), minlength=e).tolist()
    used = m - 5 if load == "tail" else m  # "tail": 5 rows after offs[E - 1]
    probs = torch.rand(e, generator=gen) + 0.2
    if load == "empty":
        probs[0] = probs[-1] = 0.0
        probs[e // 2] = 0.0
    counts = torch.bincount(torch.multinomial(probs, used, replacement=True, generator=gen), minlength=e)
    return counts.tolist()


def _offs(counts: list[int], device) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def _truth(a: torch.Tensor, w: torch.Tensor, counts: list[int], transpose: bool) -> torch.Tensor:
    """Per expert: a[rows] @ W_e^T (forward) or a[rows] @ W_e (transpose), float64; other rows 0."""
    a = a.double()
    out = torch.zeros(a.shape[0], w.shape[2] if transpose else w.shape[1], dtype=torch.float64, device=a.device)
    start = 0
    for e, c in enumerate(counts):
        rows = slice(start, start + c)
        out[rows] = a[rows] @ (w[e] if transpose else w[e].t())
        start += c
    return out


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _skip_unless(device: str, use_triton: bool) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if device == "cpu" and use_triton:
        # conftest sets TRITON_INTERPRET=1 only where there is no GPU; with it off, a CPU tensor takes
        # the reference path and the case would test the wrong thing (and fail its path check).
        if not triton_interpreting():
            pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest on machines without a GPU)")
        if triton_interpreter_problem():
            pytest.skip(triton_interpreter_problem())


def _cpu_params():
    out = []
    for case in CPU_CASES:
        out.append(pytest.param(torch.float32, case, True, id=f"triton-interp-{case[0]}"))
    for dtype in (torch.float32, torch.bfloat16):
        out.append(pytest.param(dtype, CPU_CASES[1], False, id=f"reference-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("dtype,case,use_triton", _cpu_params())
def test_forward_and_input_gradient_cpu(dtype, case, use_triton, monkeypatch):
    _skip_unless("cpu", use_triton)
    if not use_triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, e, n, k, m, load, tiles = case
    gen = torch.Generator().manual_seed(zlib.crc32(case[0].encode()))
    blocks, scales = _packed(e, n, k, gen)
    w = _dense_truth(blocks, scales)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float64), w)  # osstune's decoder = the spec
    counts = _counts(m, e, load, gen)
    offs = _offs(counts, "cpu")
    x = torch.randn(m, k, generator=gen).to(dtype)
    dy = torch.randn(m, n, generator=gen).to(dtype)
    assert mx._use_triton(x) == use_triton  # the case runs the path it names

    y = mxfp4_grouped_mm(x, blocks, scales, offs, tiles)
    dx = mxfp4_grouped_mm_t(dy, blocks, scales, offs, tiles)
    assert y.dtype == dx.dtype == dtype and y.shape == (m, n) and dx.shape == (m, k)
    assert _rel(y, _truth(x, w, counts, transpose=False)) < TOL[dtype]
    assert _rel(dx, _truth(dy, w, counts, transpose=True)) < TOL[dtype]
    if load == "tail":
        assert not y[-5:].any() and not dx[-5:].any()


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton-interp", "reference"])
def test_autograd_function_cpu(use_triton, monkeypatch):
    _skip_unless("cpu", use_triton)
    if not use_triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(7)
    e, n, k, m = 3, 48, 64, 26
    blocks, scales = _packed(e, n, k, gen)
    w = _dense_truth(blocks, scales)
    counts = _counts(m, e, "random", gen)
    x = torch.randn(m, k, generator=gen, requires_grad=True)
    g = torch.randn(m, n, generator=gen)
    y = MXFP4GroupedLinear.apply(x, blocks, scales, _offs(counts, "cpu"))
    (y * g).sum().backward()
    assert _rel(y.detach(), _truth(x.detach(), w, counts, transpose=False)) < TOL[torch.float32]
    assert _rel(x.grad, _truth(g, w, counts, transpose=True)) < TOL[torch.float32]


def _decode_exact(device: str, dtype: torch.dtype, lo: int, hi: int):
    """x = identity rows routed to expert 1: y = W_1^T must equal the decoded weights bit for bit, over
    every e2m1 code and scales across the decoder's whole exact range lo..hi (both ends included)."""
    gen = torch.Generator().manual_seed(3)
    n, k = 64, 256
    blocks, scales = _packed(2, n, k, gen, device, lo=lo, hi=hi)
    scales[1, 0, :2] = torch.tensor([lo, hi], dtype=torch.uint8, device=device)
    blocks[1, :16, 0] = torch.arange(256, dtype=torch.uint8, device=device).view(16, 16)  # all byte values
    offs = torch.tensor([0, k], dtype=torch.int32, device=device)
    x = torch.eye(k, dtype=dtype, device=device)
    y = mxfp4_grouped_mm(x, blocks, scales, offs)
    want = _dense_truth(blocks, scales)[1].t().to(dtype)
    assert torch.equal(y, want)
    # The transpose product with one-hot dy picks rows of W: dx = W_1[n].
    dy = torch.eye(n, dtype=dtype, device=device)
    dx = mxfp4_grouped_mm_t(dy, blocks, scales, torch.tensor([0, n], dtype=torch.int32, device=device))
    assert torch.equal(dx, _dense_truth(blocks, scales)[1].to(dtype))


def test_decode_is_exact_cpu():
    _skip_unless("cpu", True)
    _decode_exact("cpu", torch.float32, 2, 252)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_is_exact_gpu(dtype):
    # bf16 takes the pair decoder (inline PTX), float32 the float32 one. Also the check that the
    # subnormal intermediates (codes +-0.5) survive: a flush-to-zero multiply would zero them.
    _skip_unless("cuda", True)
    lo, hi = PAIR_DECODE_SCALES if dtype == torch.bfloat16 else (2, 252)
    _decode_exact("cuda", dtype, lo, hi)


def test_check_scales_names_the_tensor_above_the_range():
    ok = torch.full((2, 4, 3), PAIR_DECODE_SCALES[1], dtype=torch.uint8)
    check_scales(ok, "w")
    bad = ok.clone()
    bad[1, 2, 0] = PAIR_DECODE_SCALES[1] + 1
    with pytest.raises(MXFP4InputError, match=r"layers\.3\.mlp\.experts\.down_proj_scales: .* 193"):
        check_scales(bad, "layers.3.mlp.experts.down_proj_scales")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_forward_and_input_gradient_gpu(case):
    _skip_unless("cuda", True)
    name, e, n, k, m, load = case
    gen = torch.Generator().manual_seed(11)
    blocks, scales = _packed(e, n, k, gen, "cuda")
    counts = _counts(m, e, load, gen)
    offs = _offs(counts, "cuda")
    x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    g = torch.randn(m, n, generator=gen).to("cuda", torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = MXFP4GroupedLinear.apply(x, blocks, scales, offs)
    torch.cuda.synchronize()
    # No dense copy of the weights: the forward allocates its output and nothing of weight size
    # (one bf16 expert of gate_up alone is 33 MB).
    assert torch.cuda.max_memory_allocated() - base <= y.numel() * y.element_size() + (1 << 20)
    (dx,) = torch.autograd.grad(y, x, g)

    # Truth one expert at a time (a float64 copy of every expert would take GBs).
    want_y = torch.zeros(m, n, dtype=torch.float64, device="cuda")
    want_dx = torch.zeros(m, k, dtype=torch.float64, device="cuda")
    start = 0
    for i, c in enumerate(counts):
        if c:
            w = _dense_truth(blocks[i : i + 1], scales[i : i + 1])[0]  # (N, K)
            want_y[start : start + c] = x[start : start + c].detach().double() @ w.t()
            want_dx[start : start + c] = g[start : start + c].double() @ w
        start += c
    assert _rel(y.detach(), want_y) < TOL[torch.bfloat16], name
    assert _rel(dx, want_dx) < TOL[torch.bfloat16], name
    if load == "tail":
        assert not y[-5:].any() and not dx[-5:].any()


@pytest.mark.gpu
def test_float32_gpu():
    _skip_unless("cuda", True)
    gen = torch.Generator().manual_seed(5)
    e, n, k, m = 6, 80, 160, 300
    blocks, scales = _packed(e, n, k, gen, "cuda")
    counts = _counts(m, e, "empty", gen)
    offs = _offs(counts, "cuda")
    x = torch.randn(m, k, generator=gen).cuda()
    dy = torch.randn(m, n, generator=gen).cuda()
    w = _dense_truth(blocks, scales)
    assert _rel(mxfp4_grouped_mm(x, blocks, scales, offs), _truth(x, w, counts, False)) < TOL[torch.float32]
    assert _rel(mxfp4_grouped_mm_t(dy, blocks, scales, offs), _truth(dy, w, counts, True)) < TOL[torch.float32]


def test_input_errors():
    gen = torch.Generator().manual_seed(0)
    blocks, scales = _packed(2, 32, 64, gen)
    offs = torch.tensor([3, 5], dtype=torch.int32)
    x = torch.randn(5, 64)
    with pytest.raises(MXFP4InputError, match="uint8"):
        mxfp4_grouped_mm(x, blocks.float(), scales, offs)
    with pytest.raises(MXFP4InputError, match=r"scales \(E, N, K/32\)"):
        mxfp4_grouped_mm(x, blocks, scales[:, :, :1], offs)
    with pytest.raises(MXFP4InputError, match="x has 32 columns"):
        mxfp4_grouped_mm(x[:, :32], blocks, scales, offs)
    with pytest.raises(MXFP4InputError, match="dy has 64 columns"):
        mxfp4_grouped_mm_t(x, blocks, scales, offs)
    with pytest.raises(MXFP4InputError, match="offs must be int32"):
        mxfp4_grouped_mm(x, blocks, scales, offs.long())
    with pytest.raises(MXFP4InputError, match=r"shape \(E,\) = \(2,\)"):
        mxfp4_grouped_mm(x, blocks, scales, offs[:1])
    with pytest.raises(MXFP4InputError, match="bfloat16 or float32"):
        mxfp4_grouped_mm(x.half(), blocks, scales, offs)
    with pytest.raises(MXFP4InputError, match="multiple of 32"):
        MXFP4Tiles(block_k=16)
    with pytest.raises(MXFP4InputError, match="powers of two"):
        MXFP4Tiles(block_m=48)
