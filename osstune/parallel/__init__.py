"""Training on several processes: distributed plans applied to a built model from outside.

The model never imports this package. `parallelize` turns a GptOss (LoRA-wrapped or not) into its
sharded form for a World (torchrun's processes and a device mesh); the trainer then runs the same
loop as on one process, reading its share of each global batch.
"""

from osstune.parallel.comm import CommMeter
from osstune.parallel.config import ParallelConfig
from osstune.parallel.world import World, all_max, all_sum, barrier, close_world, init_world, launched
from osstune.parallel.norm import grad_norm_fn
from osstune.parallel.plan import parallelize, share

__all__ = [
    "CommMeter", "ParallelConfig", "World", "all_max", "all_sum", "barrier", "close_world", "grad_norm_fn",
    "init_world", "launched", "parallelize", "share",
]  # fmt: skip
