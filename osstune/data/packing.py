"""Packing tokenized rows into fixed-length sequences for training.

Shapes: B = sequences per batch, T = seq_len tokens per sequence.

Each packed sequence holds whole rows (documents) back to back; attention must not cross a row
boundary, which `doc_ids`, `position_ids` and `cu_seqlens` tell the model. Only the tail of a
sequence can be padding. Labels are already shifted:
    labels[t] = input_ids[t + 1]  if that token is a training target of the same row, else -100
so the loss is cross_entropy(logits[t], labels[t]) with no further shift. (Do not pass them as
`labels=` to a Hugging Face model, which shifts again; `shift_labels=` is the matching argument.)
The last token of each row and all padding have label -100.

Order: a seeded permutation of the rows per epoch, packed best-fit within windows of the permuted
order (so packs are full without sorting the whole dataset by length), then the packs of each
window shuffled. The same (seed, epoch, lengths) always give the same packs, which is what makes
the loader resumable from an integer position.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from osstune.data.vocab import NAMED_SPECIAL_TOKENS

IGNORE = -100
PAD_DOC = -1
_WINDOW = 4096  # rows per best-fit window


@dataclass(frozen=True)
class PackedBatch:
    input_ids: np.ndarray  # (B, T) int64; padding is pad_id
    labels: np.ndarray  # (B, T) int64; target of position t (shifted), IGNORE (-100) where untrained
    position_ids: np.ndarray  # (B, T) int64; 0, 1, ... restarting at each row (and at the padding)
    doc_ids: np.ndarray  # (B, T) int32; 0, 1, ... per row within its sequence, PAD_DOC (-1) for padding
    cu_seqlens: np.ndarray  # (S+1,) int32; boundaries of the S segments (rows, then padding) of the
    #                         flattened B*T tokens, as flash-attention's varlen functions take them
    max_seqlen: int  # longest segment
    num_targets: int  # labels != IGNORE: divide the summed loss by this

    def to_torch(self, device=None) -> dict:
        """The arrays as torch tensors (int64, cu_seqlens int32) on `device`, plus the two ints."""
        import torch

        out = {
            name: torch.from_numpy(getattr(self, name)).to(device)
            for name in ("input_ids", "labels", "position_ids", "doc_ids", "cu_seqlens")
        }
        out["max_seqlen"] = self.max_seqlen
        out["num_targets"] = self.num_targets
        return out


def plan_packs(lengths: np.ndarray, seq_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[np.ndarray]:
    """Row indices of each packed sequence of one epoch. lengths: (R,) tokens per row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    too_long = np.flatnonzero(lengths > seq_len)
    if len(too_long):
        raise ValueError(
            f"{len(too_long)} rows are longer than seq_len={seq_len} (row {int(too_long[0])} has "
            f"{int(lengths[too_long[0]])} tokens); set the data max_length to at most seq_len"
        )
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    packs: list[np.ndarray] = []
    for begin in range(0, len(order), _WINDOW):
        window = _best_fit(order[begin : begin + _WINDOW], lengths, seq_len)
        if shuffle:
            window = [window[i] for i in rng.permutation(len(window))]
        packs += window
    return packs


def _best_fit(rows: np.ndarray, lengths: np.ndarray, seq_len: int) -> list[np.ndarray]:
    # Longest first, each row into the fullest sequence it still fits in (best-fit decreasing).
    by_length = rows[np.argsort(-lengths[rows], kind="stable")]
    free: list[tuple[int, int]] = []  # (free tokens, pack index), sorted
    packs: list[list[int]] = []
    for row in by_length.tolist():
        need = int(lengths[row])
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            packs.append([row])
            bisect.insort(free, (seq_len - need, len(packs) - 1))
        else:
            room, pack = free.pop(at)
            packs[pack].append(row)
            bisect.insort(free, (room - need, pack))
    return [np.asarray(p, dtype=np.int64) for p in packs]


