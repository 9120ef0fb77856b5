"""The model runner: turns one `SchedulerOutput` into one forward pass over the paged KV cache.

The only part of the engine that touches tensors. The tokens of every scheduled request are laid
end to end (no padding: a decode is one row, a prefill chunk many), run through the model's own
modules (its weights, norms, rotary, router and experts) with attention over the paged cache, and
the rows that end a request's known tokens are sampled.

Cache layout: `k_caches[j]`, `v_caches[j]` (num_blocks, block_size, K, D), one pair per index j;
the j-th full-attention layer and the j-th sliding-window layer share pair j, so a block id from
the pool means the same bytes in either group (osstune.serve.kv_blocks). Block 0 is the null
block: freed sliding entries point there, and padded rows of a CUDA graph write there.

Adapters (LoRA per request): requests are ordered by adapter, so each adapter's tokens are one
contiguous slice of the batch; a projection adds `LoRALinear.delta` on its slice, the experts of a
slice run through that adapter's `LoRAExperts`. Base rows pay nothing.

Shape legend: N tokens of the step, S scheduled requests, B sampled rows, H hidden, Q query heads,
K key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from osstune.model import GptOss
from osstune.serve.adapters import AdapterSet
from osstune.serve.backend import Backend
from osstune.serve.kv_blocks import KVGroup
from osstune.serve.sampling import SamplingBatch, sample
from osstune.serve.scheduler import SchedulerOutput

FULL, SLIDING = "full", "sliding"


@torch.no_grad()
def fuse_qkv_storage(attn: nn.Module):
    """Put q/k/v's weights (and biases) side by side in one buffer and make each projection's
    parameters views of it: the same values and state-dict names, one GEMM for the three. Returns
    (weight (q+k+v, H), bias or None, [q, k, v] sizes), or None when they are not plain nn.Linear
    layers of one dtype and device (LoRA wrappers, MXFP4 projections)."""
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    if any(type(m) is not nn.Linear for m in mods):
        return None
    ws = [m.weight for m in mods]
    if len({(w.dtype, w.device) for w in ws}) > 1 or any((m.bias is None) != (mods[0].bias is None) for m in mods):
        return None
    weight = torch.cat(ws)
    bias = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
    sizes = [w.shape[0] for w in ws]
    for m, w_view, b_view in zip(mods, weight.split(sizes), bias.split(sizes) if bias is not None else [None] * 3):
        m.weight = nn.Parameter(w_view, requires_grad=False)
        if b_view is not None:
            m.bias = nn.Parameter(b_view, requires_grad=False)
    return weight, bias, sizes


def kv_groups(model: GptOss) -> list[KVGroup]:
    cfg = model.config
    groups = []
    if not all(cfg.is_sliding):
        groups.append(KVGroup(FULL, None))
    if any(cfg.is_sliding):
        groups.append(KVGroup(SLIDING, cfg.sliding_window))
    return groups


def kv_bytes_per_block(model: GptOss, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    pairs = max(sum(cfg.is_sliding), cfg.num_hidden_layers - sum(cfg.is_sliding))
    return pairs * 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


@dataclass
class StepInputs:
    """One step's tensors, on the model's device."""

    input_ids: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64
    slots: dict[str, torch.Tensor]  # group -> (N,) int64 flat cache slot of each token's key/value
    block_tables: dict[str, torch.Tensor]  # group -> (S, max_blocks) int32
    seq_lens: torch.Tensor  # (S,) int32 context length after this step
    cu_seqlens_q: torch.Tensor  # (S+1,) int32
    max_query_len: int
    sample_rows: torch.Tensor  # (B,) int64 rows whose logits are sampled
    adapter_slices: list[tuple[str, int, int]]  # (adapter, first row, end row)
    # Host copies for the reference attention (CPU tests): per request (start, n, table per group).
    host_seqs: list[tuple[int, int, dict[str, list[int]]]]


class ModelRunner:
    def __init__(self, model: GptOss, num_blocks: int, block_size: int, backend: Backend, adapters: AdapterSet) -> None:
        self.model = model
        self.cfg = model.config
        self.backend = backend
        self.adapters = adapters
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.lm_head.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        cfg = self.cfg
        # Layer -> (group, cache pair index).
        self.layer_slot: list[tuple[str, int]] = []
        counts = {FULL: 0, SLIDING: 0}
        for sliding in cfg.is_sliding:
            g = SLIDING if sliding else FULL
            self.layer_slot.append((g, counts[g]))
            counts[g] += 1
        pairs = max(counts.values())
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(pairs)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(pairs)]
        self.groups = [g.name for g in kv_groups(model)]
        # q, k and v as one GEMM (kernel path): at a decode step's few rows each projection is a
        # memory-bound GEMV, and the small k/v ones (2.9 MB each at gpt-oss-20b) run far below the
        # bandwidth the one (out 5,120) product reaches.
        self.fused_qkv: dict[int, tuple[torch.Tensor, torch.Tensor | None, list[int]]] = {}
        if backend.kernels:
            for li, layer in enumerate(model.model.layers):
                fused = fuse_qkv_storage(layer.self_attn)
                if fused is not None:
                    self.fused_qkv[li] = fused

    # ---- batch preparation (host) ----

    def prepare(self, out: SchedulerOutput) -> tuple[StepInputs, list[str]]:
        """Tensors for the step; also the request ids of the sampled rows, in row order."""
        bs = self.block_size
        chunks = sorted(out.chunks, key=lambda c: (c.adapter is not None, c.adapter or ""))
        s = len(chunks)
        lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=s)
        starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=s)
        cu = np.zeros(s + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        n = int(cu[-1])
        ids = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), dtype=np.int64, count=n)
        seq_of_row = np.repeat(np.arange(s), lens)  # (N,)
        pos = starts[seq_of_row] + (np.arange(n) - cu[:-1][seq_of_row])  # (N,)
        # Block tables: the step's rows of the KV manager's arrays, one gather per group (entries past
        # a table's length are the null block there), cut to the longest table of the step.
        table_rows = np.fromiter((c.row for c in chunks), dtype=np.int64, count=s)
        width = max(1, max(len(c.tables[g]) for c in chunks for g in self.groups))
        tables, slots = {}, {}
        for g in self.groups:
            t = out.table_rows[g][table_rows, :width]  # (s, width) int32, a copy
            tables[g] = t
            slots[g] = t[seq_of_row, pos // bs].astype(np.int64) * bs + pos % bs
        sample_idx = [i for i, c in enumerate(chunks) if c.sample]
        sampled_ids = [chunks[i].request_id for i in sample_idx]
        slices: list[tuple[str, int, int]] = []
        for i, c in enumerate(chunks):
            if c.adapter is None:
                continue
            if slices and slices[-1][0] == c.adapter:
                slices[-1] = (c.adapter, slices[-1][1], int(cu[i + 1]))
            else:
                slices.append((c.adapter, int(cu[i]), int(cu[i + 1])))
        # Two host-to-device copies for the whole step: one int64 buffer, one int32 buffer, then views.
        rows = cu[1:][sample_idx] - 1
        groups = self.groups
        wide = torch.from_numpy(np.concatenate([ids, pos, *(slots[g] for g in groups), rows]))
        narrow = torch.from_numpy(
            np.concatenate([(starts + lens).astype(np.int32), cu.astype(np.int32), *(tables[g].ravel() for g in groups)])
        )
        wide, narrow = wide.to(self.device, non_blocking=True), narrow.to(self.device, non_blocking=True)
        w_parts = wide.split([n, n, *([n] * len(groups)), len(rows)])
        n_parts = narrow.split([s, s + 1, *([s * width] * len(groups))])
        inputs = StepInputs(
            input_ids=w_parts[0],
            positions=w_parts[1],
            slots=dict(zip(groups, w_parts[2 : 2 + len(groups)])),
            block_tables={g: t.view(s, width) for g, t in zip(groups, n_parts[2:])},
            seq_lens=n_parts[0],
            cu_seqlens_q=n_parts[1],
            max_query_len=int(lens.max()),
            sample_rows=w_parts[-1],
            adapter_slices=slices,
            host_seqs=[(c.start, len(c.token_ids), c.tables) for c in chunks] if not self.backend.kernels else [],
        )
        return inputs, sampled_ids

    # ---- the forward pass ----

    @torch.inference_mode()
    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Hidden states (N, H) after the final norm, with every layer's keys/values written."""
        model, cfg, be = self.model, self.cfg, self.backend
        rotary = model.model.rotary
        eps = cfg.rms_norm_eps
        x = model.model.embed_tokens(inp.input_ids)  # (N, H)
        n = x.shape[0]
        residual = None  # the last block's output, added to x inside the next norm
        for li, layer in enumerate(model.model.layers):
            group, pair = self.layer_slot[li]
            attn = layer.self_attn
            h, x = be.add_rms_norm(x, layer.input_layernorm.weight, eps, residual)
            q, k, v = self._project_qkv(attn, h, li, inp.adapter_slices)
            q = q.view(n, cfg.num_attention_heads, cfg.head_dim)
            k = k.view(n, cfg.num_key_value_heads, cfg.head_dim)
            v = v.view(n, cfg.num_key_value_heads, cfg.head_dim)
            be.rope_qk_(q, k, inp.positions, rotary.inv_freq, rotary.scale)
            kc, vc = self.k_caches[pair], self.v_caches[pair]
            be.write_kv(k, v, kc, vc, inp.slots[group])
            o = be.attention(q, kc, vc, attn.sinks, inp, group, attn.window).reshape(n, -1)  # (N, Q*D)
            residual = self._project(attn.o_proj, o, f"model.layers.{li}.self_attn.o_proj", inp.adapter_slices)
            h, x = be.add_rms_norm(x, layer.post_attention_layernorm.weight, eps, residual)
            residual = self._moe(layer.mlp, h, li, inp.adapter_slices)
        return be.add_rms_norm(x, model.model.norm.weight, eps, residual)[0]

    def _project(self, module, x: torch.Tensor, path: str, slices) -> torch.Tensor:
        y = module(x)
        for name, s, e in slices:
            wrapper = self.adapters.linear(name, path)
            if wrapper is not None:
                y[s:e] += wrapper.delta(x[s:e])
        return y

    def _project_qkv(self, attn, h: torch.Tensor, li: int, slices):
        p = f"model.layers.{li}.self_attn"
        fused = self.fused_qkv.get(li)
        if fused is not None:
            weight, bias, sizes = fused
            q, k, v = F.linear(h, weight, bias).split(sizes, dim=-1)  # views of one (N, q+k+v) product
            for name, s, e in slices:
                for y, proj in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
                    wrapper = self.adapters.linear(name, f"{p}.{proj}")
                    if wrapper is not None:
                        y[s:e] += wrapper.delta(h[s:e])
            return q, k, v
        return (
            self._project(attn.q_proj, h, f"{p}.q_proj", slices),
            self._project(attn.k_proj, h, f"{p}.k_proj", slices),
            self._project(attn.v_proj, h, f"{p}.v_proj", slices),
        )

    def _moe(self, mlp, h: torch.Tensor, li: int, slices) -> torch.Tensor:
        idx, weights = mlp.router(h)  # (N, k)
        out = self.backend.experts(mlp.experts, h, idx, weights)
        for name, s, e in slices:
            wrapper = self.adapters.experts(name, f"model.layers.{li}.mlp.experts")
            if wrapper is not None:
                out[s:e] = self.backend.lora_experts(wrapper, h[s:e], idx[s:e], weights[s:e])
        return out

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden[rows]).float()  # (B, V)

    # ---- one step ----

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run the step; returns the sampled token of each request whose chunk ended its known tokens."""
        inp, sampled_ids = self.prepare(out)
        logits = self.backend.run(self, inp, out)
        if not sampled_ids:
            return {}
        chunks = {c.request_id: c for c in out.chunks}
        batch = SamplingBatch.build([chunks[r] for r in sampled_ids], self.device)
        tokens = sample(logits, batch)
        return dict(zip(sampled_ids, tokens.tolist()))  # the step's one device-to-host sync
