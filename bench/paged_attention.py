"""Time the paged attention with sinks (osstune.kernels.paged_attention) at gpt-oss shapes (one GPU).

    PYTHONPATH=. python bench/paged_attention.py            # decode grid + prefill chunks, ~1-2 minutes
    PYTHONPATH=. python bench/paged_attention.py --long     # also batch-1 decode at 32k and 128k keys
    PYTHONPATH=. python bench/paged_attention.py --sweep    # tile shapes and split counts, a few rows (~5 min)

Q=64, K=8, D=64, block 16, bf16 cache, shuffled physical blocks. Each decode row is captured in a
CUDA graph and replayed (triton.testing.do_bench_cudagraph: no launch overhead, and a check that the
call is capturable); GB/s counts the K/V bytes the step must read (every key of a full layer, the
last `window` keys of a sliding one) over the median time. "1 pass" forces num_splits=1, "auto" is
the launcher's default (split-K when the grid is small). Prefill rows: one chunk of queries at the
end of a context; TFLOP/s counts 4 * pairs * D * Q (QK^T and PV over the allowed pairs).
"""

from __future__ import annotations

import argparse

import torch

from osstune.kernels.attention import sink_flash_attention
from osstune.kernels.paged_attention import PagedAttentionBlocks, decode_splits, paged_attention

N_Q, N_KV, D, BS, WINDOW = 64, 8, 64, 16, 128


