"""Sampling fields shared by the endpoints -> the engine's SamplingParams (one per choice)."""

from __future__ import annotations

from dataclasses import replace

from osstune.serve.http.fields import Body
from osstune.serve.types import HARMONY_STOP_TOKENS, SamplingParams


def sampling_params(body: Body, max_tokens: int | None, max_model_len: int, prompt_len: int, n: int) -> list[SamplingParams]:
    """`max_tokens` None: up to the end of the context. `seed` makes choice i use seed + i, so the
    `n` choices differ and the same request gives the same choices again."""
    temperature = body.number("temperature", 1.0, 0.0, 2.0)
    top_p = body.number("top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = body.integer("top_k", 0, 0)  # not OpenAI's, as in vLLM and llama.cpp
    seed = body.integer("seed", None)
    if max_tokens is None:
        max_tokens = max(1, max_model_len - prompt_len)
    base = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop_token_ids=HARMONY_STOP_TOKENS,
    )
    return [replace(base, seed=None if seed is None else seed + i) for i in range(n)]
