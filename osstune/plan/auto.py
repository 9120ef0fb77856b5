"""`osstune train --plan auto|check`: the planner in front of a training run, before any model loads."""

from __future__ import annotations

from osstune.plan.hardware import GPUs
from osstune.plan.memory import PlanError, model_config
from osstune.plan.search import MARGIN, describe_change, make_plan, predict
from osstune.train.config import TrainConfig


def plan_training(cfg: TrainConfig, gpus: GPUs, mode: str, margin: float = MARGIN) -> tuple[TrainConfig, str]:
    """mode "auto": the fastest configuration predicted to fit, varying only what leaves the numbers
    unchanged (checkpoint policy, where the embedding / optimizer state / layer inputs live, the
    micro-batch split of the step's sequences); the method and the lossy options stay as given.
    mode "check": `cfg` as it is, refused when it is predicted not to fit.
    Returns the configuration to run and a line saying what the plan predicts. Raises PlanError,
    naming what to change, when nothing fits."""
    model = model_config(cfg.model)
    if mode == "check":
        c = predict(cfg, model, gpus, margin=margin)
        if not c.fits:
            plan = make_plan(cfg, gpus, margin=margin, model=model)
            raise PlanError(
                f"the plan predicts this configuration needs {c.memory.needed / 2**30:.1f} GiB of "
                f"{gpus.describe()} ({plan.budget / 2**30:.1f} GiB usable): it would run out of memory. "
                + describe_change(plan, cfg)
            )
        return cfg, _line(c, gpus)
    if mode != "auto":
        raise PlanError(f"--plan {mode!r}: use auto or check")
    plan = make_plan(cfg, gpus, margin=margin, model=model)
    if plan.chosen is None:
        raise PlanError(describe_change(plan, cfg))
    return plan.chosen.config, _line(plan.chosen, gpus)


def _line(c, gpus: GPUs) -> str:
    return (
        f"plan: predicted peak {c.memory.allocated / 2**30:.2f} GiB allocated, {c.memory.needed / 2**30:.2f} GiB of "
        f"{gpus.memory / 2**30:.1f} needed, about {c.speed.tokens_per_s:,.0f} tokens/s"
    )
