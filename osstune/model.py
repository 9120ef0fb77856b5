"""GPT-OSS in plain PyTorch: the readable reference that every fast path is tested against.

Architecture (gpt-oss model card, arXiv:2508.10925): pre-norm decoder; grouped-query attention with
biases and one learned "sink" logit per head that joins the softmax denominator; even layers see a
sliding window of 128 tokens, odd layers everything; YaRN rotary embeddings; a top-k router with a
softmax over the selected logits; experts with a clamped SwiGLU on interleaved gate/up columns.

Module and parameter names equal the Hugging Face checkpoint names, so a state dict is a checkpoint.
This file imports no kernel. How attention, experts and checkpointing execute is one `ExecutionPolicy`,
installed on the model in one call (`model.set_execution`); its default is this file's plain PyTorch.

Shape legend: B batch, T query tokens, S key tokens (cache + T), H hidden, Q query heads,
K key/value heads, G = Q / K, D head dim, E experts, I expert intermediate, N routed tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from osstune.config import ModelConfig, yarn_inv_freq
from osstune.quant.mxfp4 import dequantize_mxfp4


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class Rotary(nn.Module):
    """YaRN rotary embedding; rotates the two halves of each head (gpt-oss's convention)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.scale = yarn_inv_freq(cfg)
        self.register_buffer("inv_freq", torch.tensor(inv_freq, dtype=torch.float32), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, T, D/2) in float32, YaRN's attention scale folded in."""
        angles = positions.float().unsqueeze(-1) * self.inv_freq.float()
        return angles.cos() * self.scale, angles.sin() * self.scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, D); cos/sin (B, T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def attention_allowed(
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    window: int | None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, T, S): causal, within `window` keys (the query included), same document.

    Indices are positions in the token stream (not rotary positions, which restart per packed
    document); q_index (T,), k_index (S,), q_doc (B, T), k_doc (B, S).
    """
    allowed = k_index[None, :] <= q_index[:, None]
    if window is not None:
        allowed = allowed & (q_index[:, None] - k_index[None, :] < window)
    allowed = allowed.unsqueeze(0)
    if q_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :])
    return allowed


def sink_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Softmax attention whose denominator includes one learned logit per head.

    q (B, T, Q, D), k/v (B, S, K, D), sinks (Q,), allowed (B|1, T, S) -> (B, T, Q, D).
    out = softmax([scores, sink])[:-1] @ v: the sink takes probability mass and contributes nothing.
    """
    b, t, n_q, d = q.shape
    n_kv = k.shape[2]
    qg = q.view(b, t, n_kv, n_q // n_kv, d)  # (B, T, K, G, D)
    scores = torch.einsum("btkgd,bskd->bkgts", qg.float(), k.float()) * d**-0.5  # (B, K, G, T, S)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    sink = sinks.float().view(1, n_kv, n_q // n_kv, 1, 1).expand(b, -1, -1, t, 1)
    probs = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :-1]
    out = torch.einsum("bkgts,bskd->btkgd", probs, v.float())
    return out.reshape(b, t, n_q, d).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_q, self.n_kv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window if cfg.is_sliding[layer] else None
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_q * self.d)
        self.k_proj = nn.Linear(h, self.n_kv * self.d)
        self.v_proj = nn.Linear(h, self.n_kv * self.d)
        self.o_proj = nn.Linear(self.n_q * self.d, h)
        self.sinks = nn.Parameter(torch.zeros(self.n_q))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape
        run = ctx.execution
        if run.qkv is not None:
            q, k, v = run.qkv(self, x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # Head counts from the shapes: under tensor parallel a rank holds some of the heads.
        q = apply_rotary(q.view(b, t, -1, self.d), ctx.cos, ctx.sin)
        k = apply_rotary(k.view(b, t, -1, self.d), ctx.cos, ctx.sin)
        v = v.view(b, t, -1, self.d)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v)
        if run.attention is not None:
            out = run.attention(q, k, v, self.sinks, self.window, ctx)
        else:
            allowed = ctx.sliding_allowed if self.window is not None else ctx.full_allowed
            out = sink_attention(q, k, v, self.sinks, allowed)
        return self.o_proj(out.reshape(b, t, -1))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(cfg.num_local_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_local_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> expert indices (N, k), weights (N, k): softmax over the k selected logits only."""
        logits = F.linear(x, self.weight, self.bias)
        top, idx = logits.topk(self.top_k, dim=-1)
        return idx, top.softmax(dim=-1)


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """(N, 2I) interleaved [g0, u0, g1, u1, ...] -> (N, I)."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


class Experts(nn.Module):
    """E experts in the bf16 layout: gate_up_proj (E, H, 2I), down_proj (E, I, H), with biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.num_experts, self.alpha, self.limit = e, cfg.swiglu_alpha, cfg.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.zeros(e, h, 2 * i))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.down_proj = nn.Parameter(torch.zeros(e, i, h))
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h))

    def gate_up_weight(self, e: int) -> torch.Tensor:
        """(H, 2I) weight of expert e."""
        return self.gate_up_proj[e]

    def down_weight(self, e: int) -> torch.Tensor:
        """(I, H) weight of expert e."""
        return self.down_proj[e]

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.gate_up_weight(e).to(x.dtype) + self.gate_up_proj_bias[e].to(x.dtype)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return h @ self.down_weight(e).to(h.dtype) + self.down_proj_bias[e].to(h.dtype)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), idx/weights (N, k) -> (N, H). One matmul pair per expert that received tokens."""
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            token, slot = (idx == e).nonzero(as_tuple=True)
            h = clamped_swiglu(self.gate_up(e, x[token]), self.alpha, self.limit)
            y = self.down(e, h) * weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y)
        return out


