"""Host time of one serving decode step: scheduling, KV block allocation, batch preparation and the
update after sampling, without the forward pass (CPU only; no GPU needed).

On the GPU this work is not overlapped with the step, so it adds to every decode step's time: at 256
sequences the forward pass takes ~30 ms on an H200, and every millisecond here is ~3% of throughput.

  python3 bench/serve_host.py                       # 64, 256 and 512 sequences at 1,024 and 4,096 tokens
  python3 bench/serve_host.py --seqs 256 --context 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from osstune.config import preset
from osstune.model import GptOss, init_weights
from osstune.serve.config import EngineConfig
from osstune.serve.engine import LLMEngine
from osstune.serve.sampling import SamplingBatch
from osstune.serve.types import SamplingParams


def measure(seqs: int, context: int, steps: int) -> dict[str, float]:
    """Median milliseconds of each host part over `steps` decode steps of `seqs` sequences whose
    prompts hold `context` tokens (the tiny model: its size does not change host work)."""
    model = init_weights(GptOss(preset("tiny")), seed=0).eval()
    block, budget = 16, 8192
    # The first requests decode while the last ones are prefilled: they must not finish before that.
    new_tokens = seqs * context // budget + steps + 32
    config = EngineConfig(max_model_len=context + new_tokens, max_num_seqs=seqs, max_num_batched_tokens=budget,
                          block_size=block, num_kv_blocks=2 * seqs * (context + new_tokens) // block + 64)  # full + sliding
    engine = LLMEngine(model, config, log=lambda s: None)
    g = torch.Generator().manual_seed(0)
    for _ in range(seqs):
        prompt = torch.randint(0, 1000, (context,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_stop=True))
    sched, runner = engine.scheduler, engine.runner
    times: dict[str, list[float]] = {"schedule": [], "prepare": [], "sampling setup": [], "update": []}
    decoding = False
    while len(times["update"]) < steps:
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        _, ids = runner.prepare(out)  # the forward pass is skipped: every sampled row gets token 5
        t2 = time.perf_counter()
        chunks = {c.request_id: c for c in out.chunks}
        SamplingBatch.build([chunks[r] for r in ids], "cpu")
        t3 = time.perf_counter()
        sched.update(out, {r: 5 for r in ids})
        t4 = time.perf_counter()
        decoding = len(out.chunks) == seqs and all(len(c.token_ids) == 1 for c in out.chunks)
        if decoding:
            for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[name].append(dt * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--context", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    rows = []
    for context in args.context:
        for seqs in args.seqs:
            rows.append((seqs, context, measure(seqs, context, args.steps)))
    names = list(rows[0][2])
    print(f"{'seqs':>5} {'context':>8} " + " ".join(f"{n:>15}" for n in names) + f" {'total ms':>9}")
    for seqs, context, t in rows:
        print(f"{seqs:>5} {context:>8} " + " ".join(f"{t[n]:>15.3f}" for n in names) + f" {sum(t.values()):>9.3f}")


if __name__ == "__main__":
    main()
