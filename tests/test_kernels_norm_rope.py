"""Fused residual add + RMSNorm and in-place rotary (the decode step's glue) against their references,
and the references against the model's own RMSNorm and apply_rotary."""

from __future__ import annotations

import pytest
import torch

from osstune.config import preset
from osstune.kernels._backend import triton_interpreter_problem
from osstune.kernels.norm_rope import add_rms_norm, add_rms_norm_ref, rope_qk_, rope_qk_ref
from osstune.model import RMSNorm, Rotary, apply_rotary

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or triton_interpreter_problem() is not None, reason="CPU interpreter test"
)
gpu = pytest.mark.gpu


def test_references_equal_the_model():
    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-5)
    norm.weight.data.normal_()
    x, r = torch.randn(7, 48), torch.randn(7, 48)
    out, s = add_rms_norm_ref(x, norm.weight, 1e-5, r)
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)
    torch.testing.assert_close(out, norm(x + r), rtol=0, atol=0)
    cfg = preset("tiny")
    rot = Rotary(cfg)
    pos = torch.randint(0, 5000, (7,))
    q, k = torch.randn(7, 4, 32), torch.randn(7, 2, 32)
    cos, sin = rot(pos[None])
    rq, rk = rope_qk_ref(q.clone(), k.clone(), pos, rot.inv_freq, rot.scale)
    torch.testing.assert_close(rq, apply_rotary(q[None], cos, sin)[0], rtol=0, atol=0)
    torch.testing.assert_close(rk, apply_rotary(k[None], cos, sin)[0], rtol=0, atol=0)


def _check(device, dtype, n, h, n_q, n_k, d, tol):
    torch.manual_seed(n + h)
    x = torch.randn(n, h, device=device, dtype=dtype)
    r = torch.randn(n, h, device=device, dtype=dtype)
    w = torch.randn(h, device=device, dtype=dtype)
    for res in (None, r):
        got, s = add_rms_norm(x, w, 1e-5, res)
        ref, s_ref = add_rms_norm_ref(x, w, 1e-5, res)
        torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
        torch.testing.assert_close(got, ref, **tol)
    rot = Rotary(preset("gpt-oss-20b").replace(head_dim=d)).to(device)
    pos = torch.randint(0, 131072, (n,), device=device)
    qkv = torch.randn(n, (n_q + 2 * n_k) * d, device=device, dtype=dtype)  # q/k as strided views, like the runner's
    q = qkv[:, : n_q * d].view(n, n_q, d)
    k = qkv[:, n_q * d : (n_q + n_k) * d].view(n, n_k, d)
    q_ref, k_ref = rope_qk_ref(q.clone(), k.clone(), pos, rot.inv_freq, rot.scale)
    v_before = qkv[:, (n_q + n_k) * d :].clone()
    rope_qk_(q, k, pos, rot.inv_freq, rot.scale)
    # cos/sin of angles up to 1.3e5 rad in float32: Triton's and torch's cos may differ in the last bits.
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    assert torch.equal(qkv[:, (n_q + n_k) * d :], v_before), "v was touched"


@needs_interpreter
@pytest.mark.parametrize("n,h,n_q,n_k,d", [(1, 48, 4, 2, 32), (5, 130, 8, 1, 16)])
def test_kernels_match_on_cpu_interpreter(n, h, n_q, n_k, d):
    _check("cpu", torch.float32, n, h, n_q, n_k, d, dict(rtol=1e-5, atol=1e-5))


@gpu
@pytest.mark.parametrize("n", [1, 7, 256])
def test_kernels_match_on_gpu_real_shapes(n):
    _check("cuda", torch.float32, n, 2880, 64, 8, 64, dict(rtol=1e-5, atol=1e-4))
    # bf16 storage: one rounding of the same float32 value may land one ulp apart.
    _check("cuda", torch.bfloat16, n, 2880, 64, 8, 64, dict(rtol=1.6e-2, atol=1e-2))
