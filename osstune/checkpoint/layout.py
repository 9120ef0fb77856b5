"""The Hugging Face checkpoint layout of gpt-oss as plain data: every tensor name, its shape, what
each dimension comes from in config.json, and how a random checkpoint initialises it.

The names equal `osstune.model.GptOss`'s state-dict keys (tested), so a checkpoint is a state dict.
Shape legend: V vocab, H hidden, Q query heads, K key/value heads, D head dim, E experts,
I expert intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass

from osstune.config import ModelConfig

# Expert weights that change name and shape between the two layouts. bf16: `{p}` [E, in, out];
# MXFP4: `{p}_blocks` [E, out, in/32, 16] + `{p}_scales` [E, out, in/32] (output-major).
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")
PACKED_SUFFIXES = ("_blocks", "_scales")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    # What sets each dimension, in config.json terms, so a mismatch can name the field to fix.
    dims: tuple[str, ...]
    # "normal" (std = initializer_range), "zeros", "ones", or "packed" (uint8 MXFP4 bytes).
    init: str

    @property
    def packed(self) -> bool:
        return self.init == "packed"


def tensor_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of a checkpoint for `cfg`, in the order we write them (embedding, layers, head)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    e, i = cfg.num_local_experts, cfg.intermediate_size
    qd, kd = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
    specs = {"model.embed_tokens.weight": TensorSpec((v, h), ("vocab_size", "hidden_size"), "normal")}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        specs[p + "input_layernorm.weight"] = TensorSpec((h,), ("hidden_size",), "ones")
        for proj, (out, out_dim) in (("q_proj", (q, qd)), ("k_proj", (kv, kd)), ("v_proj", (kv, kd))):
            specs[f"{p}self_attn.{proj}.weight"] = TensorSpec((out, h), (out_dim, "hidden_size"), "normal")
            specs[f"{p}self_attn.{proj}.bias"] = TensorSpec((out,), (out_dim,), "zeros")
        specs[p + "self_attn.o_proj.weight"] = TensorSpec((h, q), ("hidden_size", qd), "normal")
        specs[p + "self_attn.o_proj.bias"] = TensorSpec((h,), ("hidden_size",), "zeros")
        specs[p + "self_attn.sinks"] = TensorSpec((cfg.num_attention_heads,), ("num_attention_heads",), "normal")
        specs[p + "post_attention_layernorm.weight"] = TensorSpec((h,), ("hidden_size",), "ones")
        # The router bias is drawn like its weight, as transformers' GptOss `_init_weights` does.
        specs[p + "mlp.router.weight"] = TensorSpec((e, h), ("num_local_experts", "hidden_size"), "normal")
        specs[p + "mlp.router.bias"] = TensorSpec((e,), ("num_local_experts",), "normal")
        specs.update(_expert_specs(cfg, p + "mlp.experts."))
    specs["model.norm.weight"] = TensorSpec((h,), ("hidden_size",), "ones")
    specs["lm_head.weight"] = TensorSpec((v, h), ("vocab_size", "hidden_size"), "normal")
    return specs


def _expert_specs(cfg: ModelConfig, p: str) -> dict[str, TensorSpec]:
    e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    E, H, I2, I = "num_local_experts", "hidden_size", "2*intermediate_size", "intermediate_size"
    gate_up_bias = TensorSpec((e, 2 * i), (E, I2), "zeros")
    down_bias = TensorSpec((e, h), (E, H), "zeros")
    if cfg.expert_format == "bf16":
        return {
            p + "gate_up_proj": TensorSpec((e, h, 2 * i), (E, H, I2), "normal"),
            p + "gate_up_proj_bias": gate_up_bias,
            p + "down_proj": TensorSpec((e, i, h), (E, I, H), "normal"),
            p + "down_proj_bias": down_bias,
        }
    block = "16 (bytes per MXFP4 block)"
    return {
        p + "gate_up_proj_blocks": TensorSpec((e, 2 * i, h // 32, 16), (E, I2, H + "/32", block), "packed"),
        p + "gate_up_proj_scales": TensorSpec((e, 2 * i, h // 32), (E, I2, H + "/32"), "packed"),
        p + "gate_up_proj_bias": gate_up_bias,
        p + "down_proj_blocks": TensorSpec((e, h, i // 32, 16), (E, H, I + "/32", block), "packed"),
        p + "down_proj_scales": TensorSpec((e, h, i // 32), (E, H, I + "/32"), "packed"),
        p + "down_proj_bias": down_bias,
    }


def dense_expert_name(name: str) -> str | None:
    """`...experts.gate_up_proj_blocks` or `..._scales` -> `...experts.gate_up_proj`; else None."""
    for suffix in PACKED_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)].rsplit(".", 1)[-1] in EXPERT_PROJECTIONS:
            return name[: -len(suffix)]
    return None


def is_dense_expert(name: str) -> bool:
    return ".mlp.experts." in name and name.rsplit(".", 1)[-1] in EXPERT_PROJECTIONS


def packed_names(dense: str) -> tuple[str, str]:
    return dense + "_blocks", dense + "_scales"
