"""`osstune plan`: predicted memory and speed of the configurations that would train (or serve) a
model on these GPUs, the recommended one, and why each other one was not chosen."""

from __future__ import annotations

import argparse
import sys

GIB = 2**30


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="predict memory and speed for your GPUs, pick the techniques, write the recipe",
        description="Enumerate the training configurations osstune supports, predict each one's peak GPU memory "
        "and speed, recommend the fastest that fits, and optionally write it as a recipe. docs/PLANNING.md.",
    )
    p.add_argument("--model", help="preset, openai/gpt-oss-20b|120b, or a local checkpoint directory")
    p.add_argument("--config", help="a recipe to start from (its other options are kept)")
    p.add_argument("--method", choices=("auto", "lora", "qlora", "full"),
                   help="auto: LoRA and QLoRA (QLoRA where the model stores MXFP4 experts); default: the recipe's, else auto")
    p.add_argument("--seq", type=int, help="tokens per packed sequence (data.seq_len)")
    p.add_argument("--batch", type=int, help="sequences per optimizer step (split into micro-batches by the plan)")
    p.add_argument("--targets", help="LoRA targets: attention, experts or all")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--gpus", default="auto", help="auto (detect), or COUNTxMEMORY[:NAME], e.g. 2x24GB or 8x80GB:H100")
    p.add_argument("--gpu-memory-limit", dest="gpu_memory_limit", help="plan for at most this much of each GPU, e.g. 24GB")
    p.add_argument("--margin", type=float, default=0.05, help="fraction of GPU memory kept free (default 0.05)")
    p.add_argument("--lossy", action="store_true", help="also consider 8-bit AdamW moments and MXFP4 attention weights")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any recipe key, as for osstune train")
    p.add_argument("--all", action="store_true", help="list every configuration, not only the best trade-offs")
    p.add_argument("--write-recipe", dest="write_recipe", metavar="FILE", help="write the recommended configuration here")
    p.add_argument("--serve", action="store_true", help="plan serving instead: KV cache, sequences, longest context")
    p.add_argument("--context", type=int, default=8192, help="--serve: tokens per sequence (default 8192)")
    p.add_argument("--concurrency", type=int, default=16, help="--serve: sequences at once (default 16)")
    p.set_defaults(func=run_plan)


def base_config(args: argparse.Namespace):
    """Defaults < --config recipe < flags < --set, as `osstune train` resolves them."""
    from osstune.train.config import TrainConfig
    from osstune.train.recipe import apply_override, from_dict, load_yaml, merge, set_path, to_dict

    data = to_dict(TrainConfig())
    if args.config:
        data = merge(data, load_yaml(args.config))
    for key, value in (("model", args.model), ("data.seq_len", args.seq), ("lora.targets", args.targets),
                       ("lora.r", args.rank)):  # fmt: skip
        if value is not None:
            set_path(data, key, value)
    if args.method not in (None, "auto"):
        set_path(data, "method", args.method)
    if args.batch is not None:
        set_path(data, "micro_batch", 1)
        set_path(data, "grad_accum", args.batch)
    for override in args.overrides:
        apply_override(data, override)
    if not args.model and not args.config:
        raise ValueError("osstune plan: pass --model (a preset, openai/gpt-oss-20b, or a checkpoint directory) or --config")
    return from_dict(TrainConfig, data, where=args.config or "options")


def _gpus(args: argparse.Namespace):
    from osstune.plan.hardware import parse_size, resolve_gpus

    limit = parse_size(args.gpu_memory_limit, "--gpu-memory-limit") if args.gpu_memory_limit else None
    return resolve_gpus(args.gpus, limit)


def run_plan(args: argparse.Namespace) -> int:
    from osstune.plan.memory import model_config

    if not 0 <= args.margin < 1:
        raise ValueError(f"--margin {args.margin}: give a fraction in [0, 1)")
    base = base_config(args)
    model = model_config(base.model)
    gpus = _gpus(args)
    if args.serve:
        return _run_serve(args, model, gpus)
    from osstune.plan.search import make_plan, what_to_change

    explicit = args.method not in (None, "auto") or (args.config and args.method is None)
    methods = (base.method,) if explicit else ("lora", "qlora")
    plan = make_plan(base, gpus, methods, lossy=args.lossy, margin=args.margin, model=model)
    print(render(plan, everything=args.all))
    if plan.chosen is None:
        print(f"\n{what_to_change(plan)}", file=sys.stderr)
        return 1
    if args.write_recipe:
        from osstune.plan.recipe import write_recipe

        path = write_recipe(plan, plan.chosen, args.write_recipe)
        print(f"\nrecipe written to {path}; train with: osstune train --config {path} --data FILE")
    return 0


