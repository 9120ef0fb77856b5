"""Packing, the resumable loader and the on-disk token cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from osstune.data import (
    IGNORE,
    DataError,
    DataOptions,
    InMemoryRows,
    PackedLoader,
    TokenCache,
    build_cache,
    plan_packs,
    tokenize_file,
)
from osstune.data.packing import pack_rows


class FakeRows:
    """Rows of random ids (0..999) with random train masks, lengths as given."""

    def __init__(self, lengths, seed=0):
        rng = np.random.default_rng(seed)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._rows = [(rng.integers(0, 1000, n).astype(np.uint32), rng.random(n) < 0.5) for n in self.lengths]

    def __len__(self):
        return len(self._rows)

    def row(self, r):
        return self._rows[r]


def expected_labels(ids, mask):
    # Written out the slow way: the target of position t is token t+1 when it is trained.
    return [int(ids[t + 1]) if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def test_pack_rows_layout():
    rows = [(np.array([5, 6, 7]), np.array([0, 1, 1], bool)), (np.array([8, 9]), np.array([0, 1], bool))]
    p = pack_rows(rows, seq_len=8, pad_id=99)
    assert p["input_ids"].tolist() == [5, 6, 7, 8, 9, 99, 99, 99]
    assert p["labels"].tolist() == [6, 7, IGNORE, 9, IGNORE, IGNORE, IGNORE, IGNORE]
    assert p["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert p["doc_ids"].tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    assert p["bounds"].tolist() == [0, 3, 5, 8]


def check_batch(batch, data, seq_len):
    """Every sequence, rebuilt document by document from doc_ids, matches the rows it came from."""
    B, T = batch.input_ids.shape
    assert T == seq_len
    seen = []
    starts = [0]
    for b in range(B):
        doc_ids = batch.doc_ids[b]
        real = doc_ids >= 0
        assert real.sum() == 0 or real[: real.sum()].all()  # padding only at the tail
        pad = ~real
        assert (batch.labels[b][pad] == IGNORE).all() and (batch.input_ids[b][pad] == 199999).all()
        for d in np.unique(doc_ids[real]):
            at = np.flatnonzero(doc_ids == d)
            ids = batch.input_ids[b][at]
            match = [r for r in range(len(data)) if np.array_equal(data.row(r)[0], ids)]
            assert match, "a packed document is not one of the rows"
            r = match[0]
            seen.append(r)
            assert batch.labels[b][at].tolist() == expected_labels(*data.row(r))
            assert batch.position_ids[b][at].tolist() == list(range(len(at)))
            starts += [b * T + at[0], b * T + at[-1] + 1]
        if pad.any():
            starts += [b * T + np.flatnonzero(pad)[0], (b + 1) * T]
    assert batch.cu_seqlens.tolist() == sorted(set(int(s) for s in starts))
    assert batch.num_targets == int((batch.labels != IGNORE).sum())
    assert batch.max_seqlen == int(np.diff(batch.cu_seqlens).max())
    return seen


def test_loader_packs_every_row_once_per_epoch():
    rng = np.random.default_rng(1)
    data = FakeRows(rng.integers(2, 60, size=300))
    loader = PackedLoader(data, seq_len=64, batch_size=3, seed=4, epochs=1)
    seen = []
    for batch in loader:
        seen += check_batch(batch, data, 64)
    assert sorted(seen) == list(range(300))
    fill = data.lengths.sum() / (loader.packs_per_epoch() * 64)
    assert fill > 0.9  # best-fit leaves little padding


def test_plan_is_deterministic_and_seeded():
    lengths = np.random.default_rng(0).integers(1, 100, size=500)
    a = plan_packs(lengths, 128, seed=1, epoch=0)
    assert [p.tolist() for p in a] == [p.tolist() for p in plan_packs(lengths, 128, seed=1, epoch=0)]
    assert [p.tolist() for p in a] != [p.tolist() for p in plan_packs(lengths, 128, seed=2, epoch=0)]
    assert [p.tolist() for p in a] != [p.tolist() for p in plan_packs(lengths, 128, seed=1, epoch=1)]
    assert all(lengths[p].sum() <= 128 for p in a)


def batches_equal(x, y):
    return all(np.array_equal(getattr(x, k), getattr(y, k)) for k in ("input_ids", "labels", "position_ids", "doc_ids"))


def test_resume_gives_the_batches_that_would_have_come():
    data = FakeRows(np.random.default_rng(2).integers(2, 30, size=40))
    reference = PackedLoader(data, seq_len=32, batch_size=2, seed=3, epochs=None)
    stream = iter(reference)
    first = [next(stream) for _ in range(7)]
    state = reference.state_dict()
    json.dumps(state)  # a trainer checkpoint can store it as JSON
    after = [next(stream) for _ in range(30)]  # crosses epoch boundaries
    assert reference.epoch >= 2
    resumed = PackedLoader(data, seq_len=32, batch_size=2, seed=3, epochs=None)
    resumed.load_state_dict(state)
    again = iter(resumed)
    assert all(batches_equal(a, next(again)) for a in after)
    assert not batches_equal(first[0], first[1])


def test_finite_epochs_end_with_a_partial_batch():
    data = FakeRows([10] * 5)  # 5 packs of 16 tokens (two 10-token rows never fit together)
    batches = list(PackedLoader(data, seq_len=16, batch_size=2, epochs=2))
    assert [b.input_ids.shape[0] for b in batches] == [2, 2, 2, 2, 2]
    batches = list(PackedLoader(data, seq_len=16, batch_size=4, epochs=1))
    assert [b.input_ids.shape[0] for b in batches] == [4, 1]


def test_unshuffled_order_is_file_order_within_equal_lengths():
    data = FakeRows([8] * 6)
    batches = list(PackedLoader(data, seq_len=8, batch_size=1, shuffle=False))
    firsts = [b.input_ids[0, 0] for b in batches]
    assert firsts == [data.row(r)[0][0] for r in range(6)]


def test_loader_errors():
    with pytest.raises(ValueError, match=r"rows are longer than seq_len=16 \(row 1 has 20 tokens\); set the data "
                                         "max_length to at most seq_len"):
        PackedLoader(FakeRows([5, 20]), seq_len=16)
    with pytest.raises(ValueError, match="no rows"):
        PackedLoader(FakeRows([]), seq_len=16)
    loader = PackedLoader(FakeRows([5, 6]), seq_len=16, seed=1)
    with pytest.raises(ValueError, match="cannot resume: the saved data position has seed=2 but this loader has 1"):
        loader.load_state_dict({**loader.state_dict(), "seed": 2})


def test_to_torch():
    torch = pytest.importorskip("torch")
    batch = next(iter(PackedLoader(FakeRows([5, 6, 7]), seq_len=16, batch_size=2)))
    t = batch.to_torch()
    assert t["input_ids"].dtype == torch.int64 and t["labels"].dtype == torch.int64
    assert t["cu_seqlens"].dtype == torch.int32 and t["input_ids"].shape == (2, 16)
    # Shifted labels: summed cross-entropy over labels equals the per-document sum done by hand.
    logits = torch.randn(2, 16, 1000)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t["labels"].flatten(), ignore_index=IGNORE,
                                             reduction="sum")
    by_hand = sum(
        -torch.log_softmax(logits[b, i], -1)[int(batch.input_ids[b, i + 1])]
        for b in range(2) for i in range(15)
        if batch.labels[b, i] != IGNORE
    )
    torch.testing.assert_close(loss, by_hand)


# ---- the on-disk cache ----

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cache_holds_the_tokenized_rows(tmp_path):
    rows_in = [GOOD, {"prompt": "2+2?", "completion": "4"}, {"question": "Việt?", "answer": "Có 😊"}]
    path = write(tmp_path / "d.jsonl", rows_in)
    cache = build_cache(path, root=tmp_path / "cache")
    rows, summary = tokenize_file(path)
    assert len(cache) == 3 and cache.summary == summary
    for r, row in enumerate(rows):
        ids, mask = cache.row(r)
        assert ids.tolist() == row.ids.tolist() and mask.astype(bool).tolist() == row.train.tolist()
    assert cache.lines.tolist() == [1, 2, 3]
    assert isinstance(cache.tokens, np.memmap)
    assert cache.lengths.tolist() == [len(r.ids) for r in rows]
    # PackedLoader reads the cache directly.
    batch = next(iter(PackedLoader(cache, seq_len=256, batch_size=1)))
    assert batch.num_targets == sum(int(r.train.sum()) for r in rows)


def test_cache_is_reused_and_keyed_by_content_and_options(tmp_path):
    path = write(tmp_path / "d.jsonl", [GOOD])
    root = tmp_path / "cache"
    a = build_cache(path, root=root)
    mtime = os.stat(a.path / "manifest.json").st_mtime_ns
    assert build_cache(path, root=root).path == a.path
    assert os.stat(a.path / "manifest.json").st_mtime_ns == mtime
    assert build_cache(path, DataOptions(train_on="all"), root=root).path != a.path
    write(path, [GOOD, GOOD])
    b = build_cache(path, root=root)
    assert b.path != a.path and len(b) == 2
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temporary leftovers
    assert TokenCache.open(a.path).source.endswith("d.jsonl")
    # The same content under another name hits the entry; its summary names the file asked for.
    copy = write(tmp_path / "copy.jsonl", [GOOD, GOOD])
    c = build_cache(copy, root=root)
    assert c.path == b.path and c.summary.path == str(copy) and b.summary.path == str(path)


def test_failed_build_leaves_nothing(tmp_path):
    path = write(tmp_path / "d.jsonl", [GOOD, {"messages": []}])
    root = tmp_path / "cache"
    with pytest.raises(DataError, match=r"d.jsonl:2: \"messages\" is empty"):
        build_cache(path, root=root)
    assert list(root.iterdir()) == []


def test_cache_with_no_usable_rows(tmp_path):
    path = write(tmp_path / "d.jsonl", ["x"])
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="no usable rows"):
        build_cache(path, DataOptions(skip_invalid=True), root=tmp_path / "cache")


def test_in_memory_rows_match_the_cache(tmp_path):
    path = write(tmp_path / "d.jsonl", [GOOD, {"prompt": "a", "completion": "b"}])
    rows, _ = tokenize_file(path)
    cache = build_cache(path, root=tmp_path / "cache")
    a = next(iter(PackedLoader(InMemoryRows(rows), seq_len=200, seed=5)))
    b = next(iter(PackedLoader(cache, seq_len=200, seed=5)))
    assert batches_equal(a, b)
