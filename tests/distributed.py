"""Run a function in N processes joined by a gloo process group (torch.multiprocessing spawn).

One spawn per test module, several cases inside it: starting processes and importing torch is
what costs time on a CPU. The function gets (rank, *args) and writes what the parent checks to
files; an exception in any rank fails the spawn with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)  # N processes share the machine's cores
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, start_method="spawn", join=True)
