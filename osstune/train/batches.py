"""From data files to the trainer's batches: validation, token cache, eval split, packing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from osstune.data import DataOptions, PackedLoader, build_cache
from osstune.data.errors import DataError
from osstune.data.packing import IGNORE, PackedBatch
from osstune.train.config import TrainConfig


@dataclass
class Batch:
    """Packed sequences as tensors. labels are already shifted: the target of position t."""

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where untrained
    position_ids: torch.Tensor  # (B, T), restarting per document
    doc_ids: torch.Tensor  # (B, T), -1 for padding
    num_trained: int
    num_tokens: int  # real (non-padding) tokens

    @classmethod
    def from_packed(cls, b: PackedBatch) -> Batch:
        return cls(
            input_ids=torch.from_numpy(b.input_ids),
            labels=torch.from_numpy(b.labels),
            position_ids=torch.from_numpy(b.position_ids),
            doc_ids=torch.from_numpy(b.doc_ids.astype(np.int64)),
            num_trained=b.num_targets,
            num_tokens=int((b.doc_ids >= 0).sum()),
        )


class _Rows:
    """A subset of a token cache's rows, in the interface PackedLoader reads."""

    def __init__(self, cache, rows: np.ndarray) -> None:
        self.cache, self.rows = cache, rows
        self.lengths = cache.lengths[rows]

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, r: int):
        return self.cache.row(int(self.rows[r]))


class BatchSource:
    """Endless, resumable stream of training batches (epochs follow one another, reshuffled)."""

    def __init__(self, dataset, cfg: TrainConfig) -> None:
        self.loader = PackedLoader(dataset, seq_len=cfg.data.seq_len, batch_size=cfg.micro_batch, seed=cfg.seed, epochs=None)
        self._it = iter(self.loader)

    def next_batch(self) -> Batch:
        return Batch.from_packed(next(self._it))

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = iter(self.loader)


@dataclass
class TrainData:
    train: BatchSource
    eval: list[Batch]
    summary: str


def _options(cfg: TrainConfig) -> DataOptions:
    d = cfg.data
    return DataOptions(
        max_length=d.seq_len, overflow=d.overlong, train_on=d.train_on, skip_invalid=d.skip_invalid, columns=d.columns
    )


def _cache(path: str, options: DataOptions):
    try:
        return build_cache(path, options)
    except DataError as e:  # the remedies as `osstune train` and recipes spell them
        raise e.with_hint(
            skip="--skip-invalid (data.skip_invalid: true in a recipe)",
            length="raise --seq-len, or --set data.overlong=truncate or drop for rows over it",
        ) from None


def build_data(cfg: TrainConfig) -> TrainData:
    """Validate and tokenize (cached on disk), split off eval rows, and set up packing.
    Raises osstune.data.DataError listing `file:line: reason` for invalid data."""
    options = _options(cfg)
    cache = _cache(cfg.data.path, options)
    rows = np.arange(len(cache))
    eval_batches: list[Batch] = []
    summary = cache.summary.describe().splitlines()[0]
    if cfg.data.eval_path:
        eval_cache = _cache(cfg.data.eval_path, options)
        eval_rows = _Rows(eval_cache, np.arange(len(eval_cache)))
    elif cfg.data.eval_fraction:
        perm = np.random.default_rng([cfg.seed, 7]).permutation(len(cache))
        n_eval = max(1, round(cfg.data.eval_fraction * len(cache)))
        if n_eval >= len(cache):
            raise ValueError(f"data.eval_fraction={cfg.data.eval_fraction} leaves no training rows of {len(cache)}")
        eval_rows, rows = _Rows(cache, np.sort(perm[:n_eval])), np.sort(perm[n_eval:])
    else:
        eval_rows = None
    if eval_rows is not None:
        loader = PackedLoader(eval_rows, seq_len=cfg.data.seq_len, batch_size=cfg.micro_batch, shuffle=False, epochs=1)
        eval_batches = [Batch.from_packed(b) for b in loader]
        summary += f"; {len(eval_rows)} rows held out for eval"
    return TrainData(train=BatchSource(_Rows(cache, rows), cfg), eval=eval_batches, summary=summary)
