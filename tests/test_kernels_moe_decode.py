"""Small-batch MoE (osstune.kernels.moe_decode) against the reference model's experts.

Truth: `osstune.model.Experts.forward` / `MXFP4Experts.forward` (a loop over experts in plain
PyTorch) run in float32 on the same, bf16-exact, inputs; and the same module in bf16, as the engine
runs it. Fresh random inputs: N in {1, 2, 3, 7, 33} tokens, k in {1, 2, 4}, experts repeated across
tokens, every token on one expert, the same expert twice in one token, expert ids in any order,
random MXFP4 bytes (every e2m1 code) with scales over a wide range. CPU cases run the Triton kernels
under Triton's interpreter at tiny shapes (its tl.dot is float32 here: see the kernel module); GPU
cases run gpt-oss-20b's expert shapes in bf16 and a CUDA-graph replay.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from osstune.config import ModelConfig
from osstune.kernels._backend import triton_interpreter_problem
from osstune.kernels.moe_decode import (
    GROUPED_FROM_TOKENS,
    DecodeTiles,
    MoEDecodeInputError,
    moe_decode,
    moe_decode_ref,
)
from osstune.lora.layers import LoRAExperts
from osstune.model import Experts, MXFP4Experts

# TRITON_INTERPRET=1 on CPU: set for the whole session in conftest.py.

moe_decode_module = importlib.import_module("osstune.kernels.moe_decode")  # the module, not the function

# The interpreter computes sigmoid with numpy, whose exp overflows (to inf: sigmoid 0, as it should)
# for very negative gates.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: on a busy 2-core machine torch's intra-op threads spin-wait for each
    other, and an index_add_ of a few hundred floats takes 10 ms instead of 10 us."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Relative L2 error against the float32 model. float32: only the summation order differs. bf16: h
# and the output are rounded to bf16 (2**-9 relative each on a GPU; Triton's interpreter converts
# float32 to bf16 by truncation, 2**-8), everything else is float32.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Against the bf16 model itself, which rounds to bf16 after every operation (matmul, bias, each
# SwiGLU step, the weighted sum per slot): about twice the error of either side against float32.
TOL_BF16_MODEL = 2.5e-2

TINY = ModelConfig(num_local_experts=6, num_experts_per_tok=4, hidden_size=64, intermediate_size=32)
GPT_OSS_20B = ModelConfig()  # E = 32, H = I = 2880, top-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _experts(cfg: ModelConfig, fmt: str, gen: torch.Generator, device="cpu", scales=(115, 130)) -> Experts:
    """Random float32 experts whose weights are bf16-exact (so a bf16 copy holds the same numbers),
    drawn on `device` (gpt-oss-20b's dense experts are 2.9 G values: too slow to draw on a CPU)."""
    e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    with torch.device(device):
        ex = MXFP4Experts(cfg) if fmt == "mxfp4" else Experts(cfg)
    g = torch.Generator(device=device).manual_seed(int(torch.randint(1 << 62, (1,), generator=gen)))
    draw = dict(generator=g, device=device)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, **draw) * std).bfloat16().float()

    with torch.no_grad():
        ex.gate_up_proj_bias.copy_(rand(e, 2 * i, std=0.1))
        ex.down_proj_bias.copy_(rand(e, h, std=0.1))
        if fmt == "mxfp4":
            for proj in ("gate_up_proj", "down_proj"):
                blocks, sc = getattr(ex, f"{proj}_blocks"), getattr(ex, f"{proj}_scales")
                blocks.copy_(torch.randint(0, 256, blocks.shape, dtype=torch.uint8, **draw))
                sc.copy_(torch.randint(scales[0], scales[1] + 1, sc.shape, dtype=torch.uint8, **draw))
        else:
            ex.gate_up_proj.copy_(rand(e, h, 2 * i, std=h**-0.5))
            ex.down_proj.copy_(rand(e, i, h, std=i**-0.5))
    return ex


@functools.cache
def _experts_20b(fmt: str) -> Experts:
    """One layer's experts at gpt-oss-20b's shape, shared by the GPU tests (which change only their
    dtype, losslessly: the values are bf16-exact)."""
    return _experts(GPT_OSS_20B, fmt, torch.Generator().manual_seed(0), device="cuda")


