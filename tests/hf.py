"""Build transformers' GptOssForCausalLM (the independent reference) from our config and weights."""

import torch
from transformers import GptOssConfig, GptOssForCausalLM

from osstune.config import ModelConfig


def hf_config(cfg: ModelConfig) -> GptOssConfig:
    # Token ids of the real vocabulary do not exist in the small test vocabularies.
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "pad_token_id", "eos_token_id", "quantization_config")}
    hc = GptOssConfig(**d)
    hc._attn_implementation = "eager"
    return hc


def hf_model(cfg: ModelConfig, state_dict: dict) -> GptOssForCausalLM:
    model = GptOssForCausalLM(hf_config(cfg)).float()
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
