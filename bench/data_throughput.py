"""Data path throughput on one CPU core: parse + render (harmony tokenization) + masks, the token
cache build, and packing. Prints tokens/s per stage and end to end.

    python bench/data_throughput.py [--rows 1500] [--seq-len 4096]

The rows are synthetic but shaped like chat fine-tuning data: a system prompt, 1-3 turns in
English, Vietnamese and Chinese, reasoning, and a tool call in a third of them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

WORDS = (
    "the model answers questions about training data with short clear sentences while tokens flow "
    "Xin chào bạn hôm nay trời đẹp chúng ta học cách tinh chỉnh mô hình ngôn ngữ "
    "我们 今天 学习 如何 微调 语言 模型 数据 很 重要 def return 42 3.14 {x: 1}"
).split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    tool = {"type": "function", "function": {"name": "search", "description": "Search the notes.",
                                             "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": text(rng, 25)}]
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": text(rng, rng.randint(10, 120))})
            if i % 3 == 0:
                messages.append({"role": "assistant", "thinking": text(rng, 20), "tool_calls": [
                    {"type": "function", "function": {"name": "search", "arguments": {"q": text(rng, 4)}}}]})
                messages.append({"role": "tool", "content": text(rng, 60)})
            messages.append({"role": "assistant", "thinking": text(rng, rng.randint(10, 80)),
                             "content": text(rng, rng.randint(20, 200))})
        rows.append({"messages": messages, **({"tools": [tool]} if i % 3 == 0 else {})})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    os.environ.setdefault("RAYON_NUM_THREADS", "1")

    from osstune.data import DataOptions, PackedLoader, TokenizedRows, build_cache, harmony_encoding

    harmony_encoding()  # load the vocabulary outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in synthetic_rows(args.rows)))
        options = DataOptions(max_length=args.seq_len, overflow="truncate")

        t = time.perf_counter()
        reader = TokenizedRows(path, options)
        tokens = sum(len(row.ids) for row in reader)
        render_s = time.perf_counter() - t

        t = time.perf_counter()
        cache = build_cache(path, options, root=Path(tmp) / "cache")
        cache_s = time.perf_counter() - t

        t = time.perf_counter()
        packed = 0
        for batch in PackedLoader(cache, seq_len=args.seq_len, batch_size=8, seed=0, epochs=1):
            packed += int((batch.doc_ids >= 0).sum())
        pack_s = time.perf_counter() - t

    print(f"{reader.summary.rows} rows, {tokens} tokens ({reader.summary.trained_tokens} trained), seq_len {args.seq_len}, 1 core")
    print(f"parse + render + mask : {tokens / render_s:>12,.0f} tokens/s  ({render_s:.2f} s)")
    print(f"cache build (all that): {tokens / cache_s:>12,.0f} tokens/s  ({cache_s:.2f} s)")
    print(f"packing from the cache: {packed / pack_s:>12,.0f} tokens/s  ({pack_s:.2f} s)")
    print(f"end to end (cache + packing): {tokens / (cache_s + pack_s):,.0f} tokens/s")


if __name__ == "__main__":
    main()
