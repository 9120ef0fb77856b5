"""Options for training on several processes (torchrun). Plain data, no torch: the trainer's config
holds a `ParallelConfig`, `osstune.parallel` applies it to a built model.

The device mesh, outermost dimension first: (dp_replicate, dp_shard, tp). Ranks along dp_replicate
and dp_shard read different batches; tp ranks of one group read the same batch and split each
matrix. Expert parallel takes its `ep` ranks from dp_shard (as torchtitan does): experts are split
over ep ranks that still read different batches, tokens travel to their expert's rank by all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ParallelConfig:
    # How data-parallel ranks hold the weights. "shard": FSDP2 `fully_shard` per decoder layer, each
    # rank keeps 1/N of every weight, gradient and optimizer state (ZeRO-3, or ZeRO-2 with
    # reshard_after_forward off). "replicate": every rank a whole copy, gradients summed over ranks
    # (DDP-like; for models that fit one device).
    data: Literal["shard", "replicate"] = "shard"
    # Free each layer's gathered weights after its forward (gather them again for the backward):
    # least memory. Off keeps them until the backward (ZeRO-2-like): one all-gather less per layer.
    reshard_after_forward: bool = True
    # Ranks that split each attention and expert matrix (tensor parallel, osstune/parallel/tensor.py);
    # they read the same batches. Must divide the model's key-value heads.
    tp: int = 1
    # Ranks that split the experts of each layer (all-to-all token dispatch); 1 = none.
    ep: int = 1
    # FSDP2's CPUOffloadPolicy: sharded parameters, gradients and optimizer step in host memory.
    # CUDA only.
    offload: bool = False
    # Measure the time spent in collectives on one step out of this many (a profiler runs on that
    # step; 0 = never). The figure is reported as comm_s on the next logged step.
    comm_every: int = 10

    def __post_init__(self) -> None:
        for name in ("tp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be at least 1")
        if self.tp > 1 and self.ep > 1:
            raise ValueError(
                f"parallel.tp={self.tp} with parallel.ep={self.ep}: tensor and expert parallel do not combine yet; "
                "choose one (ep for many experts, tp for large attention and expert matrices)"
            )
        if self.tp > 1 and self.data == "replicate":
            raise ValueError(
                f"parallel.tp={self.tp} composes with sharded data parallel only; use parallel.data='shard'"
            )
        if self.comm_every < 0:
            raise ValueError(f"parallel.comm_every={self.comm_every} must be 0 (off) or positive")
        if self.data not in ("shard", "replicate"):
            raise ValueError(f"parallel.data={self.data!r}; use 'shard' or 'replicate'")
        if self.ep > 1 and self.data == "replicate":
            raise ValueError(
                f"parallel.ep={self.ep} splits experts over data-sharding ranks; parallel.data='replicate' has "
                "none. Use parallel.data='shard' with expert parallel"
            )
        if self.offload and self.data == "replicate":
            raise ValueError("parallel.offload moves sharded weights to host memory; it needs parallel.data='shard'")

    def mesh_shape(self, world_size: int) -> tuple[int, int, int]:
        """(dp_replicate, dp_shard, tp) for `world_size` processes; ValueError when they do not fit."""
        if world_size % self.tp:
            raise ValueError(f"parallel.tp={self.tp} does not divide the {world_size} processes; pick a divisor")
        dp = world_size // self.tp
        if dp % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} must divide the {dp} data-parallel ranks ({world_size} processes / tp {self.tp})"
            )
        return (dp, 1, self.tp) if self.data == "replicate" else (1, dp, self.tp)
