"""The reference model against transformers' GptOssForCausalLM, and its own invariants."""

import pytest
import torch

from osstune.config import ModelConfig, preset
from osstune.model import GptOss, KVCache, init_weights
from tests.hf import hf_model

# Pinned small shapes (not whatever `tiny` is today) so tolerances and run time stay fixed.
SMALL = preset("tiny").replace(hidden_size=64, intermediate_size=64, head_dim=16)
CONFIGS = {
    "tiny": SMALL.replace(vocab_size=512),
    "mha_top1": SMALL.replace(vocab_size=300, num_key_value_heads=4, num_experts_per_tok=1, sliding_window=3),
    "gqa8_e16_top4": SMALL.replace(
        vocab_size=257, num_attention_heads=8, num_key_value_heads=1, num_local_experts=16,
        num_experts_per_tok=4, head_dim=8, sliding_window=7, num_hidden_layers=3,
    ),
    "all_sliding_odd_sizes": SMALL.replace(
        vocab_size=123, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        layer_types=("sliding_attention", "sliding_attention"), sliding_window=4,
    ),
}


def assert_close_scaled(a: torch.Tensor, b: torch.Tensor, tol: float, msg: str = "") -> None:
    """max |a - b| <= tol * max |b|: float32 results of two summation orders agree to ~1e-6 of
    their scale, whatever the magnitude of individual elements."""
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * scale, f"{msg} max error {err:.3g} > {tol:g} x scale {scale:.3g}"


def _random_model(cfg: ModelConfig, seed: int) -> GptOss:
    # A larger init than training's 0.02 so that every sub-layer moves the logits visibly.
    model = init_weights(GptOss(cfg.replace(initializer_range=0.1)), seed=seed)
    # Non-zero biases and norms so that every parameter matters in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("gate_up_proj"):
                p.mul_(30.0)  # push some gate/up values past the SwiGLU clamp at +-7
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_gradients_match_transformers(name):
    cfg = CONFIGS[name]
    ours = _random_model(cfg, seed=torch.randint(0, 10_000, ()).item())
    theirs = hf_model(cfg, ours.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.sliding_window + 5))  # several windows, batch 2

    a = ours(ids)
    b = theirs(input_ids=ids).logits
    assert_close_scaled(a, b, 1e-5, "logits")

    weights = torch.randn_like(a)
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    reference = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        g = reference[n].grad
        assert p.grad is not None and g is not None, n
        assert_close_scaled(p.grad, g, 1e-4, n)


def test_packed_documents_equal_separate_sequences():
    cfg = CONFIGS["tiny"]
    model = _random_model(cfg, seed=3)
    lengths = [5, 19, 1, 11]
    docs = [torch.randint(0, cfg.vocab_size, (n,)) for n in lengths]
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(ids, position_ids=positions, doc_ids=doc_ids)[0]
    separate = torch.cat([model(d[None])[0] for d in docs])
    assert_close_scaled(packed, separate, 1e-5)


def test_kv_cache_decoding_equals_full_forward():
    cfg = CONFIGS["mha_top1"]
    model = _random_model(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    full = model(ids)
    cache = KVCache(cfg.num_hidden_layers)
    steps = [model(ids[:, :6], cache=cache)]
    for t in range(6, 17):
        steps.append(model(ids[:, t : t + 1], cache=cache))
    assert_close_scaled(torch.cat(steps, dim=1), full, 1e-5)


def test_gradient_checkpointing_changes_memory_not_results():
    cfg = CONFIGS["tiny"]
    model = _random_model(cfg, seed=7).train()
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    grads, saved = [], []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        nbytes = [0]

        def pack(t, nbytes=nbytes):
            nbytes[0] += t.numel() * t.element_size()
            return t

        # What autograd keeps for the backward pass during the forward: the activation memory.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids).logsumexp(-1).sum()
        out.backward()
        saved.append(nbytes[0])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0, msg=n)
    assert saved[1] < 0.5 * saved[0], saved


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="valid presets: gpt-oss-20b, gpt-oss-120b, tiny"):
        preset("gpt-oss-7b")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "not a multiple"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
        (dict(layer_types=("full_attention",)), "layer_types has 1 entries for 4 layers"),
        (dict(expert_format="nf4"), "expert_format='nf4'"),
    ],
)
def test_bad_config_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny").replace(**change)


def test_hf_config_round_trip_and_bad_quant_method():
    cfg = preset("gpt-oss-120b").replace(expert_format="mxfp4")
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    d = cfg.to_hf_dict()
    d["quantization_config"] = {"quant_method": "gptq"}
    with pytest.raises(ValueError, match="quant_method is 'gptq'"):
        ModelConfig.from_hf_dict(d, source="x/config.json")
