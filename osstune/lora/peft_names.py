"""PEFT's tensor names and shapes for our LoRA factors, and the conversions both ways.

`save.py` writes adapters that `peft.PeftModel.from_pretrained(GptOssForCausalLM, dir)` loads;
`load.py` applies adapters PEFT wrote (or we did) to our model. Both go through `slots()`.

Tensor names and shapes (PEFT 0.21 on transformers' GptOss; r rank, E experts, P = "base_model.model."):
- attention, `target_modules`: P + "model.layers.{i}.self_attn.q_proj.lora_A.weight" (r, in) and
  ".lora_B.weight" (out, r), nn.Linear orientation: ours unchanged.
- experts, `target_parameters` ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"): PEFT's
  `ParamWrapper` adapts one 3-D parameter (E, in, out) (GptOss experts declare `is_transposed`, so
  in/out are not swapped) with lora_A.weight (E*r, in), rows expert-major (row e*r + k), and
  lora_B.weight (out, r*E), columns rank-major (column k*E + e); delta[e] = scale * A_e^T @ B_e^T.
  Ours: A (E, in, r) = lora_A.reshape(E, r, in).transpose(1, 2); B (E, r, out) =
  lora_B.reshape(out, r, E).permute(2, 1, 0).
  Both expert parameters of one layer wrap the same module, nested in the module's parameter order:
  gate_up_proj is inner ("...mlp.experts.base_layer.lora_A.weight"), down_proj outer
  ("...mlp.experts.lora_A.weight"); a lone target is outer.
- router (`train_router`): written as PEFT's modules_to_save=["router"] writes it,
  P + "model.layers.{i}.mlp.router.weight" / ".bias".
- sinks (`train_sinks`): PEFT has no wrapper for a 1-D parameter; under their model names
  (P + "model.layers.{i}.self_attn.sinks") PEFT's loader passes them to load_state_dict unchanged, so
  `PeftModel.from_pretrained` still applies them (a PEFT re-save would drop them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from osstune.lora.apply import lora_wrappers
from osstune.lora.config import EXPERT_KINDS, LoraConfig
from osstune.lora.layers import LoRAExperts
from osstune.model import GptOss

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass(frozen=True)
class Slot:
    """One PEFT tensor: its name and shape in the file, and which of our factors it holds."""

    key: str
    shape: tuple[int, ...]
    path: str  # our target path, e.g. "model.layers.0.mlp.experts.down_proj"
    factor: str  # "A" or "B"


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def slots(model: GptOss, paths: list[str], r: int) -> list[Slot]:
    """The PEFT tensors of LoRA rank r on `paths` (target paths, as `resolve_targets` gives them)."""
    out = []
    by_experts: dict[str, list[str]] = {}
    for path in paths:
        parent, _, kind = path.rpartition(".")
        if kind in EXPERT_KINDS:
            by_experts.setdefault(parent, []).append(kind)
            continue
        lin = _base(model.get_submodule(path))
        out.append(Slot(f"{PREFIX}{path}.lora_A.weight", (r, lin.in_features), path, "A"))
        out.append(Slot(f"{PREFIX}{path}.lora_B.weight", (lin.out_features, r), path, "B"))
    for parent, kinds in by_experts.items():
        experts = _base(model.get_submodule(parent))
        e, two_i, h = experts.num_experts, experts.gate_up_proj_bias.shape[1], experts.down_proj_bias.shape[1]
        dims = {"gate_up_proj": (h, two_i), "down_proj": (two_i // 2, h)}
        ordered = [k for k in EXPERT_KINDS if k in kinds]
        for i, kind in enumerate(ordered):
            n_in, n_out = dims[kind]
            # PEFT wraps the first matched parameter first, so it ends up innermost.
            stem = PREFIX + parent + ".base_layer" * (len(ordered) - 1 - i)
            out.append(Slot(f"{stem}.lora_A.weight", (e * r, n_in), f"{parent}.{kind}", "A"))
            out.append(Slot(f"{stem}.lora_B.weight", (n_out, r * e), f"{parent}.{kind}", "B"))
    return out


def factor(model: GptOss, slot: Slot) -> nn.Parameter:
    parent, _, kind = slot.path.rpartition(".")
    if kind in EXPERT_KINDS:
        return getattr(model.get_submodule(parent), f"{kind}_lora_{slot.factor}")
    return getattr(model.get_submodule(slot.path), f"lora_{slot.factor}")


def to_peft(slot: Slot, t: torch.Tensor) -> torch.Tensor:
    if slot.path.rpartition(".")[2] not in EXPERT_KINDS:
        return t.detach().clone()
    if slot.factor == "A":  # (E, in, r) -> (E*r, in)
        e, n_in, r = t.shape
        return t.detach().transpose(1, 2).reshape(e * r, n_in).contiguous()
    e, r, n_out = t.shape  # (E, r, out) -> (out, r*E)
    return t.detach().permute(2, 1, 0).reshape(n_out, r * e).contiguous()


def from_peft(slot: Slot, t: torch.Tensor, e: int) -> torch.Tensor:
    if slot.path.rpartition(".")[2] not in EXPERT_KINDS:
        return t
    if slot.factor == "A":  # (E*r, in) -> (E, in, r)
        return t.reshape(e, -1, t.shape[1]).transpose(1, 2)
    return t.reshape(t.shape[0], -1, e).permute(2, 1, 0)  # (out, r*E) -> (E, r, out)


def extra_keys(model: GptOss, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Full tensors trained beside the adapter: router and sinks, under their PEFT names."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        if cfg.train_router:
            out[f"{PREFIX}model.layers.{i}.mlp.router.weight"] = layer.mlp.router.weight
            out[f"{PREFIX}model.layers.{i}.mlp.router.bias"] = layer.mlp.router.bias
        if cfg.train_sinks:
            out[f"{PREFIX}model.layers.{i}.self_attn.sinks"] = layer.self_attn.sinks
    return out


def adapted_paths(model: GptOss) -> list[str]:
    paths = []
    for path, wrapper in lora_wrappers(model).items():
        paths += [f"{path}.{k}" for k in wrapper.kinds] if isinstance(wrapper, LoRAExperts) else [path]
    return paths
