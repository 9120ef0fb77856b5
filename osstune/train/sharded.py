"""The trainer's steps that differ when it runs as several processes (osstune.parallel): options
that do not combine with it, sharded checkpoints, and the artifact gathered and written once."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from osstune.parallel import World, barrier
from osstune.parallel.checkpoint import ShardedResumeError, is_sharded, load_sharded, read_meta, save_sharded, saved_keys
from osstune.parallel.experts import expert_parameter_names
from osstune.train.config import TrainConfig


def check_options(cfg: TrainConfig, world: World) -> None:
    """Refuse options that the sharded run does not support, naming what to use instead."""
    if not world.distributed:
        if cfg.parallel.offload:
            raise ValueError("parallel.offload applies to runs of several processes (--nproc N); use memory.* for one")
        return
    for name in ("embedding", "optimizer", "activations"):
        if getattr(cfg.memory, name) == "cpu":
            raise ValueError(
                f"memory.{name}='cpu' is for one process; with {world.size} processes set it to 'gpu' "
                "(parallel.offload keeps the sharded weights and optimizer in host memory instead)"
            )
    check_tensor_parallel_for(cfg)
    if cfg.optim.moments == "int8":
        raise ValueError("optim.moments='int8' is for one process; use float32 moments with several (they are sharded)")
    if cfg.parallel.offload and world.device.type != "cuda":
        raise ValueError("parallel.offload (FSDP2's CPUOffloadPolicy) needs CUDA devices; this run is on the CPU")


def check_tensor_parallel_for(cfg: TrainConfig) -> None:
    """The model's head counts and expert sizes against parallel.tp, read from its config (nothing
    loaded): at `osstune train --nproc` before any process starts, and in each process."""
    if cfg.parallel.tp == 1:
        return
    from osstune.checkpoint import load_config, resolve_checkpoint
    from osstune.config import PRESETS
    from osstune.parallel.tensor import check_tensor_parallel

    model = PRESETS[cfg.model] if cfg.model in PRESETS else load_config(resolve_checkpoint(cfg.model))
    frozen = cfg.method == "qlora" or (
        cfg.method == "full" and not any(t in ("all", "experts", "mlp.experts") for t in cfg.full_targets)
    )
    check_tensor_parallel(
        model,
        cfg.parallel.tp,
        packed_experts=frozen and model.expert_format == "mxfp4",
        quantized_attention=cfg.attention_weights == "mxfp4",
    )


def save(
    cfg: TrainConfig, root: Path, step: int, tokens_seen: int, model, trainable, opt, data, world: World
) -> Path:
    from osstune.train.recipe import to_dict

    # Tensors that hold one ep rank's experts differ between ep ranks: each rank's go under its own key.
    split = expert_parameter_names(model)
    tag = f"@ep{world.ep_rank}"
    tensors = {f"model/{n}" + tag * (n in split): p for n, p in trainable}
    for key, value in opt.state_tensors().items():
        tensors[f"optim/{key}" + tag * (key.split("/")[1] in split)] = value
    meta = {"tokens_seen": tokens_seen, "data_state": data.train.state_dict(), "config": to_dict(cfg)}
    return save_sharded(root, step, meta, tensors, world, keep=cfg.keep_checkpoints)


def refuse_sharded(path: Path) -> None:
    """A one-process run cannot resume a checkpoint that several processes wrote (and vice versa,
    checkpoint.read_meta): say so instead of failing to read it."""
    if is_sharded(path):
        n = json.loads((path / "state.json").read_text()).get("world_size")
        raise ShardedResumeError(f"checkpoint {path} was written by {n} processes; resume it with --nproc {n}")


def saved_config(path: Path, world: World) -> dict:
    return read_meta(path, world)["config"]


def resume(path: Path, trainable, opt, data, world: World) -> tuple[int, int]:
    """Load a sharded checkpoint into this rank's shards; returns (step, tokens_seen)."""
    meta = read_meta(path, world)
    params = dict(trainable)
    template: dict[str, torch.Tensor] = {}
    for key, shape in saved_keys(path).items():
        plain, at, ep = key.partition("@ep")
        if at and int(ep) != world.ep_rank:
            continue  # another ep rank's experts
        kind, _, rest = plain.partition("/")
        if kind == "model":
            if rest not in params:
                raise ShardedResumeError(f"checkpoint {path} holds {rest!r}, which this run does not train")
            template[key] = params[rest]
            continue
        # optimizer keys: master/{name} or adam/{name}/{exp_avg,exp_avg_sq,step}
        parts = rest.split("/")
        if parts[-1] == "step":
            template[key] = torch.zeros(shape)
        else:
            template[key] = torch.zeros_like(params[parts[1]], dtype=torch.float32)
    loaded = {k.partition("@ep")[0] for k in template}
    missing = [n for n in params if f"model/{n}" not in loaded]
    if missing:
        raise ShardedResumeError(f"checkpoint {path} lacks trainable tensor {missing[0]!r}; it belongs to another run")
    load_sharded(path, template, world)
    opt.load_state_tensors(
        {k.partition("@ep")[0].removeprefix("optim/"): v for k, v in template.items() if k.startswith("optim/")}
    )
    data.train.load_state_dict(meta["data_state"])
    return meta["step"], meta["tokens_seen"]


def export(cfg: TrainConfig, model: torch.nn.Module, trainable, world: World, dtype: torch.dtype, write) -> Path:
    """Gather what the artifact needs onto the main rank, which writes it (`write(model)`) once."""
    from osstune.parallel.gather import gather_parameters

    names = None if cfg.method == "full" else {n for n, _ in trainable}
    gather_parameters(model, world, dtype, names)
    artifact = write(model) if world.is_main else Path(cfg.output) / ("model" if cfg.method == "full" else "adapter")
    barrier(world)
    return artifact
