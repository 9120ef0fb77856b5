"""Sharded training checkpoints with torch.distributed.checkpoint (DCP): each rank writes its own
shards of the trainable weights and optimizer state, nothing is gathered.

Layout beside the one-process checkpoints (osstune/train/state.py), same directory names and the
same `latest` pointer: `step-NNNNNNN/` holds DCP's files (`.metadata`, `__R_0.distcp`, ...),
`state.json` (step, tokens, data position, config, world size) and `rng-R.safetensors` per rank.
All ranks write into a temporary directory that the main rank renames into place once every rank
is done, so a crash leaves the previous checkpoint or the new one.

Resuming needs the same number of processes and the same parallel layout (the data position is
per global batch; DCP could reshard the tensors, but the batches would differ).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from osstune.parallel.world import World, barrier

LATEST = "latest"  # the pointer file osstune/train/state.py reads too


class ShardedResumeError(ValueError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_sharded(path: Path) -> bool:
    return (path / ".metadata").is_file()


def save_sharded(
    root: Path, step: int, meta: dict, tensors: dict[str, torch.Tensor], world: World, keep: int = 2
) -> Path:
    """Write one checkpoint; a collective (every rank calls it with its own shards)."""
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(world)
    dcp.save(tensors, checkpoint_id=tmp)
    save_file({"cpu": torch.get_rng_state()}, tmp / f"rng-{world.rank}.safetensors")
    barrier(world)
    if world.is_main:
        text = json.dumps({**meta, "step": step, "world_size": world.size}, indent=2)
        with open(tmp / "state.json", "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep] if keep > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


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
