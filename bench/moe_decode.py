"""Time the small-batch MoE (`moe_decode`) against the training grouped GEMMs at gpt-oss-20b's expert shape.

    python bench/moe_decode.py            # the table, MXFP4 and bf16 experts (about 1-2 minutes)
    python bench/moe_decode.py --sweep    # also try several tile shapes for the decode kernels

One MoE layer's experts (E = 32, H = I = 2880, top-4, random weights and routing) for N tokens.
Each variant is recorded in a CUDA graph and the replay is timed (median of triton.testing.do_bench),
as the engine replays its decode steps; "eager" is the same call launched from Python. GB/s counts
the bytes of the distinct experts the tokens chose (MXFP4: blocks + scales; bf16: the weights; biases
included), each read once: what a memory-bound kernel must read at least. "copy GB/s" is a device
copy of as many bytes in the same run: the roof.

Variants: "decode" = moe_decode's kernels (forced at every N; rows sorted by expert above
UNSORTED_MAX_ROWS); in the sweep "row" = one row per program through FMAs (only where rows are not
sorted: at 1 and 4 tokens; elsewhere it is the MMA tile), "decode sorted" / "decode unsorted" = the other choice at that N, "grouped" =
moe_experts_mxfp4 / moe_experts (what training uses), "auto" = moe_decode with its crossover
(GROUPED_FROM_TOKENS).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from osstune.config import ModelConfig
from osstune.kernels.moe import moe_experts, moe_experts_mxfp4
from osstune.kernels.moe_decode import (
    GROUPED_FROM_TOKENS,
    UNSORTED_MAX_ROWS,
    DecodeTiles,
    default_tiles,
    moe_decode,
)
from osstune.model import Experts, MXFP4Experts

CFG = ModelConfig()  # gpt-oss-20b: E = 32, H = I = 2880, top-4
TOKENS = (1, 4, 16, 64, 256, 512)
SWEEP = [
    DecodeTiles(16, 64, 128, 4, 3, row=True),
    DecodeTiles(16, 32, 256, 4, 3, row=True),
    DecodeTiles(16, 128, 128, 8, 3, row=True),
    DecodeTiles(16, 64, 64, 4, 3, row=True),
    DecodeTiles(16, 16, 256, 4, 3, True),
    DecodeTiles(16, 32, 128, 4, 3, True),
    DecodeTiles(16, 32, 256, 4, 3, True),
    DecodeTiles(16, 32, 256, 4, 4, True),
    DecodeTiles(16, 32, 256, 4, 5, True),
    DecodeTiles(16, 32, 512, 4, 3, True),
    DecodeTiles(16, 32, 256, 4, 4, False),
    DecodeTiles(16, 64, 128, 4, 3, True),
    DecodeTiles(16, 64, 256, 8, 3, True),
    DecodeTiles(16, 128, 128, 8, 3, True),
    DecodeTiles(16, 64, 128, 4, 4, False),
    DecodeTiles(32, 64, 128, 4, 3, True),
    DecodeTiles(64, 64, 128, 4, 3, True),
]


def build(fmt: str) -> Experts:
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.device("cuda"):
        ex = (MXFP4Experts(CFG) if fmt == "mxfp4" else Experts(CFG)).to(torch.bfloat16)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, device="cuda", generator=g) * 0.02)
        if fmt == "mxfp4":
            for proj in ("gate_up_proj", "down_proj"):
                b, s = getattr(ex, f"{proj}_blocks"), getattr(ex, f"{proj}_scales")
                b.copy_(torch.randint(0, 256, b.shape, device="cuda", generator=g, dtype=torch.uint8))
                s.copy_(torch.randint(118, 124, s.shape, device="cuda", generator=g, dtype=torch.uint8))
    return ex


def expert_bytes(ex: Experts) -> int:
    """Bytes of one expert: every weight, scale and bias it owns."""
    return sum(t[0].numel() * t.element_size() for t in list(ex.parameters()) + list(ex.buffers()))


def routing(n: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    e, k = CFG.num_local_experts, CFG.num_experts_per_tok
    idx = torch.rand(n, e, device="cuda", generator=g).argsort(dim=1)[:, :k]
    weights = torch.rand(n, k, device="cuda", generator=g).softmax(dim=1).bfloat16()
    x = torch.randn(n, CFG.hidden_size, device="cuda", generator=g).bfloat16()
    return x, idx, weights


def timed(fn) -> tuple[float | None, float]:
    """(graph replay ms or None when it cannot be recorded, eager ms)."""
    import triton.testing

    with torch.no_grad():
        fn()
        eager = triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median")
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            replay = triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median")
        except RuntimeError as err:  # a variant that syncs cannot be recorded: report it, keep going
            print(f"    (not graphable: {str(err).splitlines()[0][:100]})", flush=True)
            replay = None
    return replay, eager


def copy_gbs(nbytes: int) -> float:
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return 2 * nbytes / ms / 1e6  # read + write


def grouped_fn(ex: Experts, x, idx, weights):
    if isinstance(ex, MXFP4Experts):
        return lambda: moe_experts_mxfp4(x, idx, weights, ex.gate_up_proj_blocks, ex.gate_up_proj_scales,
                                         ex.gate_up_proj_bias, ex.down_proj_blocks, ex.down_proj_scales,
                                         ex.down_proj_bias, ex.alpha, ex.limit)
    return lambda: moe_experts(x, idx, weights, ex.gate_up_proj, ex.gate_up_proj_bias, ex.down_proj,
                               ex.down_proj_bias, ex.alpha, ex.limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--formats", nargs="+", default=["mxfp4", "bf16"], choices=["mxfp4", "bf16"])
    parser.add_argument("--sweep", action="store_true", help="also time the decode kernels with other tiles")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/moe_decode.py needs a CUDA GPU")
    import triton

    print(f"{time.strftime('%Y-%m-%d')} {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"triton {triton.__version__}; GROUPED_FROM_TOKENS={GROUPED_FROM_TOKENS} UNSORTED_MAX_ROWS={UNSORTED_MAX_ROWS}",
          flush=True)
    rows = []
    for fmt in args.formats:
        ex = build(fmt)
        per_expert = expert_bytes(ex)
        for n in args.tokens:
            x, idx, weights = routing(n, n)
            distinct = int(idx.unique().numel())
            nbytes = distinct * per_expert
            roof = copy_gbs(nbytes)
            variants = [
                ("decode", lambda: moe_decode(ex, x, idx, weights, grouped_from_tokens=1 << 30)),
                ("decode unsorted" if n * CFG.num_experts_per_tok > UNSORTED_MAX_ROWS else "decode sorted",
                 lambda: moe_decode(ex, x, idx, weights, grouped_from_tokens=1 << 30,
                                    sort_rows=n * CFG.num_experts_per_tok <= UNSORTED_MAX_ROWS)),
                ("grouped", grouped_fn(ex, x, idx, weights)),
                ("auto", lambda: moe_decode(ex, x, idx, weights)),
            ]
            if args.sweep:
                for t in SWEEP:
                    label = f"decode {t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages}" + (
                        " swap" if t.swap else "") + (" row" if t.row else "")
                    variants.append((label, lambda t=t: moe_decode(ex, x, idx, weights, tiles=t,
                                                                   grouped_from_tokens=1 << 30)))
            for name, fn in variants:
                replay, eager = timed(fn)
                ms = replay if replay is not None else eager
                row = dict(fmt=fmt, n=n, distinct=distinct, mb=nbytes / 1e6, name=name, replay=replay, eager=eager,
                           gbs=nbytes / ms / 1e6, roof=roof)
                rows.append(row)
                shown = f"{replay * 1e3:8.1f} us" if replay is not None else "     n/a   "
                print(f"  {fmt:5s} N={n:4d} {name:34s} graph {shown}  eager {eager * 1e3:8.1f} us  "
                      f"{row['gbs']:7.0f} GB/s (copy {roof:.0f})", flush=True)
            print(f"  default tiles at N={n}: {default_tiles(idx.numel(), x)}", flush=True)
        del ex
        torch.cuda.empty_cache()
    print()
    print("| experts | N | distinct experts | MB read | variant | graph us | eager us | GB/s | copy GB/s | vs grouped |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {(r["fmt"], r["n"]): r for r in rows if r["name"] == "grouped"}
    for r in rows:
        b = base.get((r["fmt"], r["n"]))
        ms = r["replay"] if r["replay"] is not None else r["eager"]
        b_ms = (b["replay"] if b["replay"] is not None else b["eager"]) if b else None
        ratio = f"{b_ms / ms:.2f}x" if b_ms else ""
        graph = f"{r['replay'] * 1e3:.1f}" if r["replay"] is not None else "n/a"
        print(f"| {r['fmt']} | {r['n']} | {r['distinct']} | {r['mb']:.1f} | {r['name']} | {graph} | "
              f"{r['eager'] * 1e3:.1f} | {r['gbs']:.0f} | {r['roof']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
