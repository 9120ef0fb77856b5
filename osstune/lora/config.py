"""LoRA options, the names of what LoRA can target, and the error for adapters that do not fit.

Targets follow PEFT's matching rule so that one vocabulary serves our configs and PEFT's
`adapter_config.json`: an entry matches a target path when the path equals it or ends with
"." + entry. The target paths of layer i are `model.layers.{i}.self_attn.{q,k,v,o}_proj` (the
attention `nn.Linear`s) and `model.layers.{i}.mlp.experts.{gate_up_proj,down_proj}` (the 3-D expert
weights). So "q_proj" targets every layer, "7.mlp.experts.down_proj" only layer 7 (the form the
OpenAI cookbook's gpt-oss recipe uses).
"""

from __future__ import annotations

from dataclasses import dataclass

from osstune.fields import bounded, check_fields

ATTENTION_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_KINDS = ("gate_up_proj", "down_proj")
TARGET_GROUPS = {
    "attention": ATTENTION_KINDS,
    "experts": EXPERT_KINDS,
    "all": ATTENTION_KINDS + EXPERT_KINDS,
}


class AdapterError(ValueError):
    """An adapter that does not fit the model: wrong shapes or rank, missing files, unknown targets."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA (arXiv:2106.09685) options. rsLoRA (arXiv:2312.03732) scales by alpha/sqrt(r) instead of alpha/r.

    targets: "attention", "experts", "all", or a tuple of entries matched as PEFT matches them
    (see the module docstring). train_router / train_sinks train those small tensors in full
    (no low-rank pair): the router is (E, H) per layer, the sinks one logit per head.
    """

    r: int = bounded(8, ge=1)
    alpha: float = bounded(16, gt=0)
    dropout: float = bounded(0.0, ge=0.0, lt=1.0)
    rslora: bool = False
    targets: str | tuple[str, ...] = "attention"
    train_router: bool = False
    train_sinks: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        check_fields(self)
        if isinstance(self.targets, str):
            if self.targets not in TARGET_GROUPS:
                raise ValueError(
                    f"LoRA targets={self.targets!r}; use one of {', '.join(map(repr, TARGET_GROUPS))} "
                    f"or a tuple of entries ending in {', '.join(ATTENTION_KINDS + EXPERT_KINDS)}"
                )
        else:
            if not self.targets:
                raise ValueError("LoRA targets is empty; name at least one module kind")
            for entry in self.targets:
                if not isinstance(entry, str) or entry.rpartition(".")[2] not in ATTENTION_KINDS + EXPERT_KINDS:
                    raise ValueError(
                        f"LoRA target {entry!r} names no module LoRA can adapt; entries must end in one of "
                        f"{', '.join(ATTENTION_KINDS + EXPERT_KINDS)} (e.g. 'q_proj' or '7.mlp.experts.down_proj')"
                    )

    @property
    def target_entries(self) -> tuple[str, ...]:
        return TARGET_GROUPS[self.targets] if isinstance(self.targets, str) else self.targets

    @property
    def scale(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)


def target_paths(num_layers: int) -> list[str]:
    """Every path LoRA can adapt in a model of `num_layers` layers, in model order."""
    paths = []
    for i in range(num_layers):
        paths += [f"model.layers.{i}.self_attn.{k}" for k in ATTENTION_KINDS]
        paths += [f"model.layers.{i}.mlp.experts.{k}" for k in EXPERT_KINDS]
    return paths


def entry_matches(entry: str, path: str) -> bool:
    """PEFT's rule for list entries in target_modules / target_parameters."""
    return path == entry or path.endswith("." + entry)


def resolve_targets(cfg: LoraConfig, num_layers: int, source: str = "LoRA config") -> list[str]:
    """The target paths `cfg` selects; an entry that matches nothing is an error, not a silent no-op."""
    paths = target_paths(num_layers)
    chosen: set[str] = set()
    for entry in cfg.target_entries:
        hits = [p for p in paths if entry_matches(entry, p)]
        if not hits:
            raise AdapterError(
                f"{source}: target {entry!r} matches no module of this {num_layers}-layer model "
                f"(paths look like 'model.layers.0.self_attn.q_proj', 'model.layers.0.mlp.experts.down_proj')"
            )
        chosen.update(hits)
    return [p for p in paths if p in chosen]
