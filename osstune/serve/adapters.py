"""LoRA adapters served beside one base model, each request naming one or none.

Each adapter is read by `osstune.lora.load_adapter` (PEFT-format adapters, ours or PEFT-made, with
its checks: tensor names, shapes, rank, another base's adapter), its wrappers are kept, and the base
model's modules are put back: the wrappers hold the shared base module and their own low-rank pairs,
so a runner computes `wrapper.delta(x)` (attention) or runs the `LoRAExperts` (experts) for the
tokens of requests that name the adapter, and the plain module for the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from osstune.lora.layers import LoRAExperts, LoRALinear
from osstune.model import GptOss
from osstune.serve.types import RequestError


class AdapterSet:
    def __init__(self) -> None:
        self._linear: dict[str, dict[str, LoRALinear]] = {}
        self._experts: dict[str, dict[str, LoRAExperts]] = {}

    @property
    def names(self) -> list[str]:
        return list(self._linear)

    def linear(self, name: str, path: str) -> LoRALinear | None:
        return self._linear[name].get(path)

    def experts(self, name: str, path: str) -> LoRAExperts | None:
        return self._experts[name].get(path)

    def check(self, name: str | None) -> None:
        if name is not None and name not in self._linear:
            known = ", ".join(self.names) or "none are loaded"
            raise RequestError(f"unknown adapter {name!r}; the engine serves: {known}", field="model")

    def load(self, model: GptOss, name: str, path: str | Path) -> None:
        """Read the adapter at `path` for `model` and keep it as `name`; the model is left as it was."""
        from osstune.lora import load_adapter
        from osstune.lora.apply import lora_wrappers

        if name in self._linear:
            raise ValueError(f"adapter name {name!r} is given twice")
        adir = Path(path)
        _refuse_base_changes(adir)
        with torch.no_grad():
            load_adapter(model, adir)
            wrappers = lora_wrappers(model)
            linear, experts = {}, {}
            for p, w in wrappers.items():
                parent_path, _, attr = p.rpartition(".")
                setattr(model.get_submodule(parent_path), attr, w.base_layer)
                w.requires_grad_(False)
                (experts if isinstance(w, LoRAExperts) else linear)[p] = w
            if hasattr(model, "lora_config"):
                del model.lora_config
        self._linear[name] = linear
        self._experts[name] = experts


def _refuse_base_changes(adir: Path) -> None:
    """Adapters that also train base tensors (the router, the sinks) change more than low-rank pairs:
    they cannot share one base between requests."""
    config = adir / "adapter_config.json"
    weights = adir / "adapter_model.safetensors"
    if config.is_file():
        try:
            d = json.loads(config.read_text())
        except json.JSONDecodeError:
            return  # load_adapter reports it with the line
        if d.get("modules_to_save"):
            raise ValueError(
                f"{config}: the adapter trains {d['modules_to_save']} (modules_to_save) besides its LoRA pairs; "
                "such an adapter cannot share the base with other requests: merge it (osstune export) and serve the result"
            )
    if weights.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), "pt") as f:
                keys = list(f.keys())
        except SafetensorError:
            return  # load_adapter reports an unreadable file with its own message
        if any(k.endswith(".self_attn.sinks") for k in keys):
            raise ValueError(
                f"{weights}: the adapter trains the attention sinks besides its LoRA pairs; such an adapter "
                "cannot share the base with other requests: merge it (osstune export) and serve the result"
            )