def make_inputs(lens: list[int], queries: list[int], seed: int = 0, table_width: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    widths = [-(-n // BS) for n in lens]
    nb = sum(widths) + 1
    k_cache = torch.randn(nb, BS, N_KV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v_cache = torch.randn(nb, BS, N_KV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    perm = torch.randperm(nb, device="cuda", generator=g).to(torch.int32)
    tables = torch.zeros(len(lens), max(*widths, table_width), dtype=torch.int32, device="cuda")
    at = 0
    for i, w in enumerate(widths):
        tables[i, :w] = perm[at:at + w]
        at += w
    cu = torch.tensor([0, *torch.tensor(queries).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(queries), N_Q, D, device="cuda", dtype=torch.bfloat16, generator=g)
    sinks = torch.randn(N_Q, device="cuda", dtype=torch.float32, generator=g)
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, sinks, tables, lens_t, cu, max(queries)


def kv_bytes(lens: list[int], window: int | None) -> int:
    keys = sum(min(n, window) if window else n for n in lens)
    return keys * N_KV * D * 2 * 2  # k and v, bf16


def pairs(length: int, n: int, window: int | None) -> int:
    total = 0
    for p in range(length - n, length):
        total += min(p + 1, window) if window else p + 1
    return total


def time_ms(fn, graph: bool) -> float:
    import triton.testing

    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def decode_rows(batches: list[int], contexts: list[int], window: int | None, table_width: int = 0) -> None:
    name = f"sliding {WINDOW}" if window else "full"
    wide = f", tables {table_width} blocks wide (as the engine's graphs pass them)" if table_width else ""
    print(f"\ndecode, {name} layer{wide}: median us (GB/s of K/V read)")
    print(f"{'batch':>6} {'context':>8} {'1 pass':>18} {'auto':>18} {'splits':>7}")
    for b in batches:
        for ctx in contexts:
            lens = [ctx] * b
            try:
                inputs = make_inputs(lens, [1] * b, table_width=table_width)
            except torch.OutOfMemoryError:
                print(f"{b:6d} {ctx:8d}  (out of memory)")
                continue
            nbytes = kv_bytes(lens, window)
            cells = []
            for blocks in (PagedAttentionBlocks(num_splits=1), None):
                ms = time_ms(lambda: paged_attention(*inputs, window, blocks=blocks), graph=True)
                cells.append(f"{ms * 1e3:8.1f} ({nbytes / ms / 1e6:6.0f})")
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            splits = decode_splits(b, N_KV, inputs[4].shape[1] * BS, window, PagedAttentionBlocks(), sms)
            print(f"{b:6d} {ctx:8d} {cells[0]:>18} {cells[1]:>18} {splits:7d}", flush=True)
            del inputs
            torch.cuda.empty_cache()


def prefill_rows() -> None:
    print("\nprefill chunks: median ms (TFLOP/s); 'dense': the training flash kernel's forward on the same")
    print("keys laid out contiguously (a whole prompt only: it has no cache)")
    print(f"{'layer':>12} {'chunk':>6} {'context':>8} {'ms':>9} {'TFLOP/s':>8} {'dense ms':>9}")
    for window in (None, WINDOW):
        for chunk, ctx in ((512, 512), (2048, 2048), (512, 8192), (2048, 8192)):
            inputs = make_inputs([ctx], [chunk])
            ms = time_ms(lambda: paged_attention(*inputs, window), graph=False)
            flops = 4 * pairs(ctx, chunk, window) * D * N_Q
            name = f"sliding {WINDOW}" if window else "full"
            dense = ""
            if chunk == ctx:
                q, k_cache, v_cache, sinks, tables = inputs[:5]
                slots = tables[0].long()[:, None] * BS + torch.arange(BS, device="cuda")
                k = k_cache.flatten(0, 1)[slots.flatten()[:ctx]][None]  # (1, T, K, D)
                v = v_cache.flatten(0, 1)[slots.flatten()[:ctx]][None]
                with torch.no_grad():
                    dense_ms = time_ms(lambda: sink_flash_attention(q[None], k, v, sinks, window=window), graph=False)
                dense = f"{dense_ms:9.3f}"
            print(f"{name:>12} {chunk:6d} {ctx:8d} {ms:9.3f} {flops / ms / 1e9:8.1f} {dense:>9}", flush=True)
    # A mixed step: one 512-token chunk beside 63 decodes at 2k context.
    lens, queries = [1024] + [2048] * 63, [512] + [1] * 63
    inputs = make_inputs(lens, queries)
    for window in (None, WINDOW):
        ms = time_ms(lambda: paged_attention(*inputs, window), graph=True)
        name = f"sliding {WINDOW}" if window else "full"
        print(f"{name:>12} mixed: 1 chunk of 512 at 1k + 63 decodes at 2k: {ms * 1e3:.1f} us", flush=True)


def sweep() -> None:
    """Every tile shape on a few rows; the best three of each, to set the defaults from."""
    import itertools

    rows = [("decode b1 8k", [8192], [1], None), ("decode b16 4k", [4096] * 16, [1] * 16, None),
            ("decode b64 4k", [4096] * 64, [1] * 64, None), ("decode b256 1k", [1024] * 256, [1] * 256, None),
            ("prefill 2048 full", [2048], [2048], None), ("prefill 2048 sliding", [2048], [2048], WINDOW)]
    for name, lens, queries, window in rows:
        inputs = make_inputs(lens, queries)
        decode = max(queries) == 1
        results = []
        if decode:
            shapes = [PagedAttentionBlocks(decode_n=bn, decode_warps=w, decode_stages=st, num_splits=sp)
                      for bn, w, st, sp in itertools.product([32, 64, 128], [2, 4], [1, 2, 3], [None, 1, 8, 32])]
        else:
            shapes = [PagedAttentionBlocks(prefill_m=bm, prefill_n=bn, prefill_warps=w, prefill_stages=st)
                      for bm, bn, w, st in itertools.product([64, 128], [32, 64, 128], [4, 8], [1, 2, 3])]
        for blocks in shapes:
            try:
                ms = time_ms(lambda: paged_attention(*inputs, window, blocks=blocks), graph=decode)
            except Exception as e:  # a shape the compiler rejects (shared memory): report, go on
                print(f"  {name}: {blocks} failed: {type(e).__name__}")
                continue
            results.append((ms, blocks))
        results.sort(key=lambda r: r[0])
        base = kv_bytes(lens, window)
        print(f"{name}:")
        for ms, b in results[:3]:
            shape = (f"decode_n={b.decode_n} warps={b.decode_warps} stages={b.decode_stages} splits={b.num_splits}"
                     if decode else f"prefill_m={b.prefill_m} prefill_n={b.prefill_n} warps={b.prefill_warps} "
                     f"stages={b.prefill_stages}")
            print(f"  {ms * 1e3:9.1f} us ({base / ms / 1e6:5.0f} GB/s)  {shape}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="also batch-1 decode at 32k and 128k keys")
    parser.add_argument("--sweep", action="store_true", help="try tile shapes and split counts on a few rows")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.sweep:
        sweep()
        return
    contexts = [256, 1024, 4096, 8192]
    decode_rows([1, 16, 64, 256], contexts, None)
    decode_rows([1, 64], contexts, WINDOW)
    decode_rows([1, 16], [1024, 8192], None, table_width=131072 // BS)
    if args.long:
        decode_rows([1, 4], [32768, 131072], None)
    prefill_rows()


if __name__ == "__main__":
    main()
