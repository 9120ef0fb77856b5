"""Sharded training checkpoints with torch.distributed.checkpoint (DCP): each rank writes its own
shards of the trainable weights and optimizer state, nothing is gathered.

Layout beside the one-process checkpoints (osstune/train/state.py), same directory names and the
same `latest` pointer: `step-NNNNNNN/` holds DCP's files (`.metadata`, `__R_0.distcp`, ...),
`state.json` (step, tokens, data position, config, world size) and `rng-R.safetensors` per rank.
All ranks write into a temporary directory that the main rank publishes once every rank is done
(osstune/atomic.py: fsynced, renamed into place), so a crash leaves the previous checkpoint or the new one.

Resuming needs the same number of processes and the same parallel layout (the data position is
per global batch; DCP could reshard the tensors, but the batches would differ).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from osstune.atomic import atomic_dir, write_bytes
from osstune.parallel.world import World, barrier

LATEST = "latest"  # the pointer file osstune/train/state.py reads too


class ShardedResumeError(ValueError):
    pass


def is_sharded(path: Path) -> bool:
    return (path / ".metadata").is_file()


def save_sharded(
    root: Path, step: int, meta: dict, tensors: dict[str, torch.Tensor], world: World, keep: int = 2
) -> Path:
    """Write one checkpoint; a collective (every rank calls it with its own shards). The main rank
    publishes it with osstune.atomic (the one durable writer), then points `latest` at it."""
    final = root / f"step-{step:07d}"
    if not world.is_main:
        _write_shards(None, tensors, world)
        barrier(world)
        return final
    with atomic_dir(final, replace=True) as tmp:  # replace: a run resumed from an older checkpoint
        _write_shards(tmp, tensors, world)
        (tmp / "state.json").write_text(json.dumps({**meta, "step": step, "world_size": world.size}, indent=2))
    write_bytes(root / LATEST, final.name.encode())
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def _write_shards(tmp: Path | None, tensors: dict[str, torch.Tensor], world: World) -> None:
    """Every rank writes its shards and RNG state into the main rank's temporary directory."""
    where = [str(tmp) if tmp is not None else None]
    if world.distributed:
        dist.broadcast_object_list(where, src=0)
    path = Path(where[0])
    dcp.save(tensors, checkpoint_id=path)
    save_file({"cpu": torch.get_rng_state()}, path / f"rng-{world.rank}.safetensors")
    barrier(world)


def read_meta(path: Path, world: World) -> dict:
    if not is_sharded(path):
        raise ShardedResumeError(
            f"checkpoint {path} was written by a one-process run; resume it with one process (without --nproc)"
        )
    meta = json.loads((path / "state.json").read_text())
    if meta.get("world_size") != world.size:
        raise ShardedResumeError(
            f"checkpoint {path} was written by {meta.get('world_size')} processes, this run has {world.size}; "
            "resume with the same number (the global batch and the data position depend on it)"
        )
    return meta


def saved_keys(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint holds, with its whole (unsharded) shape."""
    metadata = dcp.FileSystemReader(path).read_metadata()
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def load_sharded(path: Path, tensors: dict[str, torch.Tensor], world: World) -> None:
    """Fill `tensors` (this rank's shards, already shaped and placed) in place; restore this rank's RNG."""
    dcp.load(tensors, checkpoint_id=path)
    torch.set_rng_state(load_file(path / f"rng-{world.rank}.safetensors")["cpu"])
