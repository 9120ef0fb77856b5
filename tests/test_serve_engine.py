"""The serving engine on the tiny model (CPU, reference path) against `osstune.infer.generate`, which
is itself tested against transformers: greedy tokens must be equal for every request of a mixed,
chunked, preempted, prefix-shared batch, and per-request adapters must equal the merged adapter."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from osstune.config import preset
from osstune.infer.generate import filter_logits, generate
from osstune.lora import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter
from osstune.model import GptOss, init_weights
from osstune.serve.async_engine import AsyncEngine
from osstune.serve.config import EngineConfig
from osstune.serve.engine import LLM, LLMEngine
from osstune.serve.sampling import SamplingBatch, sample, uniforms, unit_interval
from osstune.serve.scheduler import ScheduledChunk
from osstune.serve.types import RequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_stop=True)


@pytest.fixture(scope="module")
def model() -> GptOss:
    return init_weights(GptOss(preset("tiny")), seed=3).eval()


def reference(model: GptOss, prompt: list[int], n: int) -> list[int]:
    return generate(model, prompt, max_new_tokens=n, stop_tokens=()).tokens[0]


def prompts_of(lengths, seed=0, vocab=201088):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams, str | None]]], aborts=None):
    """Steps the engine; arrivals[step] are added before that step; aborts[step] names ids to abort."""
    got, reasons, step = {}, {}, 0
    while step in arrivals or engine.has_unfinished or any(s > step for s in arrivals):
        for rid, prompt, params, adapter in arrivals.get(step, []):
            engine.add_request(prompt, params, request_id=rid, adapter=adapter)
            got[rid] = []
        for rid in (aborts or {}).get(step, []):
            out = engine.abort(rid)
            if out is not None:
                got[rid] += out.new_token_ids
                reasons[rid] = out.finish_reason
        for u in engine.step():
            got[u.request_id] += u.new_token_ids
            if u.finished:
                reasons[u.request_id] = u.finish_reason
        step += 1
    return got, reasons


def test_mixed_batch_equals_generate(model):
    # Block 8, window 16 (tiny), budget 12: prompts shorter and longer than a block and the window,
    # chunked prefill beside decodes, requests arriving mid-run, a shared 24-token prefix, an abort.
    eng = LLMEngine(model, EngineConfig(block_size=8, num_kv_blocks=48, max_num_batched_tokens=12), log=lambda s: None)
    p = prompts_of((3, 21, 40, 9, 13))
    shared = p[2][:24]
    arrivals = {
        0: [("a", p[0], GREEDY, None), ("b", p[1], GREEDY, None), ("c", p[2], GREEDY, None)],
        3: [("d", p[3], GREEDY, None)],
        9: [("e", shared + p[4], GREEDY, None), ("f", p[3] + p[4], GREEDY, None)],
    }
    got, reasons = run(eng, arrivals, aborts={5: ["d"]})
    assert reasons["d"] == "abort"
    for rid, prompt in (("a", p[0]), ("b", p[1]), ("c", p[2]), ("e", shared + p[4]), ("f", p[3] + p[4])):
        assert got[rid] == reference(model, prompt, 6), rid
        assert reasons[rid] == "length"
    assert eng.stats().prefix_cache_hit_tokens_total >= 24  # e reused c's first three blocks
    assert eng.stats().kv_blocks_used == 0


def test_preemption_and_resume_equal_generate(model):
    # 8 usable blocks of 8 tokens: each request fits alone, the three together do not: some are preempted.
    eng = LLMEngine(model, EngineConfig(block_size=8, num_kv_blocks=9, max_num_batched_tokens=16), log=lambda s: None)
    p = prompts_of((10, 7, 12), seed=1)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_stop=True)
    got, reasons = run(eng, {0: [(f"r{i}", q, params, None) for i, q in enumerate(p)]})
    assert eng.stats().num_preempted_total > 0
    for i, q in enumerate(p):
        assert got[f"r{i}"] == reference(model, q, 8)
    assert eng.stats().kv_blocks_used == 0


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    """Two trained-looking adapters (random non-zero B): attention only, and attention + experts."""
    dirs = {}
    for name, targets, seed in (("att", "attention", 1), ("all", "all", 2)):
        m = apply_lora(copy.deepcopy(model), LoraConfig(r=4, alpha=8, targets=targets), seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, prm in m.named_parameters():
                if "lora_B" in n:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
        d = tmp_path_factory.mktemp(name)
        save_adapter(m, d, base_model="tiny")
        dirs[name] = d
    return dirs


def test_adapters_per_request_equal_the_merged_adapter(model, adapters):
    eng = LLMEngine(copy.deepcopy(model), EngineConfig(block_size=8, num_kv_blocks=64), adapters=adapters, log=lambda s: None)
    p = prompts_of((11, 5, 19, 8), seed=2)
    names = [None, "att", "all", "att"]
    got, _ = run(eng, {0: [(f"r{i}", q, GREEDY, a) for i, (q, a) in enumerate(zip(p, names))]})
    merged = {name: merge_lora(load_adapter(copy.deepcopy(model), d)).eval() for name, d in adapters.items()}
    for i, (q, a) in enumerate(zip(p, names)):
        ref_model = model if a is None else merged[a]
        assert got[f"r{i}"] == reference(ref_model, q, 6), (i, a)
    # The adapters differ from the base (otherwise the test above proves nothing).
    assert reference(merged["all"], p[2], 6) != reference(model, p[2], 6)


def test_bad_requests_fail_alone(model, adapters, tmp_path):
    eng = LLMEngine(copy.deepcopy(model), EngineConfig(block_size=8, num_kv_blocks=20, max_model_len=100),
                    adapters={"att": adapters["att"]}, log=lambda s: None)
    ok = eng.add_request([1, 2, 3], GREEDY)
    cases = [
        (([], GREEDY), "prompt", "empty"),
        (([5, 201088], GREEDY), "prompt", "vocabulary"),
        (([-1], GREEDY), "prompt", "vocabulary"),
        ((list(range(100)), GREEDY), "prompt", "context"),
        (([1] * 60, SamplingParams(max_tokens=50)), "max_tokens", "exceed the context"),
        (([1] * 90, SamplingParams(max_tokens=9)), "max_tokens", "KV blocks"),
    ]
    for (prompt, params), field, words in cases:
        with pytest.raises(RequestError, match=words) as e:
            eng.add_request(prompt, params)
        assert e.value.field == field
    with pytest.raises(RequestError, match="unknown adapter") as e:
        eng.add_request([1, 2], GREEDY, adapter="nope")
    assert e.value.field == "model"
    with pytest.raises(RequestError):
        SamplingParams(temperature=-1)
    # An adapter made for another model shape is refused when the engine starts, naming the tensor.
    other = init_weights(GptOss(preset("tiny").replace(hidden_size=64, intermediate_size=64)), seed=0)
    save_adapter(apply_lora(other, LoraConfig(r=4), seed=0), tmp_path / "other", base_model="tiny")
    with pytest.raises(ValueError, match="shape"):
        LLMEngine(copy.deepcopy(model), EngineConfig(num_kv_blocks=8), adapters={"x": tmp_path / "other"}, log=lambda s: None)
    outs = []
    while eng.has_unfinished:
        outs += eng.step()
    assert outs[-1].request_id == ok and outs[-1].finished and outs[-1].num_output_tokens == 6


def test_llm_generate_returns_results_in_input_order(model):
    llm = LLM(model, config=EngineConfig(block_size=8, num_kv_blocks=64), log=lambda s: None)
    p = prompts_of((9, 3, 14), seed=4)
    res = llm.generate(p, SamplingParams(max_tokens=4, temperature=0.0, ignore_stop=True))
    assert [r.token_ids for r in res] == [reference(model, q, 4) for q in p]


# ---- sampling ----


def _chunks(params_list, num_output=0):
    return [ScheduledChunk(f"r{i}", [0], 0, {}, True, p, p.seed, num_output, None) for i, p in enumerate(params_list)]


def test_seeded_sampling_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    ps = [SamplingParams(temperature=0.8, seed=11), SamplingParams(temperature=0.0, seed=0),
          SamplingParams(temperature=1.2, top_k=20, seed=5), SamplingParams(temperature=1.0, top_p=0.7, seed=9)]
    together = sample(logits, SamplingBatch.build(_chunks(ps), "cpu"))
    alone = [sample(logits[i : i + 1], SamplingBatch.build(_chunks([p]), "cpu"))[0] for i, p in enumerate(ps)]
    assert together.tolist() == [int(t) for t in alone]
    assert together[1] == logits[1].argmax()


def test_sampling_follows_the_filtered_softmax():
    torch.manual_seed(1)
    v, n = 12, 40000
    row = torch.randn(v) * 1.5
    for kw in ({}, {"top_k": 4}, {"top_p": 0.6}, {"top_k": 6, "top_p": 0.8}):
        params = [SamplingParams(temperature=0.9, seed=s, **kw) for s in range(n)]
        tokens = sample(row.expand(n, v).clone(), SamplingBatch.build(_chunks(params), "cpu"))
        freq = torch.bincount(tokens, minlength=v).float() / n
        # The independent reference: generate's filter (HF's warper order), then the softmax.
        ref = filter_logits((row / 0.9)[None], top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0)).softmax(-1)[0]
        assert (freq - ref).abs().sum() / 2 < 0.02, kw  # total variation; ~0.006 expected at n=40k
        assert (freq[ref == 0] == 0).all()


def test_uniforms_are_uniform_and_seed_dependent():
    u = uniforms(torch.tensor([1, 2]), torch.tensor([0, 0]), 100000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and (u[0] != u[1]).float().mean() > 0.99


def test_every_hash_maps_strictly_inside_the_unit_interval():
    """The extremes of the 32-bit range included: a uniform of 0 or 1 is an infinite Gumbel."""
    ends = torch.cat([torch.arange(0, 1 << 12), torch.arange((1 << 32) - (1 << 12), 1 << 32)])
    u = unit_interval(ends)
    gumbel = -torch.log(-torch.log(u))
    assert (u > 0).all() and (u < 1).all() and torch.isfinite(gumbel).all()


def test_a_token_far_ahead_is_always_sampled_at_a_real_vocabulary():
    """A logit 60 above every other at T=1: another token has probability < 201088 e^-60 ~ 2e-21.
    Many rows at gpt-oss's vocabulary, so a rare flaw in the noise (one draw in 2**24) would show."""
    v, n = 201088, 256
    logits = torch.zeros(n, v)
    best = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    logits[torch.arange(n), best] = 60.0
    for step in range(4):
        params = [SamplingParams(temperature=1.0, seed=1000 * step + s) for s in range(n)]
        batch = SamplingBatch.build(_chunks(params, num_output=step), "cpu")
        assert torch.equal(sample(logits, batch), best)


