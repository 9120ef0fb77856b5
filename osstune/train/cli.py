"""`osstune train`: recipe + flags -> TrainConfig -> train()."""

from __future__ import annotations

import argparse
import os
import sys

import yaml

# Flags that are shortcuts for recipe keys; anything else goes through --set key.sub=value.
_SHORTCUTS = {
    "model": "model",
    "data": "data.path",
    "eval_data": "data.eval_path",
    "method": "method",
    "output": "output",
    "steps": "steps",
    "lr": "optim.lr",
    "seq_len": "data.seq_len",
    "rank": "lora.r",
    "targets": "lora.targets",
    "seed": "seed",
    "device": "device",
    "report_to": "report_to",
}


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a gpt-oss model (LoRA, QLoRA or full) on a chat dataset",
        description="Fine-tune with a YAML recipe (--config) plus flags; precedence: defaults < recipe < flags < --set.",
    )
    p.add_argument("--model", help="checkpoint dir, Hugging Face id or preset (tiny, gpt-oss-20b, gpt-oss-120b)")
    p.add_argument("--data", help="training data: .jsonl/.json/.csv/.parquet file(s) (comma-separated or a glob), "
                   "a directory saved by datasets, or hf:org/name[:config][@split] (docs/DATA.md)")
    p.add_argument("--eval-data", dest="eval_data", help="held-out data for eval loss")
    p.add_argument("--method", choices=("lora", "qlora", "full"))
    p.add_argument("--output", help="run directory: checkpoints, metrics.jsonl, loss.png, the adapter or model")
    p.add_argument("--config", help="YAML recipe (see osstune/recipes/)")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seq-len", dest="seq_len", type=int)
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--targets", help="LoRA targets: attention, experts or all")
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--report-to", dest="report_to", type=lambda s: [x for x in s.split(",") if x],
                   help="also log metrics to tensorboard and/or wandb (comma-separated)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any recipe key, e.g. --set optim.warmup_steps=10 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    p.add_argument("--stop-after", dest="stop_after", type=int, help="stop this invocation after N steps (with a checkpoint)")
    p.add_argument("--plan", choices=("auto", "check"),
                   help="auto: run the fastest configuration predicted to fit this GPU (osstune plan); check: refuse "
                        "one predicted not to fit, before loading the model")
    p.add_argument("--gpu-memory-limit", dest="gpu_memory_limit", metavar="SIZE",
                   help="use at most SIZE of the GPU (e.g. 24GB): check a smaller card's fit on a bigger one")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--nproc", type=int, help="train in N processes on this machine (one per GPU), started with torchrun")
    p.set_defaults(func=run_train)


def resolve_config(args: argparse.Namespace):
    from osstune.train.config import TrainConfig
    from osstune.train.recipe import apply_override, from_dict, load_yaml, set_path, to_dict

    data = to_dict(TrainConfig())
    if args.config:
        from osstune.train.recipe import merge

        data = merge(data, load_yaml(args.config))
    for flag, key in _SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            set_path(data, key, value)
    for override in args.overrides:
        apply_override(data, override)
    return from_dict(TrainConfig, data, where=args.config or "options")


def _plan_and_limit(cfg, args: argparse.Namespace):
    """--gpu-memory-limit caps this process's share of the GPU; --plan plans for what is left."""
    import torch

    from osstune.plan.hardware import detect, limit_gpu_memory, parse_size

    limit = parse_size(args.gpu_memory_limit, "--gpu-memory-limit") if args.gpu_memory_limit else None
    on_gpu = torch.cuda.is_available() and cfg.device in ("auto", "cuda") or cfg.device.startswith("cuda")
    if not on_gpu:
        raise ValueError(
            f"--plan / --gpu-memory-limit are for training on a CUDA GPU; this run's device is {cfg.device!r} and no "
            "GPU is in use. Plan for a GPU by hand with `osstune plan --gpus 1x24GB --write-recipe FILE`"
        )
    if limit is not None:
        limit_gpu_memory(limit, None if cfg.device == "auto" else cfg.device)
    if not args.plan:
        return cfg
    from osstune.plan.auto import plan_training

    cfg, line = plan_training(cfg, detect(limit), args.plan)
    if not args.quiet:
        print(f"osstune: {line}", file=sys.stderr)
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from osstune.train.recipe import to_dict

    cfg = resolve_config(args)
    if args.nproc and args.nproc > 1 and args.gpu_memory_limit:
        raise ValueError(
            "--gpu-memory-limit caps one process's GPU; it is not passed on to the --nproc processes yet. "
            "Leave it out, or cap each GPU another way (e.g. the planner's recipe for its size)"
        )
    if args.plan or args.gpu_memory_limit:
        cfg = _plan_and_limit(cfg, args)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    if not cfg.data.path:
        raise ValueError("no training data: pass --data FILE (or data.path in the recipe)")
    from osstune.parallel import launched

    if args.nproc and args.nproc > 1 and not launched():
        from osstune.parallel.launch import launch_train

        cfg.parallel.mesh_shape(args.nproc)  # a layout that cannot fit fails here, once, not in every process
        flags = ["--resume"] * args.resume + ["--quiet"] * args.quiet
        flags += ["--stop-after", str(args.stop_after)] if args.stop_after is not None else []
        return launch_train(args.nproc, to_dict(cfg), flags)
    from osstune.train.trainer import train

    result = train(cfg, resume=args.resume, quiet=args.quiet, stop_after=args.stop_after)
    if os.environ.get("RANK", "0") != "0":
        return 0  # the main process reports
    print(f"final loss {result.final_loss:.4f}; {'adapter' if cfg.method != 'full' else 'model'}: {result.artifact}")
    return 0
