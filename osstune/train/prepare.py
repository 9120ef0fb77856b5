"""The model a training run computes with, built by one ordered pipeline of named steps:

    load -> freeze -> mxfp4_attention -> trainable -> host_embedding -> checkpointing -> execution -> parallel

`prepare_model(cfg, device, dtype)` runs `PIPELINE` on one `Preparation`. Each step is a function
whose docstring says why it sits where it does, and names the steps that must have run before it
(`Step.after`); a pipeline run in another order stops at the first step whose predecessors are
missing (`PipelineOrderError`) instead of building a different model. Steps the list leaves free
(quantizing after LoRA, offloading before the fast path) give the same model in either order
(tests/test_prepare.py swaps them).

One process and several (torchrun) use the same pipeline: a sharded run loads into host memory and
its `parallel` step shards the model (osstune.parallel.parallelize: tensor or expert parallel, then
FSDP); on one process that step does nothing. How attention, experts and checkpointing execute is one object,
`model.execution` (osstune.model.ExecutionPolicy), filled by `checkpointing`, `execution` and
`parallel`, each in its own fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from osstune import parallel
from osstune.errors import OsstuneError
from osstune.fast import FastPathOptions, enable_fast_path, use_fast_path
from osstune.model import GptOss
from osstune.offload import offload_activations, offload_embedding
from osstune.train.config import TrainConfig, packs_experts


class PipelineOrderError(OsstuneError, RuntimeError):
    pass


@dataclass
class Preparation:
    """What the steps share: the run's decisions, and the model as far as it is built."""

    cfg: TrainConfig
    device: torch.device  # where the run computes
    dtype: torch.dtype
    fast: bool  # the run's one backend decision (osstune.fast.use_fast_path)
    world: parallel.World | None = None  # several processes: the sharded run's world
    notes: list[str] = field(default_factory=list)  # what the user should know, shown at the start
    model: GptOss | None = None
    done: list[str] = field(default_factory=list)  # names of the steps run so far

    @property
    def distributed(self) -> bool:
        return self.world is not None and self.world.distributed


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Preparation], None]
    after: tuple[str, ...] = ()  # steps that must have run before this one


def stored_expert_format(model_ref: str) -> str:
    """How the checkpoint (or preset) `model_ref` stores its experts: "mxfp4" or "bf16"."""
    from osstune.checkpoint import load_config, resolve_checkpoint
    from osstune.config import PRESETS

    if model_ref in PRESETS:
        return PRESETS[model_ref].expert_format
    return load_config(resolve_checkpoint(model_ref)).expert_format


# ---- the steps, in order ----


def load(prep: Preparation) -> None:
    """First: the weights as the run keeps them. Experts are packed or decoded here (`packs_experts`),
    and a table meant for host memory is loaded straight there, so it never takes GPU memory, not even
    at the peak of the load. A sharded run loads into host memory: FSDP (the `parallel` step) moves
    each rank's shards to its GPU, so no GPU ever holds the whole model."""
    from osstune.checkpoint import load_model

    cfg = prep.cfg
    packed = packs_experts(cfg, stored_expert_format(cfg.model))
    host = ("model.embed_tokens.weight",) if cfg.memory.embedding == "cpu" else ()
    where = torch.device("cpu") if prep.distributed else prep.device
    prep.model = load_model(cfg.model, dtype=prep.dtype, device=where, packed_experts=packed, host=host)


def freeze(prep: Preparation) -> None:
    """Every loaded weight frozen, before anything is chosen to train: `trainable` then turns on
    exactly what trains (freezing after it would train nothing)."""
    for p in prep.model.parameters():
        p.requires_grad_(False)


def mxfp4_attention(prep: Preparation) -> None:
    """`attention_weights: mxfp4`: q/k/v/o stored as MXFP4, on the weights' device (one projection at
    a time, so memory never holds two copies). Before `execution`, which fuses the packed q/k/v into
    one buffer; before or after LoRA alike (quantize_attention packs the base beneath an adapter)."""
    if prep.cfg.attention_weights != "mxfp4":
        return
    from osstune.quant.linear import quantize_attention

    prep.notes.append(quantize_attention(prep.model).summary())