# ---- the asyncio engine ----


def test_async_streams_and_cancellation_free_the_cache(model):
    eng = AsyncEngine(LLMEngine(model, EngineConfig(block_size=8, num_kv_blocks=64), log=lambda s: None))
    eng.start()
    p = prompts_of((6, 9, 4, 12), seed=5)

    async def collect(prompt):
        toks = []
        async for out in eng.add_request(prompt, GREEDY):
            toks += out.new_token_ids
        return toks, out.finish_reason

    async def cancelled(prompt):
        async for out in eng.add_request(prompt, SamplingParams(max_tokens=200, temperature=0.0, ignore_stop=True)):
            if out.num_output_tokens >= 2:
                break  # the client goes away

    async def main():
        results = await asyncio.gather(*(collect(q) for q in p[:3]), cancelled(p[3]))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if eng.stats().kv_blocks_used == 0 and eng.stats().num_running == 0:
                break
        return results

    try:
        results = asyncio.run(main())
    finally:
        eng.shutdown()
    for (toks, reason), q in zip(results[:3], p):
        assert toks == reference(model, q, 6) and reason == "length"
    assert eng.stats().kv_blocks_used == 0


def test_kernel_path_equals_generate_under_the_interpreter(model):
    """The GPU path (paged attention, moe_decode, fused norm and rotary kernels), run by Triton's CPU
    interpreter in float32: same greedy tokens as the reference generate."""
    from osstune.kernels._backend import triton_interpreter_problem, triton_interpreting

    if not triton_interpreting() or triton_interpreter_problem() is not None:
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest on CPU machines)")
    eng = LLMEngine(model, EngineConfig(block_size=16, num_kv_blocks=16, max_num_batched_tokens=24, kernels="kernels"),
                    log=lambda s: None)
    assert eng.backend.kernels
    p = prompts_of((19, 4), seed=6)
    got, _ = run(eng, {0: [(f"r{i}", q, SamplingParams(max_tokens=3, temperature=0.0, ignore_stop=True), None)
                           for i, q in enumerate(p)]})
    for i, q in enumerate(p):
        assert got[f"r{i}"] == reference(model, q, 3)


def test_a_reader_whose_event_loop_closed_does_not_stop_the_engine(model):
    eng = AsyncEngine(LLMEngine(model, EngineConfig(block_size=8, num_kv_blocks=64), log=lambda s: None))
    eng.start()
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_stop=True)

    async def leave():  # adds a request and returns: its loop closes with the request still running
        eng.add_request([1, 2, 3], params)

    asyncio.run(leave())

    async def after():
        toks = []
        async for out in eng.add_request([4, 5, 6], GREEDY):
            toks += out.new_token_ids
        return toks

    try:
        assert len(asyncio.run(asyncio.wait_for(after(), 120))) == 6  # a dead engine thread would hang here
        for _ in range(100):
            if eng.stats().kv_blocks_used == 0 and eng.stats().num_running == 0:
                break
            import time

            time.sleep(0.05)
        assert eng.stats().kv_blocks_used == 0 and eng.error is None
    finally:
        eng.shutdown()
