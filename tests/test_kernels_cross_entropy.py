"""Chunked linear + cross-entropy (osstune.kernels.cross_entropy) against F.cross_entropy on the full
logits, loss and gradients wrt hidden and weight. Truth is F.cross_entropy in float64.

CPU cases run the row kernel under Triton's interpreter and the plain-PyTorch fallback; GPU cases run
the real 201,088-entry vocabulary in bf16.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from osstune.kernels._backend import triton_interpreter_problem

# TRITON_INTERPRET=1 on CPU: set for the whole session in conftest.py.

from osstune.kernels.cross_entropy import (
    CrossEntropyInputError,
    chunked_cross_entropy,
    chunked_cross_entropy_sum,
    cross_entropy_ref,
)

# (N, H, V, chunk): chunks that do not divide N; V over one 4096-wide tile so the row loop runs twice.
CPU_CASES = [(37, 16, 50, 8), (16, 8, 5000, 5)]
GPU_CASES = [(1000, 128, 201088, 384), (3000, 256, 50000, 1024)]
# Relative error vs float64. The logits are float32 from float32-accumulated GEMMs, so the loss is
# close to exact; the gradients pass through softmax - onehot rounded to bf16 (8-bit mantissa).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1.5e-2)}  # (loss, gradients)


def _params():
    out = []
    for use_triton in (True, False):
        tag = "triton" if use_triton else "torch"
        out += [pytest.param("cpu", torch.float32, c, use_triton, id=f"cpu-{tag}-{c}") for c in CPU_CASES]
    out += [pytest.param("cuda", torch.bfloat16, c, True, marks=pytest.mark.gpu, id=f"cuda-{c}") for c in GPU_CASES]
    return out


def _skip_unless_runnable(device: str, use_triton: bool) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("CPU cases run on machines without a GPU")
    if device == "cpu" and use_triton and triton_interpreter_problem():
        pytest.skip(triton_interpreter_problem())


def _problem(case, gen, ignored: float = 0.3):
    n, h, v, _ = case
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 2 / h**0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignored] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("device,dtype,case,use_triton", _params())
def test_matches_full_logits(device, dtype, case, use_triton, monkeypatch):
    _skip_unless_runnable(device, use_triton)
    if not use_triton:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    hidden, weight, labels = _problem(case, gen)
    h64, w64 = (x.to(dtype).double().requires_grad_() for x in (hidden, weight))
    want = F.cross_entropy(h64 @ w64.t(), labels)
    want_grads = torch.autograd.grad(want, (h64, w64))

    h, w = (x.to(device=device, dtype=dtype).requires_grad_() for x in (hidden, weight))
    got = chunked_cross_entropy(h, w, labels.to(device), chunk_size=case[3])
    grads = torch.autograd.grad(got, (h, w))

    loss_tol, grad_tol = TOL[dtype]
    assert abs(got.item() - want.item()) / abs(want.item()) < loss_tol
    for name, g, ref in zip(("hidden", "weight"), grads, want_grads):
        g = g.double().cpu()
        err = ((g - ref).norm() / ref.norm()).item()
        assert err < grad_tol, f"d{name}: relative error {err:.2e} >= {grad_tol:.0e}"


def test_sum_and_count_for_accumulation():
    """Two micro-batches normalised by their total trained tokens equal one batch's mean."""
    gen = torch.Generator().manual_seed(5)
    hidden, weight, labels = _problem((30, 8, 40, 7), gen)
    hidden.requires_grad_()
    s1, c1 = chunked_cross_entropy_sum(hidden[:11], weight, labels[:11], chunk_size=4)
    s2, c2 = chunked_cross_entropy_sum(hidden[11:], weight, labels[11:], chunk_size=4)
    assert int(c1 + c2) == int((labels != -100).sum())
    total = (s1 + s2) / (c1 + c2)
    (grad,) = torch.autograd.grad(total, hidden)
    h2 = hidden.detach().clone().requires_grad_()
    want = F.cross_entropy(h2 @ weight.t(), labels)
    (want_grad,) = torch.autograd.grad(want, h2)
    torch.testing.assert_close(total, want.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s1, F.cross_entropy(hidden[:11] @ weight.t(), labels[:11], reduction="sum").float())


def test_all_ignored_gives_zero_not_nan():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    loss = chunked_cross_entropy(hidden, weight, torch.full((6,), -100), chunk_size=4)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_frozen_weight_and_no_grad():
    gen = torch.Generator().manual_seed(6)
    hidden, weight, labels = (x.float() if x.is_floating_point() else x for x in _problem((12, 8, 30, 5), gen))
    hidden.requires_grad_()
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=5)
    (grad,) = torch.autograd.grad(loss, hidden)
    h2 = hidden.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(cross_entropy_ref(h2, weight, labels), h2)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels), cross_entropy_ref(hidden, weight, labels))


def test_bad_inputs_raise():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(CrossEntropyInputError, match="labels has shape"):
        chunked_cross_entropy(h, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(CrossEntropyInputError, match=r"weight \(V, H\)"):
        chunked_cross_entropy(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(CrossEntropyInputError, match="integer class index"):
        chunked_cross_entropy(h, w, torch.zeros(4))
    with pytest.raises(RuntimeError, match="outside"):
        chunked_cross_entropy(h, w, torch.tensor([0, 10, 2, -100]))


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_row_kernel_gradient_in_place(grad_dtype):
    """The row kernel writes the gradient over the float32 logits it reads (bf16 into the first half
    of each row's bytes): loss and gradient equal the plain-PyTorch rows on the same logits, rounded
    to the gradient dtype, and the wider float64 gradient gets a buffer of its own."""
    from osstune.kernels.cross_entropy import _rows_loss_grad

    if torch.cuda.is_available():
        pytest.skip("CPU interpreter case; the GPU runs the in-place path in test_matches_full_logits")
    if triton_interpreter_problem():
        pytest.skip(triton_interpreter_problem())
    gen = torch.Generator().manual_seed(7)
    c, v = 5, 9000  # three 4096-wide blocks, the last one partial
    logits = torch.randn(c, v, generator=gen) * 4
    labels = torch.randint(0, v, (c,), generator=gen)
    labels[2] = -100
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        want_loss, want_grad = _rows_loss_grad(logits.clone(), labels, -100, grad_dtype, True)
    buffer = logits.clone()
    loss, grad = _rows_loss_grad(buffer, labels, -100, grad_dtype, True)
    shares = grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert shares == (grad_dtype != torch.float64)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    tol = {torch.bfloat16: (8e-3, 1e-7), torch.float32: (1e-6, 1e-9), torch.float64: (1e-6, 1e-9)}[grad_dtype]
    torch.testing.assert_close(grad, want_grad, rtol=tol[0], atol=tol[1])
