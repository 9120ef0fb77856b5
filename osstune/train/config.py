"""Training options. YAML recipes and CLI overrides are read into these dataclasses (recipe.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from osstune.fields import bounded, check_fields
from osstune.lora.config import LoraConfig
from osstune.parallel.config import ParallelConfig


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    # A separate eval file, or a fraction of the training rows held out (by seed) for eval loss.
    eval_path: str | None = None
    eval_fraction: float = bounded(0.0, ge=0.0, lt=1.0)
    # Tokens per packed sequence; rows are packed into it without attention crossing rows.
    seq_len: int = bounded(2048, ge=2)
    # What to do with a row longer than seq_len: "error", "truncate" or "drop".
    overlong: Literal["error", "truncate", "drop"] = "truncate"
    # Which assistant messages are trained: the last turn (default), its final answers, or all
    # (osstune/data/masks.py and docs/DATA.md say why).
    train_on: Literal["last", "final", "all"] = "last"
    skip_invalid: bool = False
    # Source columns read as osstune's keys, "KEY=COLUMN" (e.g. prompt=question); docs/DATA.md.
    columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self)
        if self.eval_path and self.eval_fraction:
            raise ValueError("set data.eval_path or data.eval_fraction, not both")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = bounded(2e-4, gt=0.0)
    weight_decay: float = bounded(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = bounded(1e-8, gt=0.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # Steps of linear warmup from 0; fewer than TrainConfig.steps.
    warmup_steps: int = bounded(0, ge=0)
    # The schedule decays to lr * min_lr_ratio at the last step.
    min_lr_ratio: float = bounded(0.1, ge=0.0, le=1.0)
    # Gradients are scaled down to this global L2 norm when above it.
    max_grad_norm: float = bounded(1.0, gt=0.0)
    # AdamW's two moments: "float32" (8 bytes a trainable value), or "int8": block-wise 8-bit codes,
    # one float32 absmax per 256 values (about 2 bytes a value; 0.69 -> 0.18 GiB for LoRA r=8 on
    # attention + experts of gpt-oss-20b). Lossy: each step re-rounds the moments to the nearest of
    # 256 levels (Dettmers et al. 2022). Tensors under 4,096 values keep float32 moments
    # (osstune/kernels/adam8.py, osstune/train/optim.py).
    moments: Literal["float32", "int8"] = "float32"

    def __post_init__(self) -> None:
        check_fields(self)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)}: each must be in [0, 1)")


@dataclass(frozen=True)
class MemoryConfig:
    """Where the large tensors of a training step live on a CUDA machine: "gpu", or "cpu" (host
    memory). Each "cpu" gives the same numbers and trades GPU memory for PCIe copies; on a CPU-only
    run both settings are the same place (osstune/offload.py, osstune/train/optim.py)."""

    # The frozen embedding table (1.08 GiB for gpt-oss): rows are gathered on the host and only the
    # batch's (B, T, hidden) rows are copied over: 3-12 ms per micro-step (2k-64k tokens, measured
    # on an H100 machine), where the GPU's own lookup takes under 1 ms. Not for a trained embedding.
    embedding: Literal["gpu", "cpu"] = "gpu"
    # The optimizer's float32 masters and AdamW moments (12 bytes per trainable value: 1.04 GiB for
    # LoRA r=8 on attention + experts of gpt-oss-20b, 92M values). Costs gradients and weights over
    # PCIe and AdamW on the CPU once per optimizer step: 0.23 s instead of 0.02 s for those 92M.
    optimizer: Literal["gpu", "cpu"] = "gpu"
    # The layer inputs that gradient checkpointing keeps (2 x tokens x hidden bytes per layer: 8.4 GiB
    # for 24 layers at 65,536 tokens; the measured peak fell 7.6 GiB, the step took 0.6% longer).
    # Copied out and back on a side stream, overlapping the compute; the step is then not recorded
    # as a CUDA graph (host copies cannot be). Needs gradient_checkpointing.
    activations: Literal["gpu", "cpu"] = "gpu"

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "tiny"
    output: str = "runs/osstune"
    method: Literal["lora", "full", "qlora"] = "lora"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # Several processes (torchrun): data, tensor and expert parallel (osstune/parallel/, docs/PARALLEL.md).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # QLoRA only: "mxfp4" also stores the frozen attention projections q/k/v/o in MXFP4, as classic
    # QLoRA stores every frozen linear in 4 bits (gpt-oss-20b: 1.19 -> 0.32 GiB). Lossy: the
    # relative error is reported at the start of the run; the adapter is merged onto the original
    # bf16 weights by `osstune export`. Slower attention projections (docs/QLORA.md).
    attention_weights: Literal["bf16", "mxfp4"] = "bf16"
    # Full fine-tuning: which weights train; names are matched as substrings ("all" = everything).
    full_targets: tuple[str, ...] = ("all",)
    steps: int = bounded(100, ge=1)
    # Packed sequences per optimizer step = micro_batch * grad_accum.
    micro_batch: int = bounded(1, ge=1)
    grad_accum: int = bounded(1, ge=1)
    gradient_checkpointing: bool = True
    # What the checkpoint keeps on the fast path: "layer" recomputes each decoder layer in the
    # backward (least memory); "keep_expert_gemms" keeps the outputs of the base expert GEMMs (bf16
    # or MXFP4) and recomputes the rest: +11-15% tokens/s for ~3.2 GiB more at 2,048 tokens on
    # gpt-oss-20b (docs/PERFORMANCE.md).
    checkpoint_policy: Literal["layer", "keep_expert_gemms"] = "layer"
    # Attention and experts through osstune's kernels (osstune/fast.py): "auto" = on a CUDA GPU,
    # "always" (also on the CPU, slow: for tests), "never" (the reference model). Not on/off:
    # YAML reads those as booleans.
    fast: Literal["auto", "always", "never"] = "auto"
    # "auto": bfloat16 compute on a GPU, float32 on the CPU.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: str = "auto"
    seed: int = 0
    log_every: int = bounded(1, ge=1)
    # Where the logged metrics also go, besides metrics.jsonl: "tensorboard" (<output>/tensorboard)
    # and/or "wandb" (WANDB_MODE=offline respected); osstune/train/report.py.
    report_to: tuple[Literal["tensorboard", "wandb"], ...] = ()
    # Eval loss every eval_every steps and at the end (0: never; needs data.eval_path or eval_fraction).
    eval_every: int = bounded(0, ge=0)
    # A checkpoint every save_every steps and every save_minutes of training (0 turns either off),
    # on SIGINT/SIGTERM, and at the end: an interrupted run resumes with --resume.
    save_every: int = bounded(500, ge=0)
    save_minutes: float = bounded(30.0, ge=0.0)
    # How many of the newest checkpoints are kept (0: all).
    keep_checkpoints: int = bounded(2, ge=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.optim.warmup_steps >= self.steps:
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps} must be fewer than steps={self.steps} "
                "(the learning rate would never reach optim.lr)"
            )
        if self.method != "full" and self.full_targets != ("all",):
            raise ValueError(f"full_targets only applies to method 'full', not {self.method!r}")
        if self.attention_weights == "mxfp4" and self.method != "qlora":
            raise ValueError(
                f"attention_weights='mxfp4' stores frozen attention weights in 4 bits, which only method 'qlora' "
                f"trains on; method is {self.method!r}. Use --method qlora or attention_weights='bf16'"
            )
        if self.checkpoint_policy == "keep_expert_gemms" and (
            not self.gradient_checkpointing or self.fast == "never" or self.memory.activations == "cpu"
        ):
            raise ValueError(
                "checkpoint_policy='keep_expert_gemms' selects what the fast path's gradient checkpointing keeps; it "
                "needs gradient_checkpointing on, fast not 'never', and memory.activations='gpu' (layer inputs in host "
                "memory are recomputed whole). Use checkpoint_policy='layer' otherwise"
            )
        if self.memory.activations == "cpu" and not self.gradient_checkpointing:
            raise ValueError(
                "memory.activations='cpu' moves the layer inputs that gradient checkpointing keeps; "
                "turn gradient_checkpointing on or set memory.activations='gpu'"
            )
        # The trainer's own rule for full_targets (a name contains a target, or "all").
        if self.memory.embedding == "cpu" and self.method == "full" and any(
            t == "all" or t in "model.embed_tokens.weight" for t in self.full_targets
        ):
            raise ValueError(
                f"memory.embedding='cpu' keeps the embedding frozen in host memory, but full_targets "
                f"{list(self.full_targets)} trains model.embed_tokens.weight; list targets that leave it out "
                "(e.g. [self_attn, mlp, norm, lm_head]) or set memory.embedding='gpu'"
            )


def packs_experts(cfg: TrainConfig, expert_format: str) -> bool:
    """Whether the run keeps MXFP4 experts (`expert_format` as stored) packed: QLoRA, and full
    fine-tuning that leaves the experts frozen, do (the same weights in a quarter of the memory); LoRA
    and trained experts use dense ones. The trainer (osstune.train.prepare) and the planner follow it."""
    frozen = cfg.method == "qlora" or (
        cfg.method == "full" and not any(t in ("all", "experts", "mlp.experts") for t in cfg.full_targets)
    )
    return frozen and expert_format == "mxfp4"


# Fields that may differ when a run is resumed (they do not change what was computed so far).
# A field missing from an older checkpoint's config counts as its default (trainer._check_resume).
RESUMABLE_CHANGES = frozenset({
    "steps", "log_every", "report_to", "eval_every", "save_every", "save_minutes", "keep_checkpoints", "device", "fast", "checkpoint_policy",
    "memory.embedding", "memory.optimizer", "memory.activations",
    "parallel.reshard_after_forward", "parallel.offload", "parallel.comm_every",
})  # fmt: skip
