"""`osstune train`: recipe + flags -> TrainConfig -> train()."""

from __future__ import annotations

import argparse
import os
import sys

import yaml

# Flags that are shortcuts for config keys, with their help; each flag's type and choices come from
# the TrainConfig field it sets (osstune/train/config.py). Any other key: --set key.sub=value.
_SHORTCUTS = {
    "model": ("model", "checkpoint dir, Hugging Face id or preset (tiny, gpt-oss-20b, gpt-oss-120b)"),
    "data": ("data.path", "training data: .jsonl/.json/.csv/.parquet file(s) (comma-separated or a glob), a "
             "directory saved by datasets, or hf:org/name[:config][@split] (docs/DATA.md)"),
    "eval_data": ("data.eval_path", "held-out data for eval loss"),
    "method": ("method", "what trains: LoRA adapters, LoRA over frozen MXFP4 experts, or every weight"),
    "output": ("output", "run directory: checkpoints, metrics.jsonl, loss.png, the adapter or model"),
    "steps": ("steps", "optimizer steps"),
    "lr": ("optim.lr", "peak learning rate"),
    "seq_len": ("data.seq_len", "tokens per packed sequence"),
    "rank": ("lora.r", "LoRA rank"),
    "targets": ("lora.targets", "LoRA targets: attention, experts or all"),
    "seed": ("seed", "random seed (weights of new adapters, data order)"),
    "device": ("device", "auto, cpu, cuda or cuda:N"),
    "report_to": ("report_to", "also log metrics to tensorboard and/or wandb (comma-separated)"),
    "skip_invalid": ("data.skip_invalid", "skip invalid data rows (counted and reported) instead of failing"),
}


def _field_type(key: str):
    import typing

    from osstune.train.config import TrainConfig

    cls, tp = TrainConfig, None
    for part in key.split("."):
        tp = typing.get_type_hints(cls)[part]
        cls = tp
    return tp


def add_commands(sub: argparse._SubParsersAction) -> None:
    import typing

    from osstune.train.config import TrainConfig
    from osstune.train.recipe import to_dict

    p = sub.add_parser(
        "train",
        help="fine-tune a gpt-oss model (LoRA, QLoRA or full) on a chat dataset",
        description="Fine-tune with a YAML recipe (--config) plus flags; precedence: defaults < recipe < flags < --set.",
    )
    defaults = to_dict(TrainConfig())
    for flag, (key, text) in _SHORTCUTS.items():
        tp = _field_type(key)
        default = defaults
        for part in key.split("."):
            default = default[part]
        said = [key] if key != flag else []
        shown = default is not None and default is not False and not (isinstance(default, (str, list)) and not default)
        said += [f"default {default}"] if shown else []
        kw: dict = {"dest": flag, "help": f"{text} ({', '.join(said)})" if said else text}
        if typing.get_origin(tp) is typing.Literal:
            kw["choices"] = typing.get_args(tp)
        elif typing.get_origin(tp) is tuple:
            kw["type"] = lambda s: [x for x in s.split(",") if x]  # a list, checked by TrainConfig
        elif tp in (int, float):
            kw["type"] = tp
        elif tp is bool:
            kw.update(action="store_true", default=None)
        p.add_argument("--" + flag.replace("_", "-"), **kw)
    p.add_argument("--config", help="YAML recipe: a file, or a shipped recipe's name (gpt-oss-20b-qlora, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set optim.warmup_steps=10 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    p.add_argument("--stop-after", dest="stop_after", type=int, help="stop this invocation after N steps (with a checkpoint)")
    p.add_argument("--plan", choices=("auto", "check"),
                   help="auto: run the fastest configuration predicted to fit this GPU (osstune plan); check: refuse "
                        "one predicted not to fit, before loading the model")
    p.add_argument("--gpu-memory-limit", dest="gpu_memory_limit", metavar="SIZE",
                   help="use at most SIZE of the GPU (e.g. 24GB): check a smaller card's fit on a bigger one")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--nproc", type=int, help="train in N processes on this machine (one per GPU), started with torchrun")
    p.set_defaults(func=run_train)


def resolve_config(args: argparse.Namespace):
    from osstune.train.config import TrainConfig
    from osstune.train.recipe import apply_override, from_dict, key_lines, load_yaml, merge, set_path, to_dict

    data = to_dict(TrainConfig())
    lines: dict[str, str] = {}
    if args.config:
        data = merge(data, load_yaml(args.config))
        lines = key_lines(args.config)  # a bad value from the recipe is reported at its line
    overridden = []
    for flag, (key, _) in _SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            set_path(data, key, value)
            overridden.append(key)
    for override in args.overrides:
        apply_override(data, override)
        overridden.append(override.partition("=")[0])
    for key in overridden:  # ... unless the command line replaced it
        lines = {k: v for k, v in lines.items() if k != key and not k.startswith(key + ".")}
    where = " + ".join(filter(None, [args.config, "command line" if overridden or not args.config else ""]))
    return from_dict(TrainConfig, data, where=where, lines=lines)


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
        from osstune.train.sharded import check_tensor_parallel_for

        check_tensor_parallel_for(cfg)
        flags = ["--resume"] * args.resume + ["--quiet"] * args.quiet
        flags += ["--stop-after", str(args.stop_after)] if args.stop_after is not None else []
        return launch_train(args.nproc, to_dict(cfg), flags)
    from osstune.train.trainer import train

    result = train(cfg, resume=args.resume, quiet=args.quiet, stop_after=args.stop_after)
    if os.environ.get("RANK", "0") != "0":
        return 0  # the main process reports
    print(f"final loss {result.final_loss:.4f}; {'adapter' if cfg.method != 'full' else 'model'}: {result.artifact}")
    return 0
