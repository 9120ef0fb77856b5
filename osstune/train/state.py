"""Training checkpoints: trainable weights, optimizer, schedule position, data position and RNG.

Each checkpoint is a directory written under a temporary name, flushed to disk, then renamed into
place (osstune/atomic.py); `latest` names the newest complete one and is itself replaced
atomically, and only then are old checkpoints pruned. A crash at any moment leaves either the
previous checkpoint or the new one, never a half-written one that loads; a checkpoint damaged
afterwards (a truncated file) is reported and the previous one is used.
Everything is stored as safetensors + JSON: nothing is unpickled on resume.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from osstune.atomic import atomic_dir, clean_leftovers, write_bytes

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


def save_checkpoint(
    root: Path,
    state: TrainState,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, torch.Tensor],
    keep: int = 2,
) -> Path:
    """Write `step-N` (complete and on disk), then point `latest` at it, then prune old ones."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:07d}"
    meta = {"step": state.step, "tokens_seen": state.tokens_seen, "data_state": state.data_state, "config": state.config}
    rng = {"cpu": state.rng_cpu}
    rng.update({f"cuda{i}": t for i, t in enumerate(state.rng_cuda)})
    # replace: a run resumed from an older checkpoint (the newer one was corrupt) writes that step again.
    with atomic_dir(final, replace=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "trainable.safetensors")
        save_file({k: v.detach().contiguous().cpu() for k, v in optimizer.items()}, tmp / "optimizer.safetensors")
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    write_bytes(root / LATEST, final.name.encode())
    _prune(root, keep, current=final)
    return final


def _prune(root: Path, keep: int, current: Path) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def has_checkpoint(root: Path) -> bool:
    """Whether `root` holds a run's checkpoints (complete or not)."""
    return (root / LATEST).is_file() or any(p.is_dir() for p in root.glob("step-*"))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names; None when there is none. Leftovers of a killed save are removed."""
    clean_leftovers(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise ResumeError(f"{pointer} names {path.name}, which is missing or incomplete; delete {pointer} to start over")
    return path


def load_latest(root: Path) -> tuple[Path, tuple[TrainState, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Load the newest readable checkpoint under `root`: the one `latest` names or, when it cannot
    be read (a truncated file, a disk error), the previous ones in turn, with a warning naming the
    file that failed. Raises ResumeError naming every failure when none can be read."""
    clean_leftovers(root)
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    if named is not None:
        candidates = [named] + [p for p in candidates if p != named and p.name < named.name]
    if not candidates:
        raise ResumeError(f"--resume: no checkpoint in {root}; start without --resume")
    failures = []
    for path in candidates:
        try:
            loaded = load_checkpoint(path)
        except ResumeError as e:
            failures.append(str(e))
            continue
        if failures:
            warnings.warn(
                f"{'; '.join(failures)}. Resuming from the previous good checkpoint {path} instead "
                f"(the steps after {path.name} are trained again)",
                stacklevel=2,
            )
        return path, loaded
    raise ResumeError("no checkpoint can be resumed from:\n  " + "\n  ".join(failures) + "\nStart a new run (another --output).")


def load_checkpoint(path: Path) -> tuple[TrainState, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read one checkpoint; ResumeError naming the file when one is missing or damaged."""
    loaded: dict[str, Any] = {}
    for name in ("state.json", "trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
        file = path / name
        try:
            loaded[name] = json.loads(file.read_text()) if name.endswith(".json") else load_file(file)
        except (OSError, ValueError, SafetensorError) as e:  # missing, truncated or overwritten
            raise ResumeError(f"checkpoint file {file} cannot be read ({e})") from None
    meta, weights, optimizer, rng = loaded.values()
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