def _routing(n: int, k: int, e: int, gen: torch.Generator, load: str = "random"):
    """idx (N, k) int64, weights (N, k) float32 summing to 1 per token."""
    if load == "random":  # distinct experts per token, as a top-k router picks them
        idx = torch.rand(n, e, generator=gen).argsort(dim=1)[:, :k]
    elif load == "one_expert":  # slot 0 of every token on expert e - 1, the rest random
        rest = torch.rand(n, e - 1, generator=gen).argsort(dim=1)[:, : k - 1]
        idx = torch.cat((torch.full((n, 1), e - 1), rest), dim=1)
    elif load == "all_one":  # every slot of every token on one expert
        idx = torch.full((n, k), 1)
    else:
        raise AssertionError(load)
    weights = torch.rand(n, k, generator=gen).softmax(dim=1)
    return idx, weights


def _check_against_model(ex: Experts, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                         dtype: torch.dtype, **kw) -> None:
    """moe_decode on the module in `dtype` vs the float32 module on the same numbers (and vs itself)."""
    x, weights = x.to(dtype), weights.to(dtype)
    truth = ex.float()(x.float(), idx, weights.float())
    module = ex.to(dtype)
    out = moe_decode(module, x, idx, weights, **kw)
    assert out.dtype == dtype and out.shape == x.shape
    assert _rel(out, truth) <= TOL[dtype], f"vs float32 model: {_rel(out, truth):.2e}"
    assert _rel(moe_decode_ref(module, x, idx, weights), truth) <= TOL[dtype]
    if dtype == torch.bfloat16:
        assert _rel(out, module(x, idx, weights)) <= TOL_BF16_MODEL


def _interpreter():
    if torch.cuda.is_available():
        pytest.skip("interpreter cases run on machines without a GPU")
    problem = triton_interpreter_problem()
    if problem:
        pytest.skip(problem)


# Every (N, k) for MXFP4 (the checkpoint's format); dense weights share the code past the weight tile
# loader, so they get each N and each k once (the interpreter takes ~1 s a case).
CASES = [("mxfp4", n, k) for n in (1, 2, 3, 7, 33) for k in (1, 2, 4)]
CASES += [("bf16", 1, 4), ("bf16", 2, 1), ("bf16", 3, 2), ("bf16", 7, 4), ("bf16", 33, 2)]


@pytest.mark.parametrize("fmt,n,k", CASES)
def test_matches_model_interpreter(fmt, n, k):
    _interpreter()
    gen = torch.Generator().manual_seed(n * 10 + k)
    ex = _experts(TINY, fmt, gen)
    idx, weights = _routing(n, k, TINY.num_local_experts, gen)
    _check_against_model(ex, torch.randn(n, TINY.hidden_size, generator=gen), idx, weights, torch.float32)


@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
@pytest.mark.parametrize("n,k,load,dtype", [(7, 4, "random", torch.bfloat16), (33, 2, "one_expert", torch.float32),
                                            (3, 2, "all_one", torch.bfloat16)])
def test_bf16_and_loads_interpreter(fmt, n, k, load, dtype):
    _interpreter()
    gen = torch.Generator().manual_seed(n + k)
    ex = _experts(TINY, fmt, gen)
    idx, weights = _routing(n, k, TINY.num_local_experts, gen, load)
    _check_against_model(ex, torch.randn(n, TINY.hidden_size, generator=gen), idx, weights, dtype)


@pytest.mark.parametrize("sort_rows", [False, True])
def test_wide_scales_int32_ids_and_tiles_interpreter(sort_rows):
    """MXFP4 scale bytes 90-160 (weights 2**-37 to 6 * 2**33), int32 ids, x a column slice of a wider
    tensor, the weight tile on the left of the product, several column tiles and K steps, rows sorted
    by expert or not (the default picks by the number of rows)."""
    _interpreter()
    gen = torch.Generator().manual_seed(7)
    ex = _experts(TINY, "mxfp4", gen, scales=(90, 160))
    idx, weights = _routing(7, 2, TINY.num_local_experts, gen)
    x = torch.randn(7, 3 * TINY.hidden_size, generator=gen)[:, TINY.hidden_size : 2 * TINY.hidden_size]
    tiles = DecodeTiles(block_m=16, block_n=32, block_k=32, swap=True)
    _check_against_model(ex, x, idx.int(), weights, torch.float32, tiles=tiles, sort_rows=sort_rows)


