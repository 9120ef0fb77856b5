"""The memory model: what one GPU holds at the peak of a training step, term by term.

Static terms (weights, adapters, gradients, optimizer state) are counted, not estimated: the model is
built on the meta device exactly as the trainer prepares it (`osstune.train.prepare.PIPELINE`:
which experts stay packed, MXFP4 attention, LoRA wrappers or full-training targets, the embedding in
host memory), and every parameter and buffer is summed at its real shape and dtype. The optimizer's
bytes follow `osstune.train.optim.MasterAdamW` and `osstune.train.adam8.AdamW8bit` tensor by tensor.

Activation terms are formulas in the model's shapes; one coefficient (WORKING_SET) was fitted to
peaks measured on an H100, and the allocator's slack is estimated from measured reserved memory
(docs/PERFORMANCE.md; docs/PLANNING.md explains each term and the fit).
Figures are bytes; GiB = 2**30 bytes. Sharding degrees (osstune/plan/parallel.py) divide the terms
that a sharded run would split.

Shape legend: T tokens of a micro-step (micro_batch x seq_len), L layers, H hidden, I expert
intermediate, k experts per token, Q/K query/key-value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from osstune.config import PRESETS, ModelConfig
from osstune.plan.parallel import Degrees
from osstune.train.config import TrainConfig, packs_experts

GIB = 2**30

# ---- fitted coefficients (docs/PLANNING.md "Activations") ----
# One layer's recomputation and backward hold WORKING_SET x its forward activations (see
# `layer_activation_bytes`): the slope of the peak over the sequence with the layer inputs in host
# memory is 244.0 kB a token for gpt-oss-20b QLoRA (docs/PERFORMANCE.md, "The longest sequence":
# 27.08 GiB at 65,536 tokens, 68.03 at 245,760); less the loss's 11.5 kB (final hidden state and its
# gradient), over the 172.7 kB of forward activations the formula gives.
WORKING_SET = 1.346
# Allocator and CUDA runtime on top of what tensors hold (what `max_memory_reserved` and the CUDA
# context add to `max_memory_allocated`): measured 0.1-0.6 GiB at 2,048 tokens, 1.75 at 8,192 and
# 2.6 GiB for gpt-oss-120b at 4,096 (docs/PERFORMANCE.md, QLoRA tables "alloc" vs "reserved").
CONTEXT_BYTES = int(0.5 * GIB)  # the CUDA context and kernels' modules, outside PyTorch's allocator
SLACK_OF_ACTIVATIONS = 0.35  # the graph's private pool and free space inside segments

# osstune/train/optim.py and adam8.py
MIN_8BIT_NUMEL = 4096
ADAM8_BLOCK = 256
GRAD_SLICE = 2**25
# osstune/kernels/cross_entropy.py: rows of float32 logits per chunk (256 MiB), 2,048 with a trained lm_head.
LOSS_CHUNK_BUDGET = 256 * 2**20
TRAINED_WEIGHT_CHUNK = 2048

_HUB_NAMES = {"openai/gpt-oss-20b": "gpt-oss-20b", "openai/gpt-oss-120b": "gpt-oss-120b"}


class PlanError(ValueError):
    """A plan that cannot be made from the options given; the message says which and what to do."""


def model_config(ref: str) -> ModelConfig:
    """The ModelConfig of a preset, of openai/gpt-oss-20b|120b (MXFP4 experts, as published; no
    download needed), or of a local checkpoint directory (its config.json)."""
    if ref in PRESETS:
        return PRESETS[ref]
    if ref in _HUB_NAMES:
        return PRESETS[_HUB_NAMES[ref]].replace(expert_format="mxfp4")
    path = Path(ref).expanduser()
    if (path / "config.json").is_file():
        return ModelConfig.from_json(path / "config.json")
    raise PlanError(
        f"model {ref!r}: the planner reads the shapes of a preset ({', '.join(PRESETS)}), of "
        f"{' or '.join(_HUB_NAMES)}, or of a local checkpoint directory with a config.json"
    )


# ------------------------------------------------------------------ the model as the trainer builds it


def packed_experts(cfg: TrainConfig, model: ModelConfig) -> bool:
    """Whether the trainer keeps `model`'s experts packed for `cfg` (its rule: train.config.packs_experts)."""
    return packs_experts(cfg, model.expert_format)