def trainable(prep: Preparation) -> None:
    """What trains: LoRA adapters (apply_lora wraps the projections and experts, the base frozen), or
    the weights `full_targets` names. After `freeze`; before `host_embedding` (which refuses a trained
    table) and `execution` (its selective checkpoint tells base from adapter GEMMs by the rank)."""
    cfg, model = prep.cfg, prep.model
    if cfg.method in ("lora", "qlora"):
        from osstune.lora import apply_lora

        apply_lora(model, cfg.lora)
        return
    names = [n for n, _ in model.named_parameters()]
    chosen = [n for n in names if "all" in cfg.full_targets or any(t in n for t in cfg.full_targets)]
    if not chosen:
        raise ValueError(f"full_targets {list(cfg.full_targets)} match no parameter; names look like {names[1]!r}")
    params = dict(model.named_parameters())
    for n in chosen:
        params[n].requires_grad_(True)


def host_embedding(prep: Preparation) -> None:
    """`memory.embedding: cpu`: the (frozen) table stays in host memory and only a batch's rows go to
    the device (osstune.offload.HostEmbedding). After `trainable`: the table is then no parameter,
    so only a check made once what trains is chosen can refuse a trained one (offload_embedding's)."""
    if prep.cfg.memory.embedding == "cpu":
        offload_embedding(prep.model, prep.device)


def checkpointing(prep: Preparation) -> None:
    """Gradient checkpointing, and with `memory.activations: cpu` its layer inputs in host memory (the
    `checkpoint` field of the execution policy). Independent of `execution`, which fills other fields."""
    prep.model.gradient_checkpointing = prep.cfg.gradient_checkpointing
    if prep.cfg.memory.activations == "cpu":
        offload_activations(prep.model)


def execution(prep: Preparation) -> None:
    """The fast path (osstune's kernels for q/k/v, attention, experts, the selective checkpoint) as
    the model's execution policy, when the run's backend decision says so. After the weights have
    their final modules, dtype and device (`mxfp4_attention`, `trainable`): fusing q/k/v and the
    checkpoint's adapter ranks are read here. Before `parallel`, whose expert dispatch owns the experts."""
    if prep.fast:
        enable_fast_path(prep.model, FastPathOptions(checkpoint=prep.cfg.checkpoint_policy))


def parallel_plan(prep: Preparation) -> None:
    """Several processes: tensor or expert parallel, then FSDP over what is left
    (osstune.parallel.parallelize). Each takes over the policy's `experts` (expert parallel's
    all-to-all dispatch; tensor parallel's split region, which runs the fast path's experts kernel
    inside on the local tensors). Last: it shards what the steps before built, trainable parameters
    chosen. Nothing on one process."""
    if prep.distributed:
        prep.model = parallel.parallelize(prep.model, prep.world, prep.dtype)


PIPELINE: tuple[Step, ...] = (
    Step("load", load),
    Step("freeze", freeze, after=("load",)),
    Step("mxfp4_attention", mxfp4_attention, after=("load",)),
    Step("trainable", trainable, after=("freeze",)),
    Step("host_embedding", host_embedding, after=("trainable",)),
    Step("checkpointing", checkpointing, after=("load",)),
    Step("execution", execution, after=("mxfp4_attention", "trainable")),
    Step("parallel", parallel_plan, after=("trainable", "host_embedding", "checkpointing", "execution")),
)


def prepare_model(
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    notes: list[str] | None = None,
    *,
    fast: bool | None = None,
    world: parallel.World | None = None,
    steps: tuple[Step, ...] = PIPELINE,
) -> GptOss:
    """The model as `cfg` trains it on `device` (sharded for `world` when it has several processes);
    what the user should know about it is appended to `notes`. fast: the run's backend decision
    (default: use_fast_path(cfg.fast, device)). steps: the pipeline (tests run it in other orders)."""
    prep = Preparation(cfg, device, dtype, use_fast_path(cfg.fast, device) if fast is None else fast, world)
    if notes is not None:
        prep.notes = notes
    for step in steps:
        missing = [name for name in step.after if name not in prep.done]
        if missing:
            raise PipelineOrderError(
                f"model preparation: step {step.name!r} ran before {', '.join(map(repr, missing))}, which it "
                f"follows (osstune.train.prepare.{step.run.__name__} says why); run the steps in PIPELINE's order"
            )
        step.run(prep)
        prep.done.append(step.name)
    return prep.model
