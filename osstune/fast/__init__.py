"""The fast path of a training step: the reference model's attention and experts through osstune's
kernels (`hooks`), and the micro-step recorded as a CUDA graph (`graphs`). The loss's kernel is chosen
in osstune.train.loss. Measurements: docs/PERFORMANCE.md.

    summary = enable_fast_path(model)                 # after apply_lora
    step = graphed_step(model, cross_entropy_sum)     # None where it cannot be graphed
"""

from osstune.fast.graphs import GraphCaptureError, GraphedStep, graphed_step, why_not_graphed
from osstune.fast.hooks import (
    CHECKPOINT_POLICIES,
    FastPathOptions,
    FastPathSummary,
    disable_fast_path,
    enable_fast_path,
    expert_lora,
    fast_attention,
    fast_experts,
    reference_reason,
    use_fast_path,
)

__all__ = [
    "CHECKPOINT_POLICIES",
    "FastPathOptions",
    "FastPathSummary",
    "GraphCaptureError",
    "GraphedStep",
    "disable_fast_path",
    "enable_fast_path",
    "expert_lora",
    "fast_attention",
    "fast_experts",
    "graphed_step",
    "reference_reason",
    "use_fast_path",
    "why_not_graphed",
]
