"""Generation with the KV cache against transformers' GptOssForCausalLM.generate and plain references."""

from __future__ import annotations

import copy

import pytest
import torch

from osstune.config import preset
from osstune.infer.generate import GenerationError, SamplingOptions, filter_logits, generate, sample_next
from osstune.model import GptOss, init_weights

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper  # noqa: E402

VOCAB = 512  # small vocabulary keeps the lm_head cheap; the tiny preset's window is 16 tokens


@pytest.fixture(scope="module")
def models():
    cfg = preset("tiny").replace(vocab_size=VOCAB)
    ours = init_weights(GptOss(cfg), seed=3).float().eval()
    hf_cfg = transformers.GptOssConfig(
        **{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "pad_token_id", "eos_token_id")}
    )
    hf_cfg._attn_implementation = "eager"
    theirs = transformers.GptOssForCausalLM(hf_cfg).float().eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _hf_generate(hf, prompt: torch.Tensor, new: int, eos: int | None = None) -> list[list[int]]:
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[:, prompt.shape[1] :].tolist()


# (batch, prompt length, new tokens): both cross the 16-token sliding window, one during prefill.
SHAPES = [(1, 5, 40), (3, 7, 30), (2, 23, 12)]


@pytest.mark.parametrize("b,t,n", SHAPES)
def test_greedy_matches_transformers(models, b, t, n):
    ours, hf = models
    prompt = torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(b * 100 + t))
    result = generate(ours, prompt, max_new_tokens=n, stop_tokens=())
    assert result.tokens == _hf_generate(hf, prompt, n)
    assert result.stop_reasons == ["length"] * b


@pytest.mark.parametrize("b,t,n", SHAPES)
def test_cached_logits_equal_full_forward(models, b, t, n):
    ours, _ = models
    prompt = torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(7 + t))
    # Sampling makes the continuation differ from greedy paths the other test covers.
    result = generate(ours, prompt, max_new_tokens=n, temperature=1.0, seed=t, stop_tokens=(), return_logits=True)
    full = torch.cat((prompt, torch.tensor(result.tokens)), dim=1)  # (B, T + N)
    with torch.no_grad():
        expected = ours(full)[:, t - 1 : -1]  # the logits that predicted each new token
    # float32; one query against the cache reduces in another order than the whole sequence does,
    # so errors of a few ulps of the largest logit (~1e-6 relative) are expected, not more.
    scale = expected.abs().max().item()
    torch.testing.assert_close(result.logits, expected, atol=5e-6 * scale, rtol=1e-5)


def test_stop_token_per_row_matches_transformers(models):
    ours, hf = models
    prompt = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(11))
    free = _hf_generate(hf, prompt, 20)
    stop = free[0][4]  # a token row 0 reaches at step 5; other rows may stop elsewhere or run on
    expected = _hf_generate(hf, prompt, 20, eos=stop)
    result = generate(ours, prompt, max_new_tokens=20, stop_tokens=(stop,))
    for row, tokens in enumerate(result.tokens):
        if stop in free[row]:
            cut = free[row].index(stop) + 1
            assert result.stop_reasons[row] == "stop"
            assert tokens == expected[row][:cut]
        else:
            assert result.stop_reasons[row] == "length"
            assert tokens == expected[row]
    assert result.stop_reasons[0] == "stop"


def test_streamer_sees_every_token_in_order(models):
    ours, _ = models
    seen: list[tuple[int, int]] = []
    record = lambda row, token: seen.append((row, token))  # noqa: E731
    result = generate(ours, [[1, 2, 3], [4, 5, 6]], max_new_tokens=6, stop_tokens=(), streamer=record)
    for row in (0, 1):
        assert [k for r, k in seen if r == row] == result.tokens[row]


def test_seeded_sampling_is_reproducible(models):
    ours, _ = models
    prompt = [5, 6, 7, 8]
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.95, stop_tokens=())
    a = generate(ours, prompt, seed=1, **kw).tokens
    assert generate(ours, prompt, seed=1, **kw).tokens == a
    # 20 draws from a near-uniform 512-way distribution: equal only by a ~1e-50 chance.
    assert generate(ours, prompt, seed=2, **kw).tokens != a


