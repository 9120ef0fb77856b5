"""The processes of a run: rank, device and the device mesh, read from torchrun's environment.

One process per device. `init_world` starts torch.distributed when torchrun launched the process
(WORLD_SIZE > 1) and returns a one-process World otherwise, so the trainer has a single code path.
Backend: NCCL on CUDA, gloo on the CPU (the CPU tests run 2 and 4 processes on gloo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from osstune.parallel.config import ParallelConfig

# Mesh dimension names, outermost first. With expert parallel, dp_shard is unflattened into
# (efsdp, ep): ep borrows its ranks from data sharding, FSDP shards the experts over what is left.
DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device
    # The (sub)meshes by role, None for one process: "fsdp" (dp_replicate, dp_shard), "dp" (those
    # flattened: ranks reading different batches), "tp", and with expert parallel "ep", "efsdp".
    meshes: dict[str, DeviceMesh] | None = None
    config: ParallelConfig = ParallelConfig()
    owns_group: bool = False  # init_world started the process group, so close_world ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def dp_size(self) -> int:
        """Ranks that read different batches."""
        return 1 if self.meshes is None else self.meshes["dp"].size()

    @property
    def dp_rank(self) -> int:
        return 0 if self.meshes is None else self.meshes["dp"].get_local_rank()

    @property
    def ep_rank(self) -> int:
        """This rank's place in its expert-parallel group (0 without expert parallel)."""
        return self.meshes["ep"].get_local_rank() if self.meshes and "ep" in self.meshes else 0

    def describe(self) -> str:
        """e.g. "4 processes: data 2 x expert 2, weights sharded, resharded after forward" (the mesh;
        every process reads its own batches either way)."""
        if self.meshes is None:
            return "1 process"
        cfg = self.config
        parts = [f"data {self.dp_size // cfg.ep}" if cfg.ep > 1 else f"data {self.dp_size}"]
        parts += [f"expert {cfg.ep}"] * (cfg.ep > 1) + [f"tensor {cfg.tp}"] * (cfg.tp > 1)
        how = "replicated" if cfg.data == "replicate" else (
            "sharded, resharded after forward" if cfg.reshard_after_forward else "sharded, kept gathered until backward"
        )
        return f"{self.size} processes: {' x '.join(parts)}, weights {how}"

    def dp_group(self) -> dist.ProcessGroup | None:
        return None if self.meshes is None else self.meshes["dp"].get_group()


def launched() -> bool:
    """True inside a process that torchrun (or another launcher that sets WORLD_SIZE) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world(cfg: ParallelConfig, device: torch.device) -> World:
    """Join the process group torchrun set up and build the mesh; a lone World when not launched.

    `device` is the run's device kind; under torchrun on CUDA each process takes cuda:LOCAL_RANK.
    """
    if not launched():
        for name in ("ep", "tp"):
            if getattr(cfg, name) > 1:
                raise ValueError(
                    f"parallel.{name}={getattr(cfg, name)} splits the model over several processes; start them "
                    "with `osstune train --nproc N` or `torchrun --nproc-per-node N -m osstune train`"
                )
        return World(0, 1, device, None, cfg)
    size = int(os.environ["WORLD_SIZE"])
    replicate, shard, tp = cfg.mesh_shape(size)  # checks before any process group exists
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()  # a caller (a test, a notebook) may have started it already
    if owns:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    mesh = init_device_mesh(device.type, (replicate, shard, tp), mesh_dim_names=DIMS)
    fsdp = mesh["dp_replicate", "dp_shard"]
    meshes = {"fsdp": fsdp, "dp": fsdp._flatten("dp"), "tp": mesh["tp"]}
    if cfg.ep > 1:
        experts = mesh._unflatten("dp_shard", (shard // cfg.ep, cfg.ep), ("efsdp", "ep"))
        meshes.update(ep=experts["ep"], efsdp=experts["efsdp"])
    return World(dist.get_rank(), size, device, meshes, cfg, owns)


def close_world(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, value: float) -> float:
    """The sum of a float over the data-parallel ranks (tp ranks of one group hold the same value)."""
    if world.dp_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t, group=world.dp_group())
    return float(t)


def all_max(world: World, value: float) -> float:
    """The largest value over all ranks (e.g. peak memory per device)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
