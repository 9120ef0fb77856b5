"""A live `osstune serve` stack for tests: the real engine on a tiny random model (CPU), the real
HTTP app under uvicorn on a free loopback port, in a background thread."""

from __future__ import annotations

import contextlib
import copy
import functools
import time

import torch

from osstune.config import preset
from osstune.lora import LoraConfig, apply_lora, lora_parameters, save_adapter
from osstune.model import GptOss, init_weights

MAX_MODEL_LEN = 512


@functools.cache
def _base() -> GptOss:
    return init_weights(GptOss(preset("tiny")), seed=0).eval()


def base_model() -> GptOss:
    """The tiny preset with fixed random weights, a fresh copy each time (the engine and LoRA
    change the module they get)."""
    return copy.deepcopy(_base())


def write_adapter(path) -> None:
    """A LoRA adapter with non-zero factors (a fresh one's B is zero and would change nothing)."""
    model = apply_lora(base_model(), LoraConfig(r=4, targets="all"), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, path, base_model="tiny")


@contextlib.contextmanager
def live_server(adapters: dict | None = None, api_key: str | None = None, max_in_flight: int = 256, device: str = "cpu",
                dtype: torch.dtype = torch.float32, model: GptOss | None = None, **engine):
    """Yields (url, ServerContext); the engine is shut down afterwards."""
    from osstune.serve.async_engine import AsyncEngine
    from osstune.serve.config import EngineConfig
    from osstune.serve.http.context import ServerContext
    from osstune.serve.http.server import BackgroundServer

    config = EngineConfig(**{"max_model_len": MAX_MODEL_LEN, "num_kv_blocks": 1024, "max_num_seqs": 128, **engine})
    model = model if model is not None else base_model()
    eng = AsyncEngine.from_model(model.to(device=device, dtype=dtype), adapters=adapters, config=config, device=device)
    eng.start()
    ctx = ServerContext(eng, "tiny", max_in_flight=max_in_flight, api_key=api_key)
    try:
        with BackgroundServer(ctx) as url:
            yield url, ctx
    finally:
        eng.shutdown()


def wait_idle(engine, timeout: float = 10.0):
    """The engine's stats once nothing runs or waits and no KV block is held (or the last seen)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if (stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def scripted_model(chain: list[int]) -> GptOss:
    """A model whose greedy reply to any prompt ending with `chain[0]` is `chain[1:]` (and on, when the
    chain ends with a token it holds earlier: a loop).

    Attention and expert outputs are zeroed, so the last hidden state is the current token's
    embedding and the logits are a bigram table; each lm_head row of a successor points along its
    predecessor's embedding (logit ~ 10 sqrt(hidden) against ~1 for any other row). The engine runs
    it like any model: a real way to make the server see harmony tool calls and reasoning. A token can
    have one successor only.
    """
    assert len(set(chain[:-1])) == len(chain) - 1, "a bigram chain gives each token one successor"
    model = base_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.self_attn.o_proj.bias.zero_()
            layer.mlp.experts.down_proj.zero_()
            layer.mlp.experts.down_proj_bias.zero_()
        model.lm_head.weight.mul_(0.01)
        embed = model.model.embed_tokens.weight
        for current, successor in zip(chain, chain[1:]):
            model.lm_head.weight[successor] = 10 * embed[current] / embed[current].norm()
    return model
