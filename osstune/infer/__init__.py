"""Inference: generation with the KV cache; harmony chat (`osstune chat`) and batch generation
(`osstune generate`) on the serving engine."""

import importlib

__all__ = ["STOP_TOKENS", "GenerationError", "GenerationResult", "generate"]


def __getattr__(name: str):
    # Imported on first use (PEP 562): `osstune --help` registers `chat` without importing torch.
    if name not in __all__:
        raise AttributeError(f"module 'osstune.infer' has no attribute {name!r}")
    return getattr(importlib.import_module("osstune.infer.generate"), name)
