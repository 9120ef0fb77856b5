"""HTTP serving benchmark: the `openai` client (asyncio) against `osstune serve` on loopback, and the
same load run directly on the engine, so the cost of the HTTP layer shows as a ratio.

Per concurrency level (default 1, 16, 64, 256): requests/s, output tokens/s, time to first token
and inter-token latency percentiles (p50/p90/p99). The load: streaming /v1/completions with random
token prompts of --prompt tokens and --output new tokens (greedy; with random weights a stop token
is rare, and usage counts what was generated), `concurrency` requests in flight at a time until
--requests-per-level x concurrency (at least --min-requests) are done.

This process holds the engine and the server (uvicorn in a thread, as `osstune serve` runs it);
the clients run in --client-procs separate processes so their JSON parsing does not take the
server's interpreter. The engine-direct load runs in this process on the same AsyncEngine.

  python3 bench/serve_http.py --preset gpt-oss-20b            # random weights in the real shape
  python3 bench/serve_http.py --model openai/gpt-oss-20b      # a checkpoint
  python3 bench/serve_http.py --preset tiny --levels 1 4 --output 16 --prompt 32   # a CPU check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VOCAB_SAMPLE = 200000  # ordinary tokens only


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99)}


def summarize(kind: str, concurrency: int, wall: float, records: list[dict]) -> dict:
    """records: per request {"ttft": s, "itl": [s, ...], "tokens": n}."""
    tokens = sum(r["tokens"] for r in records)
    itl = [x for r in records for x in r["itl"]]
    return {
        "kind": kind, "concurrency": concurrency, "requests": len(records), "seconds": wall,
        "requests_s": len(records) / wall, "output_tok_s": tokens / wall,
        "ttft_ms": {k: v * 1e3 for k, v in percentiles([r["ttft"] for r in records]).items()},
        "itl_ms": {k: v * 1e3 for k, v in percentiles(itl).items()},
    }


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB_SAMPLE) for _ in range(length)] for _ in range(n)]


async def _limited(concurrency: int, jobs: list, run) -> list[dict]:
    queue = list(reversed(jobs))
    out: list[dict] = []

    async def worker() -> None:
        while queue:
            out.append(await run(queue.pop()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


# ---- the client processes (HTTP) ----

def _client(url: str, jobs: list[list[int]], concurrency: int, output: int, q, barrier) -> None:
    import openai

    async def main() -> list[dict]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600)
        barrier.wait()  # every client process imported and ready: the clock starts now

        async def one(prompt: list[int]) -> dict:
            t0 = time.perf_counter()
            stream = await client.completions.create(
                model="bench", prompt=prompt, max_tokens=output, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
            first, last, itl, tokens = None, None, [], 0
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                if not chunk.choices or not chunk.choices[0].text:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
            return {"ttft": (first or time.perf_counter()) - t0, "itl": itl, "tokens": tokens}

        start = time.time()
        records = await _limited(concurrency, jobs, one)
        return start, time.time(), records

    q.put(asyncio.run(main()))


def run_http(url: str, concurrency: int, jobs: list[list[int]], output: int, procs: int) -> dict:
    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, concurrency))
    q, barrier = ctx.Queue(), ctx.Barrier(procs)
    shares = [jobs[i::procs] for i in range(procs)]
    levels = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    workers = [ctx.Process(target=_client, args=(url, s, c, output, q, barrier)) for s, c in zip(shares, levels)]
    for w in workers:
        w.start()
    parts = [q.get() for _ in workers]
    for w in workers:
        w.join()
    wall = max(end for _, end, _ in parts) - min(start for start, _, _ in parts)  # wall clocks: one machine
    return summarize("http", concurrency, wall, [r for _, _, records in parts for r in records])


# ---- the engine directly (same process, same AsyncEngine) ----

def run_direct(engine, concurrency: int, jobs: list[list[int]], output: int) -> dict:
    from osstune.serve.types import SamplingParams

    params = SamplingParams(max_tokens=output, temperature=0.0)

    async def one(prompt: list[int]) -> dict:
        t0 = time.perf_counter()
        first, last, itl, tokens = None, None, [], 0
        async for out in engine.add_request(prompt, params):
            tokens = out.num_output_tokens
            if not out.new_token_ids:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                itl.extend([(now - last) / len(out.new_token_ids)] * len(out.new_token_ids))
            last = now
        return {"ttft": (first or time.perf_counter()) - t0, "itl": itl, "tokens": tokens}

    async def main() -> tuple[float, list[dict]]:
        t0 = time.perf_counter()
        records = await _limited(concurrency, jobs, one)
        return time.perf_counter() - t0, records

    wall, records = asyncio.run(main())
    return summarize("engine", concurrency, wall, records)


def build_engine(args):
    import torch

    from osstune.serve.async_engine import AsyncEngine
    from osstune.serve.config import EngineConfig

    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.budget,
                          max_model_len=args.prompt + args.output + 16)
    if args.model:
        return AsyncEngine.from_model(args.model, config=config, log=print)
    import serve_throughput  # the random-weight builder of the engine's own benchmark

    model, _ = serve_throughput._model(args.preset)
    if not torch.cuda.is_available():
        model = model.float()
    return AsyncEngine.from_model(model, config=config, log=print)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt-oss-20b", help="random weights in this shape (unless --model)")
    ap.add_argument("--model", help="a checkpoint directory or hub id instead of random weights")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--output", type=int, default=256)
    ap.add_argument("--requests-per-level", type=int, default=4, help="requests = this x concurrency")
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--switch-interval", type=float,
                    help="sys.setswitchinterval for this process (Python's default 0.005 s): how long the engine "
                    "thread may wait for the GIL while the HTTP thread runs")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    from osstune.serve.http.context import ServerContext
    from osstune.serve.http.server import BackgroundServer

    engine = build_engine(args)
    engine.start()
    ctx = ServerContext(engine, "bench", max_in_flight=1 << 20)
    warm = prompts(2, args.prompt, seed=99)
    run_direct(engine, 2, warm, 8)  # compile/capture outside the timings
    results = []
    with BackgroundServer(ctx) as url:
        run_http(url, 2, warm, 8, 1)
        for level in args.levels:
            jobs = prompts(max(args.min_requests, args.requests_per_level * level), args.prompt, seed=level)
            for kind in ("engine", "http"):
                if kind == "engine":
                    r = run_direct(engine, level, jobs, args.output)
                else:
                    r = run_http(url, level, jobs, args.output, args.client_procs)
                results.append(r)
                print(json.dumps(r), flush=True)
    engine.shutdown()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = Path(args.model).name if args.model else args.preset
    (Path(args.out) / f"serve_http_{name}.json").write_text(json.dumps(results, indent=1))
    print(f"\n{name}: prompt {args.prompt}, output {args.output} tokens, streaming /v1/completions")
    print(f"{'conc':>5} {'kind':>6} {'req/s':>8} {'out tok/s':>10} {'TTFT p50/p90/p99 ms':>24} {'ITL p50/p90/p99 ms':>22} {'HTTP/engine':>11}")
    for r in results:
        direct = next(x for x in results if x["kind"] == "engine" and x["concurrency"] == r["concurrency"])
        ratio = r["output_tok_s"] / direct["output_tok_s"] if r["kind"] == "http" else 1.0
        t, i = r["ttft_ms"], r["itl_ms"]
        print(f"{r['concurrency']:>5} {r['kind']:>6} {r['requests_s']:>8.2f} {r['output_tok_s']:>10.1f} "
              f"{t['p50']:>8.1f}/{t['p90']:.1f}/{t['p99']:.1f} {i['p50']:>8.2f}/{i['p90']:.2f}/{i['p99']:.2f} {ratio:>11.3f}")


if __name__ == "__main__":
    main()
