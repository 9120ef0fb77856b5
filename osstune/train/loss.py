"""Next-token cross-entropy from hidden states, a chunk of tokens at a time.

`cross_entropy_sum` follows the run's backend decision (`kernel`); by default, on CUDA the fused chunked
kernel (`osstune.kernels.chunked_cross_entropy_sum`: logits, loss and gradients per chunk, float32
logits, no boolean indexing, so no host sync), tested against the reference; elsewhere the
reference below. The reference: when the float32 logits of all trained tokens would exceed
`budget` bytes, each chunk's logits are recomputed in the backward pass instead of stored, so the
full (tokens x 201,088) logits never exist at once; below it, recomputing would only cost time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from osstune.kernels import chunked_cross_entropy_sum

IGNORE = -100


def cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int | None = None,
    budget: int = 1 << 30,
    kernel: bool | None = None,
) -> torch.Tensor:
    """hidden (N, H), weight (V, H), labels (N,) with -100 = not trained -> summed loss (float32).
    chunk: tokens per chunk; default: the kernel's memory-bounded choice on CUDA, 2048 elsewhere.
    kernel: the run's backend decision (TrainConfig.fast, decided once by the trainer); False is the
    reference even on CUDA. None: the kernel on CUDA tensors.

    On CUDA the kernel computes the gradients during this call (they are the backward's only
    work), so call it where a backward follows, or under torch.no_grad (then it skips them).
    """
    if hidden.is_cuda if kernel is None else kernel and hidden.is_cuda:
        total, _ = chunked_cross_entropy_sum(hidden, weight, labels, IGNORE, chunk)
        return total
    return cross_entropy_sum_ref(hidden, weight, labels, chunk or 2048, budget)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def cross_entropy_sum_ref(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 2048, budget: int = 1 << 30
) -> torch.Tensor:
    """The plain-PyTorch definition (see the module docstring); same arguments and result."""
    keep = labels != IGNORE
    hidden, labels = hidden[keep], labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    recompute = hidden.shape[0] * weight.shape[0] * 4 > budget
    for s in range(0, hidden.shape[0], chunk):
        h, y = hidden[s : s + chunk], labels[s : s + chunk]
        if recompute and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss, h, weight, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, y)
    return total
