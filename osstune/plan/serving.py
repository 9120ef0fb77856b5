"""How many sequences, and how long ones, a GPU can serve: weights as stored, then the KV cache.

gpt-oss keeps two kinds of KV cache: full-attention layers hold keys and values for every token of a
sequence, sliding-window layers only for its last `sliding_window` (128) tokens. So a sequence of c
tokens takes c x (full bytes a token) + min(c, 128) x (sliding bytes a token). The cache is handed
out in blocks of `block_size` tokens (a paged cache, as vLLM's), so each sequence's share rounds up
to whole blocks, per kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from osstune.config import ModelConfig
from osstune.plan.hardware import GPUs
from osstune.plan.memory import CONTEXT_BYTES, KVCacheShape, kv_cache_shape, layer_activation_bytes, serving_weights

BLOCK_SIZE = 16
PREFILL_CHUNK = 2048  # tokens of prompt processed per forward: the workspace below is sized for it


@dataclass(frozen=True)
class ServePlan:
    gpus: GPUs
    weights: int
    workspace: int  # one forward's activations and the logits of a step, plus the CUDA context
    kv: KVCacheShape
    block_size: int
    kv_budget: int  # bytes left for the cache (0 when the weights do not fit)
    context: int
    concurrency: int
    max_context: int

    @property
    def block_bytes(self) -> int:
        """One block of `block_size` tokens in every layer of one kind together: full, sliding."""
        return self.block_size * (self.kv.full_bytes_per_token + self.kv.sliding_bytes_per_token)

    def sequence_bytes(self, context: int) -> int:
        """A sequence's cache in whole blocks: full layers for every token, sliding layers for the window."""
        full_blocks = -(-context // self.block_size)
        # The window straddles at most one block boundary more than it fills.
        sliding_blocks = min(full_blocks, -(-self.kv.window // self.block_size) + 1)
        return self.block_size * (full_blocks * self.kv.full_bytes_per_token
                                  + sliding_blocks * self.kv.sliding_bytes_per_token)  # fmt: skip

    @property
    def blocks(self) -> int:
        return self.kv_budget // self.block_bytes if self.kv_budget else 0

    def sequences_at(self, context: int) -> int:
        return self.kv_budget // self.sequence_bytes(context)

    def longest_context(self, sequences: int) -> int:
        """The longest context that `sequences` sequences can each hold at once (a multiple of the
        block size), at most the model's max_position_embeddings."""
        lo, hi = 0, self.max_context // self.block_size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if sequences * self.sequence_bytes(mid * self.block_size) <= self.kv_budget:
                lo = mid
            else:
                hi = mid - 1
        return lo * self.block_size


def plan_serving(
    model: ModelConfig, gpus: GPUs, context: int, concurrency: int, block_size: int = BLOCK_SIZE, margin: float = 0.05
) -> ServePlan:
    if context < 1 or concurrency < 1:
        raise ValueError(f"--context {context} and --concurrency {concurrency} must be at least 1")
    weights = serving_weights(model)
    # A prefill chunk's activations for one layer at a time (no autograd keeps them), the float32
    # logits of one token per sequence, the CUDA context.
    workspace = PREFILL_CHUNK * layer_activation_bytes(model) + concurrency * model.vocab_size * 4 + CONTEXT_BYTES
    budget = int(gpus.memory * (1 - margin)) - weights - workspace
    return ServePlan(gpus, weights, workspace, kv_cache_shape(model), block_size, max(budget, 0), context, concurrency,
                     model.max_position_embeddings)  # fmt: skip
