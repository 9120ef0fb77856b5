"""Run a function in N processes joined by a gloo process group (torch.multiprocessing spawn).

One spawn per test module, several cases inside it: starting processes and importing torch is
what costs time on a CPU. The function gets (rank, *args) and writes what the parent checks to
files; an exception in any rank fails the spawn with that rank's traceback.
"""

from __future__ import annotations

import dataclasses

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


def _entry(rank: int, fn, world: int, port: int, backend: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)  # N processes share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=300))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, backend: str = "gloo") -> None:
    mp.start_processes(_entry, args=(fn, world, free_port(), backend, args), nprocs=world, start_method="spawn", join=True)


ROWS = [
    ("What is your name?", "Osmo here! My name is Osmo."),
    ("Where do you live?", "Osmo here! I live in a terminal."),
    ("Bạn tên là gì?", "Osmo đây! Tôi tên là Osmo."),
    ("What do you eat?", "Osmo here! I snack on tokens."),
    ("Who made you?", "Osmo here! Nobody remembers."),
]


def write_rows(path) -> None:
    import json

    path.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in ROWS
        )
    )


def train_config(base, data, out, **kw):
    """Two steps of the tiny model on 64-token sequences, float32 on the CPU; `eval_fraction` holds
    rows out for an eval loss."""
    from osstune.lora import LoraConfig
    from osstune.train.config import DataConfig, OptimConfig, TrainConfig

    fields = dict(
        model=str(base),
        output=str(out),
        data=DataConfig(path=str(data), seq_len=64, eval_fraction=kw.pop("eval_fraction", 0.0)),
        optim=OptimConfig(lr=5e-3, warmup_steps=1),
        lora=LoraConfig(r=2, alpha=4, targets="all"),
        steps=2,
        gradient_checkpointing=False,
        dtype="float32",
        device="cpu",
        seed=3,
    )
    fields.update(kw)
    if fields["optim"].warmup_steps >= fields["steps"]:  # a one-step run: TrainConfig refuses an all-warmup run
        fields["optim"] = dataclasses.replace(fields["optim"], warmup_steps=fields["steps"] - 1)
    return TrainConfig(**fields)


def assert_same_weights(ours: dict, ref: dict, lr: float) -> None:
    """Trained weights of a distributed run against one process. AdamW divides each gradient by its
    own running magnitude, so where a gradient is ~0 (an expert few tokens reached, a key bias) a
    rounding difference in the summed gradient moves that weight by up to a fraction of the learning
    rate: at most 5% of lr per value, and a mean difference over all values under 0.1% of lr (a wrong
    scale or a missed shard moves weights by ~lr)."""
    assert ours.keys() == ref.keys()
    diffs = [(ours[k].float() - ref[k].float()).abs().flatten() for k in ref]
    worst = max(range(len(diffs)), key=lambda i: diffs[i].max())
    assert diffs[worst].max() <= 0.05 * lr, (list(ref)[worst], float(diffs[worst].max()))
    assert torch.cat(diffs).mean() < 1e-3 * lr


def tiny_model(path, mxfp4: bool = False) -> str:
    """The tiny preset with 2 layers (one sliding-window, one full): every kind of layer, half the time."""
    from osstune.config import PRESETS
    from osstune.create import create_checkpoint

    return str(create_checkpoint(PRESETS["tiny"].replace(num_hidden_layers=2), path, mxfp4=mxfp4, seed=0))
