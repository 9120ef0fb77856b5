"""Time osstune's training kernels against their baselines at gpt-oss-20b shapes (one GPU).

    python bench/kernels.py                 # the table (about 3-5 minutes on an H100, compiles included)
    python bench/kernels.py --only attention --sweep   # also try several attention tile shapes

Each row is forward + backward (the gradients a LoRA step needs, unless the row says otherwise),
median of triton.testing.do_bench on random bf16 data. TFLOP/s counts the matmul FLOPs the row must do
(see docs/KERNELS.md); "vs" is baseline time / this row's time. Peak is the extra device memory one
forward + backward allocates above its inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
import torch.nn.functional as F

from osstune.kernels import (
    ExpertLoRA,
    chunked_cross_entropy,
    moe_experts,
    moe_experts_ref,
    sink_flash_attention,
)
from osstune.kernels.attention import default_blocks

H, I, E, TOP_K, N_Q, N_KV, D, VOCAB, WINDOW = 2880, 2880, 32, 4, 64, 8, 64, 201088, 128
ROWS: list[dict] = []


def bench(fn, grads_to_none=()) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, grad_to_none=list(grads_to_none), return_mode="median")


def host_ms(fn, iters: int = 10) -> float:
    """Host time to enqueue one call (no sync inside): when it is near the device time, the row
    measures Python and launch overhead rather than the GPU."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) / iters * 1e3
    torch.cuda.synchronize()
    return host


def peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def record(group: str, name: str, shape: str, ms: float, flops: float | None, baseline: str | None, mb: float | None,
           host: float | None = None):
    row = dict(group=group, name=name, shape=shape, ms=ms, tflops=flops / ms / 1e9 if flops else None, mb=mb,
               baseline=baseline, host=host)
    ROWS.append(row)
    print(f"  {group:9s} {name:34s} {shape:18s} {ms:9.3f} ms" + (f" {row['tflops']:7.1f} TFLOP/s" if flops else ""), flush=True)


# ---------------------------------------------------------------- attention


def attention_pairs(t: int, window: int | None) -> int:
    """(query, key) pairs a causal (sliding) mask allows."""
    if window is None:
        return t * (t + 1) // 2
    w = min(window, t)
    return w * (w + 1) // 2 + (t - w) * w


def flex_sink_attention_fn(t: int, window: int | None):
    """FlexAttention + the sink as an LSE correction: out * sigmoid(lse - sink)."""
    from torch.nn.attention import flex_attention as fa

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx >= kv_idx
        if window is not None:
            ok = ok & (q_idx - kv_idx < window)
        return ok

    block_mask = fa.create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device="cuda")
    flex = torch.compile(fa.flex_attention, dynamic=False)
    aux = hasattr(fa, "AuxRequest")

    def run(q, k, v, sinks):  # q (B, T, Q, D)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        if aux:
            out, extra = flex(qt, kt, vt, block_mask=block_mask, enable_gqa=True, return_aux=fa.AuxRequest(lse=True))
            lse = extra.lse
        else:
            out, lse = flex(qt, kt, vt, block_mask=block_mask, enable_gqa=True, return_lse=True)
        out = out * torch.sigmoid(lse - sinks.view(1, -1, 1)).unsqueeze(-1).to(out.dtype)
        return out.transpose(1, 2)

    return run


def eager_sink_attention_fn(t: int, window: int | None):
    from osstune.model import attention_allowed, sink_attention

    idx = torch.arange(t, device="cuda")
    allowed = attention_allowed(idx, idx, window)
    return lambda q, k, v, sinks: sink_attention(q, k, v, sinks, allowed)


