"""Paged attention with sinks (osstune.kernels.paged_attention): the kernel against its plain-PyTorch
reference, and the reference against the model's dense sink_attention on the same keys laid out
contiguously.

Caches are built with shuffled physical blocks; every block a sequence must not read (table entries
past its length, and on sliding layers blocks wholly before its first query's window) points at a
block full of NaN or is -1, so a read of one shows up as NaN in the output. CPU cases run the Triton
kernel under the interpreter at tiny shapes with 16/32-wide tiles (one key tile spanning two cache
blocks, or half of one); GPU cases use gpt-oss's head shapes (Q=64, K=8, D=64, block 16).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from osstune.kernels._backend import triton_interpreter_problem

# TRITON_INTERPRET=1 on CPU: set for the whole session in conftest.py.

from osstune.kernels.paged_attention import (
    PagedAttentionBlocks,
    decode_splits,
    PagedAttentionInputError,
    paged_attention,
    paged_attention_ref,
    write_kv_cache,
    write_kv_cache_ref,
)
from osstune.model import attention_allowed, sink_attention


@dataclass(frozen=True)
class Case:
    lens: tuple[int, ...]  # context length of each sequence after the step
    queries: tuple[int, ...]  # query tokens of each sequence this step (0 allowed)
    n_q: int
    n_kv: int
    d: int
    bs: int  # cache block size
    window: int | None
    block_m: int = 16  # prefill tile rows (decode tiles: 16 rows)
    block_n: int = 16
    splits: int | None = 1  # of the decode launch


CPU_CASES = [
    Case((37, 5, 70), (1, 5, 3), 4, 2, 16, 16, None),  # decodes (n * G <= 16 rows) of 1-5 queries, GQA
    Case((37, 5, 70), (1, 5, 3), 4, 2, 16, 16, 7, block_n=32),  # window < block, tile spans 2 blocks
    Case((90, 33, 1), (9, 0, 1), 2, 1, 16, 32, 20),  # prefill + decode, block 32, half-block tiles, 0 queries
    Case((100, 64), (40, 1), 4, 4, 32, 16, 45, block_m=32),  # window > block, long prefill chunk, G=1
    Case((129, 17, 50), (1, 1, 1), 8, 1, 16, 16, None, splits=3),  # decode split-K, G=8 fills 8 rows
    Case((129, 61), (1, 6), 8, 2, 16, 16, 23, block_n=32, splits=4),  # split-K decode beside a prefill, window
    Case((0, 12, 3), (0, 12, 3), 2, 1, 16, 32, 5),  # a whole prompt (no cache before), an empty slot
]
GPU_CASES = [
    Case((1,), (1,), 64, 8, 64, 16, None, splits=None),
    Case((8191, 300, 4097, 16), (1, 1, 1, 1), 64, 8, 64, 16, None, splits=None),
    Case((8191, 300, 4097, 16), (1, 1, 1, 1), 64, 8, 64, 16, 128, splits=None),
    Case((131072,), (1,), 64, 8, 64, 16, None, splits=None),
    Case((70000, 33), (1, 1), 64, 8, 64, 16, 128, splits=None),
    Case((2000, 513, 130, 7), (512, 1, 130, 7), 64, 8, 64, 16, None, splits=None),
    Case((2000, 513, 130, 7), (512, 1, 130, 7), 64, 8, 64, 16, 128, splits=None),
    Case((5000, 40), (1, 40), 64, 8, 64, 32, 128, splits=None),
]
# Relative L2 error bounds vs float64 on the rounded inputs. The interpreter computes float32 as
# float32; on the GPU a float32 tl.dot runs as tf32 (10-bit mantissa); bf16 rounds P to 8 bits
# before the P @ V matmul.
TOL = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 5e-3, ("cuda", torch.bfloat16): 2e-2}


def _tiny_blocks(prefill_m: int = 16, block_n: int = 16, num_splits: int | None = 1) -> PagedAttentionBlocks:
    """Interpreter tiles: 16-row decode tiles (sequences of up to 16 // G queries), small prefill tiles."""
    return PagedAttentionBlocks(decode_m=16, decode_n=block_n, decode_warps=1, decode_stages=1, num_splits=num_splits,
                                prefill_m=prefill_m, prefill_n=block_n, prefill_warps=1, prefill_stages=1)


def _skip_unless_runnable(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if device == "cpu":
        if torch.cuda.is_available():
            pytest.skip("interpreter cases run on machines without a GPU")
        problem = triton_interpreter_problem()
        if problem:
            pytest.skip(problem)


def _build(case: Case, dtype: torch.dtype, device: str, gen: torch.Generator, pad_rows: int = 0):
    """Random q, caches, sinks, tables; blocks a sequence must not read hold NaN or are -1."""
    s = len(case.lens)
    widths = [-(-length // case.bs) for length in case.lens]
    max_blocks = max(widths + [1]) + 2  # wider than any sequence needs, as a preallocated table is
    n_used = sum(widths)
    nb = n_used + 3
    poison = nb - 1
    kc = torch.randn(nb, case.bs, case.n_kv, case.d, generator=gen, dtype=torch.float64)
    vc = torch.randn(nb, case.bs, case.n_kv, case.d, generator=gen, dtype=torch.float64)
    kc[poison] = float("nan")
    vc[poison] = float("nan")
    physical = torch.randperm(nb - 1, generator=gen)[:n_used].tolist()
    tables = torch.full((s, max_blocks), -1, dtype=torch.int32)
    for i, (length, n) in enumerate(zip(case.lens, case.queries)):
        ids = [physical.pop() for _ in range(widths[i])]
        tables[i, : widths[i]] = torch.tensor(ids, dtype=torch.int32)
        tables[i, widths[i]:: 2] = poison  # past the end: some NaN blocks, some -1
        if case.window is not None and n > 0:
            first_key = max(0, length - n - case.window + 1)
            for j in range(first_key // case.bs):  # wholly before the first query's window
                tables[i, j] = poison if j % 2 else -1
    cu = torch.tensor([0, *torch.tensor(case.queries).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]) + pad_rows, case.n_q, case.d, generator=gen, dtype=torch.float64)
    sinks = torch.randn(case.n_q, generator=gen, dtype=torch.float64)
    kc, vc, q = (x.to(dtype).to(torch.float64) for x in (kc, vc, q))  # exactly what the kernel sees
    lens = torch.tensor(case.lens, dtype=torch.int32)
    return dict(q=q, k_cache=kc, v_cache=vc, sinks=sinks, block_tables=tables, seq_lens=lens, cu_seqlens_q=cu,
                max_query_len=max(case.queries), window=case.window)


def _on(inputs: dict, device: str, dtype: torch.dtype) -> dict:
    out = dict(inputs)
    for name in ("q", "k_cache", "v_cache"):
        out[name] = inputs[name].to(device=device, dtype=dtype)
    out["sinks"] = inputs["sinks"].to(device=device, dtype=torch.float32)
    for name in ("block_tables", "seq_lens", "cu_seqlens_q"):
        out[name] = inputs[name].to(device)
    return out


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want).norm() / want.norm()).item()


def _params():
    out = [pytest.param("cpu", torch.float32, case, id=f"cpu-{i}") for i, case in enumerate(CPU_CASES)]
    for dtype in (torch.bfloat16, torch.float32):
        out += [pytest.param("cuda", dtype, case, marks=pytest.mark.gpu, id=f"cuda-{dtype}-{i}")
                for i, case in enumerate(GPU_CASES)]
    return out


@pytest.mark.parametrize("device,dtype,case", _params())
def test_kernel_matches_reference(device, dtype, case):
    _skip_unless_runnable(device)
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    inputs = _build(case, dtype, "cpu", gen, pad_rows=2)
    n_real = int(inputs["cu_seqlens_q"][-1])
    want = paged_attention_ref(**inputs)[:n_real]  # float64 truth, NaN blocks never touched
    assert torch.isfinite(want).all()
    blocks = None
    if device == "cpu":
        blocks = _tiny_blocks(prefill_m=case.block_m, block_n=case.block_n, num_splits=case.splits)
    got = paged_attention(**_on(inputs, device, dtype), blocks=blocks)
    assert got.shape == inputs["q"].shape and got.dtype == dtype
    got = got[:n_real]
    assert torch.isfinite(got).all(), "the kernel read a block outside its sequence's keys (NaN)"
    err = _rel_err(got, want)
    assert err < TOL[(device, dtype)], f"relative error {err:.2e}"


def _random_case(seed: int) -> Case:
    """A random batch: 1-4 sequences, lengths 0-80, any query count up to the length, windows
    from 1 (the query alone) up, G in {1, 2, 4}, every tile choice."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    lens, queries = [], []
    for _ in range(pick([1, 2, 3, 4])):
        length = int(torch.randint(0, 81, (1,), generator=g))
        lens.append(length)
        queries.append(pick([0, 1, 1, min(2, length), length, length // 3]) if length else 0)
    if not any(queries):
        lens[0], queries[0] = max(lens[0], 1), 1
    n_kv = pick([1, 2])
    return Case(tuple(lens), tuple(queries), n_kv * pick([1, 2, 4]), n_kv, 16, pick([16, 32]),
                pick([None, 1, 3, 16, 50]), block_m=pick([16, 32]), block_n=pick([16, 32]), splits=pick([1, 2, 3]))


@pytest.mark.parametrize("seed", range(4))
def test_kernel_matches_reference_random_batches(seed):
    _skip_unless_runnable("cpu")
    case = _random_case(seed)
    inputs = _build(case, torch.float32, "cpu", torch.Generator().manual_seed(seed))
    want = paged_attention_ref(**inputs)
    got = paged_attention(**_on(inputs, "cpu", torch.float32),
                          blocks=_tiny_blocks(prefill_m=case.block_m, block_n=case.block_n, num_splits=case.splits))
    assert torch.isfinite(got).all(), f"{case}: read a block outside the keys (NaN)"
    assert _rel_err(got, want) < TOL[("cpu", torch.float32)], case


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 7, 16])
def test_gpu_splits_agree(splits):
    """Every split count computes the same function (decode at 8k keys, and a prefill chunk)."""
    _skip_unless_runnable("cuda")
    case = Case((8192, 3000, 77), (1, 1, 20), 64, 8, 64, 16, None)
    inputs = _build(case, torch.bfloat16, "cpu", torch.Generator().manual_seed(3))
    want = paged_attention_ref(**inputs)
    got = paged_attention(**_on(inputs, "cuda", torch.bfloat16), blocks=PagedAttentionBlocks(num_splits=splits))
    assert _rel_err(got, want) < TOL[("cuda", torch.bfloat16)]


@pytest.mark.parametrize("case", [CPU_CASES[0], CPU_CASES[2], CPU_CASES[3]], ids=["full", "sliding-bs32", "sliding-long"])
def test_reference_matches_model(case):
    """Independent check of the reference: per sequence, the model's sink_attention over the same
    keys laid out contiguously, with the model's own mask (no Triton)."""
    gen = torch.Generator().manual_seed(7)
    inputs = _build(case, torch.float64, "cpu", gen)
    got = paged_attention_ref(**inputs)
    cu = inputs["cu_seqlens_q"].tolist()
    for s, (length, n) in enumerate(zip(case.lens, case.queries)):
        if n == 0:
            continue
        pos = torch.arange(length)
        slots = inputs["block_tables"][s, pos // case.bs].long() * case.bs + pos % case.bs
        k = inputs["k_cache"].flatten(0, 1)[slots][None]  # (1, L, K, D)
        v = inputs["v_cache"].flatten(0, 1)[slots][None]
        if case.window is not None:  # the model would see the garbage blocks: give it zeros there
            before = pos < max(0, length - n - case.window + 1)
            k[:, before] = 0
            v[:, before] = 0
        q = inputs["q"][cu[s]:cu[s + 1]][None]
        allowed = attention_allowed(torch.arange(length - n, length), pos, case.window)
        want = sink_attention(q, k, v, inputs["sinks"], allowed)[0]
        # sink_attention computes in float32 whatever its inputs; the reference keeps float64.
        torch.testing.assert_close(got[cu[s]:cu[s + 1]], want, rtol=2e-5, atol=2e-6)


def test_split_k_equals_one_pass():
    """Split-K (forced) against the single-pass kernel on the same inputs, including splits that get
    no keys at all (more splits than key tiles)."""
    _skip_unless_runnable("cpu")
    case = Case((40, 3, 18), (1, 1, 2), 4, 2, 16, 16, None)
    inputs = _on(_build(case, torch.float32, "cpu", torch.Generator().manual_seed(5)), "cpu", torch.float32)
    one = paged_attention(**inputs, blocks=_tiny_blocks(num_splits=1))
    many = paged_attention(**inputs, blocks=_tiny_blocks(num_splits=4))
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


def test_column_slice_of_a_wider_table():
    """The engine may pass table[:, :width] of a preallocated table (rows not adjacent)."""
    _skip_unless_runnable("cpu")
    case = Case((40, 9), (2, 1), 4, 2, 16, 16, None)
    inputs = _on(_build(case, torch.float32, "cpu", torch.Generator().manual_seed(9)), "cpu", torch.float32)
    tables = inputs["block_tables"]
    wide = torch.full((tables.shape[0], tables.shape[1] + 5), 10**6, dtype=torch.int32)
    wide[:, : tables.shape[1]] = tables
    tiles = _tiny_blocks(num_splits=1)
    got = paged_attention(**{**inputs, "block_tables": wide[:, : tables.shape[1]]}, blocks=tiles)
    torch.testing.assert_close(got, paged_attention(**inputs, blocks=tiles), rtol=0, atol=0)


def test_decode_splits():
    """Split-K only while the grid is under two waves; each split keeps >= 4 key tiles of the longest
    context the table allows; a window bounds that context."""
    blocks = PagedAttentionBlocks()  # 64-key tiles
    assert decode_splits(1, 8, 8192, None, blocks, sm_count=132) == 32  # 8192 keys / (4 * 64)
    assert decode_splits(1, 8, 131072, None, blocks, sm_count=132) == 33  # 264 programs / 8
    assert decode_splits(16, 8, 131072, None, blocks, sm_count=132) == 3
    assert decode_splits(64, 8, 131072, None, blocks, sm_count=132) == 1
    assert decode_splits(1, 8, 131072, 128, blocks, sm_count=132) == 1  # at most 144 keys: under 4 tiles in all
    assert decode_splits(1, 8, 200, None, blocks, sm_count=132) == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_write_kv_cache(device):
    """Rows land at their slots (also across blocks), negative slots write nothing."""
    _skip_unless_runnable(device)
    gen = torch.Generator().manual_seed(11)
    nb, bs, n_kv, d = 5, 16, 2, 16
    k_cache = torch.randn(nb, bs, n_kv, d, generator=gen).bfloat16()
    v_cache = torch.randn(nb, bs, n_kv, d, generator=gen).bfloat16()
    slots = torch.tensor([3 * bs + 15, -1, 0, 4 * bs + 1, -1, 2 * bs + 7], dtype=torch.int64)
    # bf16 rows into a bf16 cache, as the engine writes them (the interpreter's float32 -> bf16 cast
    # truncates where the GPU rounds, so no cast is tested here).
    k = torch.randn(len(slots), n_kv, d, generator=gen).bfloat16()
    v = torch.randn(len(slots), n_kv, d, generator=gen).bfloat16()
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            want_k[slot // bs, slot % bs] = k[i]
            want_v[slot // bs, slot % bs] = v[i]
    for write in (write_kv_cache, write_kv_cache_ref):
        kc, vc = k_cache.to(device), v_cache.to(device)
        write(k.to(device), v.to(device), kc, vc, slots.to(device))
        torch.testing.assert_close(kc.cpu(), want_k, rtol=0, atol=0)
        torch.testing.assert_close(vc.cpu(), want_v, rtol=0, atol=0)


def test_empty_steps():
    """No sequences at all, and only padding rows (every sequence with 0 queries)."""
    _skip_unless_runnable("cpu")
    kc = torch.randn(3, 16, 1, 16)
    sinks = torch.zeros(2)
    none = paged_attention(torch.randn(0, 2, 16), kc, kc, sinks, torch.zeros(0, 4, dtype=torch.int32),
                           torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 0, None)
    assert none.shape == (0, 2, 16)
    padded = paged_attention(torch.randn(3, 2, 16), kc, kc, sinks, torch.zeros(2, 4, dtype=torch.int32),
                             torch.tensor([5, 0], dtype=torch.int32), torch.zeros(3, dtype=torch.int32), 1, 7,
                             blocks=_tiny_blocks(num_splits=2))
    assert padded.shape == (3, 2, 16)


def test_bad_inputs_name_the_tensor():
    case = Case((10,), (1,), 4, 2, 16, 16, None)
    inputs = _build(case, torch.float32, "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(PagedAttentionInputError, match="block_tables has dtype torch.int64"):
        paged_attention(**{**inputs, "block_tables": inputs["block_tables"].long()})
    with pytest.raises(PagedAttentionInputError, match="sinks has shape"):
        paged_attention(**{**inputs, "sinks": inputs["sinks"][:3]})
    with pytest.raises(PagedAttentionInputError, match="not a multiple"):
        paged_attention(**{**inputs, "q": inputs["q"][:, :3]})
    with pytest.raises(PagedAttentionInputError, match="window=0"):
        paged_attention(**{**inputs, "window": 0})


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_reads_new_lengths_and_tables():
    """Captured once, replayed after the lengths, tables, queries and cache change in place: the call
    syncs nothing and reads everything on the device (decode at 4k keys: the split-K path)."""
    _skip_unless_runnable("cuda")
    case = Case((4000, 700, 33), (1, 1, 1), 64, 8, 64, 16, None)
    first = _on(_build(case, torch.bfloat16, "cpu", torch.Generator().manual_seed(1)), "cuda", torch.bfloat16)
    later = _build(Case((3100, 4090, 2), (1, 1, 1), 64, 8, 64, 16, None), torch.bfloat16, "cpu",
                   torch.Generator().manual_seed(2))
    tensors = ("q", "k_cache", "v_cache", "sinks", "block_tables", "seq_lens", "cu_seqlens_q")
    static = {name: first[name].clone() for name in tensors}
    for name in ("k_cache", "v_cache", "block_tables"):  # room for the later inputs
        shape = [max(a, b) for a, b in zip(first[name].shape, later[name].shape)]
        static[name] = torch.zeros(shape, device="cuda", dtype=first[name].dtype)
    args = dict(max_query_len=1, window=None)
    paged_attention(**static, **args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(**static, **args)
    later_dev = _on(later, "cuda", torch.bfloat16)
    for name in tensors:
        static[name].zero_()
        src = later_dev[name]
        static[name][tuple(slice(0, n) for n in src.shape)].copy_(src)
    graph.replay()
    want = paged_attention_ref(**later)
    assert _rel_err(out, want) < TOL[("cuda", torch.bfloat16)]
