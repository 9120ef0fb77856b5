"""Autoregressive generation with the KV cache: prefill the prompt once, then one token a step.

Rows of a batch must have equal prompt lengths (no left-padding: the reference model takes no
attention mask with a cache); run prompts of different lengths as separate calls. Each row stops on
its own at a stop token; the batch ends when every row has stopped or `max_new_tokens` is reached.

Shape legend: B batch rows, T prompt tokens, N new tokens, V vocabulary.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from osstune.model import GptOss, KVCache

# harmony's stop tokens for assistant actions: <|return|> ends a final answer, <|call|> a tool call.
# <|end|> is not one: it closes the analysis message that precedes the final answer.
STOP_TOKENS = (200002, 200012)


class GenerationError(ValueError):
    """A generation request that cannot be run as given (bad prompt or sampling option)."""


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens; the keyword arguments of `generate` as one value (what chat passes on)."""

    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_options(self.max_new_tokens, self.temperature, self.top_p, self.top_k)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens of each row; the stop token is included when one ended it
    stop_reasons: list[str]  # per row: "stop" (a stop token) or "length" (max_new_tokens reached)
    logits: torch.Tensor | None = None  # (B, N, V) float32, the logits each new token was chosen from


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of probability top_p.

    logits (B, V) -> (B, V). top-k first, then top-p over what is left (the order of Hugging Face's
    logits warpers). Nucleus (Holtzman et al., arXiv:1904.09751): keep the most likely tokens until
    their probability reaches top_p; a token is dropped when the tokens ranked above it already
    reach it, so the most likely token is always kept.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs  # (B, V) probability of the better-ranked tokens
        drop_sorted = mass_above >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_options(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise GenerationError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p={top_p} must be in (0, 1] (1 keeps every token)")
    if top_k < 0:
        raise GenerationError(f"top_k={top_k} must be >= 0 (0 keeps every token)")


def _prompt_tensor(prompt_ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A (B, T) int64 CPU tensor from a list of ids, a list of equal-length lists or a (T,)/(B, T) tensor."""
    if isinstance(prompt_ids, torch.Tensor):
        ids = prompt_ids.detach().to("cpu", torch.long)
    else:
        rows = list(prompt_ids)
        if rows and isinstance(rows[0], (list, tuple)):
            lengths = sorted({len(r) for r in rows})
            if len(lengths) > 1:
                raise GenerationError(
                    f"prompt rows have different lengths {lengths}; batched generation needs equal "
                    "lengths (left-padding is not supported): generate them in separate calls"
                )
        ids = torch.tensor(rows, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise GenerationError(
            f"prompt must be a non-empty list of ids or a (B, T) tensor, got shape {tuple(ids.shape)}"
        )
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise GenerationError(
            f"prompt token id {int(ids[bad][0])} is outside the model's vocabulary [0, {vocab_size}); "
            "the prompt was tokenized for another vocabulary"
        )
    return ids


@torch.inference_mode()
def generate(
    model: GptOss,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_tokens: Sequence[int] = STOP_TOKENS,
    streamer: Callable[[int, int], None] | None = None,
    return_logits: bool = False,
) -> GenerationResult:
    """Continue each prompt row by up to `max_new_tokens` tokens.

    temperature 0 is greedy; otherwise tokens are sampled after top-k/top-p filtering, from
    `torch.Generator` seeded with `seed` (reproducible on one device) or from torch's global RNG.
    `streamer(row, token)` is called for each new token of each row as soon as it is chosen.
    Runs on the model's device, in the model's dtype; sampling is done in float32.
    """
    _check_options(max_new_tokens, temperature, top_p, top_k)
    cfg = model.config
    ids = _prompt_tensor(prompt_ids, cfg.vocab_size)  # (B, T)
    b, t = ids.shape
    if t >= cfg.max_position_embeddings:
        raise GenerationError(
            f"the prompt has {t} tokens, the model's context is max_position_embeddings="
            f"{cfg.max_position_embeddings}: shorten the prompt"
        )
    if t + max_new_tokens > cfg.max_position_embeddings:
        room = cfg.max_position_embeddings - t
        warnings.warn(
            f"max_new_tokens={max_new_tokens} would run past the model's context "
            f"({cfg.max_position_embeddings}) after a {t}-token prompt; generating at most {room}",
            stacklevel=2,
        )
        max_new_tokens = room

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = frozenset(stop_tokens)
    cache = KVCache(cfg.num_hidden_layers)
    tokens: list[list[int]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    active = [True] * b
    step_logits: list[torch.Tensor] = []

    next_input = ids.to(device)  # the prompt once, then one token per row
    for _ in range(max_new_tokens):
        # Only the last position's logits are needed: skipping the (B, T, V) prompt logits saves
        # T x 0.4 MB per row in bf16 at gpt-oss's vocabulary (3.2 GB for an 8k-token prompt).
        hidden = model(next_input, cache=cache, return_hidden=True)[:, -1]  # (B, H)
        logits = model.lm_head(hidden).float()  # (B, V)
        if return_logits:
            step_logits.append(logits)
        chosen = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        for row, token in enumerate(chosen.tolist()):  # the one host sync per step
            if not active[row]:
                continue
            tokens[row].append(token)
            if streamer is not None:
                streamer(row, token)
            if token in stop:
                active[row], reasons[row] = False, "stop"
        if not any(active):
            break
        # Finished rows keep stepping with whatever they sampled; their outputs are ignored.
        next_input = chosen.unsqueeze(1)  # (B, 1)

    logits_out = torch.stack(step_logits, dim=1) if return_logits and step_logits else None  # (B, N, V)
    return GenerationResult(tokens=tokens, stop_reasons=reasons, logits=logits_out)