def attention_inputs(t: int, gen_seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    q = torch.randn(1, t, N_Q, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, t, N_KV, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, t, N_KV, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    sinks = torch.randn(N_Q, device="cuda", dtype=torch.float32, generator=g).requires_grad_()
    return q, k, v, sinks


def fwd_bwd(fn, inputs):
    grad = torch.randn_like(inputs[0])

    def step():
        fn(*inputs).backward(grad)

    return step


def check_flex_lse_gradients() -> str:
    """Does autograd flow through FlexAttention's LSE (the sink's gradient needs it)? Compare the
    flex-with-sinks gradients with the float32 eager reference at a small size."""
    t = 256
    q, k, v, sinks = attention_inputs(t, 1)
    grad = torch.randn_like(q)
    errs = []
    for fn in (flex_sink_attention_fn(t, None), eager_sink_attention_fn(t, None)):
        out = fn(q, k, v, sinks)
        errs.append([out.float()] + [x.float() for x in torch.autograd.grad(out, (q, k, v, sinks), grad)])
    rel = [((a - b).norm() / b.norm()).item() for a, b in zip(*errs)]
    return "flex-with-sinks vs eager, relative error out/dq/dk/dv/dsinks: " + " ".join(f"{r:.1e}" for r in rel)


def run_attention(seqs, sweep: bool, profile_attention: bool) -> None:
    print(check_flex_lse_gradients(), flush=True)
    for t in seqs:
        for window in (None, WINDOW):
            label = "full" if window is None else f"sliding {window}"
            shape = f"T={t}"
            flops = 14 * attention_pairs(t, window) * D * N_Q  # fwd 2 matmuls, bwd 5, 2 FLOPs a MAC
            inputs = attention_inputs(t)
            ours = lambda q, k, v, s: sink_flash_attention(q, k, v, s, window=window)  # noqa: E731
            base_name = f"ours {label}"
            variants = [(base_name, ours, None), (f"flex+sink {label}", flex_sink_attention_fn(t, window), base_name)]
            if t <= 4096:
                variants.append((f"eager ref {label}", eager_sink_attention_fn(t, window), base_name))
            for name, fn, baseline in variants:
                step = fwd_bwd(fn, inputs)
                record("attention", name, shape, bench(step, inputs), flops, baseline, peak_mb(step), host_ms(step))
            if sweep:
                sweep_attention_blocks(t, inputs, flops, window)
            if profile_attention and t == seqs[0]:
                profile(f"attention {label} T={t}", fwd_bwd(ours, inputs))


def sweep_attention_blocks(t, inputs, flops, window=None) -> None:
    """Forward tiles timed on the forward alone; dQ and dK/dV tiles each varied with the other at
    its default, timed on forward + backward."""
    q, k, v, s = inputs
    base = default_blocks(t, window)
    fwd_opts = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4)]
    if window is None:
        for bm, bn, w, st in fwd_opts:
            blocks = dataclasses.replace(base, fwd_m=bm, fwd_n=bn, fwd_warps=w, fwd_stages=st)
            with torch.no_grad():
                ms = bench(lambda: sink_flash_attention(q, k, v, s, blocks=blocks))
            print(f"  sweep T={t} fwd m{bm} n{bn} w{w} s{st}: {ms:.3f} ms  {flops * 4 / 14 / ms / 1e9:.0f} TFLOP/s", flush=True)
    tiles = [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 2)]
    opts = [dict(dq_m=a, dq_n=b_, dq_warps=w, dq_stages=st) for a, b_, w, st in tiles]
    opts += [dict(dkdv_n=a, dkdv_m=b_, dkdv_warps=w, dkdv_stages=st, dkdv_loop_group=lg)
             for a, b_, w, st in tiles for lg in (False, True)]
    for opt in opts:
        blocks = dataclasses.replace(base, **opt)
        fn = lambda q, k, v, s: sink_flash_attention(q, k, v, s, window=window, blocks=blocks)  # noqa: E731
        ms = bench(fwd_bwd(fn, inputs), inputs)
        print(f"  sweep T={t} window={window} fwd+bwd {opt}: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s", flush=True)


