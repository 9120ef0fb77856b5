"""`load_adapter`: apply an adapter in PEFT's format (written by PEFT or by us) to our model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from osstune.lora.apply import mark_trainable, wrap_paths
from osstune.lora.config import (
    ATTENTION_KINDS,
    EXPERT_KINDS,
    TARGET_GROUPS,
    AdapterError,
    LoraConfig,
    resolve_targets,
    target_paths,
)
from osstune.lora.peft_names import CONFIG_NAME, WEIGHTS_NAME, extra_keys, factor, from_peft, slots
from osstune.model import GptOss

# PEFT options whose non-default values change what the adapter computes and that we do not implement.
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layer_replication": None,
    "use_qalora": False,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
}


# Module names in transformers' GptOssForCausalLM other than the attention projections: a PEFT
# target_modules entry ending in one of these adapted something (or failed to) in PEFT.
_HF_MODULE_LEAVES = {
    "embed_tokens", "layers", "self_attn", "mlp", "router", "experts", "input_layernorm",
    "post_attention_layernorm", "norm", "rotary_emb", "lm_head", "model",
}  # fmt: skip


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"{path}: not found; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if d.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type is {d.get('peft_type')!r}; osstune loads LoRA adapters only")
    for key, default in _UNSUPPORTED.items():
        value = d.get(key, default)
        if value not in (default, None, {}, [], False):
            raise AdapterError(f"{path}: {key}={value!r} is not supported by osstune; train without it")
    return d


def _targets(d: dict[str, Any], num_layers: int, source: Path) -> str | tuple[str, ...]:
    modules = d.get("target_modules") or []
    if isinstance(modules, str):
        if modules == "all-linear":
            # PEFT's "all-linear" on GptOss: every nn.Linear but the output layer, i.e. q/k/v/o
            # (transformers' router is not an nn.Linear).
            modules = list(ATTENTION_KINDS)
        else:  # a regular expression PEFT matches with re.fullmatch against module names
            attn = [p for p in target_paths(num_layers) if p.rpartition(".")[2] in ATTENTION_KINDS]
            modules = [p for p in attn if re.fullmatch(modules, p)]
            if not modules:
                raise AdapterError(f"{source}: target_modules {d['target_modules']!r} matches no attention projection")
    kept = []
    for entry in modules:
        leaf = entry.rpartition(".")[2]
        if leaf in ATTENTION_KINDS:
            kept.append(entry)
        elif leaf in _HF_MODULE_LEAVES:
            raise AdapterError(
                f"{source}: target_modules entry {entry!r} adapts a module osstune does not "
                f"(LoRA modules: {', '.join(ATTENTION_KINDS)}; experts go in target_parameters)"
            )
        else:
            # Generic recipes list e.g. "gate_proj"/"down_proj": no gpt-oss *module* has that name
            # (the expert weights are parameters), so PEFT matched nothing with it either.
            warnings.warn(f"{source}: target_modules entry {entry!r} names no gpt-oss module; ignored, as PEFT does")
    params = tuple(d.get("target_parameters") or ())
    for entry in params:
        if entry.rpartition(".")[2] not in EXPERT_KINDS:
            raise AdapterError(
                f"{source}: target_parameters entry {entry!r} is not a parameter osstune adapts "
                f"({', '.join(EXPERT_KINDS)} of mlp.experts)"
            )
    entries = tuple(kept) + params
    if not entries:
        raise AdapterError(f"{source}: neither target_modules nor target_parameters is set")
    # Give back the group name for the lists that `adapter_config` writes for one.
    for group, kinds in TARGET_GROUPS.items():
        written = {f"mlp.experts.{k}" if k in EXPERT_KINDS else k for k in kinds}
        if set(entries) == written and len(entries) == len(written):
            return group
    return entries


def _train_router(d: dict[str, Any], source: Path) -> bool:
    saved = d.get("modules_to_save") or []
    for name in saved:
        if name.rpartition(".")[2] != "router":
            raise AdapterError(f"{source}: modules_to_save entry {name!r} is not supported (only 'router')")
    return bool(saved)


def load_adapter(model: GptOss, adapter_dir: str | os.PathLike, *, dtype: torch.dtype | None = None) -> GptOss:
    """Apply the LoRA that `adapter_dir/adapter_config.json` describes and load its tensors.

    Everything is checked before the model changes: a wrong tensor name, shape or rank raises
    `AdapterError` naming the tensor and the file, and leaves the model as it was.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adir = Path(adapter_dir)
    if not adir.is_dir():
        raise AdapterError(f"{adir}: adapter directory not found")
    config_path, weights_path = adir / CONFIG_NAME, adir / WEIGHTS_NAME
    d = _read_config(config_path)
    if not weights_path.is_file():
        other = " (adapter_model.bin is not read: re-save it with safetensors)" if (adir / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{weights_path}: not found{other}")
    num_layers = model.config.num_hidden_layers
    try:
        cfg = LoraConfig(
            r=d.get("r", 8),
            alpha=d.get("lora_alpha", 8),
            dropout=d.get("lora_dropout", 0.0) or 0.0,
            rslora=bool(d.get("use_rslora", False)),
            targets=_targets(d, num_layers, config_path),
            train_router=_train_router(d, config_path),
        )
    except AdapterError:
        raise
    except ValueError as e:
        raise AdapterError(f"{config_path}: {e}") from None
    paths = resolve_targets(cfg, num_layers, source=str(config_path))
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as e:
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({e})") from None

    planned = slots(model, paths, cfg.r)
    sinks = any(k.endswith(".self_attn.sinks") for k in tensors)
    cfg = dataclasses.replace(cfg, train_sinks=sinks)
    extras = {k: v.shape for k, v in extra_keys(model, cfg).items()}
    expected = {s.key: s.shape for s in planned} | extras
    for key in tensors:
        if key not in expected:
            raise AdapterError(
                f"{weights_path}: tensor {key!r} does not belong to the adapter {CONFIG_NAME} describes "
                f"for this model ({num_layers} layers, targets {list(cfg.target_entries)})"
            )
    for key, shape in expected.items():
        if key not in tensors:
            raise AdapterError(f"{weights_path}: tensor {key!r} is missing (targets {list(cfg.target_entries)})")
        if tuple(tensors[key].shape) != tuple(shape):
            raise AdapterError(
                f"{weights_path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, this model with "
                f"r={cfg.r} needs {tuple(shape)}: the adapter is for another model shape or rank"
            )

    wrap_paths(model, paths, cfg, dtype=dtype)
    with torch.no_grad():
        for slot in planned:
            param = factor(model, slot)
            e = param.shape[0] if param.dim() == 3 else 1
            param.copy_(from_peft(slot, tensors[slot.key], e))
        for key, param in extra_keys(model, cfg).items():
            param.copy_(tensors[key])
    mark_trainable(model, cfg)
    return model
