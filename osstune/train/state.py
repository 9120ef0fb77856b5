"""Training checkpoints: trainable weights, optimizer, schedule position, data position and RNG.

Each checkpoint is a directory written under a temporary name, flushed to disk, then renamed into
place; `latest` names the newest complete one and is itself replaced atomically. A crash at any
moment leaves either the previous checkpoint or the new one, never a half-written one that loads.
Everything is stored as safetensors + JSON: nothing is unpickled on resume.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


class ResumeError(ValueError):
    pass


@dataclass
class TrainState:
    step: int
    tokens_seen: int
    data_state: dict[str, Any]
    config: dict[str, Any]
    rng_cpu: torch.Tensor
    rng_cuda: list[torch.Tensor]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    root: Path,
    state: TrainState,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, torch.Tensor],
    keep: int = 2,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-step-{state.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "trainable.safetensors")
    save_file({k: v.detach().contiguous().cpu() for k, v in optimizer.items()}, tmp / "optimizer.safetensors")
    rng = {"cpu": state.rng_cpu}
    rng.update({f"cuda{i}": t for i, t in enumerate(state.rng_cuda)})
    save_file(rng, tmp / "rng.safetensors")
    meta = {"step": state.step, "tokens_seen": state.tokens_seen, "data_state": state.data_state, "config": state.config}
    _write_file(tmp / "state.json", json.dumps(meta, indent=2).encode())
    for f in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
        with open(tmp / f, "rb+") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    _write_file(pointer, final.name.encode())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    _prune(root, keep, current=final)
    return final


def _prune(root: Path, keep: int, current: Path) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise ResumeError(f"{pointer} names {path.name}, which is missing or incomplete; delete {pointer} to start over")
    return path


def load_checkpoint(path: Path) -> tuple[TrainState, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    try:
        meta = json.loads((path / "state.json").read_text())
        weights = load_file(path / "trainable.safetensors")
        optimizer = load_file(path / "optimizer.safetensors")
        rng = load_file(path / "rng.safetensors")
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ResumeError(f"checkpoint {path} cannot be read: {e}") from None
    cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    state = TrainState(
        step=meta["step"],
        tokens_seen=meta["tokens_seen"],
        data_state=meta["data_state"],
        config=meta["config"],
        rng_cpu=rng["cpu"],
        rng_cuda=cuda,
    )
    return state, weights, optimizer
