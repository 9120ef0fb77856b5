"""LoRA for gpt-oss: attention projections and per-expert pairs, PEFT-format adapters, merging.

    apply_lora(model, LoraConfig(targets="all"))   # wrap, freeze the base
    save_adapter(model, "out/adapter", base_model="openai/gpt-oss-20b")
    load_adapter(fresh_model, "out/adapter")        # ours or PEFT's
    merge_lora(model)                               # fold into the base weights for export
"""

from osstune.lora.apply import apply_lora, dequantize_experts, lora_parameters, mark_trainable, merge_lora
from osstune.lora.config import ATTENTION_KINDS, EXPERT_KINDS, AdapterError, LoraConfig
from osstune.lora.layers import LoRAExperts, LoRALinear
from osstune.lora.load import load_adapter
from osstune.lora.save import adapter_config, adapter_state_dict, save_adapter

__all__ = [
    "ATTENTION_KINDS",
    "EXPERT_KINDS",
    "AdapterError",
    "LoRAExperts",
    "LoRALinear",
    "LoraConfig",
    "adapter_config",
    "adapter_state_dict",
    "apply_lora",
    "dequantize_experts",
    "load_adapter",
    "lora_parameters",
    "mark_trainable",
    "merge_lora",
    "save_adapter",
]
