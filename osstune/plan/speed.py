"""The speed model: seconds per optimizer step, hence tokens/s, of a training configuration on a GPU.

A step is `grad_accum` micro-steps of T = micro_batch x seq_len tokens and one optimizer update:

    micro-step = matmul FLOPs / (peak x MATMUL_EFFICIENCY)      (experts x MXFP4_EXPERT_TIME when packed)
               + attention FLOPs / (peak x ATTENTION_EFFICIENCY)
               + expert LoRA: EXPERT_LORA_TOKEN x T x L x k x r
               + FIXED_PER_LAYER x L  +  PER_EXPERT x L x E
    eager (no CUDA graph: layer inputs in host memory): at least the host's time to enqueue it,
               L x (EAGER_HOST_PER_LAYER + EAGER_HOST_PER_LAYER_TOKEN x T)
    update     = trainable values x the optimizer's time per value (GPU float32, GPU 8-bit, or host)

FLOPs are counted from the shapes as bench/train_throughput.py counts model FLOPs (forward 2x,
input gradients 2x per matmul parameter; attention 4 x heads x head_dim per allowed pair forward,
twice that backward), plus what runs again: the recomputation of each layer under gradient
checkpointing, less the base expert GEMMs that `keep_expert_gemms` keeps. The coefficients were
fitted to the tokens/s measured on one H100 (docs/PERFORMANCE.md; the fit: docs/PLANNING.md) and
scale with the GPU's dense bf16 peak. It ranks configurations; its absolute figures are estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

from osstune.config import ModelConfig
from osstune.plan.parallel import Degrees
from osstune.train.config import TrainConfig

H100_PEAK = 989e12  # dense bf16 FLOP/s of the machine the coefficients were measured on

# Fitted by least squares over 20 measured configurations (docs/PLANNING.md "Speed"); times in
# seconds on an H100. The fit's largest misses: 9% at 2,048 tokens, 23% at 65,536 (eager).
MATMUL_EFFICIENCY = 0.328
ATTENTION_EFFICIENCY = 0.288
MXFP4_EXPERT_TIME = 1.23  # packed expert GEMMs against cutlass's bf16 grouped GEMM (pair decoder)
FIXED_PER_LAYER = 0.80e-3  # launches, norms, rotary, routing: what does not grow with FLOPs
EXPERT_LORA_TOKEN = 1.35e-8  # per token, layer, routed expert and rank: the low-rank grouped GEMMs
PER_EXPERT = 2.65e-5  # per layer and expert: what grows with the expert count (grouped GEMM groups, sorting)
# Not fitted: taken from measurements.
MXFP4_ATTENTION_TIME = 1.27  # MXFP4 q/k/v/o against bf16 at 2,048 tokens (docs/PERFORMANCE.md)
KEEP_SAVES = 0.75  # of the base expert GEMMs' recomputation that keep_expert_gemms skips (the
# policy keeps their outputs; +11-15% tokens/s measured where skipping all would give +17-19%)
# Measured on the H100 machine (docs/PERFORMANCE.md): the eager step's host time, 0.364 s at 2,048
# tokens and 0.625 s at 8,192 for 24 layers ("Why CUDA graphs"), as a line per layer; AdamW per
# trainable value: torch's foreach float32 5.7 ms, the 8-bit kernel 2.0 ms, on the host 0.17 s
# (float32) and 1.9 s (8-bit, osstune/train/optim.py's warning) for 92.5M values on 16 cores.
EAGER_HOST_PER_LAYER = 11.55e-3
EAGER_HOST_PER_LAYER_TOKEN = 1.77e-6
ADAM_GPU_FLOAT32 = 5.7e-3 / 92.5e6
ADAM_GPU_INT8 = 2.0e-3 / 92.5e6
ADAM_HOST = 0.17 / 92.5e6
ADAM_HOST_INT8 = 1.9 / 92.5e6
# The host-memory embedding: gathering the batch's rows on the host, 3-12 ms a micro-step from 2k to
# 64k tokens (osstune/train/config.py MemoryConfig.embedding).
HOST_EMBEDDING_FIXED = 3e-3
HOST_EMBEDDING_TOKEN = 9e-3 / 63488


def attention_pairs(t: int, window: int | None) -> int:
    """(query, key) pairs a causal sequence of t tokens attends to, within `window` keys if given."""
    if window is None:
        return t * (t + 1) // 2
    w = min(window, t)
    return w * (w + 1) // 2 + (t - w) * w


@dataclass(frozen=True)
class StepFlops:
    """FLOPs executed by one micro-step, split by what runs them at different speeds."""

    dense: float  # attention projections, router, lm_head (bf16 GEMMs)
    attention_proj: float  # the q/k/v/o share of `dense`
    experts: float  # base expert GEMMs (bf16 or MXFP4)
    attention: float  # the attention kernels


def step_flops(cfg: TrainConfig, model: ModelConfig) -> StepFlops:
    h, i, k, e = model.hidden_size, model.intermediate_size, model.num_experts_per_tok, model.num_local_experts
    qd, kd = model.num_attention_heads * model.head_dim, model.num_key_value_heads * model.head_dim
    L, seq = model.num_hidden_layers, cfg.data.seq_len
    t = cfg.micro_batch * seq
    proj = h * (qd + 2 * kd) + qd * h
    experts = k * 3 * h * i
    head = model.vocab_size * h
    ckpt = cfg.gradient_checkpointing
    passes = 3 if ckpt else 2  # forward, input gradients, recomputation
    expert_passes = passes - (KEEP_SAVES if ckpt and cfg.checkpoint_policy == "keep_expert_gemms" else 0)
    weight_grads = 1 if cfg.method == "full" else 0  # trained weights get a weight-gradient GEMM too
    dense = 2 * t * (L * (proj + h * e) * (passes + weight_grads) + head * (2 + weight_grads))
    attn_proj = 2 * t * L * proj * (passes + weight_grads)
    exp = 2 * t * L * experts * (expert_passes + weight_grads)
    pairs = sum(attention_pairs(seq, model.sliding_window if s else None) for s in model.is_sliding)
    attention = cfg.micro_batch * 4 * qd * pairs * (3 + (1 if ckpt else 0))
    return StepFlops(dense, attn_proj, exp, attention)


def expert_lora_rank(cfg: TrainConfig) -> int:
    """The rank of LoRA on the experts, 0 when no expert projection is adapted."""
    if cfg.method == "full":
        return 0
    kinds = {entry.rpartition(".")[2] for entry in cfg.lora.target_entries}
    return cfg.lora.r * len(kinds & {"gate_up_proj", "down_proj"}) // 2


@dataclass(frozen=True)
class SpeedEstimate:
    step_s: float
    tokens_per_s: float  # all GPUs together
    graphed: bool


def estimate_speed(
    cfg: TrainConfig,
    model: ModelConfig,
    trainable_values: int,
    peak_flops: float = H100_PEAK,
    degrees: Degrees = Degrees(),
    packed_experts: bool = False,
) -> SpeedEstimate:
    f = step_flops(cfg, model)
    rate = peak_flops * MATMUL_EFFICIENCY
    L, t = model.num_hidden_layers, cfg.micro_batch * cfg.data.seq_len
    attn_proj_time = f.attention_proj / rate * (MXFP4_ATTENTION_TIME - 1 if cfg.attention_weights == "mxfp4" else 0)
    gpu = (
        f.dense / rate
        + attn_proj_time
        + f.experts / rate * (MXFP4_EXPERT_TIME if packed_experts else 1.0)
        + f.attention / (peak_flops * ATTENTION_EFFICIENCY)
    )
    # The terms below were measured on an H100; on another GPU they scale with its peak (a guess:
    # they are bound by launches and memory traffic as much as by FLOPs).
    scale = H100_PEAK / peak_flops
    fixed = FIXED_PER_LAYER * L + PER_EXPERT * L * model.num_local_experts
    fixed += EXPERT_LORA_TOKEN * t * L * model.num_experts_per_tok * expert_lora_rank(cfg)
    gpu += fixed * scale
    graphed = cfg.memory.activations == "gpu" and cfg.lora.dropout == 0
    # Eager, the host enqueues every kernel: the step takes at least that long. Layer inputs copied
    # to the host overlap the compute (+0.6% measured, osstune/train/config.py).
    micro = gpu if graphed else max(gpu * 1.006, L * (EAGER_HOST_PER_LAYER + EAGER_HOST_PER_LAYER_TOKEN * t))
    if cfg.memory.embedding == "cpu":
        micro += HOST_EMBEDDING_FIXED + HOST_EMBEDDING_TOKEN * t
    if cfg.memory.optimizer == "cpu":
        update = (ADAM_HOST_INT8 if cfg.optim.moments == "int8" else ADAM_HOST) * trainable_values
    else:
        update = (ADAM_GPU_INT8 if cfg.optim.moments == "int8" else ADAM_GPU_FLOAT32) * trainable_values * scale
    # A sharded run: each GPU steps its own micro-batches (dp_shard) or a share of every one (tp/ep);
    # the communication is not modelled (marked as needing multi-GPU support anyway).
    micro = micro / (degrees.tp * degrees.ep)
    update = update / degrees.gpus
    step = cfg.grad_accum * micro + update
    tokens = cfg.grad_accum * t * degrees.dp_shard
    return SpeedEstimate(step, tokens / step, graphed)
