"""LoRA for gpt-oss: attention projections and per-expert pairs, PEFT-format adapters, merging.

    apply_lora(model, LoraConfig(targets="all"))   # wrap, freeze the base
    save_adapter(model, "out/adapter", base_model="openai/gpt-oss-20b")
    load_adapter(fresh_model, "out/adapter")        # ours or PEFT's
    merge_lora(model)                               # fold into the base weights for export
"""

import importlib

# Imported on first use (PEP 562), so that a config that names LoraConfig does not import torch.
_HOMES = {
    "apply_lora": "apply", "dequantize_experts": "apply", "lora_parameters": "apply", "mark_trainable": "apply",
    "merge_lora": "apply", "ATTENTION_KINDS": "config", "EXPERT_KINDS": "config", "AdapterError": "config",
    "LoraConfig": "config", "LoRAExperts": "layers", "LoRALinear": "layers", "load_adapter": "load",
    "adapter_config": "save", "adapter_state_dict": "save", "save_adapter": "save",
}  # fmt: skip


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'osstune.lora' has no attribute {name!r}")
    return getattr(importlib.import_module(f"osstune.lora.{_HOMES[name]}"), name)


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