def build_meta_model(cfg: TrainConfig, model: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model `cfg` trains, on the meta device: the same modules, shapes, dtypes and trainable flags
    as the trainer's, no storage. The embedding stays an nn.Embedding (where it lives is counted apart)."""
    from osstune.lora import apply_lora
    from osstune.model import GptOss
    from osstune.quant.linear import MXFP4Linear

    shapes = model.replace(expert_format="mxfp4" if packed_experts(cfg, model) else "bf16")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            net = GptOss(shapes)
    finally:
        torch.set_default_dtype(previous)
    net.requires_grad_(False)
    if cfg.attention_weights == "mxfp4":  # quantize_attention's result (it cannot quantize meta tensors)
        for layer in net.model.layers:
            for kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(layer.self_attn, kind)
                packed = MXFP4Linear(linear.in_features, linear.out_features, bias=False, dtype=dtype, device="meta")
                packed.bias = linear.bias
                setattr(layer.self_attn, kind, packed)
    if cfg.method in ("lora", "qlora"):
        apply_lora(net, cfg.lora, seed=0)  # LoRA factors in the base's dtype, on the base's (meta) device
    else:
        for name, p in net.named_parameters():
            if "all" in cfg.full_targets or any(t in name for t in cfg.full_targets):
                p.requires_grad_(True)
    return net


@dataclass(frozen=True)
class ModelBytes:
    """What the built model holds, by where it goes. Bytes of parameters and buffers at their dtype."""

    weights: int  # every frozen tensor but the embedding (packed or dense experts, attention, lm_head, norms)
    experts: int  # the frozen expert weights among them (what expert parallelism splits)
    embedding: int  # the embedding table (on the GPU unless memory.embedding = cpu; then in `host`)
    adapters: int  # LoRA factors (trainable, on the GPU)
    trainable: int  # every trainable tensor's bytes (adapters, or full-training targets, router, sinks)
    trainable_values: int
    trainable_numels: tuple[int, ...]  # per tensor, for the 8-bit moments' blocks
    trainable_lm_head: bool


def count_bytes(cfg: TrainConfig, model: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> ModelBytes:
    net = build_meta_model(cfg, model, dtype)
    weights = experts = embedding = adapters = trainable = 0
    numels = []
    lm_head = False
    tensors = [(n, t, t.requires_grad) for n, t in net.named_parameters()]
    tensors += [(n, t, False) for n, t in net.named_buffers()]
    for name, t, trains in tensors:
        size = t.numel() * t.element_size()
        if trains:
            trainable += size
            numels.append(t.numel())
            lm_head |= name.startswith("lm_head")
            if name.endswith(("lora_A", "lora_B")):
                adapters += size
        elif name == "model.embed_tokens.weight":
            embedding += size
        else:
            weights += size
            experts += size if ".mlp.experts." in name else 0
    return ModelBytes(weights, experts, embedding, adapters, trainable, sum(numels), tuple(numels), lm_head)


# ----------------------------------------------------------------------------- activations


def layer_activation_bytes(model: ModelConfig, dtype_bytes: int = 2) -> int:
    """Bytes a token leaves in one decoder layer's forward for its backward (what autograd saves):
    attention: the two norms' inputs and outputs (4H), q/k/v before and after rotary (2(Q+2K)D),
    the attention output (QD) and o_proj's (H); MoE: for each of the k routed copies, the gathered
    input (H), gate_up's output (2I), SwiGLU's (I) and down's (H), plus the router's logits (E).
    gpt-oss-20b: 172.7 kB a token; turning checkpointing off added 159 kB per token and layer at
    2,048 tokens (+7.3 GiB over 24 layers, docs/PERFORMANCE.md "Why CUDA graphs")."""
    h, i, k = model.hidden_size, model.intermediate_size, model.num_experts_per_tok
    qd, kd = model.num_attention_heads * model.head_dim, model.num_key_value_heads * model.head_dim
    attention = 4 * h + 2 * (qd + 2 * kd) + qd + h
    moe = k * (h + 2 * i + i + h) + model.num_local_experts
    return dtype_bytes * (attention + moe)


def loss_chunk_rows(model: ModelConfig, trained_lm_head: bool) -> int:
    if trained_lm_head:
        return TRAINED_WEIGHT_CHUNK
    return max(128, LOSS_CHUNK_BUDGET // (4 * model.vocab_size) // 128 * 128)


# ------------------------------------------------------------------------------------ the terms


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes on one GPU, by term (docs/PLANNING.md); `host` is pinned/host memory the run needs."""

    weights: int  # frozen, and trained other than LoRA factors
    embedding: int
    adapters: int  # LoRA factors
    gradients: int
    optimizer: int
    layer_inputs: int
    kept_gemms: int
    saved_activations: int  # every layer's, without gradient checkpointing
    working_set: int
    loss: int
    host: int

    @property
    def allocated(self) -> int:
        """Peak of `torch.cuda.max_memory_allocated`: what the trainer reports as peak_gpu_gb."""
        return (self.weights + self.embedding + self.adapters + self.gradients + self.optimizer
                + self.activations)  # fmt: skip

    @property
    def activations(self) -> int:
        return self.layer_inputs + self.kept_gemms + self.saved_activations + self.working_set + self.loss

    @property
    def slack(self) -> int:
        return CONTEXT_BYTES + int(SLACK_OF_ACTIVATIONS * self.activations)

    @property
    def needed(self) -> int:
        """What the process takes from the card: allocated plus the allocator's and CUDA's share."""
        return self.allocated + self.slack

    def terms(self) -> dict[str, int]:
        names = ("weights", "embedding", "adapters", "gradients", "optimizer", "layer_inputs", "kept_gemms",
                 "saved_activations", "working_set", "loss")  # fmt: skip
        return {n: getattr(self, n) for n in names} | {"slack": self.slack}


def optimizer_bytes(counted: ModelBytes, cfg: TrainConfig, dtype_bytes: int) -> int:
    """MasterAdamW: a float32 master of every trainable tensor not already float32, and AdamW's two
    moments: float32 (8 bytes a value), or 8-bit blocks of 256 with a float32 absmax each for
    tensors of at least 4,096 values."""
    masters = 4 * counted.trainable_values if dtype_bytes != 4 else 0
    moments = 0
    for n in counted.trainable_numels:
        if cfg.optim.moments == "int8" and n >= MIN_8BIT_NUMEL:
            blocks = math.ceil(n / ADAM8_BLOCK)
            moments += blocks * (2 * ADAM8_BLOCK + 8)
        else:
            moments += 8 * n
    return masters + moments


def estimate(
    cfg: TrainConfig,
    model: ModelConfig,
    degrees: Degrees = Degrees(),
    dtype: torch.dtype = torch.bfloat16,
    counted: ModelBytes | None = None,
) -> MemoryEstimate:
    """Peak memory of one GPU for the run `cfg` describes (the model's shapes from `model`)."""
    counted = counted or count_bytes(cfg, model, dtype)
    b = torch.empty(0, dtype=dtype).element_size()
    t = cfg.micro_batch * cfg.data.seq_len
    L, h = model.num_hidden_layers, model.hidden_size
    act = layer_activation_bytes(model, b)
    checkpointing = cfg.gradient_checkpointing
    layer_inputs = L * t * h * b if checkpointing and cfg.memory.activations == "gpu" else 0
    kept = 0
    if checkpointing and cfg.checkpoint_policy == "keep_expert_gemms":
        kept = L * t * model.num_experts_per_tok * (2 * model.intermediate_size + h) * b
    saved = 0 if checkpointing else L * t * act
    working = int(WORKING_SET * t * act)
    # The loss: one chunk of float32 logits (its gradient written over it), the final hidden state and
    # its gradient, and with a trained lm_head its float32 gradient accumulator.
    rows = min(loss_chunk_rows(model, counted.trainable_lm_head), t)
    loss = rows * model.vocab_size * 4 + 2 * t * h * b
    if counted.trainable_lm_head:
        loss += model.vocab_size * h * 4
    optimizer = optimizer_bytes(counted, cfg, b)
    host = 0
    if cfg.memory.optimizer == "cpu":
        # Offloaded, every trainable tensor gets a float32 master (float32 ones too) and a float32
        # gradient buffer, pinned in host memory.
        host += optimizer + 4 * counted.trainable_values * (2 if b == 4 else 1)
        optimizer = 0
    # The update's float32 gradient slice (MasterAdamW._step_on_device) comes after the backward has
    # freed the activations: it only raises the peak when it is larger than they were.
    step_transient = 4 * min(counted.trainable_values, GRAD_SLICE) if optimizer else 0
    embedding = counted.embedding
    if cfg.memory.embedding == "cpu":
        host += embedding
        embedding = t * h * b  # the batch's rows, copied over
    if cfg.memory.activations == "cpu":
        host += L * t * h * b
    est = MemoryEstimate(
        # Frozen weights, and trained ones other than LoRA factors (full fine-tuning, router, sinks).
        weights=degrees.split_dense(counted.weights - counted.experts + counted.trainable - counted.adapters)
        + degrees.split_experts(counted.experts),
        embedding=degrees.split_embedding(embedding),
        adapters=degrees.split_dense(counted.adapters),
        gradients=degrees.split_dense(counted.trainable),
        optimizer=degrees.split_dense(optimizer),
        layer_inputs=degrees.split_tokens(layer_inputs),
        kept_gemms=degrees.split_tokens(kept),
        saved_activations=degrees.split_tokens(saved),
        working_set=degrees.split_tokens(working),
        loss=degrees.split_tokens(loss),
        host=host,
    )
    if step_transient > est.activations:
        est = replace(est, working_set=est.working_set + step_transient - est.activations)
    return est


# --------------------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class KVCacheShape:
    """The KV cache of gpt-oss: full layers keep every token, sliding layers only the last `window`."""

    full_bytes_per_token: int  # all full-attention layers, keys and values
    sliding_bytes_per_token: int  # all sliding layers, per token inside the window
    window: int

    def sequence_bytes(self, context: int) -> int:
        return context * self.full_bytes_per_token + min(context, self.window) * self.sliding_bytes_per_token


def kv_cache_shape(model: ModelConfig, dtype_bytes: int = 2) -> KVCacheShape:
    per_layer = 2 * model.num_key_value_heads * model.head_dim * dtype_bytes  # a key and a value
    n_sliding = sum(model.is_sliding)
    n_full = model.num_hidden_layers - n_sliding
    return KVCacheShape(n_full * per_layer, n_sliding * per_layer, model.sliding_window)


def meta_model(model: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model as stored (MXFP4 experts packed where the checkpoint packs them), on the meta device."""
    from osstune.model import GptOss

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return GptOss(model)
    finally:
        torch.set_default_dtype(previous)


def serving_weights(model: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the model as it serves: every tensor as stored, counted on the meta device."""
    net = meta_model(model, dtype)
    return sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
