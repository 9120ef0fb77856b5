"""A planned configuration written as a recipe that `osstune train --config FILE` reads."""

from __future__ import annotations

from pathlib import Path

import yaml

from osstune.plan.search import Candidate, Plan
from osstune.train.recipe import to_dict


def recipe_text(plan: Plan, c: Candidate) -> str:
    m = c.memory
    header = [
        f"# Planned by `osstune plan` for {plan.gpus.describe()}.",
        f"# Predicted: peak {m.allocated / 2**30:.2f} GiB allocated, {m.needed / 2**30:.2f} GiB taken from the GPU "
        f"(of {plan.gpus.memory / 2**30:.1f}); about {c.speed.tokens_per_s:,.0f} tokens/s (an estimate: docs/PLANNING.md).",
    ]
    if m.host:
        header.append(f"# Host memory for the offloaded tensors: {m.host / 2**30:.2f} GiB.")
    if c.lossy:
        header.append("# Lossy options: " + ", ".join(
            s for s, on in (("8-bit AdamW moments", c.config.optim.moments == "int8"),
                            ("MXFP4 attention weights", c.config.attention_weights == "mxfp4")) if on))  # fmt: skip
    if not c.degrees.single:
        header.append(f"# Sharding {c.degrees.label()}: not expressible in a recipe yet (needs multi-GPU support).")
    body = yaml.safe_dump(to_dict(c.config), sort_keys=False)
    return "\n".join(header) + "\n" + body


def write_recipe(plan: Plan, c: Candidate, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(recipe_text(plan, c))
    return path
