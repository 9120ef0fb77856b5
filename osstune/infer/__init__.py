"""Inference: generation with the KV cache, harmony chat, the `osstune chat` command."""

from osstune.infer.generate import STOP_TOKENS, GenerationError, GenerationResult, generate

__all__ = ["STOP_TOKENS", "GenerationError", "GenerationResult", "generate"]