@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
def test_unchosen_experts_never_enter_interpreter(fmt):
    """NaN in every expert the tokens did not choose (biases, dense weights; MXFP4 scale byte 255, which
    decodes to inf or NaN) leaves the output finite; a NaN in a token gives NaN where the model does."""
    _interpreter()
    gen = torch.Generator().manual_seed(5)
    ex = _experts(TINY, fmt, gen)
    idx = torch.tensor([[1, 4], [4, 1], [1, 4]])
    weights = torch.rand(3, 2, generator=gen).softmax(dim=1)
    with torch.no_grad():
        for e in set(range(TINY.num_local_experts)) - {1, 4}:
            tensors = [ex.gate_up_proj_bias, ex.down_proj_bias]
            tensors += [] if fmt == "mxfp4" else [ex.gate_up_proj, ex.down_proj]
            for t in tensors:
                t[e] = float("nan")
            if fmt == "mxfp4":
                ex.gate_up_proj_scales[e] = ex.down_proj_scales[e] = 255
    x = torch.randn(3, TINY.hidden_size, generator=gen)
    for sort_rows in (False, True):
        out = moe_decode(ex, x, idx, weights, sort_rows=sort_rows)
        assert torch.isfinite(out).all()
        assert _rel(out, ex(x, idx, weights)) <= TOL[torch.float32]
    # A NaN that the model does meet goes through the SwiGLU's clamps as through torch's.
    x[1, 0] = float("nan")
    assert torch.equal(moe_decode(ex, x, idx, weights).isnan(), ex(x, idx, weights).isnan())


@pytest.mark.parametrize("sort_rows,route_kernel,row", [(False, True, False), (False, True, True), (True, True, False),
                                                         (True, False, False)])
def test_invalid_ids_contribute_nothing_interpreter(sort_rows, route_kernel, row, monkeypatch):
    """Ids outside [0, E) cannot be checked without a host sync: their slots add zeros (the model would
    raise, or read expert E - 1 for -1). Also runs the torch.sort path that large batches take."""
    _interpreter()
    if not route_kernel:
        monkeypatch.setattr(moe_decode_module, "ROUTE_MAX_ELEMENTS", 0)
    gen = torch.Generator().manual_seed(9)
    ex = _experts(TINY, "mxfp4", gen)
    e = TINY.num_local_experts
    idx, weights = _routing(5, 2, e, gen)
    bad = torch.tensor([[True, False], [False, True], [False, False], [True, False], [False, False]])
    bad_ids = idx.masked_fill(bad, -1)
    bad_ids[3, 0] = e
    x = torch.randn(5, TINY.hidden_size, generator=gen)
    tiles = DecodeTiles(block_n=64, block_k=64, row=True) if row else None
    out = moe_decode(ex, x, bad_ids, weights, sort_rows=sort_rows, tiles=tiles)
    truth = ex(x, idx, weights.masked_fill(bad, 0.0))  # the same slots with weight 0
    assert _rel(out, truth) <= TOL[torch.float32]
    assert _rel(moe_decode_ref(ex, x, bad_ids, weights), truth) <= TOL[torch.float32]


@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_fma_path_interpreter(fmt, dtype):
    """The FMA path (a row per program, no MMA) that few rows take on a GPU: K not a whole number of
    steps, several column tiles, top-1 to top-4."""
    _interpreter()
    gen = torch.Generator().manual_seed(13)
    ex = _experts(TINY, fmt, gen)
    tiles = DecodeTiles(block_n=32, block_k=128 if dtype == torch.float32 else 32, row=True)
    for n, k in ((1, 4), (3, 1), (2, 2)):
        idx, weights = _routing(n, k, TINY.num_local_experts, gen)
        x = torch.randn(n, TINY.hidden_size, generator=gen)
        _check_against_model(ex, x, idx, weights, dtype, tiles=tiles, sort_rows=False)