class MXFP4Experts(Experts):
    """Experts kept as packed MXFP4 blocks + E8M0 scales (4.25 bits a weight), decoded on use.

    Blocks are stored output-major, as in the checkpoint: gate_up (E, 2I, H/32, 16), down
    (E, H, I/32, 16). Biases stay in floating point and are trainable like any parameter.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.num_experts, self.alpha, self.limit = e, cfg.swiglu_alpha, cfg.swiglu_limit
        u8 = dict(dtype=torch.uint8)
        self.register_buffer("gate_up_proj_blocks", torch.zeros(e, 2 * i, h // 32, 16, **u8))
        self.register_buffer("gate_up_proj_scales", torch.zeros(e, 2 * i, h // 32, **u8))
        self.register_buffer("down_proj_blocks", torch.zeros(e, h, i // 32, 16, **u8))
        self.register_buffer("down_proj_scales", torch.zeros(e, h, i // 32, **u8))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h))

    def gate_up_weight(self, e: int) -> torch.Tensor:
        w = dequantize_mxfp4(self.gate_up_proj_blocks[e], self.gate_up_proj_scales[e], self.gate_up_proj_bias.dtype)
        return w.t()

    def down_weight(self, e: int) -> torch.Tensor:
        return dequantize_mxfp4(self.down_proj_blocks[e], self.down_proj_scales[e], self.down_proj_bias.dtype).t()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.router = Router(cfg)
        self.experts = MXFP4Experts(cfg) if cfg.expert_format == "mxfp4" else Experts(cfg)

    def forward(self, x: torch.Tensor, execution: ExecutionPolicy | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, weights = self.router(x)
        if execution is not None and execution.experts is not None:
            return execution.experts(self.experts, x, idx, weights).view(shape)
        return self.experts(x, idx, weights).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.execution)


class KVCache:
    """Keys and values of every layer, appended step by step during generation."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=1)
            v = torch.cat((self.values[layer], v), dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


@dataclass(frozen=True)
class ExecutionPolicy:
    """How the model's operations execute. Every field None is the plain-PyTorch reference of this
    file (`REFERENCE`, the model's default); a field set replaces that one operation in every layer.

    The model holds one policy (`GptOss.set_execution`, `GptOss.execution`) and hands it to its layers
    in the `ForwardContext` of each forward pass; it is no part of the state dict. The fields are
    plain functions (or callable objects) that receive the module they stand in for on every call,
    so wrapping or replacing a projection or the experts later (LoRA) is seen. Who fills them:
    osstune.fast (kernels), osstune.parallel (expert parallel's dispatch, tensor parallel's split
    experts), osstune.offload (the layer checkpoint with inputs in host memory); each changes only its
    own fields (`replace`).
    """

    # (attention, x (B, T, H)) -> q (B, T, Q*D), k, v (B, T, K*D): the three projections at once.
    qkv: Callable | None = None
    # (q (B, T, Q, D), k, v (B, S, K, D), sinks (Q,), window, ctx) -> (B, T, Q, D).
    attention: Callable | None = None
    # (experts module, x (N, H), idx (N, k), weights (N, k)) -> (N, H).
    experts: Callable | None = None
    # (layer, x, ctx) -> the layer's output, recomputing the layer in the backward: replaces
    # torch.utils.checkpoint where `gradient_checkpointing` applies.
    checkpoint: Callable | None = None
    # torch.utils.checkpoint's context_fn (a selective policy), and its preserve_rng_state (off while
    # a CUDA graph records, which cannot read the generator).
    checkpoint_context: Callable | None = None
    checkpoint_preserve_rng: bool = True

    def replace(self, **changes) -> ExecutionPolicy:
        return dataclasses.replace(self, **changes)

    def checkpoint_kwargs(self) -> dict:
        """Keyword arguments for torch.utils.checkpoint beyond use_reentrant=False (none by default)."""
        kwargs: dict = {}
        if self.checkpoint_context is not None:
            kwargs["context_fn"] = self.checkpoint_context
        if not self.checkpoint_preserve_rng:
            kwargs["preserve_rng_state"] = False
        return kwargs

    def describe(self) -> str:
        """The fields that differ from the reference ("attention=fast_attention, experts=..."), or "reference"."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={getattr(value, '__name__', None) or type(value).__name__}")
        return ", ".join(parts) or "reference"


REFERENCE = ExecutionPolicy()


@dataclass
class ForwardContext:
    """What every layer of one forward pass shares: rotary tables, token indices, documents, the cache.

    The dense (B|1, T, S) masks are built on first use: kernels that take `doc_ids` and the window
    directly never need them.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    q_index: torch.Tensor  # (T,) stream positions of the new tokens (after the cache)
    k_index: torch.Tensor  # (S,)
    sliding_window: int
    doc_ids: torch.Tensor | None = None  # (B, T)
    cache: KVCache | None = None
    execution: ExecutionPolicy = REFERENCE

    @functools.cached_property
    def full_allowed(self) -> torch.Tensor:
        return attention_allowed(self.q_index, self.k_index, None, self.doc_ids, self.doc_ids)

    @functools.cached_property
    def sliding_allowed(self) -> torch.Tensor:
        return attention_allowed(self.q_index, self.k_index, self.sliding_window, self.doc_ids, self.doc_ids)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)


