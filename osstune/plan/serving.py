"""How many sequences, and how long ones, one GPU can serve with `osstune.serve`'s engine: the
weights as stored, the engine's reserve for a step, then its paged KV cache.

gpt-oss keeps two kinds of KV cache: full-attention layers hold keys and values for every token,
sliding-window layers only for the last `sliding_window` (128). The engine (osstune/serve/kv_blocks.py)
draws both from one pool of blocks of `block_size` tokens, each block a slice of every cache tensor
(one tensor pair per full + sliding layer pair), so a request of c tokens holds ceil(c / block_size)
full-layer blocks plus at most ceil(128 / block_size) + 1 sliding-layer blocks while decoding. The
pool's size follows the engine's own rule (osstune/serve/engine.py `kv_cache_blocks`):
gpu_memory_utilization x memory - weights - the CUDA context - one step's activations and logits -
0.5 GiB, over the bytes of a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osstune.config import ModelConfig
from osstune.plan.hardware import GPUs
from osstune.plan.memory import CONTEXT_BYTES, KVCacheShape, kv_cache_shape, meta_model
from osstune.serve.config import EngineConfig
from osstune.serve.kv_blocks import KVCacheManager

GIB = 2**30


@dataclass(frozen=True)
class ServePlan:
    gpus: GPUs
    engine: EngineConfig
    weights: int
    reserve: int  # the CUDA context, one step's activations and logits, the engine's 0.5 GiB
    kv: KVCacheShape
    block_bytes: int
    blocks: int  # in the pool (0 when the weights leave no room)
    max_context: int
    manager: KVCacheManager

    @property
    def kv_budget(self) -> int:
        return self.blocks * self.block_bytes

    def blocks_for(self, context: int) -> int:
        """Blocks one request of `context` tokens holds while decoding (the engine's own count)."""
        return self.manager.max_blocks_needed(context, 1)

    def sequences_at(self, context: int) -> int:
        usable = self.blocks - 1  # block 0 is the engine's null block
        return max(usable, 0) // self.blocks_for(context)

    def longest_context(self, sequences: int) -> int:
        """The longest context (a multiple of the block size) that `sequences` requests can each hold
        at once, at most the model's max_position_embeddings."""
        bs = self.engine.block_size
        lo, hi = 0, self.max_context // bs
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if sequences * self.blocks_for(mid * bs) <= self.blocks - 1:
                lo = mid
            else:
                hi = mid - 1
        return lo * bs


def plan_serving(model: ModelConfig, gpus: GPUs, engine: EngineConfig = EngineConfig(),
                 dtype: torch.dtype = torch.bfloat16) -> ServePlan:  # fmt: skip
    from osstune.serve.runner import kv_bytes_per_block, kv_groups

    net = meta_model(model, dtype)
    weights = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    elem = torch.empty(0, dtype=dtype).element_size()
    h, i, k = model.hidden_size, model.intermediate_size, model.num_experts_per_tok
    step = engine.max_num_batched_tokens * (h * 16 + k * i * 6) * elem
    logits = engine.max_num_seqs * model.vocab_size * 4 * 6
    reserve = CONTEXT_BYTES + step + logits + GIB // 2
    per_block = kv_bytes_per_block(net, engine.block_size, dtype)
    budget = gpus.memory * engine.gpu_memory_utilization - weights - reserve
    blocks = max(int(budget // per_block), 0)
    manager = KVCacheManager(max(blocks, 1), engine.block_size, kv_groups(net), enable_caching=False)
    return ServePlan(gpus, engine, weights, reserve, kv_cache_shape(model, elem), per_block, blocks,
                     model.max_position_embeddings, manager)  # fmt: skip