def test_reference_without_triton(monkeypatch):
    """On CPU without the interpreter moe_decode runs the plain-PyTorch reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(3)
    for fmt in ("bf16", "mxfp4"):
        ex = _experts(TINY, fmt, gen)
        idx, weights = _routing(5, 4, TINY.num_local_experts, gen)
        x = torch.randn(5, TINY.hidden_size, generator=gen)
        _check_against_model(ex, x, idx, weights, torch.float32)
        _check_against_model(ex, x, idx, weights, torch.bfloat16)


def test_no_tokens():
    gen = torch.Generator().manual_seed(2)
    for fmt in ("bf16", "mxfp4"):
        ex = _experts(TINY, fmt, gen)
        out = moe_decode(ex, torch.zeros(0, TINY.hidden_size), torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4))
        assert out.shape == (0, TINY.hidden_size)


def test_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    ex = _experts(TINY, "mxfp4", gen)
    x = torch.randn(3, TINY.hidden_size)
    idx, weights = _routing(3, 2, TINY.num_local_experts, gen)
    with pytest.raises(MoEDecodeInputError, match="float16"):
        moe_decode(ex, x.half(), idx, weights)
    with pytest.raises(MoEDecodeInputError, match=r"x \(N, H\)"):
        moe_decode(ex, x, idx[:2], weights[:2])
    with pytest.raises(MoEDecodeInputError, match="hidden size 32"):
        moe_decode(ex, x[:, :32], idx, weights)
    with pytest.raises(MoEDecodeInputError, match="idx must hold"):
        moe_decode(ex, x, idx.float(), weights)
    with pytest.raises(MoEDecodeInputError, match="Linear has no"):
        moe_decode(torch.nn.Linear(2, 2), x, idx, weights)
    # An adapter is never dropped silently: LoRA over the experts is not read as plain experts.
    with pytest.raises(MoEDecodeInputError, match="LoRAExperts has no"):
        moe_decode(LoRAExperts(ex, ("gate_up_proj",), r=2, scale=1.0), x, idx, weights)
    with pytest.raises(MoEDecodeInputError, match="block_k"):
        DecodeTiles(block_k=16)


# ---------------------------------------------------------------- sm_90 code without a GPU


def _compile_for_sm90() -> None:
    """Compile the kernels for Hopper (sm_90) as the GPU launches specialise them at gpt-oss-20b's
    shapes (16-divisible sizes and strides, the default tiles, both row modes, MXFP4 and dense): CI has
    no GPU, yet a kernel that Triton's interpreter runs can still fail to compile for one. Runs in a
    process without TRITON_INTERPRET (under it, kernels are not compiled)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from osstune.kernels import _moe_decode_triton as kern
    from osstune.kernels.moe_decode import FEW_ROWS_TILES, ROW_TILES

    divisible = {"K", "N", "E", "stride_x", "stride_h", "stride_y", "stride_we", "stride_wn", "stride_wk",
                 "stride_se", "stride_be"}  # stride_sn = H / 32 = 90 is not

    def build(fn, types: dict, consts: dict) -> None:
        names = list(inspect.signature(fn.fn).parameters)
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if n not in consts and (sig[n].startswith("*") or n in divisible)}
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                        attrs=attrs)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})

    # Batch 1's MXFP4 kernels, then the sorted rows' (wgmma) of each format, one kernel each:
    # compiling takes seconds per kernel on CI's two cores.
    for mxfp4, (sort_rows, tiles), which in ((True, (False, FEW_ROWS_TILES), "gate_up down"),
                                             (True, (True, ROW_TILES[512]), "gate_up"),
                                             (False, (True, ROW_TILES[512]), "down")):
        w = "*u8" if mxfp4 else "*bf16"
        common = dict(Ids="*i64", Order="*i32", Offs="*i32", W=w, Scales="*u8" if mxfp4 else w, Bias="*bf16")
        gemv = tiles.row and not sort_rows
        consts = dict(BLOCK_M=1 if gemv else tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, E_PAD=64,
                      SORTED=sort_rows, MXFP4=mxfp4, PAIRS=mxfp4, SWAP=tiles.swap, EVEN=False, F32_DOT=False,
                      PRECISION=None, GEMV=gemv)
        if not mxfp4:
            consts["stride_wn"] = 1  # dense weights (E, in, out): Triton specialises a stride of 1
        if "gate_up" in which:
            build(kern._gate_up, dict(common, X="*bf16", Hout="*bf16", alpha="fp32", limit="fp32"), consts)
        if "down" in which:
            build(kern._down, dict(common, Hin="*bf16", RouteW="*bf16", Y="*fp32"), consts)
    build(kern._route, dict(Ids="*i64", Order="*i32", Offs="*i32"), dict(M_PAD=256, E_PAD=64))
    build(kern._combine, dict(Y="*fp32", Out="*bf16"), dict(TOPK=4, BLOCK=1024))