def pack_rows(rows: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One packed sequence from (ids (L,), mask (L,)) rows: the five (T,) arrays of a PackedBatch row."""
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    position_ids = np.zeros(seq_len, dtype=np.int64)
    doc_ids = np.full(seq_len, PAD_DOC, dtype=np.int32)
    bounds = [0]
    at = 0
    for doc, (ids, mask) in enumerate(rows):
        n = len(ids)
        ids = np.asarray(ids, dtype=np.int64)
        input_ids[at : at + n] = ids
        labels[at : at + n - 1] = np.where(np.asarray(mask[1:], dtype=bool), ids[1:], IGNORE)
        position_ids[at : at + n] = np.arange(n)
        doc_ids[at : at + n] = doc
        at += n
        bounds.append(at)
    if at < seq_len:
        position_ids[at:] = np.arange(seq_len - at)
        bounds.append(seq_len)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "doc_ids": doc_ids,
        "bounds": np.asarray(bounds, dtype=np.int32),
    }


class PackedLoader:
    """Batches of packed sequences over a tokenized dataset, resumable.

    `dataset` needs `lengths` ((R,) tokens per row) and `row(r) -> (ids, mask)`: a TokenCache, or
    `InMemoryRows`. The position is (epoch, pack): `state_dict()` after a batch, `load_state_dict()`
    before iterating again, and the next batch is the one that would have come. `epochs=None` runs
    forever; the last batch of the last epoch may have fewer than `batch_size` sequences.
    """

    def __init__(self, dataset, seq_len: int, batch_size: int = 1, seed: int = 0, shuffle: bool = True,
                 epochs: int | None = 1, pad_id: int = NAMED_SPECIAL_TOKENS["<|endoftext|>"]):
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be at least 2 and 1")
        if len(dataset.lengths) == 0:
            raise ValueError("the dataset has no rows to pack")
        self.dataset = dataset
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.shuffle, self.epochs, self.pad_id = shuffle, epochs, pad_id
        self._lengths = np.asarray(dataset.lengths)
        self._plan_epoch, self._plan = -1, []
        self.epoch, self.pack = 0, 0
        self._packs_of(0)  # checks the lengths now rather than at the first batch

    def packs_per_epoch(self) -> int:
        return len(self._packs_of(self.epoch))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pack": self.pack, "seed": self.seed, "seq_len": self.seq_len,
                "rows": len(self._lengths), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "rows", "shuffle"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume: the saved data position has {key}={state.get(key)!r} but this loader has "
                    f"{mine[key]!r}; resume with the same dataset and data options"
                )
        self.epoch, self.pack = int(state["epoch"]), int(state["pack"])

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            chosen: list[np.ndarray] = []
            while len(chosen) < self.batch_size and (self.epochs is None or self.epoch < self.epochs):
                plan = self._packs_of(self.epoch)
                if self.pack >= len(plan):
                    self.epoch, self.pack = self.epoch + 1, 0
                    continue
                chosen.append(plan[self.pack])
                self.pack += 1
            if not chosen:
                return
            yield self._batch(chosen)

    def _packs_of(self, epoch: int) -> list[np.ndarray]:
        if epoch != self._plan_epoch:
            self._plan = plan_packs(self._lengths, self.seq_len, self.seed, epoch, self.shuffle)
            self._plan_epoch = epoch
        return self._plan

    def _batch(self, packs: list[np.ndarray]) -> PackedBatch:
        seqs = [pack_rows([self.dataset.row(int(r)) for r in pack], self.seq_len, self.pad_id) for pack in packs]
        stacked = {k: np.stack([s[k] for s in seqs]) for k in ("input_ids", "labels", "position_ids", "doc_ids")}
        # Segment boundaries over the flattened (B*T,) tokens.
        bounds = np.concatenate([s["bounds"][1:] + i * self.seq_len for i, s in enumerate(seqs)])
        cu_seqlens = np.concatenate([[0], bounds]).astype(np.int32)
        return PackedBatch(
            **stacked,
            cu_seqlens=cu_seqlens,
            max_seqlen=int(np.diff(cu_seqlens).max()),
            num_targets=int((stacked["labels"] != IGNORE).sum()),
        )


class InMemoryRows:
    """TokenizedRow list -> the `lengths` / `row(r)` interface PackedLoader reads (small datasets, tests)."""

    def __init__(self, rows):
        self._rows = [(r.ids, r.train) for r in rows]
        self.lengths = np.asarray([len(ids) for ids, _ in self._rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        return self._rows[r]
