"""Inference: generation with the KV cache; harmony chat (`osstune chat`) and batch generation
(`osstune generate`) on the serving engine."""

from osstune.infer.generate import STOP_TOKENS, GenerationError, GenerationResult, generate

__all__ = ["STOP_TOKENS", "GenerationError", "GenerationResult", "generate"]