class GptOss(nn.Module):
    """The causal LM. `model(input_ids)` returns logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self._execution = REFERENCE

    @property
    def execution(self) -> ExecutionPolicy:
        """How this model's attention, experts and checkpointing run (`ExecutionPolicy`)."""
        return self._execution

    def set_execution(self, policy: ExecutionPolicy | None) -> ExecutionPolicy:
        """Install `policy` (None: the reference) for every later forward; returns the one it replaces,
        so `model.set_execution(previous)` undoes it."""
        policy = REFERENCE if policy is None else policy
        if not isinstance(policy, ExecutionPolicy):
            raise TypeError(
                f"set_execution takes an osstune.model.ExecutionPolicy or None, not {type(policy).__name__}"
            )
        previous, self._execution = self._execution, policy
        return previous

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or the final normed hidden states (B, T, H).

        inputs_embeds (B, T, H), instead of input_ids: tokens already embedded (a CUDA graph takes
        them from a host-memory table, osstune.fast.graphs). position_ids (B, T): rotary positions
        (restart at 0 per packed document); default: the token's index after the cache. doc_ids
        (B, T): attention never crosses documents. With a cache, the new tokens attend to everything
        cached before them.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass either input_ids or inputs_embeds to GptOss.forward, not both or neither")
        past = cache.length if cache is not None else 0
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed documents) cannot be combined with a KV cache")
        # The embedding's output, not input_ids, says where the model runs: a table in host memory
        # (osstune.offload.HostEmbedding) takes the ids on the host.
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        b, t = x.shape[:2]
        device = x.device
        q_index = torch.arange(past, past + t, device=device)
        k_index = torch.arange(past + t, device=device)
        if position_ids is None:
            position_ids = q_index.unsqueeze(0).expand(b, t)
        cos, sin = self.model.rotary(position_ids)
        run = self._execution
        ctx = ForwardContext(cos, sin, q_index, k_index, self.config.sliding_window, doc_ids, cache, run)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                if run.checkpoint is not None:
                    x = run.checkpoint(layer, x, ctx)
                else:
                    x = checkpoint(layer, x, ctx, use_reentrant=False, **run.checkpoint_kwargs())
            else:
                x = layer(x, ctx)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)


@torch.no_grad()
def init_parameters(model: GptOss, normal: Callable[[torch.Tensor], object]) -> None:
    """gpt-oss's initialisation rule over the parameters: norms one, biases zero except the router's,
    every other parameter (matrices, sinks, router bias) drawn by `normal(p)` in place."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias") and "router" not in name:
            p.zero_()
        else:
            normal(p)


@torch.no_grad()
def init_weights(model: GptOss, seed: int = 0) -> GptOss:
    """Random initialisation as gpt-oss's trainers do it: normal(0, 0.02) matrices, zero biases,
    unit norms; normal sinks. Packed MXFP4 experts are drawn in float and then quantized."""
    from osstune.quant.mxfp4 import quantize_mxfp4

    std = model.config.initializer_range
    gen = torch.Generator().manual_seed(seed)

    init_parameters(model, lambda p: p.copy_(torch.randn(p.shape, generator=gen) * std))
    for module in model.modules():
        if isinstance(module, MXFP4Experts):
            e, two_i, g, _ = module.gate_up_proj_blocks.shape
            h = module.down_proj_blocks.shape[1]
            for proj, (rows, cols) in (("gate_up_proj", (two_i, g * 32)), ("down_proj", (h, two_i // 2))):
                w = torch.randn(e, rows, cols, generator=gen) * std
                blocks, scales = quantize_mxfp4(w)
                getattr(module, f"{proj}_blocks").copy_(blocks)
                getattr(module, f"{proj}_scales").copy_(scales)
    return model
