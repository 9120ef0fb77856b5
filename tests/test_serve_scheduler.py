"""The scheduler and the KV block manager without a model: a stand-in runner stores each token id in
the cache slot its key/value would take, reads back through the block tables what attention would
see, and checks it against the request's real tokens. Next tokens are a hash of the whole context,
so any scheduling mistake (a wrong chunk, a lost token, a stale or shared block, a freed block still
read) changes the outputs, which must equal a plain sequential unrolling of each request.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osstune.serve.kv_blocks import NULL_BLOCK, KVCacheManager, KVGroup
from osstune.serve.scheduler import Request, Scheduler
from osstune.serve.types import RequestError, SamplingParams

STOP = 7  # a "stop token" of the stand-in vocabulary


def next_token(context: list[int]) -> int:
    return int.from_bytes(hashlib.blake2b(repr(context).encode(), digest_size=4).digest(), "little") % 50


def unroll(prompt: list[int], max_tokens: int, max_len: int, stop: bool = True) -> tuple[list[int], str]:
    tokens, out = list(prompt), []
    while True:
        t = next_token(tokens)
        tokens.append(t)
        out.append(t)
        if stop and t == STOP:
            return out, "stop"
        if len(out) >= max_tokens or len(tokens) >= max_len:
            return out, "length"


class SlotRunner:
    """Writes token ids where keys/values would go and checks what every query would see."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.bs = kv.block_size
        self.slots = {g.name: [None] * (kv.pool.num_blocks * self.bs) for g in kv.groups}

    def execute(self, out, requests) -> dict[str, int]:
        sampled = {}
        for c in out.chunks:
            full = requests[c.request_id].token_ids
            assert c.token_ids == full[c.start : c.start + len(c.token_ids)]
            for g in self.kv.groups:
                table = c.tables[g.name]
                for i, p in enumerate(range(c.start, c.start + len(c.token_ids))):
                    b = table[p // self.bs]
                    assert b != NULL_BLOCK, "a token written into the null block"
                    self.slots[g.name][b * self.bs + p % self.bs] = c.token_ids[i]
                for q in range(c.start, c.start + len(c.token_ids)):
                    lo = 0 if g.window is None else max(0, q - g.window + 1)
                    seen = []
                    for p in range(lo, q + 1):
                        b = table[p // self.bs]
                        assert b != NULL_BLOCK, f"query {q} of {c.request_id} needs position {p}, freed"
                        seen.append(self.slots[g.name][b * self.bs + p % self.bs])
                    assert seen == full[lo : q + 1], f"{g.name} layer of {c.request_id} at {q} sees wrong keys"
            if c.sample:
                sampled[c.request_id] = next_token(full[: c.start + len(c.token_ids)])
        return sampled


def check_invariants(kv: KVCacheManager) -> None:
    pool = kv.pool
    refs = [0] * pool.num_blocks
    for state in kv.requests.values():
        for table in state.tables.values():
            for b in table:
                if b != NULL_BLOCK:
                    refs[b] += 1
    for b in range(1, pool.num_blocks):
        assert pool.blocks[b].ref_count == refs[b], f"block {b}: ref_count {pool.blocks[b].ref_count}, held {refs[b]}"
        assert (b in pool.free) == (refs[b] == 0), f"block {b} free-queue membership wrong"
    for (group, _), b in pool.cached.items():
        assert pool.blocks[b].key is not None and pool.blocks[b].key[0] == group
    # The array copy of the tables (what the runner gathers): each request's row equals its lists,
    # null past their end; no two requests share a row; rows no request holds are all null.
    owned = [state.row for state in kv.requests.values()]
    assert len(set(owned)) == len(owned)
    for name, rows in kv.rows.items():
        array = rows.array
        for rid, state in kv.requests.items():
            table = state.tables[name]
            if state.row < array.shape[0]:
                assert array[state.row, : len(table)].tolist() == table, f"{name} row of {rid} differs from its table"
                assert not array[state.row, len(table) :].any(), f"{name} row of {rid} holds blocks past its table"
            else:
                assert not table, f"{rid} has a {name} table but no row"
        assert not array[[r for r in range(array.shape[0]) if r not in owned]].any(), f"a free {name} row holds blocks"


def make(num_blocks: int, bs: int, window: int, budget: int, max_len: int = 200, caching: bool = True, seqs: int = 8):
    kv = KVCacheManager(num_blocks, bs, [KVGroup("full", None), KVGroup("sliding", window)], caching)
    return kv, Scheduler(kv, seqs, budget, max_len)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    bs=st.sampled_from([2, 4]),
    window=st.integers(2, 9),
    budget=st.integers(1, 24),
    num_blocks=st.integers(24, 60),
    caching=st.booleans(),
)
def test_any_schedule_gives_the_sequential_outputs(data, bs, window, budget, num_blocks, caching):
    kv, sched = make(num_blocks, bs, window, budget, caching=caching, seqs=data.draw(st.integers(1, 6)))
    runner = SlotRunner(kv)
    shared = data.draw(st.lists(st.integers(0, 49), min_size=0, max_size=12))
    n_req = data.draw(st.integers(1, 7))
    plan = []
    for i in range(n_req):
        own = data.draw(st.lists(st.integers(0, 49), min_size=1, max_size=20))
        prompt = (shared if data.draw(st.booleans()) else []) + own
        arrive = data.draw(st.integers(0, 12))
        abort_at = data.draw(st.one_of(st.none(), st.integers(0, 30)))
        plan.append((f"r{i}", prompt, data.draw(st.integers(1, 12)), arrive, abort_at))
    expected = {rid: unroll(p, m, 200) for rid, p, m, _, _ in plan}
    got: dict[str, list[int]] = {rid: [] for rid, *_ in plan}
    reasons: dict[str, str] = {}
    live: dict[str, Request] = {}
    step = 0
    while step < 400:
        for rid, prompt, m, arrive, abort_at in plan:
            if arrive == step:
                req = Request(rid, prompt, SamplingParams(max_tokens=m, stop_token_ids=(STOP,)), seed=0)
                try:
                    sched.add(req)
                except RequestError:  # can never fit this pool: refused, and the others go on
                    assert kv.max_blocks_needed(len(prompt) + m, budget) > num_blocks - 1
                    reasons[rid] = "refused"
                    continue
                live[rid] = req
            if abort_at is not None and abort_at == step and rid in live and rid not in reasons:
                if sched.abort(rid) is not None:
                    reasons[rid] = "abort"
        check_invariants(kv)
        if not sched.has_work and step > 12:
            break
        out = sched.schedule()
        assert out.num_tokens <= budget
        check_invariants(kv)
        sampled = runner.execute(out, {c.request_id: live[c.request_id] for c in out.chunks})
        for u in sched.update(out, sampled):
            got[u.request_id].extend(u.new_token_ids)
            if u.finished:
                reasons[u.request_id] = u.finish_reason
        check_invariants(kv)
        step += 1
    assert not sched.has_work
    assert kv.num_used == 0, "blocks leaked"
    for rid, (tokens, reason) in expected.items():
        if reasons[rid] == "refused":
            assert got[rid] == []
        elif reasons[rid] == "abort":
            assert got[rid] == tokens[: len(got[rid])]
        else:
            assert (got[rid], reasons[rid]) == (tokens, reason)


def test_sliding_group_memory_is_bounded_whatever_the_length():
    kv, sched = make(num_blocks=40, bs=4, window=8, budget=4, max_len=1000, seqs=1)
    runner = SlotRunner(kv)
    req = Request("long", list(range(30)), SamplingParams(max_tokens=100, ignore_stop=True), seed=0)
    sched.add(req)
    most = 0
    while sched.has_work:
        out = sched.schedule()
        live = [b for b in kv.tables("long")["sliding"] if b != NULL_BLOCK]
        most = max(most, len(live))
        sched.update(out, runner.execute(out, {"long": req}))
    # (window - 1 + chunk) / block_size + 1 blocks at most: 11 positions -> 3 whole blocks + 1.
    assert most <= -(-(8 - 1 + 4) // 4) + 1
    assert kv.num_used == 0


def test_prefix_cache_hit_skips_the_shared_blocks_and_gives_the_same_tokens():
    kv, sched = make(num_blocks=60, bs=4, window=6, budget=64)
    runner = SlotRunner(kv)
    system = list(range(20, 41))  # 21 tokens: 5 whole blocks
    outs = {}
    for rid, tail in (("a", [1, 2]), ("b", [3])):
        req = Request(rid, system + tail, SamplingParams(max_tokens=3, ignore_stop=True), seed=0)
        sched.add(req)
        toks = []
        while sched.has_work:
            out = sched.schedule()
            if rid == "b" and not toks:
                assert out.chunks[0].start == 20, "b should resume after the cached 5 blocks"
            for u in sched.update(out, runner.execute(out, {rid: req})):
                toks += u.new_token_ids
                outs[rid] = (toks, u.num_cached_tokens)
    assert outs["a"][1] == 0 and outs["b"][1] == 20
    assert outs["b"][0] == unroll(system + [3], 3, 999, stop=False)[0]


def test_a_request_that_can_never_fit_is_refused_and_others_go_on():
    kv, sched = make(num_blocks=8, bs=4, window=4, budget=8, max_len=500)
    with pytest.raises(RequestError) as e:
        sched.add(Request("big", list(range(40)), SamplingParams(max_tokens=10), seed=0))
    assert e.value.field == "max_tokens" and "KV blocks" in str(e.value)
    with pytest.raises(RequestError, match="exceed the context"):
        sched.add(Request("long", list(range(10)), SamplingParams(max_tokens=495), seed=0))
    sched.add(Request("ok", [1, 2, 3], SamplingParams(max_tokens=2, ignore_stop=True), seed=0))
    assert sched.has_work


def test_preemption_recomputes_and_loses_nothing():
    # Two requests whose full contexts cannot both be held: one is preempted and recomputed.
    kv, sched = make(num_blocks=17, bs=2, window=2, budget=16, max_len=100)
    runner = SlotRunner(kv)
    reqs = {r: Request(r, p, SamplingParams(max_tokens=8, ignore_stop=True), seed=0)
            for r, p in (("x", list(range(6))), ("y", list(range(10, 16))))}
    for r in reqs.values():
        sched.add(r)
    got = {"x": [], "y": []}
    while sched.has_work:
        out = sched.schedule()
        for u in sched.update(out, runner.execute(out, reqs)):
            got[u.request_id] += u.new_token_ids
        check_invariants(kv)
    assert sched.num_preempted_total > 0
    for r in reqs.values():
        assert got[r.request_id] == unroll(r.prompt_token_ids, 8, 100, stop=False)[0]
