"""Serving benchmark: osstune's engine against transformers' generate / generate_batch and our own
reference `osstune.infer.generate`, in the same run, on the same GPU.

gpt-oss shapes with random weights (MXFP4 experts as the checkpoints ship them, bf16 elsewhere);
greedy decoding with stop tokens ignored, so every request generates exactly its output length.
Scenarios (each in its own process, so one running out of memory does not end the others):

  batch1       one request: 256-token prompt, 256 new tokens: time to first token, decode tokens/s
  throughput   N requests of P prompt + O output tokens submitted at once: output tokens/s
  mixed        prompts 32-4,096 tokens, outputs 16-1,024 (log-uniform, seeded): continuous batching
               against static batching (the same engine, batches formed and drained whole)
  ref          osstune.infer.generate batch 1 (the reference model with a growing cache)
  hf           transformers generate, batch 1 (bf16 experts: transformers decodes MXFP4 to train)
  hf-batch     transformers generate_batch, 64 requests of 256 + 256 tokens (OOM reported as OOM)
  profile      a torch.profiler table of one eager decode step at batch 1 (where the time goes)

  python3 bench/serve_throughput.py [--preset gpt-oss-20b] [--only batch1 throughput ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB_SAMPLE = 200000  # ordinary tokens only


def _prompts(n: int, lengths, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    if isinstance(lengths, int):
        lengths = [lengths] * n
    return [torch.randint(0, VOCAB_SAMPLE, (p,), generator=g).tolist() for p in lengths]


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _model(preset: str):
    """The preset's shape with random weights drawn on the GPU (seconds; drawing 21B values on the host
    takes minutes): bf16 matrices normal(0, 0.02), zero biases, unit norms; MXFP4 experts as random
    codes with scales near 2**-6 (weights of the same magnitude)."""
    import torch

    from osstune.checkpoint.random_init import random_model_on
    from osstune.config import PRESETS

    t0 = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: checking the script on tiny
    model = random_model_on(PRESETS[preset].replace(expert_format="mxfp4"), dev)
    _sync()
    log(f"{preset} built on the GPU in {time.perf_counter() - t0:.1f} s")
    return model.eval(), time.perf_counter() - t0


def _engine(model, **kw):
    from osstune.serve.config import EngineConfig
    from osstune.serve.engine import LLMEngine

    logs = []
    t0 = time.perf_counter()
    eng = LLMEngine(model, EngineConfig(**kw), log=logs.append)
    log(f"engine ready in {time.perf_counter() - t0:.1f} s: {logs[0]}")
    return eng, logs[0]


def _drain(eng, t_add: dict[str, float]):
    """Run to completion; per request: first-token time, last-token time, tokens."""
    import torch

    first, last, count = {}, {}, {}
    while eng.has_unfinished:
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            if o.new_token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                count[o.request_id] = o.num_output_tokens
    _sync()
    return first, last, count


def run_batch1(args) -> dict:
    from osstune.serve.types import SamplingParams

    model, load_s = _model(args.preset)
    eng, report = _engine(model, max_num_seqs=16)
    params = SamplingParams(max_tokens=args.b1_new, temperature=0.0, ignore_stop=True)
    rows = []
    for rep in range(3):
        log(f"batch1 repetition {rep}")
        prompt = _prompts(1, 256, seed=rep)[0]
        t0 = time.perf_counter()
        rid = eng.add_request(prompt, params)
        first, last, count = _drain(eng, {})
        ttft = first[rid] - t0
        decode = (count[rid] - 1) / (last[rid] - first[rid])
        rows.append((ttft, decode))
    ttft, decode = rows[-1]
    return {"scenario": "batch1", "ttft_ms": ttft * 1e3, "decode_tok_s": decode, "load_s": load_s,
            "all": rows, "engine": report}


def run_throughput(args) -> dict:
    import torch

    from osstune.serve.types import SamplingParams

    model, _ = _model(args.preset)
    eng, report = _engine(model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.budget)
    # Warm-up: compile the prefill shapes outside the timed run.
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_stop=True)
    for p in _prompts(4, args.prompt, seed=99):
        eng.add_request(p, warm)
    _drain(eng, {})
    params = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_stop=True)
    prompts = _prompts(args.requests, args.prompt, seed=1)
    _sync()
    log("throughput: timed run")
    t0 = time.perf_counter()
    for p in prompts:
        eng.add_request(p, params)
    first, last, count = _drain(eng, {})
    wall = time.perf_counter() - t0
    out_tokens = sum(count.values())
    ttfts = sorted(t - t0 for t in first.values())
    return {"scenario": "throughput", "requests": args.requests, "prompt": args.prompt, "output": args.output,
            "wall_s": wall, "output_tok_s": out_tokens / wall,
            "total_tok_s": (out_tokens + args.requests * args.prompt) / wall,
            "ttft_p50_s": ttfts[len(ttfts) // 2], "preempted": eng.stats().num_preempted_total,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0, "engine": report}


def run_mixed(args) -> dict:
    import torch

    from osstune.serve.types import SamplingParams

    model, _ = _model(args.preset)
    eng, report = _engine(model, max_num_seqs=args.mixed_max_num_seqs, max_num_batched_tokens=args.budget)
    rng = random.Random(7)
    n = args.mixed_requests
    lens = [int(math.exp(rng.uniform(math.log(32), math.log(4096)))) for _ in range(n)]
    outs = [int(math.exp(rng.uniform(math.log(16), math.log(1024)))) for _ in range(n)]
    prompts = _prompts(n, lens, seed=3)
    total_out = sum(outs)
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_stop=True)
    eng.add_request(prompts[0], warm)
    _drain(eng, {})

    def params(o):
        return SamplingParams(max_tokens=o, temperature=0.0, ignore_stop=True)

    _sync()
    t0 = time.perf_counter()
    for p, o in zip(prompts, outs):
        eng.add_request(p, params(o))
    _drain(eng, {})
    continuous = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = args.mixed_max_num_seqs
    for i in range(0, n, b):
        for p, o in zip(prompts[i : i + b], outs[i : i + b]):
            eng.add_request(p, params(o))
        _drain(eng, {})
    static = time.perf_counter() - t0
    return {"scenario": "mixed", "requests": n, "max_num_seqs": b, "output_tokens": total_out,
            "continuous_tok_s": total_out / continuous, "static_tok_s": total_out / static,
            "gain": static / continuous, "engine": report}


def run_ref(args) -> dict:
    import torch

    from osstune.infer.generate import generate

    model, _ = _model(args.preset)
    prompt = _prompts(1, 256, seed=0)[0]
    generate(model, prompt, max_new_tokens=4, stop_tokens=())
    _sync()
    t0 = time.perf_counter()
    n = 32
    generate(model, prompt, max_new_tokens=n, stop_tokens=())
    _sync()
    return {"scenario": "ref", "decode_tok_s": n / (time.perf_counter() - t0)}


def _hf_model(preset: str):
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from osstune.config import PRESETS

    c = PRESETS[preset]
    hc = GptOssConfig(num_hidden_layers=c.num_hidden_layers, num_local_experts=c.num_local_experts,
                      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      head_dim=c.head_dim, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, sliding_window=c.sliding_window,
                      max_position_embeddings=c.max_position_embeddings)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = GptOssForCausalLM(hc)
        torch.set_default_dtype(torch.float32)
    return model.eval()


def run_hf(args) -> dict:
    import torch

    model = _hf_model(args.preset)
    ids = torch.tensor([_prompts(1, 256, seed=0)[0]], device="cuda")
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
    _sync()
    n = 64
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    _sync()
    return {"scenario": "hf", "decode_tok_s": n / (time.perf_counter() - t0)}


def run_hf_batch(args) -> dict:
    import torch
    from transformers import GenerationConfig

    model = _hf_model(args.preset)
    prompts = _prompts(64, 256, seed=1)
    cfg = GenerationConfig(max_new_tokens=256, do_sample=False, eos_token_id=None, pad_token_id=0)
    import logging

    errors: list[str] = []  # generate_batch catches errors in its loop and logs them

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    logging.getLogger("ContinuousBatchingLogger").addHandler(Keep())
    t0 = time.perf_counter()
    try:
        out = model.generate_batch(inputs=prompts, generation_config=cfg)
    except torch.OutOfMemoryError:
        errors.append("CUDA out of memory")
    wall = time.perf_counter() - t0
    if any("out of memory" in e for e in errors):
        return {"scenario": "hf-batch", "result": "out of memory",
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {"scenario": "hf-batch", "output_tok_s": tokens / wall, "requests": len(out)}


def run_profile(args) -> dict:
    """Kernel tables of eager steps: decode at batch 1, decode at batch 64, and a prefill step of
    `--budget` tokens (where a throughput run spends its time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from osstune.serve.types import SamplingParams

    model, _ = _model(args.preset)
    eng, _ = _engine(model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.budget, cuda_graph_max_batch=0)
    out = {"scenario": "profile"}

    def prof(name: str, steps: int) -> None:
        _sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            _sync()
            wall = (time.perf_counter() - t0) / steps
        table = p.key_averages().table(sort_by="cuda_time_total", row_limit=22)
        (Path(args.out) / f"profile_{args.preset}_{name}.txt").write_text(table)
        cuda_us = sum(e.self_device_time_total for e in p.key_averages()) / steps
        out[name] = {"wall_ms": wall * 1e3, "gpu_ms": cuda_us / 1e3}
        log(f"profile {name}: {wall * 1e3:.2f} ms a step (wall, profiled), {cuda_us / 1e3:.2f} ms of GPU time")

    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_stop=True)
    eng.add_request(_prompts(1, 256, seed=0)[0], long)
    for _ in range(6):
        eng.step()
    prof("decode1", 5)
    eng.shutdown()
    for p in _prompts(64, 256, seed=1):
        eng.add_request(p, long)
    while len(eng.scheduler.running) < 64 or any(r.num_computed < 256 for r in eng.scheduler.running):
        eng.step()
    for _ in range(3):
        eng.step()
    prof("decode64", 5)
    eng.shutdown()
    for p in _prompts(args.budget // 1024 * 2, 1024, seed=2):
        eng.add_request(p, long)
    eng.step()
    prof("prefill", 1)
    eng.shutdown()
    return out


SCENARIOS = {"batch1": run_batch1, "throughput": run_throughput, "mixed": run_mixed, "ref": run_ref,
             "hf": run_hf, "hf-batch": run_hf_batch, "profile": run_profile}


def _worker(name: str, args, q) -> None:
    try:
        q.put(SCENARIOS[name](args))
    except Exception as e:  # noqa: BLE001 - reported in the table, the other scenarios go on
        q.put({"scenario": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt-oss-20b")
    ap.add_argument("--only", nargs="+", default=["batch1", "throughput", "mixed", "ref", "hf", "hf-batch"],
                    choices=list(SCENARIOS))
    ap.add_argument("--b1-new", type=int, default=256, help="new tokens of the batch-1 request")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--output", type=int, default=512)
    ap.add_argument("--mixed-requests", type=int, default=256)
    ap.add_argument("--mixed-max-num-seqs", type=int, default=64,
                    help="batch size of both runs of `mixed` (static batching drains batches of this size)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    results = []
    for name in args.only:
        q = ctx.Queue()
        p = ctx.Process(target=_worker, args=(name, args, q))
        t0 = time.perf_counter()
        p.start()
        p.join(args.timeout)
        if p.is_alive():
            p.kill()
            r = {"scenario": name, "error": f"timed out after {args.timeout:.0f} s"}
        else:
            r = q.get() if not q.empty() else {"scenario": name, "error": f"exit code {p.exitcode}"}
        r["seconds"] = time.perf_counter() - t0
        results.append(r)
        print(json.dumps(r, default=str)[:3000], flush=True)
    (Path(args.out) / f"serve_{args.preset}.json").write_text(json.dumps(results, indent=1, default=str))
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{args.preset}, {gpu}, torch {torch.__version__}")
    for r in results:
        keys = [k for k in ("decode_tok_s", "ttft_ms", "output_tok_s", "continuous_tok_s", "static_tok_s", "gain",
                            "result", "error") if k in r]
        print(f"{r['scenario']:>11}: " + ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                                              for k in keys) + f"  ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