def describe(cfg, degrees=None) -> str:
    """A configuration in one line: method, checkpointing, what lives on the host, lossy options,
    micro-batch x accumulation, sharding."""
    parts = [cfg.method, "no-ckpt" if not cfg.gradient_checkpointing else cfg.checkpoint_policy]
    moved = [k for k in ("embedding", "optimizer", "activations") if getattr(cfg.memory, k) == "cpu"]
    if moved:
        parts.append("host:" + ",".join(moved))
    if cfg.optim.moments == "int8":
        parts.append("int8-moments")
    if cfg.attention_weights == "mxfp4":
        parts.append("mxfp4-attn")
    parts.append(f"{cfg.micro_batch}x{cfg.grad_accum}")
    if degrees is not None and not degrees.single:
        parts.append(degrees.label())
    return " ".join(parts)


def render(plan, everything: bool = False) -> str:
    from osstune.plan.search import frontier

    base = plan.candidates[0].config
    lines = [
        f"Plan: {base.model}, {base.data.seq_len} tokens x {base.micro_batch * base.grad_accum} sequences a step, "
        f"LoRA r={base.lora.r} on {base.lora.targets}" if base.method != "full" else
        f"Plan: {base.model}, full fine-tuning of {list(base.full_targets)}, {base.data.seq_len} tokens",
        f"GPUs: {plan.gpus.describe()}; fits = needs at most {plan.budget / GIB:.1f} GiB ({plan.margin:.0%} kept free)",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    rows = list(plan.candidates) if everything else frontier(plan)
    rows = sorted(rows, key=lambda c: -c.speed.tokens_per_s)
    head = f"  {'configuration':66s} {'alloc GiB':>9s} {'needs GiB':>9s} {'host GiB':>8s} {'tok/s':>8s}  verdict"
    lines += ["", head]
    for c in rows:
        mark = "*" if c is plan.chosen else " "
        m = c.memory
        lines.append(f"{mark} {describe(c.config, c.degrees):66s} {m.allocated / GIB:9.2f} {m.needed / GIB:9.2f} "
                     f"{m.host / GIB:8.2f} {c.speed.tokens_per_s:8,.0f}  {plan.why_not(c)}")  # fmt: skip
    if not everything:
        lines.append(f"({len(rows)} of {len(plan.candidates)} configurations: those no other beats in both speed and "
                     "memory; --all lists every one)")  # fmt: skip
    if plan.chosen is not None:
        lines += ["", f"Recommended: {describe(plan.chosen.config, plan.chosen.degrees)}", "  peak memory by term (GiB):"]
        for name, value in plan.chosen.memory.terms().items():
            if value:
                lines.append(f"    {name:18s} {value / GIB:8.2f}")
        lines.append(f"    {'= needs':18s} {plan.chosen.memory.needed / GIB:8.2f}")
    return "\n".join(lines)


def _run_serve(args: argparse.Namespace, model, gpus) -> int:
    from osstune.plan.serving import plan_serving
    from osstune.serve.config import EngineConfig

    engine = EngineConfig(gpu_memory_utilization=1 - args.margin) if args.margin != 0.05 else EngineConfig()
    s = plan_serving(model, gpus, engine)
    rows = [
        ("weights as stored", f"{s.weights / GIB:.2f} GiB"),
        ("engine reserve (step, logits, CUDA)", f"{s.reserve / GIB:.2f} GiB"),
        (f"KV cache ({engine.gpu_memory_utilization:.0%} of the GPU)", f"{s.kv_budget / GIB:.2f} GiB"),
        ("KV bytes a token, full-attention layers", f"{s.kv.full_bytes_per_token:,}"),
        (f"KV bytes a sequence, sliding layers ({s.kv.window})", f"{s.kv.window * s.kv.sliding_bytes_per_token:,}"),
        (f"blocks of {engine.block_size} tokens", f"{s.blocks:,} ({s.block_bytes:,} bytes each)"),
    ]
    if s.blocks > 1:
        rows += [
            (f"sequences of {args.context:,} tokens at once", f"{s.sequences_at(args.context):,}"),
            ("longest context, one sequence", f"{s.longest_context(1):,} (model max {model.max_position_embeddings:,})"),
            (f"longest context, {args.concurrency} at once", f"{s.longest_context(args.concurrency):,}"),
        ]
    print(f"Serve plan: {args.model or args.config} on one of {gpus.describe()}, osstune.serve's engine defaults")
    for name, value in rows:
        print(f"  {name:42s} {value}")
    if s.blocks <= 1:
        print("the weights leave no room for a KV cache on this GPU", file=sys.stderr)
        return 1
    if s.sequences_at(args.context) < args.concurrency:
        print(f"{args.concurrency} sequences of {args.context:,} tokens do not fit at once; at most "
              f"{s.sequences_at(args.context)}", file=sys.stderr)  # fmt: skip
        return 1
    return 0
