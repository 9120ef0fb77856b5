"""The one place that decides how the runner's operations execute: plain-PyTorch references, or our
kernels (paged attention with sinks, `moe_decode` for the experts, the training grouped GEMMs for
adapters' experts) with CUDA graphs for decode steps.

`Backend.reference()` is the definition (and what a CPU runs); `Backend.for_device` picks kernels on
CUDA unless told otherwise. The runner calls only these methods, so which path ran is decided once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from osstune.kernels.norm_rope import add_rms_norm, add_rms_norm_ref, rope_qk_, rope_qk_ref
from osstune.model import Experts, attention_allowed, sink_attention

if TYPE_CHECKING:
    from osstune.serve.runner import ModelRunner, StepInputs
    from osstune.serve.scheduler import SchedulerOutput


def write_kv_ref(k, v, k_cache, v_cache, slots) -> None:
    """k/v (N, K, D) into the caches (num_blocks, block_size, K, D) at flat slots (N,)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def paged_attention_host(q, k_cache, v_cache, sinks, host_seqs, group: str, window: int | None) -> torch.Tensor:
    """Reference attention over the paged cache, driven by host-side block tables: per request,
    gather the visible keys by position and run the model's `sink_attention`."""
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    row = 0
    for start, n, tables in host_seqs:
        end = start + n
        lo = 0 if window is None else max(0, start - window + 1)
        positions = torch.arange(lo, end)
        table = torch.tensor(tables[group], dtype=torch.long)
        blocks = table[positions // bs].to(k_cache.device)
        offsets = (positions % bs).to(k_cache.device)
        k = k_cache[blocks, offsets]  # (L, K, D)
        v = v_cache[blocks, offsets]
        allowed = attention_allowed(torch.arange(start, end), positions, window).to(q.device)
        out[row : row + n] = sink_attention(q[row : row + n][None], k[None], v[None], sinks, allowed)[0]
        row += n
    return out


class Backend:
    def __init__(self, kernels: bool, cuda_graph_max_batch: int = 0) -> None:
        self.kernels = kernels
        self.cuda_graph_max_batch = cuda_graph_max_batch if kernels else 0
        self.graphs = None  # osstune.serve.graphs.DecodeGraphs, built by the engine after the cache
        if kernels:  # resolved once here, not in every layer of every step
            from osstune.fast.hooks import fast_experts
            from osstune.kernels.moe_decode import moe_decode  # the training GEMMs from 128 tokens on
            from osstune.kernels.paged_attention import paged_attention, write_kv_cache

            self._paged_attention, self._write_kv_cache = paged_attention, write_kv_cache
            self._moe_decode, self._fast_experts = moe_decode, fast_experts

    @classmethod
    def for_device(cls, device: torch.device, choice: str = "auto", cuda_graph_max_batch: int = 0) -> Backend:
        if choice == "kernels":
            from osstune.kernels._backend import triton_usable

            if not triton_usable(torch.empty(0, device=device)):
                raise ValueError(
                    f"kernels='kernels' needs Triton on {device} (a CUDA GPU, or TRITON_INTERPRET=1 on a CPU)"
                )
            return cls(True, cuda_graph_max_batch if device.type == "cuda" else 0)
        return cls(choice == "auto" and device.type == "cuda", cuda_graph_max_batch)

    @property
    def name(self) -> str:
        return "kernels" if self.kernels else "reference"

    # ---- operations ----

    def add_rms_norm(self, x, weight, eps, residual):
        """(RMSNorm(x + residual), x + residual); residual None: (RMSNorm(x), x)."""
        if not self.kernels:
            return add_rms_norm_ref(x, weight, eps, residual)
        return add_rms_norm(x, weight, eps, residual)

    def rope_qk_(self, q, k, positions, inv_freq, scale) -> None:
        (rope_qk_ if self.kernels else rope_qk_ref)(q, k, positions, inv_freq, scale)

    def write_kv(self, k, v, k_cache, v_cache, slots) -> None:
        if not self.kernels:
            return write_kv_ref(k, v, k_cache, v_cache, slots)
        self._write_kv_cache(k, v, k_cache, v_cache, slots)

    def attention(self, q, k_cache, v_cache, sinks, inp: StepInputs, group: str, window: int | None) -> torch.Tensor:
        if not self.kernels:
            return paged_attention_host(q, k_cache, v_cache, sinks, inp.host_seqs, group, window)
        return self._paged_attention(
            q, k_cache, v_cache, sinks, inp.block_tables[group], inp.seq_lens, inp.cu_seqlens_q,
            inp.max_query_len, window,
        )

    def experts(self, experts, x, idx, weights) -> torch.Tensor:
        if not self.kernels:
            return experts(x, idx, weights)
        if not isinstance(experts, Experts):  # LoRA wrappers applied in place (a trained model in chat)
            return self.lora_experts(experts, x, idx, weights)
        return self._moe_decode(experts, x, idx, weights)

    def lora_experts(self, wrapper, x, idx, weights) -> torch.Tensor:
        if not self.kernels:
            return wrapper(x, idx, weights)
        return self._fast_experts(wrapper, x, idx, weights)

    # ---- a whole step ----

    def run(self, runner: ModelRunner, inp: StepInputs, out: SchedulerOutput) -> torch.Tensor:
        """Logits (B, V) float32 of the sampled rows."""
        if self.graphs is not None and self.graphs.can_run(inp, out):
            return self.graphs.run(inp)
        hidden = runner.forward(inp)
        return runner.logits(hidden, inp.sample_rows)
