"""Sharding degrees as data: how a multi-GPU run would split each memory term across GPUs.

Kept apart so that it can follow the multi-GPU training configuration once that exists
(osstune/parallel/); until then a plan row with a degree above 1 is marked "needs multi-GPU support".
The splits are the first-order ones: data-parallel sharding (FSDP / ZeRO-3, `dp_shard`) divides
weights, gradients and optimizer state; tensor parallelism (`tp`, osstune/parallel/tensor.py)
divides the attention and expert weights (the embedding stays whole on each tp rank; the lm_head,
norms and router too, which this first-order count divides with the other dense weights) but not
the activations kept between layers (no sequence parallel); expert parallelism (`ep`) divides the
experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from osstune.config import ModelConfig


@dataclass(frozen=True)
class Degrees:
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1

    @property
    def gpus(self) -> int:
        return self.dp_shard * self.tp * self.ep

    @property
    def single(self) -> bool:
        return self.gpus == 1

    def split_dense(self, n: int) -> int:
        return -(-n // (self.dp_shard * self.tp))

    def split_experts(self, n: int) -> int:
        return -(-n // (self.dp_shard * self.tp * self.ep))

    def split_embedding(self, n: int) -> int:
        return -(-n // self.dp_shard)

    def split_tokens(self, n: int) -> int:
        """Activations: every tp rank of a group holds its batch's whole layer inputs and outputs."""
        return n

    def label(self) -> str:
        parts = [f"{name}={v}" for name, v in (("dp_shard", self.dp_shard), ("tp", self.tp), ("ep", self.ep)) if v > 1]
        return ",".join(parts) or "1 GPU"


def degree_options(gpus: int, model: ModelConfig) -> list[Degrees]:
    """One GPU, and for `gpus` > 1 each single kind of split over all of them that the shapes allow
    (tp divides the key-value heads and the experts' intermediate size, ep the experts)."""
    out = [Degrees()]
    if gpus > 1:
        out.append(Degrees(dp_shard=gpus))
        if model.num_key_value_heads % gpus == 0 and model.intermediate_size % gpus == 0:
            out.append(Degrees(tp=gpus))
        if model.num_local_experts % gpus == 0:
            out.append(Degrees(ep=gpus))
    return out


# Whether a sharded row may be recommended: only once osstune trains on several GPUs (osstune.parallel)
# AND a recipe can say the degrees (a TrainConfig field this module then maps them to). Until both,
# a recommended sharded row would write a recipe that trains on one GPU and runs out of memory.
MULTI_GPU_WIRED = False


def multi_gpu_available() -> bool:
    return MULTI_GPU_WIRED