def test_top_k_one_is_greedy(models):
    ours, _ = models
    prompt = [9, 8, 7]
    sampled = generate(ours, prompt, max_new_tokens=10, temperature=0.8, top_k=1, seed=0, stop_tokens=())
    assert sampled.tokens == generate(ours, prompt, max_new_tokens=10, stop_tokens=()).tokens


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (0, 0.9), (5, 1.0), (40, 0.8), (1, 0.3), (0, 1e-6)])
def test_filter_logits_matches_transformers_warpers(seed, top_k, top_p):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 97, generator=gen) * (1 + seed)
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_logits(logits, top_k=top_k, top_p=top_p)
    assert torch.equal(got.isinf(), expected.isinf())
    assert torch.equal(got[~got.isinf()], logits[~got.isinf()])


def test_sampling_follows_the_filtered_distribution():
    # One fixed row of logits drawn 40000 times: the frequencies must match softmax(filtered / T).
    logits = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.2, -0.5, -1.0, -3.0])
    temperature, top_k, top_p = 0.7, 6, 0.9
    scaled = logits / temperature
    expected = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, scaled[None])).softmax(-1)[0]
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(n, -1), temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    freq = torch.bincount(draws, minlength=len(logits)).float() / n
    assert (freq[expected == 0] == 0).all()
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-9).all(), (freq, expected)


def test_unequal_rows_are_refused(models):
    ours, _ = models
    with pytest.raises(GenerationError, match="left-padding"):
        generate(ours, [[1, 2, 3], [4, 5]], max_new_tokens=2)


def test_out_of_vocabulary_prompt_is_refused(models):
    ours, _ = models
    with pytest.raises(GenerationError, match=r"200006 is outside the model's vocabulary \[0, 512\)"):
        generate(ours, [1, 200006], max_new_tokens=2)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ],
)
def test_bad_sampling_options_are_refused(kw, match):
    with pytest.raises(GenerationError, match=match):
        SamplingOptions(**kw)


def test_generation_past_the_context_is_capped_with_a_warning(models):
    ours, _ = models
    small = GptOss(ours.config.replace(max_position_embeddings=12))
    small.load_state_dict(ours.state_dict())
    with pytest.warns(UserWarning, match="generating at most 2"):
        result = generate(small, list(range(10)), max_new_tokens=5, stop_tokens=())
    assert len(result.tokens[0]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_greedy_matches_transformers_and_bf16_runs(models):
    ours_cpu, hf_cpu = models
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, hf = GptOss(ours_cpu.config).cuda(), copy.deepcopy(hf_cpu).to("cuda")
    ours.load_state_dict(ours_cpu.state_dict())
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    result = generate(ours, prompt, max_new_tokens=30, stop_tokens=(), return_logits=True)
    assert result.tokens == _hf_generate(hf, prompt, 30)
    full = torch.cat((prompt, torch.tensor(result.tokens, device="cuda")), dim=1)
    with torch.no_grad():
        expected = ours(full)[:, 8:-1]
        torch.testing.assert_close(result.logits, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)
    # bf16 sampling runs from a separate copy; the float32 model above is left as it was.
    sampled = generate(copy.deepcopy(ours).bfloat16(), prompt, max_new_tokens=30, temperature=1.0, seed=0, stop_tokens=())
    assert all(len(row) == 30 and all(0 <= t < VOCAB for t in row) for row in sampled.tokens)
    assert next(ours.parameters()).dtype == torch.float32


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_model_is_as_close_to_float32_as_transformers_bf16(models, device):
    """The model in bf16 against transformers' in bf16: each one's logits against the float32 truth.
    The two round in different places, so they are not bitwise equal; ours must be no further from
    the truth than transformers' (within 1.5x)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ours_cpu, hf_cpu = models
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5)).to(device)  # past the window
    with torch.no_grad():
        truth = copy.deepcopy(ours_cpu).to(device)(ids).double()
        ours16 = copy.deepcopy(ours_cpu).to(device, torch.bfloat16)(ids)
        hf16 = copy.deepcopy(hf_cpu).to(device, torch.bfloat16)(ids).logits
    assert ours16.dtype == hf16.dtype == torch.bfloat16

    def err(x):
        return ((x.double() - truth).norm() / truth.norm()).item()

    # Random weights amplify rounding through the layers: both land near 0.2 here on the CPU, where an
    # error in the model (a wrong mask, a float32-only path) puts ours near 1.
    assert err(hf16) < 0.5, err(hf16)
    assert err(ours16) <= 1.5 * err(hf16) + 1e-3, (err(ours16), err(hf16))
