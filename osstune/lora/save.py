"""`save_adapter`: `adapter_model.safetensors` + `adapter_config.json` in PEFT's format."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from osstune.atomic import write_with
from osstune.lora.config import ATTENTION_KINDS, EXPERT_KINDS, LoraConfig
from osstune.lora.peft_names import CONFIG_NAME, WEIGHTS_NAME, adapted_paths, extra_keys, factor, slots, to_peft
from osstune.model import GptOss


def _lora_config_of(model: GptOss) -> LoraConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("this model has no LoRA adapter; call apply_lora() or load_adapter() first")
    return cfg


def adapter_state_dict(model: GptOss) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names and in PEFT's shapes (copies, detached)."""
    cfg = _lora_config_of(model)
    sd = {s.key: to_peft(s, factor(model, s)) for s in slots(model, adapted_paths(model), cfg.r)}
    sd.update({k: v.detach().clone() for k, v in extra_keys(model, cfg).items()})
    return sd


def adapter_config(model: GptOss, base_model: str | None = None) -> dict[str, Any]:
    """`adapter_config.json` as PEFT's `LoraConfig` reads it."""
    cfg = _lora_config_of(model)
    entries = cfg.target_entries
    modules = [t for t in entries if t.rpartition(".")[2] in ATTENTION_KINDS]
    # A bare "gate_up_proj" would match in PEFT too; the qualified form is what PEFT's docs show.
    params = [f"mlp.experts.{t}" if t in EXPERT_KINDS else t for t in entries if t.rpartition(".")[2] in EXPERT_KINDS]
    dropout = cfg.dropout
    if params and dropout:
        warnings.warn(
            f"lora dropout {dropout} is recorded as 0.0 in {CONFIG_NAME}: PEFT refuses lora_dropout != 0 with "
            "expert target_parameters (its ParamWrapper cannot apply dropout); inference is unaffected",
            stacklevel=3,
        )
        dropout = 0.0
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": cfg.rslora,
        "target_modules": modules or None,
        "target_parameters": params or None,
        "modules_to_save": ["router"] if cfg.train_router else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _write_tokenizer(out: Path, base_model: str | None) -> None:
    """The base checkpoint's tokenizer files when `base_model` is a directory holding them (plus our
    chat template if it has none), else the built-in gpt-oss tokenizer's."""
    import shutil

    from osstune.data.tokenizer import ensure_chat_template, write_tokenizer_files

    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
    base = Path(base_model) if base_model else None
    if base is not None and base.is_dir() and (base / "tokenizer.json").is_file():
        for name in names:
            if (base / name).is_file():
                shutil.copyfile(base / name, out / name)
        ensure_chat_template(out)
    else:
        write_tokenizer_files(out)


def save_adapter(model: GptOss, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the tokenizer files with the chat template (so the adapter directory serves as the
    tokenizer too, as `AutoTokenizer.from_pretrained(adapter_dir)` expects), then
    `adapter_model.safetensors`, then `adapter_config.json` (its presence marks a complete save)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out, base_model)
    config = adapter_config(model, base_model)
    sd = adapter_state_dict(model)
    write_with(out / WEIGHTS_NAME, lambda p: save_file(sd, p, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_with(out / CONFIG_NAME, lambda p: p.write_text(text))
    return out
