"""`osstune train --nproc N`: start N processes on this machine with torchrun (torch.distributed.run).

torchrun gives each process its RANK, WORLD_SIZE and LOCAL_RANK and a rendezvous; when one process
fails, it stops the others and exits non-zero, so a failing rank ends the job with its error instead
of leaving the others waiting in a collective. Several machines: run torchrun yourself on each
(`torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT -m osstune train ...`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def launch_train(nproc: int, recipe: dict, flags: list[str]) -> int:
    """Run `osstune train` in `nproc` processes on `recipe` (the resolved config as a dict); returns
    the exit status (0, or that of the first process that failed)."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: give the number of processes (one per GPU), at least 1")
    with tempfile.TemporaryDirectory(prefix="osstune-launch-") as tmp:
        config = Path(tmp) / "recipe.yaml"
        config.write_text(yaml.safe_dump(recipe, sort_keys=False))
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "osstune", "train", "--config", str(config), *flags,
        ]  # fmt: skip
        return subprocess.call(cmd, env=os.environ.copy())
