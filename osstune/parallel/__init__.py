"""Training on several processes: distributed plans applied to a built model from outside.

The model never imports this package. `parallelize` turns a GptOss (LoRA-wrapped or not) into its
sharded form for a World (torchrun's processes and a device mesh); the trainer then runs the same
loop as on one process, reading its share of each global batch.
"""

import importlib

# Imported on first use (PEP 562): TrainConfig holds a ParallelConfig, and configs import no torch.
_HOMES = {
    "CommMeter": "comm", "ParallelConfig": "config", "World": "world", "all_max": "world", "all_sum": "world",
    "barrier": "world", "close_world": "world", "init_world": "world", "launched": "world",
    "grad_norm_fn": "norm", "parallelize": "plan", "share": "plan",
}  # fmt: skip

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'osstune.parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(f"osstune.parallel.{_HOMES[name]}"), name)
