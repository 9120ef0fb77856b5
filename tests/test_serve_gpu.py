"""The serving engine's kernel path on a GPU: paged attention, moe_decode, fused norm/rotary and CUDA-
graphed decode steps against the reference model."""

from __future__ import annotations

import copy

import pytest
import torch

from osstune.config import preset
from osstune.infer.generate import generate
from osstune.lora import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter
from osstune.model import GptOss, init_weights
from osstune.serve.config import EngineConfig
from osstune.serve.engine import LLMEngine
from osstune.serve.types import SamplingParams

pytestmark = pytest.mark.gpu


def _prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200000, (n,), generator=g).tolist() for n in lengths]


def _run(eng, prompts, n, adapters=None):
    ids = [eng.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_stop=True),
                           adapter=(adapters or [None] * len(prompts))[i]) for i, p in enumerate(prompts)]
    got = {i: [] for i in ids}
    while eng.has_unfinished:
        for u in eng.step():
            got[u.request_id] += u.new_token_ids
    return [got[i] for i in ids]


def test_float32_tiny_kernel_path_with_graphs_equals_generate():
    model = init_weights(GptOss(preset("tiny")), seed=5).cuda().eval()
    eng = LLMEngine(model, EngineConfig(block_size=16, num_kv_blocks=64, max_num_batched_tokens=32, cuda_graph_max_batch=8),
                    log=lambda s: None)
    assert eng.backend.kernels and eng.backend.graphs is not None
    prompts = _prompts((3, 40, 17, 70, 5), seed=0)
    got = _run(eng, prompts, 12)
    for p, g in zip(prompts, got):
        assert g == generate(model, p, max_new_tokens=12, stop_tokens=()).tokens[0]


def test_adapters_per_request_on_the_kernel_path(tmp_path):
    model = init_weights(GptOss(preset("tiny")), seed=5).eval()
    lora = apply_lora(copy.deepcopy(model), LoraConfig(r=4, alpha=8, targets="all"), seed=1)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_adapter(lora, tmp_path / "a", base_model="tiny")
    eng = LLMEngine(copy.deepcopy(model).cuda(), EngineConfig(block_size=16, num_kv_blocks=64), adapters={"a": tmp_path / "a"},
                    log=lambda s: None)
    prompts = _prompts((9, 30, 4), seed=1)
    got = _run(eng, prompts, 8, adapters=["a", None, "a"])
    merged = merge_lora(load_adapter(copy.deepcopy(model), tmp_path / "a")).cuda().eval()
    for p, g, a in zip(prompts, got, ["a", None, "a"]):
        ref = merged if a else model.cuda()
        assert g == generate(ref, p, max_new_tokens=8, stop_tokens=()).tokens[0]


@torch.inference_mode()
def test_bf16_real_shapes_logits_match_the_reference_model():
    """Four layers at gpt-oss-20b's shapes, MXFP4 experts, bf16: the engine's prefill and graphed
    decode logits against the reference model's full forward over the same tokens."""
    from osstune.checkpoint.random_init import random_model_on

    cfg = preset("gpt-oss-20b").replace(num_hidden_layers=4, expert_format="mxfp4")
    model = random_model_on(cfg, "cuda")
    model.eval()
    eng = LLMEngine(model, EngineConfig(num_kv_blocks=512, cuda_graph_max_batch=4), log=lambda s: None)
    prompt = _prompts((300,), seed=2)[0]
    got = _run(eng, [prompt], 6)[0]
    full = torch.tensor([prompt + got[:-1]], device="cuda")
    ref_logits = model(full)[0, len(prompt) - 1 :].float()  # (6, V): each generated token's logits
    ref_tokens = ref_logits.argmax(-1).tolist()
    # bf16 through 4 layers in two orders of summation: near-ties may flip; most tokens must agree and
    # the engine's choice must be (near) the reference's best.
    agree = sum(a == b for a, b in zip(got, ref_tokens))
    assert agree >= 5, (got, ref_tokens)
    for t, row in zip(got, ref_logits):
        assert row[t] >= row.max() - 0.05 * row.abs().max()
