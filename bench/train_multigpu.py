"""Training throughput, memory and communication on 1..N GPUs of one machine, through the real trainer.

    osstune create --preset gpt-oss-20b --mxfp4 --output /tmp/gpt-oss-20b     # random weights, real shape
    PYTHONPATH=. python3 bench/train_multigpu.py --model /tmp/gpt-oss-20b --method lora --nproc 1 2 4
    PYTHONPATH=. python3 bench/train_multigpu.py --model /tmp/gpt-oss-20b --method qlora --nproc 1 2 4 --set parallel.ep=2
    PYTHONPATH=. python3 bench/train_multigpu.py --model /tmp/gpt-oss-20b --method full --nproc 2 4 8 \
        --set parallel.reshard_after_forward=false

Each configuration runs `osstune train --nproc N` (torchrun) on synthetic rows that fill `--seq`
tokens, one sequence per rank per step (the global batch grows with N, as data parallel scales),
and reads the main rank's metrics.jsonl: tokens/s of the whole job (steps after `--warmup`), peak
memory of the fullest GPU, and the time in collectives of the sampled steps (parallel.comm_every).
Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU). Extra recipe keys: --set k=v.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = "the a of and to in is that for it as with was on be by this are from at or an have not but".split()


def write_rows(path: Path, rows: int, tokens: int, seed: int = 0) -> None:
    """Prompt/completion rows of about `tokens` tokens each (common words are one token each)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            prompt = " ".join(rng.choice(WORDS) for _ in range(tokens // 4))
            completion = " ".join(rng.choice(WORDS) for _ in range(tokens))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def run(args, nproc: int, data: Path, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "osstune", "train", "--model", args.model, "--data", str(data), "--output", str(out),
        "--method", args.method, "--steps", str(args.steps), "--seq-len", str(args.seq), "--quiet",
        "--set", "log_every=1", "--set", f"parallel.comm_every={args.comm_every}",
    ]  # fmt: skip
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    for kv in args.set:
        cmd += ["--set", kv]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"nproc": nproc, "error": done.stderr[-2000:]}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > args.warmup]
    comm = [r["comm_s"] for r in records if r.get("comm_s") is not None]
    return {
        "nproc": nproc,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_gpu_gib": max((r.get("peak_gpu_gb") or 0.0) for r in records),
        "comm_s_per_step": statistics.median(comm) if comm else None,
        "final_loss": records[-1]["loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face id")
    p.add_argument("--method", default="lora", choices=("lora", "qlora", "full"))
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    p.add_argument("--comm-every", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="osstune-multigpu-") as tmp:
        tmp = Path(tmp)
        data = tmp / "rows.jsonl"
        write_rows(data, rows=args.steps * max(args.nproc) * 2, tokens=args.seq)
        for n in args.nproc:
            result = run(args, n, data, tmp / f"run-{n}")
            results.append(result)
            print(json.dumps(result), flush=True)
    base = next((r for r in results if r["nproc"] == 1 and "error" not in r), None)
    print(f"\n{'GPUs':>4} {'tokens/s':>10} {'per GPU':>9} {'scaling':>8} {'peak GiB':>9} {'comm s/step':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['nproc']:>4} failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        scaling = f"{r['tokens_per_s'] / (r['nproc'] * base['tokens_per_s']):.2f}" if base else "-"
        comm = f"{r['comm_s_per_step']:.3f}" if r["comm_s_per_step"] is not None else "-"
        print(f"{r['nproc']:>4} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s'] / r['nproc']:>9,.0f} {scaling:>8} "
              f"{r['peak_gpu_gib']:>9.2f} {comm:>11}")  # fmt: skip


if __name__ == "__main__":
    main()