def profile(name: str, step) -> None:
    """Where one step's device time goes: the top kernels by CUDA time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"\n--- profile: {name} (3 steps) ---")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


# ---------------------------------------------------------------- MoE


def moe_problem(n: int, rank: int | None, train_base: bool, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(n, H, generator=g, **bf).requires_grad_()
    logits = torch.randn(n, E, generator=g, device="cuda")
    top, idx = logits.topk(TOP_K, dim=-1)
    weights = top.softmax(-1).to(torch.bfloat16).requires_grad_()
    gate_up = (torch.randn(E, H, 2 * I, generator=g, **bf) * 0.02).requires_grad_(train_base)
    gate_up_bias = torch.zeros(E, 2 * I, **bf).requires_grad_(train_base)
    down = (torch.randn(E, I, H, generator=g, **bf) * 0.02).requires_grad_(train_base)
    down_bias = torch.zeros(E, H, **bf).requires_grad_(train_base)
    lora = None
    if rank:
        lora = ExpertLoRA(
            (torch.randn(E, H, rank, generator=g, **bf) * 0.01).requires_grad_(),
            torch.zeros(E, rank, 2 * I, **bf).requires_grad_(),
            (torch.randn(E, I, rank, generator=g, **bf) * 0.01).requires_grad_(),
            torch.zeros(E, rank, H, **bf).requires_grad_(),
            2.0,
        )
    args = (x, idx, weights, gate_up, gate_up_bias, down, down_bias, 1.702, 7.0, lora)
    leaves = [x, weights] + ([gate_up, gate_up_bias, down, down_bias] if train_base else [])
    if lora:
        leaves += [lora.a_gu, lora.b_gu, lora.a_d, lora.b_d]
    return args, leaves


def run_moe(seqs, profile_moe: bool) -> None:
    for n in seqs:
        shape = f"N={n}"
        m = n * TOP_K
        for label, rank, train_base in (("frozen base", None, False), ("LoRA r=8", 8, False), ("full FT", None, True)):
            args, leaves = moe_problem(n, rank, train_base)
            flops = 12 * m * H * I + (6 * m * H * I if train_base else 0)
            grad = torch.randn_like(args[0])

            def step(fn=moe_experts):
                fn(*args).backward(grad)

            record("moe", f"ours {label}", shape, bench(step, leaves), flops, None, peak_mb(step), host_ms(step))
            if n <= 8192:
                ref = lambda: step(moe_experts_ref)  # noqa: E731
                record("moe", f"loop ref {label}", shape, bench(ref, leaves), flops, f"ours {label}", peak_mb(ref))
            if profile_moe and rank:
                profile(f"MoE {label} N={n}", step)
            del args, leaves
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- MXFP4 grouped GEMMs (QLoRA)


def mxfp4_problem(n: int, seed: int = 0, h: int = H, i: int = I):
    """The four expert GEMMs of one layer at N tokens (M = N * top-k rows, sorted by expert as the
    router spreads them): (name, kind, a, blocks, scales, offs, dense weight for the grouped_mm baseline)."""
    from osstune.quant.mxfp4 import quantize_mxfp4

    g = torch.Generator(device="cuda").manual_seed(seed)
    m = n * TOP_K
    experts = torch.randn(n, E, generator=g, device="cuda").topk(TOP_K, dim=-1).indices.flatten()
    offs = torch.searchsorted(experts.sort().values, torch.arange(E, device="cuda"), right=True).to(torch.int32)
    problems = []
    for proj, (out_f, in_f) in (("gate_up", (2 * i, h)), ("down", (h, i))):
        w = torch.randn(E, out_f, in_f, generator=g, device="cuda") * 0.02
        blocks, scales = quantize_mxfp4(w)
        dense = w.to(torch.bfloat16).transpose(1, 2).contiguous()  # (E, in, out), as the bf16 experts are stored
        x = torch.randn(m, in_f, generator=g, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(m, out_f, generator=g, device="cuda", dtype=torch.bfloat16)
        problems.append((f"{proj} fwd", "fwd", x, blocks, scales, offs, dense))
        # The bf16 input gradient multiplies by the transposed view, as autograd does for grouped_mm.
        problems.append((f"{proj} dgrad", "dgrad", dy, blocks, scales, offs, dense.transpose(1, 2)))
    return problems


def mxfp4_candidates() -> list:
    from osstune.kernels.mxfp4_gemm import MXFP4Tiles

    out = []
    for bm in (64, 128):
        for bn in (64, 128, 256):
            for bk in (64, 128, 256):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        for swap in (False, True):
                            if bn * bk > 128 * 128 or bm * max(bn, bk) > 128 * 256:  # register/smem budget
                                continue
                            out.append(MXFP4Tiles(bm, bn, bk, warps, stages, swap))
    return out


def _precompile(args) -> int:
    """Child process: compile a share of the candidates into Triton's disk cache, so that the timing
    loop finds them compiled. Small sizes with the real ones' divisibility (Triton specialises integer
    arguments and strides on divisibility by 16, not on their values): K = 96 like 2880 has K / 2
    divisible by 16 and K / 32 not."""
    from osstune.kernels.mxfp4_gemm import mxfp4_grouped_mm, mxfp4_grouped_mm_t

    share, workers = args
    n = 0
    for i, tiles in enumerate(mxfp4_candidates()):
        if i % workers != share:
            continue
        for _, kind, a, blocks, scales, offs, _ in mxfp4_problem(64, h=96, i=96):
            fn = mxfp4_grouped_mm if kind == "fwd" else mxfp4_grouped_mm_t
            try:
                fn(a, blocks, scales, offs, tiles)
                n += 1
            except Exception:  # out of shared memory or registers: skipped in the timing loop too
                pass
    torch.cuda.synchronize()
    return n


def run_mxfp4(seqs, sweep: bool) -> None:
    from osstune.kernels.mxfp4_gemm import BACKWARD_TILES, FORWARD_TILES, mxfp4_grouped_mm, mxfp4_grouped_mm_t

    if sweep:
        import multiprocessing as mp

        workers = 12
        t0 = time.time()
        with mp.get_context("spawn").Pool(workers) as pool:
            compiled = sum(pool.map(_precompile, [(s, workers) for s in range(workers)]))
        print(f"  mxfp4: {compiled} kernel variants compiled in {time.time() - t0:.0f} s", flush=True)
    for n in seqs:
        shape = f"N={n}"
        for name, kind, a, blocks, scales, offs, dense in mxfp4_problem(n):
            fn = mxfp4_grouped_mm if kind == "fwd" else mxfp4_grouped_mm_t
            flops = 2 * a.shape[0] * dense.shape[1] * dense.shape[2]
            record("mxfp4", f"grouped_mm bf16 {name}", shape, bench(lambda: torch._grouped_mm(a, dense, offs)), flops, None, None)
            default = FORWARD_TILES if kind == "fwd" else BACKWARD_TILES
            record("mxfp4", f"ours {name}", shape, bench(lambda: fn(a, blocks, scales, offs)), flops,
                   f"grouped_mm bf16 {name}", None)
            if not sweep:
                continue
            timed = []
            for tiles in mxfp4_candidates():
                try:
                    timed.append((triton_bench_fast(lambda t=tiles: fn(a, blocks, scales, offs, t)), tiles))
                except Exception:
                    continue
            timed.sort(key=lambda x: x[0])
            for ms, tiles in timed[:3]:
                record("mxfp4", f"{name} {_tiles_label(tiles)}", shape, ms, flops, f"grouped_mm bf16 {name}", None)
            print(f"  mxfp4 {name} {shape}: default {default} vs best of {len(timed)}", flush=True)
            del a, blocks, scales, dense
        torch.cuda.empty_cache()


def run_mxfp4_attention(seqs) -> None:
    """The frozen attention projections stored as MXFP4 (`attention_weights: mxfp4`): one group each,
    forward and input gradient, default tiles and a few smaller ones, and W decoded whole then a bf16
    matmul (`dequantize_mxfp4_fast`, what MXFP4DenseLinear does), against bf16 matmuls; then q, k
    and v as the fast path runs them, one GEMM over the three weights side by side (out 4096 + 512 +
    512), beside the three GEMMs it replaces, as kernels and as layers (bias, split, input gradient)."""
    from osstune.kernels.mxfp4_dequant import dequantize_mxfp4_fast
    from osstune.kernels.mxfp4_gemm import MXFP4Tiles, mxfp4_grouped_mm, mxfp4_grouped_mm_t
    from osstune.quant.mxfp4 import quantize_mxfp4

    g = torch.Generator(device="cuda").manual_seed(0)
    candidates = [None, MXFP4Tiles(64, 64, 64, 4, 3), MXFP4Tiles(128, 64, 64, 4, 3), MXFP4Tiles(128, 64, 64, 8, 3),
                  MXFP4Tiles(128, 128, 64, 4, 3), MXFP4Tiles(128, 64, 128, 8, 3), MXFP4Tiles(128, 128, 128, 4, 2)]
    totals: dict[tuple[int, str, str], float] = {}  # (tokens, fwd/dgrad, tiles) -> ms over q, k, v, o
    qkv: dict[tuple[int, str, str, str], float] = {}  # (tokens, fwd/dgrad, tiles, "3 GEMMs"/"fused") -> ms
    for n in seqs:
        offs = torch.full((1,), n, dtype=torch.int32, device="cuda")
        for proj, (out_f, in_f) in (("q", (N_Q * D, H)), ("k/v", (N_KV * D, H)), ("o", (H, N_Q * D)),
                                    ("qkv fused", ((N_Q + 2 * N_KV) * D, H))):
            w = torch.randn(1, out_f, in_f, generator=g, device="cuda") * 0.02
            blocks, scales = quantize_mxfp4(w)
            dense = w[0].to(torch.bfloat16)
            x = torch.randn(n, in_f, generator=g, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(n, out_f, generator=g, device="cuda", dtype=torch.bfloat16)
            flops = 2 * n * out_f * in_f
            for kind, fn, a, base in (("fwd", mxfp4_grouped_mm, x, lambda: x @ dense.t()),
                                      ("dgrad", mxfp4_grouped_mm_t, dy, lambda: dy @ dense)):
                name = f"attn {proj} {kind}"
                times = 2 if proj == "k/v" else 1
                ms = bench(base)
                record("mxfp4", f"bf16 matmul {name}", f"N={n}", ms, flops, None, None)
                if proj != "qkv fused":
                    totals[n, kind, "bf16 matmul"] = totals.get((n, kind, "bf16 matmul"), 0.0) + times * ms
                decoded_mm = {"fwd": lambda: x @ dequantize_mxfp4_fast(blocks[0], scales[0]).t(),
                              "dgrad": lambda: dy @ dequantize_mxfp4_fast(blocks[0], scales[0])}[kind]
                ms = bench(decoded_mm)
                record("mxfp4", f"{name} decode + bf16 matmul", f"N={n}", ms, flops, f"bf16 matmul {name}", None)
                if proj == "qkv fused":
                    qkv[n, kind, "decode + bf16 matmul", "fused"] = ms
                else:
                    totals[n, kind, "decode + bf16 matmul"] = totals.get((n, kind, "decode + bf16 matmul"), 0.0) + times * ms
                    if proj != "o":
                        key = (n, kind, "decode + bf16 matmul", "3 GEMMs")
                        qkv[key] = qkv.get(key, 0.0) + times * ms
                for tiles in candidates:
                    label = "default" if tiles is None else _tiles_label(tiles)
                    ms = bench(lambda t=tiles: fn(a, blocks, scales, offs, t))
                    record("mxfp4", f"{name} {label}", f"N={n}", ms, flops, f"bf16 matmul {name}", None)
                    if proj == "qkv fused":
                        qkv[n, kind, label, "fused"] = ms
                        continue
                    totals[n, kind, label] = totals.get((n, kind, label), 0.0) + times * ms
                    if proj != "o":
                        qkv[n, kind, label, "3 GEMMs"] = qkv.get((n, kind, label, "3 GEMMs"), 0.0) + times * ms
        run_qkv_layers(n, g)
    print("  q + k + v + o, ms:")
    for (n, kind, label), ms in sorted(totals.items()):
        print(f"    N={n} {kind:5s} {label:24s} {ms:.3f}")
    print("  q + k + v as three GEMMs / as one fused GEMM, ms:")
    for n, kind, label, how in sorted(qkv):
        if how == "fused":
            three, fused = qkv[n, kind, label, "3 GEMMs"], qkv[n, kind, label, how]
            print(f"    N={n} {kind:5s} {label:24s} {three:.3f} / {fused:.3f}")


def run_qkv_layers(n: int, g: torch.Generator) -> None:
    """q/k/v as `MXFP4Linear` layers (frozen, with biases), forward + input gradient: called one by one
    against `osstune.fast.hooks.fast_qkv` over the same layers after `fuse_mxfp4_storage`."""
    from osstune.config import PRESETS
    from osstune.fast.hooks import fast_qkv
    from osstune.model import Attention
    from osstune.quant.linear import QKV_PROJECTIONS, MXFP4Linear, fuse_mxfp4_storage

    attn = Attention(PRESETS["gpt-oss-20b"], 0).to("cuda", torch.bfloat16).requires_grad_(False)
    for kind in QKV_PROJECTIONS:
        setattr(attn, kind, MXFP4Linear.from_linear(getattr(attn, kind)))
    x = torch.randn(1, n, H, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    grads = [torch.randn(1, n, f, generator=g, device="cuda", dtype=torch.bfloat16)
             for f in (N_Q * D, N_KV * D, N_KV * D)]
    flops = 4 * n * H * (N_Q + 2 * N_KV) * D  # forward and input gradient

    def step(fn):
        torch.autograd.backward(fn(), grads)

    separate = lambda: step(lambda: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)))  # noqa: E731
    record("mxfp4", "attn q/k/v layers one by one", f"N={n}", bench(separate, [x]), flops, None, peak_mb(separate),
           host_ms(separate))
    fuse_mxfp4_storage([attn.q_proj, attn.k_proj, attn.v_proj])
    fused = lambda: step(lambda: fast_qkv(attn, x))  # noqa: E731
    record("mxfp4", "attn q/k/v layers fused", f"N={n}", bench(fused, [x]), flops, "attn q/k/v layers one by one",
           peak_mb(fused), host_ms(fused))


def _tiles_label(t) -> str:
    return f"{t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages}" + (" swap" if t.swap else "")


def triton_bench_fast(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


# ---------------------------------------------------------------- cross-entropy


def run_ce(seqs) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(VOCAB, H, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02)
    for n in seqs:
        shape = f"N={n}"
        hidden = torch.randn(n, H, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
        labels = torch.randint(0, VOCAB, (n,), generator=g, device="cuda")
        for label, train_w in (("frozen lm_head", False), ("trained lm_head", True)):
            weight.requires_grad_(train_w)
            leaves = [hidden] + ([weight] if train_w else [])
            flops = (6 if train_w else 4) * n * VOCAB * H

            def unchunked():
                F.cross_entropy((hidden @ weight.t()).float(), labels).backward()

            rows = []
            for chunk in (256, 384, 512, 1024, 2048):
                step = lambda chunk=chunk: chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk).backward()  # noqa: E731
                rows.append((f"chunked {chunk} {label}", step))
            for name, step in rows:
                record("ce", name, shape, bench(step, leaves), flops, None, peak_mb(step), host_ms(step, 3))
            record("ce", f"unchunked {label}", shape, bench(unchunked, leaves), flops, f"chunked 2048 {label}",
                   peak_mb(unchunked))
            weight.grad = None


def print_table() -> None:
    by_name = {(r["group"], r["name"], r["shape"]): r for r in ROWS}
    print()
    print("| kernel | variant | shape | ms | TFLOP/s | peak MiB | host ms | ours faster by |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        ratio = ""
        if r["baseline"]:
            base = by_name.get((r["group"], r["baseline"], r["shape"]))
            if base:
                ratio = f"{r['ms'] / base['ms']:.2f}x"
        tf = f"{r['tflops']:.0f}" if r["tflops"] else ""
        mb = f"{r['mb']:.0f}" if r["mb"] is not None else ""
        host = f"{r['host']:.2f}" if r["host"] is not None else ""
        print(f"| {r['group']} | {r['name']} | {r['shape']} | {r['ms']:.3f} | {tf} | {mb} | {host} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["attention", "moe", "mxfp4", "mxfp4-attention", "ce"], action="append")
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--sweep", action="store_true", help="also sweep attention and MXFP4 GEMM tile shapes")
    parser.add_argument("--profile", action="store_true", help="print kernel-time breakdowns (MoE with LoRA, attention)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    import triton

    print(f"{time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"triton {triton.__version__}", flush=True)
    only = args.only or ["attention", "moe", "mxfp4", "mxfp4-attention", "ce"]
    t0 = time.time()
    for part, fn in (("attention", lambda: run_attention(args.seqs, args.sweep, args.profile)), ("moe", lambda: run_moe(args.seqs, args.profile)),
                     ("mxfp4", lambda: run_mxfp4(args.seqs, args.sweep)),
                     ("mxfp4-attention", lambda: run_mxfp4_attention(args.seqs)),
                     ("ce", lambda: run_ce(args.seqs))):
        if part in only:
            fn()
            print(f"[{part} done at {time.time() - t0:.0f} s]", flush=True)
            torch.cuda.empty_cache()
    print_table()


if __name__ == "__main__":
    main()
