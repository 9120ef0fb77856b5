"""Enumerate the training configurations osstune supports for a request, predict each, recommend one.

The recommendation is the fastest configuration whose predicted need (allocated peak + allocator
and CUDA slack, osstune/plan/memory.py) fits each GPU with `margin` to spare; ties go to the one
needing less memory, then to the earlier in enumeration order. One fixed order over a fixed set of
candidates: with more memory the set that fits only grows, so the choice never gets slower.

What varies: the method (when more than one is allowed), the checkpoint policy (layer,
keep_expert_gemms, none), where the embedding, the optimizer state and the layer inputs live, how the
step's sequences split into micro-batches, sharding degrees over several GPUs, and, only when
`lossy` is allowed, 8-bit AdamW moments and MXFP4 attention weights (they change the numbers).
What stays: everything else in the base config (model, data, LoRA rank and targets, sequence length).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from osstune.config import ModelConfig
from osstune.plan.hardware import GPUs
from osstune.plan.memory import MemoryEstimate, ModelBytes, count_bytes, estimate, model_config, packed_experts
from osstune.plan.parallel import Degrees, degree_options, multi_gpu_available
from osstune.plan.speed import SpeedEstimate, estimate_speed
from osstune.train.config import MemoryConfig, TrainConfig

MARGIN = 0.05  # of each GPU's memory kept free beyond the prediction


@dataclass(frozen=True)
class Candidate:
    config: TrainConfig
    degrees: Degrees
    memory: MemoryEstimate
    speed: SpeedEstimate
    fits: bool
    usable: str = ""  # why it cannot be recommended whatever the memory ("" = it can)

    @property
    def lossy(self) -> bool:
        return self.config.optim.moments == "int8" or self.config.attention_weights == "mxfp4"


@dataclass(frozen=True)
class Plan:
    gpus: GPUs
    model: ModelConfig
    margin: float
    candidates: tuple[Candidate, ...]
    chosen: Candidate | None
    notes: tuple[str, ...] = field(default=())

    def why_not(self, c: Candidate) -> str:
        """Why `c` was not recommended, in words."""
        if c is self.chosen:
            return "recommended"
        if c.usable:
            return c.usable + ("; it would fit" if c.fits else f"; needs {c.memory.needed / 2**30:.1f} GiB a GPU")
        if not c.fits:
            return f"does not fit: needs {c.memory.needed / 2**30:.1f} of {self.budget / 2**30:.1f} GiB"
        if self.chosen is not None and c.speed.tokens_per_s < self.chosen.speed.tokens_per_s:
            return f"slower ({c.speed.tokens_per_s:,.0f} tok/s)"
        return "as fast, needs more memory"

    @property
    def budget(self) -> int:
        return int(self.gpus.memory * (1 - self.margin))


@lru_cache(maxsize=32)
def _counted(cfg: TrainConfig, model: ModelConfig, dtype: torch.dtype) -> ModelBytes:
    return count_bytes(cfg, model, dtype)


def counted_for(cfg: TrainConfig, model: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> ModelBytes:
    """count_bytes, cached on what it depends on (the method, its targets and attention storage)."""
    key = TrainConfig(model="plan", method=cfg.method, lora=cfg.lora, full_targets=cfg.full_targets,
                      attention_weights=cfg.attention_weights)  # fmt: skip
    return _counted(key, model, dtype)


@lru_cache(maxsize=8192)
def _predicted(cfg: TrainConfig, model: ModelConfig, peak_flops: float, degrees: Degrees):
    counted = counted_for(cfg, model)
    mem = estimate(cfg, model, degrees, counted=counted)
    speed = estimate_speed(cfg, model, counted.trainable_values, peak_flops, degrees, packed_experts(cfg, model))
    return mem, speed


def predict(
    cfg: TrainConfig, model: ModelConfig, gpus: GPUs, degrees: Degrees = Degrees(), margin: float = MARGIN
) -> Candidate:
    mem, speed = _predicted(cfg, model, gpus.peak_flops, degrees)
    usable = ""
    if degrees.gpus > gpus.count:
        usable = f"needs {degrees.gpus} GPUs"
    elif not degrees.single and not multi_gpu_available():
        usable = "needs multi-GPU support (not in osstune yet)"
    return Candidate(cfg, degrees, mem, speed, mem.needed <= gpus.memory * (1 - margin), usable)


def _variants(base: TrainConfig, methods: tuple[str, ...], lossy: bool, model: ModelConfig) -> list[TrainConfig]:
    batch = base.micro_batch * base.grad_accum
    micro_batches = [m for m in (1, 2, 4, 8) if batch % m == 0]
    out = []
    for method, policy, emb, opt, act, moments, attn, micro in itertools.product(
        methods,
        ("layer", "keep_expert_gemms", "none"),
        ("gpu", "cpu"),
        ("gpu", "cpu"),
        ("gpu", "cpu"),
        ("float32", "int8") if lossy else (base.optim.moments,),
        ("bf16", "mxfp4") if lossy else (base.attention_weights,),
        micro_batches,
    ):
        try:
            cfg = dataclasses.replace(
                base,
                method=method,
                gradient_checkpointing=policy != "none",
                checkpoint_policy="layer" if policy == "none" else policy,
                memory=MemoryConfig(embedding=emb, optimizer=opt, activations=act),
                optim=dataclasses.replace(base.optim, moments=moments),
                attention_weights=attn if method == "qlora" else "bf16",
                micro_batch=micro,
                grad_accum=batch // micro,
            )
        except ValueError:
            continue  # a combination TrainConfig refuses (e.g. keep_expert_gemms with layer inputs on the host)
        if cfg not in out:
            out.append(cfg)
    return out


def usable_methods(methods: tuple[str, ...], model: ModelConfig) -> tuple[tuple[str, ...], list[str]]:
    notes = []
    if "qlora" in methods and model.expert_format != "mxfp4":
        notes.append("qlora left out: the model stores bf16 experts (QLoRA trains over MXFP4 ones)")
        methods = tuple(m for m in methods if m != "qlora")
    if not methods:
        raise ValueError("no method left to plan: " + "; ".join(notes))
    return methods, notes


def make_plan(
    base: TrainConfig,
    gpus: GPUs,
    methods: tuple[str, ...] | None = None,
    lossy: bool = False,
    margin: float = MARGIN,
    model: ModelConfig | None = None,
) -> Plan:
    model = model or model_config(base.model)
    methods, notes = usable_methods(methods or (base.method,), model)
    candidates = []
    for cfg in _variants(base, methods, lossy, model):
        for degrees in degree_options(gpus.count, model):
            candidates.append(predict(cfg, model, gpus, degrees, margin))
    chosen = recommend(candidates)
    return Plan(gpus, model, margin, tuple(candidates), chosen, tuple(notes))


def recommend(candidates: list[Candidate] | tuple[Candidate, ...]) -> Candidate | None:
    ok = [(i, c) for i, c in enumerate(candidates) if c.fits and not c.usable]
    if not ok:
        return None
    return min(ok, key=lambda ic: (-ic[1].speed.tokens_per_s, ic[1].memory.needed, ic[0]))[1]


def frontier(plan: Plan) -> list[Candidate]:
    """The candidates that no other of the same kind (recommendable, or not: several GPUs without
    multi-GPU support) beats in both speed and memory, plus the recommended one, fastest first: the
    table worth reading."""
    keep = []
    for c in plan.candidates:
        peers = [o for o in plan.candidates if bool(o.usable) == bool(c.usable)]
        beaten = any(
            o.speed.tokens_per_s >= c.speed.tokens_per_s and o.memory.needed <= c.memory.needed
            and (o.speed.tokens_per_s > c.speed.tokens_per_s or o.memory.needed < c.memory.needed)
            for o in peers
        )
        if not beaten or c is plan.chosen:
            keep.append(c)
    return sorted(keep, key=lambda c: -c.speed.tokens_per_s)


def what_to_change(plan: Plan) -> str:
    """For a plan where nothing fits: the smallest configuration, and what it would take."""
    usable = [c for c in plan.candidates if not c.usable] or list(plan.candidates)
    least = min(usable, key=lambda c: c.memory.needed)
    hints = []
    if least.config.method == "lora" and plan.model.expert_format == "mxfp4":
        hints.append("method qlora (experts stay MXFP4)")
    if not least.lossy and least.config.method == "qlora":
        hints.append("lossy options (optim.moments int8, attention_weights mxfp4; osstune plan --lossy)")
    hints.append(f"a shorter data.seq_len than {least.config.data.seq_len}")
    hints.append(f"a GPU with at least {least.memory.needed / (1 - plan.margin) / 2**30:.1f} GiB")
    return (
        f"nothing fits {plan.gpus.describe()}: the smallest configuration ({describe_options(least.config)}) needs "
        f"{least.memory.needed / 2**30:.1f} GiB of {plan.budget / 2**30:.1f}. Try " + ", or ".join(hints)
    )


def describe_change(plan: Plan, cfg: TrainConfig) -> str:
    """What to change in `cfg` to get the plan's choice, or what_to_change when nothing fits."""
    if plan.chosen is None:
        return what_to_change(plan)
    new = plan.chosen.config
    changes = [f"{k}: {a!r} -> {b!r}" for k, a, b in _diff(cfg, new)]
    return "Set " + ", ".join(changes) + f" (predicted {plan.chosen.memory.needed / 2**30:.1f} GiB), or run with --plan auto"


def describe_options(cfg: TrainConfig) -> str:
    return ", ".join(f"{k}={b!r}" for k, _, b in _diff(TrainConfig(), cfg, keys=_PLANNED))


_PLANNED = ("method", "gradient_checkpointing", "checkpoint_policy", "memory.embedding", "memory.optimizer",
            "memory.activations", "optim.moments", "attention_weights", "micro_batch", "grad_accum")  # fmt: skip


def _diff(a: TrainConfig, b: TrainConfig, keys: tuple[str, ...] = _PLANNED) -> list[tuple[str, object, object]]:
    out = []
    for key in keys:
        va, vb = a, b
        for part in key.split("."):
            va, vb = getattr(va, part), getattr(vb, part)
        if va != vb:
            out.append((key, va, vb))
    return out
