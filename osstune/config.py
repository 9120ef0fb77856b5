"""Model configuration: one flat frozen dataclass with gpt-oss's real defaults.

The field names follow the Hugging Face `config.json` of gpt-oss so that reading and writing
checkpoints is a plain mapping. Presets: `gpt-oss-20b`, `gpt-oss-120b` and `tiny` (a few layers, a
small hidden size, the real 201088-token vocabulary) for tests and the CPU demo.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int = 24
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    # Even layers use the sliding window, odd layers attend to everything (gpt-oss model card).
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 150000.0
    # YaRN (arXiv:2309.00071) as gpt-oss ships it: factor 32 over an original context of 4096.
    rope_factor: float = 32.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = False
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    initializer_range: float = 0.02
    eos_token_id: int = 200002
    pad_token_id: int = 199999
    # "bf16" (dense expert tensors) or "mxfp4" (packed blocks + scales), the layout on disk.
    expert_format: str = "bf16"

    def __post_init__(self) -> None:
        if not self.layer_types:
            kinds = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", kinds)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"invalid model config: {msg}")

        if len(self.layer_types) != self.num_hidden_layers:
            raise bad(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise bad(f"unknown layer types {sorted(unknown)}; expected {SLIDING!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise bad(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.num_local_experts}]")
        if self.head_dim % 2:
            raise bad(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.expert_format not in ("bf16", "mxfp4"):
            raise bad(f"expert_format={self.expert_format!r}; expected 'bf16' or 'mxfp4'")
        if self.expert_format == "mxfp4" and (self.hidden_size % 32 or self.intermediate_size % 32):
            raise bad(
                f"MXFP4 needs hidden_size ({self.hidden_size}) and intermediate_size "
                f"({self.intermediate_size}) to be multiples of 32"
            )

    def replace(self, **changes: Any) -> ModelConfig:
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()  # re-derive the alternation for the new depth
        return dataclasses.replace(self, **changes)

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        return tuple(t == SLIDING for t in self.layer_types)

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count (experts counted at full size; `active` counts only top-k experts)."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + q + 2 * (h * kv + kv) + q * h + h + self.num_attention_heads
        n_exp = self.num_experts_per_tok if active else e
        experts = n_exp * (h * 2 * i + 2 * i + i * h + h)
        per_layer = attn + experts + e * h + e + 2 * h
        return self.num_hidden_layers * per_layer + 2 * self.vocab_size * h + h

    # ---- Hugging Face config.json ----

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        if d.get("model_type", "gpt_oss") != "gpt_oss":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}; osstune only loads 'gpt_oss'")
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if rope and rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
            raise ValueError(f"{source}: rope type {rope.get('rope_type')!r} is not supported; gpt-oss uses 'yarn'")
        quant = d.get("quantization_config")
        expert_format = "bf16"
        if quant:
            method = quant.get("quant_method")
            if method != "mxfp4":
                raise ValueError(
                    f"{source}: quantization_config.quant_method is {method!r}; osstune reads bf16 "
                    "checkpoints and quant_method 'mxfp4' only"
                )
            expert_format = "mxfp4"
        kw: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key in names and key not in ("layer_types", "expert_format"):
                kw[key] = value
        if "layer_types" in d and d["layer_types"]:
            kw["layer_types"] = tuple(d["layer_types"])
        if "num_experts_per_tok" not in d and "experts_per_token" in d:
            kw["num_experts_per_tok"] = d["experts_per_token"]
        if "rope_theta" not in d and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        for ours, theirs in (
            ("rope_factor", "factor"),
            ("rope_original_max_position_embeddings", "original_max_position_embeddings"),
            ("rope_beta_fast", "beta_fast"),
            ("rope_beta_slow", "beta_slow"),
            ("rope_truncate", "truncate"),
        ):
            if theirs in rope:
                kw[ours] = rope[theirs]
        for key in ("eos_token_id", "pad_token_id"):
            if isinstance(kw.get(key), list):
                kw[key] = kw[key][0]
            if kw.get(key) is None:
                kw.pop(key, None)
        try:
            return cls(expert_format=expert_format, **kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.9,
            "experts_per_token": self.num_experts_per_tok,
            "initial_context_length": self.rope_original_max_position_embeddings,
        }
        for f in dataclasses.fields(self):
            if f.name.startswith("rope_") and f.name != "rope_theta" or f.name == "expert_format":
                continue
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        d["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": self.rope_factor,
            "original_max_position_embeddings": self.rope_original_max_position_embeddings,
            "beta_fast": self.rope_beta_fast,
            "beta_slow": self.rope_beta_slow,
            "truncate": self.rope_truncate,
        }
        if self.expert_format == "mxfp4":
            d["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            }
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_hf_dict(d, source=str(path))


PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-20b": ModelConfig(),
    "gpt-oss-120b": ModelConfig(num_hidden_layers=36, num_local_experts=128),
    # Small enough to train on a laptop CPU in minutes, with the real vocabulary and every
    # architectural feature (sinks, both layer kinds, GQA, top-k routing, YaRN).
    "tiny": ModelConfig(
        num_hidden_layers=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        hidden_size=128,
        intermediate_size=128,
        head_dim=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        rope_original_max_position_embeddings=256,
        max_position_embeddings=8192,
        # About 1/sqrt(hidden). With the usual 0.02 at this width every logit stays near +-1.5
        # (normed hidden state times a frozen unembedding row), and no adapter could make the
        # taught token stand out among 201,088.
        initializer_range=0.088,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def yarn_inv_freq(cfg: ModelConfig) -> tuple[list[float], float]:
    """Inverse frequencies and the attention (cos/sin) scale of YaRN, arXiv:2309.00071 section 3.

    Dimensions that rotate fast within the original context keep their frequency (extrapolation),
    slow ones are divided by `factor` (interpolation), with a linear ramp between `beta_fast` and
    `beta_slow` rotations. Matches gpt-oss's reference and transformers' `_compute_yarn_parameters`.
    """
    d, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    orig = cfg.rope_original_max_position_embeddings

    def dim_for(rotations: float) -> float:
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(cfg.rope_beta_fast), dim_for(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    inv = []
    for j in range(d // 2):
        extrapolated = 1.0 / base ** (2 * j / d)
        interpolated = extrapolated / factor
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)
        keep = 1.0 - ramp  # 1 for fast-rotating dims: keep the original frequency
        inv.append(interpolated * (1 - keep) + extrapolated * keep)
    scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv, scale
