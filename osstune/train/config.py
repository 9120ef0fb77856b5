"""Training options. YAML recipes and CLI overrides are read into these dataclasses (recipe.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from osstune.lora import LoraConfig


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    # A separate eval file, or a fraction of the training rows held out (by seed) for eval loss.
    eval_path: str | None = None
    eval_fraction: float = 0.0
    # Tokens per packed sequence; rows are packed into it without attention crossing rows.
    seq_len: int = 2048
    # What to do with a row longer than seq_len: "error", "truncate" or "drop".
    overlong: Literal["error", "truncate", "drop"] = "truncate"
    # Which assistant messages are trained: the last turn (default), its final answers, or all
    # (osstune/data/masks.py and docs/DATA.md say why).
    train_on: Literal["last", "final", "all"] = "last"
    skip_invalid: bool = False


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    # The schedule decays to lr * min_lr_ratio at the last step.
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    model: str = "tiny"
    output: str = "runs/osstune"
    method: Literal["lora", "full", "qlora"] = "lora"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Full fine-tuning: which weights train; names are matched as substrings ("all" = everything).
    full_targets: tuple[str, ...] = ("all",)
    steps: int = 100
    # Packed sequences per optimizer step = micro_batch * grad_accum.
    micro_batch: int = 1
    grad_accum: int = 1
    gradient_checkpointing: bool = True
    # Attention and experts through osstune's kernels (osstune/fast.py): "auto" = on a CUDA GPU,
    # "always" (also on the CPU, slow: for tests), "never" (the reference model). Not on/off:
    # YAML reads those as booleans.
    fast: Literal["auto", "always", "never"] = "auto"
    # "auto": bfloat16 compute on a GPU, float32 on the CPU.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: str = "auto"
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.data.seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, got {self.data.seq_len}")
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.data.eval_fraction}")
        if self.data.eval_path and self.data.eval_fraction:
            raise ValueError("set data.eval_path or data.eval_fraction, not both")
        if self.optim.warmup_steps > self.steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}")
        if self.method != "full" and self.full_targets != ("all",):
            raise ValueError(f"full_targets only applies to method 'full', not {self.method!r}")


# Fields that may differ when a run is resumed (they do not change what was computed so far).
RESUMABLE_CHANGES = frozenset({"steps", "log_every", "eval_every", "save_every", "keep_checkpoints", "device", "fast"})
