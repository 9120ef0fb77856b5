"""Flash attention with sinks (osstune.kernels.attention) against the reference model's sink_attention.

CPU cases run the Triton kernels under Triton's interpreter (float32, tiny shapes, 16-wide tiles so
that every code path — masked edges, unmasked middle, skipped blocks — is hit); GPU cases run the
compiled kernels at the default tiles in bf16 and float32. Truth is the reference in float64.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from osstune.kernels._backend import triton_interpreter_problem

# TRITON_INTERPRET=1 on CPU: set for the whole session in conftest.py.

from osstune.kernels.attention import (
    AttentionBlocks,
    AttentionInputError,
    default_blocks,
    sink_flash_attention,
    sink_flash_attention_ref,
)
from osstune.model import attention_allowed, sink_attention

TINY_BLOCKS = AttentionBlocks(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, dkdv_n=16, dkdv_m=16, fwd_stages=1,
                              dq_stages=1, dkdv_stages=1, fwd_warps=1, dq_warps=1, dkdv_warps=1)

# (B, T, Q, K, D, window, packed documents, dK/dV summed over the group in-kernel (None: heuristic))
CPU_CASES = [
    (1, 45, 4, 2, 16, None, False, None),
    (2, 37, 2, 1, 16, 7, False, False),
    (1, 61, 2, 2, 32, None, True, None),
    (1, 50, 4, 1, 16, 19, True, None),
    (1, 64, 2, 1, 16, 21, False, None),
    (2, 43, 4, 2, 16, None, True, True),
]
GPU_CASES = [
    (2, 1000, 8, 2, 64, None, False, None),
    (1, 777, 16, 2, 64, 128, False, False),
    (2, 1500, 4, 4, 32, None, True, True),
    (1, 2048, 8, 1, 64, 128, True, None),
    (1, 300, 4, 2, 16, 33, True, None),
    (1, 129, 64, 8, 64, None, False, None),
    (1, 4500, 16, 2, 64, None, True, None),
]
# Relative L2 error bounds vs float64. float32 in the interpreter is plain float32 arithmetic; on the
# GPU a float32 tl.dot runs as tf32 (10-bit mantissa); bf16 rounds P and dS to 8 bits before the
# matmuls, and the sink gradient sums T such terms.
TOL = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 5e-3, ("cuda", torch.bfloat16): 2e-2}


def _params():
    out = [pytest.param("cpu", torch.float32, case, id=f"cpu-{case}") for case in CPU_CASES]
    for dtype in (torch.bfloat16, torch.float32):
        out += [pytest.param("cuda", dtype, case, marks=pytest.mark.gpu, id=f"cuda-{dtype}-{case}") for case in GPU_CASES]
    return out


def _skip_unless_runnable(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if device == "cpu":
        if torch.cuda.is_available():
            pytest.skip("interpreter cases run on machines without a GPU")
        problem = triton_interpreter_problem()
        if problem:
            pytest.skip(problem)


def _random_docs(b: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """Contiguous runs of shuffled ids, lengths 1..t/2 (short ones included)."""
    rows = []
    for _ in range(b):
        lengths = []
        while sum(lengths) < t:
            lengths.append(int(torch.randint(1, max(2, t // 2), (1,), generator=gen)))
        ids = torch.randperm(len(lengths), generator=gen) * 3 + 1
        rows.append(torch.repeat_interleave(ids, torch.tensor(lengths))[:t])
    return torch.stack(rows)


@pytest.mark.parametrize("device,dtype,case", _params())
def test_matches_model_reference(device, dtype, case):
    _skip_unless_runnable(device)
    b, t, n_q, n_kv, d, window, packed, loop_group = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q = torch.randn(b, t, n_q, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, t, n_kv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, t, n_kv, d, generator=gen, dtype=torch.float64)
    sinks = torch.randn(n_q, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(b, t, n_q, d, generator=gen, dtype=torch.float64)
    docs = _random_docs(b, t, gen) if packed else None

    # Truth: the model's reference on float64 copies of exactly the (rounded) inputs the kernel sees.
    leaves = [x.to(dtype).to(torch.float64).requires_grad_() for x in (q, k, v)] + [sinks.clone().requires_grad_()]
    idx = torch.arange(t)
    ref = sink_attention(*leaves, attention_allowed(idx, idx, window, docs, docs))
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)

    inputs = [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]
    inputs.append(sinks.to(device=device, dtype=torch.float32).requires_grad_())
    blocks = TINY_BLOCKS if device == "cpu" else default_blocks(t, window)
    if loop_group is not None:
        blocks = dataclasses.replace(blocks, dkdv_loop_group=loop_group)
    doc_ids = docs.to(device) if docs is not None else None
    out = sink_flash_attention(*inputs, window=window, doc_ids=doc_ids, blocks=blocks)
    grads = torch.autograd.grad(out, inputs, grad_out.to(device=device, dtype=dtype))

    tol = TOL[(device, dtype)]
    for name, got, want in zip(("out", "dq", "dk", "dv", "dsinks"), (out, *grads), (ref, *ref_grads)):
        got = got.double().cpu()
        assert torch.isfinite(got).all(), name
        err = ((got - want).norm() / want.norm()).item()
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def test_ref_equals_model_reference():
    """The module's own plain-PyTorch reference computes the model's function (float64, no Triton)."""
    gen = torch.Generator().manual_seed(1)
    b, t, n_q, n_kv, d = 2, 23, 4, 2, 8
    q = torch.randn(b, t, n_q, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, t, n_kv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, t, n_kv, d, generator=gen, dtype=torch.float64)
    sinks = torch.randn(n_q, generator=gen, dtype=torch.float64)
    docs = _random_docs(b, t, gen)
    idx = torch.arange(t)
    for window, doc in ((None, None), (5, None), (None, docs), (4, docs)):
        want = sink_attention(q, k, v, sinks, attention_allowed(idx, idx, window, doc, doc))
        got = sink_flash_attention_ref(q, k, v, sinks, window=window, doc_ids=doc)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cu_seqlens_equals_doc_ids():
    _skip_unless_runnable("cpu")
    gen = torch.Generator().manual_seed(2)
    t = 40
    q = torch.randn(1, t, 2, 16, generator=gen)
    k = torch.randn(1, t, 1, 16, generator=gen)
    v = torch.randn(1, t, 1, 16, generator=gen)
    sinks = torch.randn(2, generator=gen)
    cu = torch.tensor([0, 3, 20, 21, 40])
    doc_ids = torch.repeat_interleave(torch.arange(4), cu.diff()).unsqueeze(0)
    a = sink_flash_attention(q, k, v, sinks, window=9, cu_seqlens=cu, blocks=TINY_BLOCKS)
    b = sink_flash_attention(q, k, v, sinks, window=9, doc_ids=doc_ids, blocks=TINY_BLOCKS)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A document of 3 tokens sees nothing before it: its first token attends to itself only.
    want = sink_attention(q, k, v, sinks, attention_allowed(torch.arange(t), torch.arange(t), 9, doc_ids, doc_ids))
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(k_heads=3), "not a multiple"),
        (dict(d=24), "head dim 24"),
        (dict(sinks=5), "one logit per query head"),
        (dict(window=0), "window=0"),
        (dict(doc_len=7), "doc_ids has shape"),
    ],
)
def test_bad_inputs_raise(change, match):
    d = change.get("d", 16)
    q = torch.randn(1, 8, 4, d)
    k = torch.randn(1, 8, change.get("k_heads", 2), d)
    sinks = torch.zeros(change.get("sinks", 4))
    doc_ids = torch.zeros(1, change["doc_len"], dtype=torch.long) if "doc_len" in change else None
    with pytest.raises(AttentionInputError, match=match):
        sink_flash_attention(q, k, k, sinks, window=change.get("window"), doc_ids=doc_ids)
