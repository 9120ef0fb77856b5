"""The config.json that openai/gpt-oss-20b ships on the Hugging Face Hub, as published (MXFP4
experts, `experts_per_token` beside `num_experts_per_tok`, `rope_scaling` with `truncate`,
`quantization_config`), read into ModelConfig and written back."""

from __future__ import annotations

import json

from osstune.config import PRESETS, ModelConfig

LAYER_TYPES = ["sliding_attention", "full_attention"] * 12
OPENAI_20B = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": LAYER_TYPES,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}


def test_openai_config_reads_as_the_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(OPENAI_20B))
    cfg = ModelConfig.from_json(path)
    assert cfg == PRESETS["gpt-oss-20b"].replace(expert_format="mxfp4")


def test_written_config_keeps_every_value_openai_ships():
    written = ModelConfig.from_hf_dict(OPENAI_20B).to_hf_dict()
    differ = {k: (v, written.get(k)) for k, v in OPENAI_20B.items() if k != "transformers_version" and written.get(k) != v}
    assert not differ, differ
