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
                dtype: torch.dtype = torch.float32, **engine):
    """Yields (url, ServerContext); the engine is shut down afterwards."""
    from osstune.serve.async_engine import AsyncEngine
    from osstune.serve.config import EngineConfig
    from osstune.serve.http.context import ServerContext
    from osstune.serve.http.server import BackgroundServer

    config = EngineConfig(**{"max_model_len": MAX_MODEL_LEN, "num_kv_blocks": 1024, "max_num_seqs": 128, **engine})
    eng = AsyncEngine.from_model(base_model().to(device=device, dtype=dtype), adapters=adapters, config=config, device=device)
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
