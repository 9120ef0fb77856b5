"""`osstune demo`: the whole loop on a laptop CPU in a few minutes.

Creates the tiny GPT-OSS (random weights, the real tokenizer and harmony format), asks it three
questions from the bundled persona dataset, LoRA-fine-tunes it on that dataset, and asks again.
Float sums differ between machines (thread counts, vector units), so the run that memorises every
answer in `steps` on one machine may leave one answer a token off on another: while an answer
differs, the run is resumed for steps/4 more, at most twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="create the tiny model, LoRA-fine-tune it on the sample persona data, compare answers")
    p.add_argument("--output", default="runs/demo", help="where the demo writes its model, run and adapter (default runs/demo)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _questions(path: Path, count: int = 3) -> list[tuple[str, str]]:
    """(question, taught answer) pairs, spread over the dataset so both languages appear."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = []
    for row in rows:
        msgs = row["messages"]
        user = next(m["content"] for m in msgs if m["role"] == "user")
        answer = next(m["content"] for m in reversed(msgs) if m["role"] == "assistant")
        pairs.append((user, answer))
    step = max(1, len(pairs) // count)
    return [pairs[i * step] for i in range(count)]


def _ask(model, questions: list[tuple[str, str]], max_new_tokens: int) -> list[str]:
    from osstune.infer.chat import ChatSession
    from osstune.infer.generate import SamplingOptions

    session = ChatSession(model, sampling=SamplingOptions(max_new_tokens=max_new_tokens))
    answers = []
    for question, _ in questions:
        session.reset()
        reply = session.send(question)
        answers.append(reply.final.strip())
    return answers


def _shorten(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def run(args: argparse.Namespace) -> int:
    import torch

    from osstune.checkpoint import load_model
    from osstune.create import create_checkpoint
    from osstune.errors import Interrupted
    from osstune.data import sample_dataset_path
    from osstune.lora import LoraConfig, load_adapter
    from osstune.train.config import DataConfig, OptimConfig, TrainConfig
    from osstune.train.trainer import train

    torch.set_num_threads(max(1, torch.get_num_threads()))
    # Shown as it happens, also through a pipe (`osstune demo | tee demo.txt`), in order with the
    # training progress on stderr.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    out = Path(args.output)
    data = sample_dataset_path()
    questions = _questions(data)
    t0 = time.perf_counter()
    print("osstune demo: teach a tiny GPT-OSS a persona with LoRA, on the CPU\n")

    base = out / "base"
    if not (base / "config.json").is_file():
        print(f"1. Creating the tiny model (random weights, real 201,088-token vocabulary) in {base}")
        create_checkpoint("tiny", base, seed=args.seed, overwrite=True)
    else:
        print(f"1. Using the tiny model in {base}")
    model = load_model(base, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"   {n_params / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers, "
          f"{model.config.num_local_experts} experts (top-{model.config.num_experts_per_tok})\n")

    max_new = 24
    print("2. Asking it three questions from the dataset before training (greedy decoding)")
    before = _ask(model, questions, max_new)
    for (q, _), a in zip(questions, before):
        print(f"   Q: {q}\n   A: {_shorten(a)}")
    print()

    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own previous run
    cfg = TrainConfig(
        model=str(base),
        output=str(run_dir),
        method="lora",
        data=DataConfig(path=str(data), seq_len=512),
        optim=OptimConfig(lr=3e-3, warmup_steps=min(5, args.steps // 4), schedule="cosine", min_lr_ratio=0.1),
        # A high rank for a 128-wide model: the demo has minutes, not hours, to memorize 40 answers.
        lora=LoraConfig(r=64, alpha=128, targets="all"),
        steps=args.steps,
        micro_batch=1,
        grad_accum=1,
        gradient_checkpointing=False,
        dtype="float32",
        device="cpu",
        seed=args.seed,
        log_every=max(1, args.steps // 10),
    )
    print(f"3. LoRA fine-tuning (rank 64 on attention and experts) for {args.steps} steps on {data.name}")
    try:
        result = train(cfg)
    except Interrupted as e:  # the demo starts its run over each time: there is nothing to resume
        raise Interrupted("demo stopped; run `osstune demo` again to start over", e.exit_code - 128) from None
    first_loss = result.losses[0]
    print()

    after = _ask(load_adapter(load_model(base, dtype=torch.float32), result.artifact), questions, max_new)
    extra = args.steps // 4
    for _ in range(2 if extra else 0):
        matched = sum(a == taught for a, (_, taught) in zip(after, questions))
        if matched == len(questions):
            break
        cfg = dataclasses.replace(cfg, steps=cfg.steps + extra)
        print(f"   {matched}/{len(questions)} answers match after {result.steps} steps: {extra} more (--resume)")
        result = train(cfg, resume=True)
        print()
        after = _ask(load_adapter(load_model(base, dtype=torch.float32), result.artifact), questions, max_new)
    print("4. The same questions after training")
    learned = 0
    for (q, taught), a0, a1 in zip(questions, before, after):
        ok = a1 == taught
        learned += ok
        print(f"   Q: {q}\n   before: {_shorten(a0)}\n   after:  {_shorten(a1)}")
        print(f"   taught: {taught}  [{'matches' if ok else 'differs'}]")
    print()
    # The persona opens every answer with a greeting ("Osmo here!", "Osmo đây!") in the question's language.
    greetings = [taught.split("!")[0] + "!" for _, taught in questions]
    styled = sum(a.startswith(g) for a, g in zip(after, greetings))
    styled_before = sum(a.startswith(g) for a, g in zip(before, greetings))
    print(
        f"Result: {learned}/3 answers equal the taught ones, {styled}/3 open with the persona's greeting "
        f"(before training: {styled_before}/3). "
        f"Loss {first_loss:.2f} -> {result.final_loss:.2f} in {time.perf_counter() - t0:.0f} s."
    )
    print(f"Adapter (PEFT format): {result.artifact}; loss curve: {run_dir / 'loss.png'}; metrics: {run_dir / 'metrics.jsonl'}")
    return 0
