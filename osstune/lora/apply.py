"""Put LoRA wrappers into a `GptOss` model, choose what trains, and fold adapters back for export.

The model is changed in place by replacing modules (composition): `self_attn.q_proj` becomes a
`LoRALinear` around the original `nn.Linear` (or the `MXFP4Linear` that
`osstune.quant.linear.quantize_attention` put there), `mlp.experts` a `LoRAExperts` around the
original experts. `model.lora_config` records the options the adapter was made with.
"""

from __future__ import annotations

import torch
from torch import nn

from osstune.lora.config import EXPERT_KINDS, LoraConfig, resolve_targets
from osstune.lora.layers import LoRAExperts, LoRALinear, dequantized
from osstune.model import GptOss, MXFP4Experts


def apply_lora(
    model: GptOss, cfg: LoraConfig, *, dtype: torch.dtype | None = None, seed: int | None = None
) -> GptOss:
    """Wrap the modules `cfg.targets` selects, freeze everything else (see `mark_trainable`).

    dtype: of the LoRA factors; default the base module's floating dtype (the biases' dtype over
    MXFP4 experts). seed: for A's initialisation; default torch's global generator.
    """
    paths = resolve_targets(cfg, model.config.num_hidden_layers)
    wrap_paths(model, paths, cfg, dtype=dtype, seed=seed)
    mark_trainable(model, cfg)
    return model


def wrap_paths(
    model: GptOss, paths: list[str], cfg: LoraConfig, *, dtype: torch.dtype | None = None, seed: int | None = None
) -> None:
    """Wrap exactly `paths` (as `resolve_targets` returns them) with LoRA of rank cfg.r."""
    if any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules()):
        raise ValueError("this model already has LoRA adapters; merge_lora() it or start from a fresh model")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    expert_kinds: dict[str, list[str]] = {}
    for path in paths:
        parent_path, _, kind = path.rpartition(".")
        if kind in EXPERT_KINDS:
            expert_kinds.setdefault(parent_path, []).append(kind)
            continue
        parent = model.get_submodule(parent_path)
        base = getattr(parent, kind)
        setattr(parent, kind, LoRALinear(base, cfg.r, cfg.scale, cfg.dropout, dtype, gen))
    for experts_path, kinds in expert_kinds.items():
        mlp_path, _, name = experts_path.rpartition(".")
        mlp = model.get_submodule(mlp_path)
        base = getattr(mlp, name)
        setattr(mlp, name, LoRAExperts(base, tuple(kinds), cfg.r, cfg.scale, cfg.dropout, dtype, gen))
    model.lora_config = cfg


def lora_wrappers(model: nn.Module) -> dict[str, LoRALinear | LoRAExperts]:
    """Every LoRA wrapper by module path, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The low-rank factors (not the router or sinks that `train_router`/`train_sinks` add)."""
    return [p for n, p in model.named_parameters() if n.rpartition(".")[2].endswith(("lora_A", "lora_B"))]


def mark_trainable(model: nn.Module, cfg: LoraConfig) -> int:
    """requires_grad on the LoRA factors (and router / sinks when cfg says so), off everywhere else.
    Returns the number of trainable values."""
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = lora_parameters(model)
    for name, p in model.named_parameters():
        leaf = name.rpartition(".")[2]
        if cfg.train_router and ".mlp.router." in name:
            chosen.append(p)
        elif cfg.train_sinks and leaf == "sinks":
            chosen.append(p)
    for p in chosen:
        p.requires_grad_(True)
    return sum(p.numel() for p in chosen)


@torch.no_grad()
def merge_lora(model: GptOss) -> GptOss:
    """Fold every adapter into the base weights and remove the wrappers (in place).

    Attention: W (out, in) += scale * B @ A. Experts: W[e] (in, out) += scale * A[e] @ B[e] for
    gate_up and down alike. Where expert LoRA sat over MXFP4 experts, the merged weights are
    dense, so every remaining MXFP4 expert block is decoded too and `model.config.expert_format`
    becomes "bf16": one layout per model, as checkpoints have. Requantizing is `osstune export`'s job.

    Attention stored as MXFP4 (`quantize_attention`): an adapted projection becomes a dense
    `nn.Linear` of decoded W + scale * B @ A; projections without an adapter stay `MXFP4Linear`
    (the model is not headed for a checkpoint anyway). `model.quantized_attention` stays set: the
    merged weights derive from the lossy MXFP4 copy, so `save_model` still refuses the model; merge
    the saved adapter onto the original checkpoint with `osstune export` instead.
    """
    densified = False
    for path, wrapper in lora_wrappers(model).items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if isinstance(wrapper, LoRAExperts) and isinstance(wrapper.base_layer, MXFP4Experts):
            densified = True
        setattr(parent, name, wrapper.merge())
    if densified:
        dequantize_experts(model)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@torch.no_grad()
def dequantize_experts(model: GptOss) -> GptOss:
    """Replace every `MXFP4Experts` by dense `Experts` (the biases' dtype); config says "bf16"."""
    for layer in model.model.layers:
        if isinstance(layer.mlp.experts, MXFP4Experts):
            layer.mlp.experts = dequantized(layer.mlp.experts)
    model.config = model.config.replace(expert_format="bf16")
    return model
