"""Fast training and serving kernels, each beside its plain-PyTorch reference (`*_ref`).

Layer rule: this package imports only torch, triton (lazily, when a kernel runs) and osstune.config;
the reference model (osstune.model) never imports it. Notes and measured times: docs/KERNELS.md.
"""

from osstune.kernels.attention import (
    AttentionBlocks,
    AttentionInputError,
    sink_flash_attention,
    sink_flash_attention_ref,
)
from osstune.kernels.cross_entropy import (
    CrossEntropyInputError,
    chunked_cross_entropy,
    chunked_cross_entropy_sum,
    cross_entropy_ref,
)
from osstune.kernels.moe import ExpertLoRA, MoEInputError, moe_experts, moe_experts_ref
from osstune.kernels.paged_attention import (
    PagedAttentionBlocks,
    PagedAttentionInputError,
    paged_attention,
    paged_attention_ref,
    write_kv_cache,
    write_kv_cache_ref,
)

__all__ = [
    "AttentionBlocks",
    "AttentionInputError",
    "CrossEntropyInputError",
    "ExpertLoRA",
    "MoEInputError",
    "PagedAttentionBlocks",
    "PagedAttentionInputError",
    "chunked_cross_entropy",
    "chunked_cross_entropy_sum",
    "cross_entropy_ref",
    "moe_experts",
    "moe_experts_ref",
    "paged_attention",
    "paged_attention_ref",
    "sink_flash_attention",
    "sink_flash_attention_ref",
    "write_kv_cache",
    "write_kv_cache_ref",
]