def test_kernels_compile_for_sm90():
    if torch.cuda.is_available():
        pytest.skip("the GPU tests compile and run the kernels")
    if triton_interpreter_problem() or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("needs triton with its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[1]
    code = "import sys; sys.path[:0] = sys.argv[1:]; import test_kernels_moe_decode as t; t._compile_for_sm90()"
    run = subprocess.run([sys.executable, "-c", code, str(root), str(root / "tests")], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
@pytest.mark.parametrize("n", [1, 4, 64, 256, GROUPED_FROM_TOKENS + 3])
def test_gpt_oss_20b_shapes_gpu(fmt, n):
    gen = torch.Generator().manual_seed(n)
    ex = _experts_20b(fmt)
    idx, weights = _routing(n, 4, GPT_OSS_20B.num_local_experts, gen)
    x, idx, weights = x.cuda(), idx.cuda(), weights.cuda()
    _check_against_model(ex, x, idx, weights, torch.bfloat16)
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync raises
    try:
        moe_decode(ex, x.bfloat16(), idx, weights.bfloat16())
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
def test_loads_and_float32_gpu(fmt):
    gen = torch.Generator().manual_seed(11)
    cfg = GPT_OSS_20B.replace(num_local_experts=8)
    # The bf16 pair decoder's full scale range (PAIR_DECODE_SCALES).
    ex = _experts(cfg, fmt, gen, device="cuda", scales=(66, 192) if fmt == "mxfp4" else (115, 130))
    for n, load in ((33, "one_expert"), (5, "all_one")):
        idx, weights = _routing(n, 4, cfg.num_local_experts, gen, load)
        x = torch.randn(n, cfg.hidden_size, generator=gen).cuda()
        for dtype in (torch.float32, torch.bfloat16):
            _check_against_model(ex, x, idx.cuda(), weights.cuda(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
@pytest.mark.parametrize("n", [1, 64])
def test_cuda_graph_replay_gpu(fmt, n):
    """Recorded once, replayed with new tokens and new routing: no host sync, nothing value-dependent."""
    gen = torch.Generator().manual_seed(5)
    ex = _experts_20b(fmt).to(torch.bfloat16)
    e = GPT_OSS_20B.num_local_experts
    idx, weights = _routing(n, 4, e, gen)
    x = torch.randn(n, GPT_OSS_20B.hidden_size, generator=gen).bfloat16().cuda()
    idx, weights = idx.cuda(), weights.bfloat16().cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe_decode(ex, x, idx, weights)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_decode(ex, x, idx, weights)
    for trial in range(3):
        new_idx, new_w = _routing(n, 4, e, gen, "one_expert" if trial == 1 else "random")
        x.copy_(torch.randn(n, GPT_OSS_20B.hidden_size, generator=gen))
        idx.copy_(new_idx)
        weights.copy_(new_w)
        graph.replay()
        truth = moe_decode_ref(ex, x, idx, weights)
        assert _rel(out, truth) <= TOL[torch.bfloat16], f"replay {trial}: {_rel(out, truth):.2e}"
