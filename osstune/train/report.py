"""Metrics to TensorBoard and Weights & Biases (`report_to`), beside metrics.jsonl.

TensorBoard: event files in <output>/tensorboard through `torch.utils.tensorboard` (needs the
`tensorboard` package, not TensorFlow). W&B: a run in <output>/wandb, whose id is kept in
<output>/wandb-run-id so `--resume` continues the same run; WANDB_MODE=offline (or `wandb offline`)
writes it locally for a later `wandb sync`, and WANDB_PROJECT names the project (default osstune).
Both are optional: `pip install 'osstune[logging]'`.

Tags: train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/tokens, train/peak_gpu_gb,
eval/loss; the step is the optimizer step, as in metrics.jsonl. In a distributed run only rank 0
reports (the metrics are the run's, not one rank's).
"""

from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path
from typing import Any

REPORTERS = ("tensorboard", "wandb")
_TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
    "tokens": "train/tokens", "peak_gpu_gb": "train/peak_gpu_gb", "eval_loss": "eval/loss",
}  # fmt: skip
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_reporters(report_to: tuple[str, ...]) -> None:
    """Fail before any model is loaded when a reporter is unknown or its package is missing."""
    for name in report_to:
        if name not in REPORTERS:
            raise ValueError(f"report_to: {name!r} is not one of {', '.join(REPORTERS)}")
        try:
            importlib.import_module(_PACKAGES[name])
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                f"report_to {name!r} needs the '{_PACKAGES[name]}' package: pip install 'osstune[logging]'"
            ) from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record -> {tag: value} (the step itself is not a scalar)."""
    return {_TAGS[k]: float(v) for k, v in record.items() if k in _TAGS and v is not None}


class Reporter:
    """Sends each logged record to the chosen backends; `close()` flushes them."""

    def __init__(self, report_to: tuple[str, ...], out: Path, config: dict[str, Any], start_step: int = 0) -> None:
        check_reporters(report_to)
        self._tb = self._wandb = None
        if not _main_process():
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, events logged after the checkpoint (a lost tail) are dropped, as in metrics.jsonl.
            self._tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if "wandb" in report_to:
            self._wandb = _wandb_run(out, config)

    def log(self, step: int, record: dict[str, Any]) -> None:
        values = scalars(record)
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _wandb_run(out: Path, config: dict[str, Any]):
    import wandb

    out.mkdir(parents=True, exist_ok=True)
    id_file = out / "wandb-run-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    try:
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "osstune"), name=out.name, id=run_id, resume="allow",
            dir=str(out), config=config,
        )  # fmt: skip
    except wandb.errors.UsageError as e:
        raise RuntimeError(
            f"wandb could not start a run ({e}); run `wandb login`, or set WANDB_MODE=offline to write it locally"
        ) from None
    id_file.write_text(run_id + "\n")
    return run
