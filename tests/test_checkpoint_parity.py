"""Parity with transformers' GptOssForCausalLM, the executable reference for the format.

Checkpoints we write load in transformers with the same logits as in osstune, and checkpoints
transformers writes load in osstune with the same logits; our MXFP4 decoding equals transformers'
`convert_moe_packed_tensors`. All in float32, where both models compute the same sums.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

from osstune.checkpoint import load_model, save_model  # noqa: E402
from osstune.checkpoint.convert import unpack_experts  # noqa: E402
from osstune.create import create_checkpoint  # noqa: E402
from tests.shapes import CFG as SMALL  # noqa: E402

# A larger init than 0.02 so that routing, the SwiGLU clamp and the sinks all matter to the logits.
CFG = SMALL.replace(num_hidden_layers=3, initializer_range=0.2)
# Longer than the sliding window (16) so both attention kinds differ.
IDS = torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
# float32 on both sides; what remains is summation order: observed max |diff| ~2e-5 on logits of
# std 1.6 and max ~7. A layout bug (the control below) moves them by ~8.
TOL = dict(rtol=1e-4, atol=1e-4)


def hf_logits(path, mxfp4: bool) -> torch.Tensor:
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if mxfp4 else {}  # CPU has no MXFP4 kernel
    model = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(IDS).logits


def our_logits(path_or_model) -> torch.Tensor:
    model = load_model(path_or_model, dtype=torch.float32) if not isinstance(path_or_model, torch.nn.Module) else path_or_model
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("writer", ["save_model", "create"])
@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
def test_transformers_loads_our_checkpoints(tmp_path, writer, fmt):
    out = tmp_path / "ckpt"
    if writer == "create":
        create_checkpoint(CFG, out, mxfp4=fmt == "mxfp4", seed=5, max_shard_size="200KB", write_tokenizer=False)
    else:
        save_model(load_model(CFG, seed=5), out, format=fmt, write_tokenizer=False)
    theirs, ours = hf_logits(out, fmt == "mxfp4"), our_logits(out)
    assert ours.abs().max() > 1.0  # logits large enough that the tolerance is meaningful
    torch.testing.assert_close(ours, theirs, **TOL)


def test_parity_check_can_fail(tmp_path):
    """Control: a checkpoint that differs only by gate/up column order (a classic layout bug) fails."""
    save_model(load_model(CFG, seed=5), tmp_path / "a", write_tokenizer=False)
    model = load_model(tmp_path / "a", dtype=torch.float32)
    w = model.model.layers[1].mlp.experts.gate_up_proj
    with torch.no_grad():
        w.copy_(torch.cat((w[..., 1::2], w[..., 0::2]), dim=-1))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(our_logits(model), hf_logits(tmp_path / "a", False), **TOL)


@pytest.mark.parametrize("dtype,shard", [(torch.float32, "5GB"), (torch.bfloat16, "100KB")])
def test_we_load_transformers_checkpoints(tmp_path, dtype, shard):
    # Spelled in transformers' own terms (its defaults for everything else), not derived from our
    # config mapping: the point is reading a config.json we did not write.
    hf_cfg = GptOssConfig(
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=64,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    GptOssForCausalLM(hf_cfg).to(dtype).save_pretrained(tmp_path / "hf", max_shard_size=shard)
    # The reference is loaded afresh: `.to(bfloat16)` above also rounded its rotary buffer.
    hf = GptOssForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(tmp_path / "hf")
    for name, t in hf.state_dict().items():
        assert ours.state_dict()[name].dtype == dtype and torch.equal(ours.state_dict()[name], t), name
    torch.testing.assert_close(our_logits(tmp_path / "hf"), hf_logits(tmp_path / "hf", False), **TOL)


def test_unpack_equals_transformers_decoding():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 96, 4, 16), dtype=torch.uint8, generator=g)  # (E, out, in/32, 16)
    scales = torch.randint(110, 140, (3, 96, 4), dtype=torch.uint8, generator=g)
    theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)  # (E, in, out)
    ours = unpack_experts(blocks, scales, torch.float32)
    assert ours.shape == theirs.shape == (3, 128, 96)
    assert torch.equal(ours, theirs)
