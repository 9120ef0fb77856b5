"""Sampling a batch of rows, each with its own temperature, top-k, top-p and seed, on the device.

Random rows use the Gumbel-max trick: argmax(logits / T + g) with g = -log(-log(u)) is a sample of
softmax(logits / T); restricted to the tokens top-k / top-p keep, it samples their renormalised
distribution. The uniforms u come from a counter-based hash of (seed, step, token id) rather than a
stateful generator, so a request's tokens depend on its seed and position only: not on which other
requests share its batch, nor on preemption and recomputation. Greedy rows (T = 0) take the argmax.
No host sync per row: the sort for top-k/top-p runs only when some row asks for it, which the host
knows from the parameters.

Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32, Wellons) on int64 tensors holding values < 2**32.
    Products may wrap past 2**63; their low 32 bits, which the mask keeps, are exact either way."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B,) seeds and (B,) steps -> (B, V) float32 uniforms in (0, 1), a pure function of the three."""
    dev = seeds.device
    tok = torch.arange(vocab, device=dev, dtype=torch.int64)
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    row = _mix32(_mix32(lo ^ _mix32(hi + 0x9E3779B9)) ^ (steps & _M32))  # (B,)
    h = _mix32(row[:, None] ^ _mix32(tok + 0x632BE5AB)[None, :])  # (B, V)
    return unit_interval(h)


def unit_interval(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 in (0, 1), both ends excluded: their top 23 bits, centred.

    23 bits, not 24: (k + 0.5) / 2**24 rounds to exactly 1.0 in float32 at k = 2**24 - 1, and a
    uniform of 1 is an infinite Gumbel, which wins whatever the logits (one token in 2**24: at a
    200k vocabulary, one sampled token in 80 would be uniformly random)."""
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


@dataclass
class SamplingBatch:
    any_random: bool
    any_filter: bool
    all_random: bool
    # None when every row is greedy (nothing to copy to the device).
    temperature: torch.Tensor | None = None  # (B,) float32; 0 is greedy
    top_k: torch.Tensor | None = None  # (B,) int64; 0 keeps every token
    top_p: torch.Tensor | None = None  # (B,) float32
    seeds: torch.Tensor | None = None  # (B,) int64
    steps: torch.Tensor | None = None  # (B,) int64 output tokens before this one

    @classmethod
    def build(cls, chunks, device) -> SamplingBatch:
        temps = [c.params.temperature for c in chunks]
        ks = [c.params.top_k for c in chunks]
        ps = [c.params.top_p for c in chunks]

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        random = [x > 0 for x in temps]
        if not any(random):
            return cls(any_random=False, any_filter=False, all_random=False)
        return cls(
            temperature=t(temps, torch.float32),
            top_k=t(ks, torch.int64),
            top_p=t(ps, torch.float32),
            seeds=t([c.seed for c in chunks], torch.int64),
            steps=t([c.num_output for c in chunks], torch.int64),
            any_random=any(random),
            any_filter=any(r and (k > 0 or p < 1.0) for r, k, p in zip(random, ks, ps)),
            all_random=all(random),
        )


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits (B, V) float32 -> tokens (B,) int64."""
    greedy = logits.argmax(dim=-1)
    if not batch.any_random:
        return greedy
    b, v = logits.shape
    temp = batch.temperature.clamp(min=1e-6)[:, None]
    scaled = logits / temp  # (B, V)
    gumbel = -torch.log(-torch.log(uniforms(batch.seeds, batch.steps, v)))  # (B, V)
    if batch.any_filter:
        scaled_sorted, order = scaled.sort(dim=-1, descending=True)  # (B, V)
        rank = torch.arange(v, device=logits.device)[None, :]
        k = torch.where(batch.top_k > 0, batch.top_k, v)[:, None]
        drop = rank >= k
        # Nucleus (Holtzman et al., arXiv:1904.09751) over what top-k kept: a token is dropped once the
        # better-ranked tokens already hold top_p of the probability (the best token always stays).
        probs = scaled_sorted.masked_fill(drop, float("-inf")).softmax(dim=-1)
        drop |= (probs.cumsum(dim=-1) - probs) >= batch.top_p[:, None]
        noisy = scaled_sorted.masked_fill(drop, float("-inf")) + gumbel.gather(1, order)
        chosen = order.gather(1, noisy.argmax(dim=-1, keepdim=True)).squeeze(1)
    else:
        chosen = (scaled + gumbel).argmax(dim=-1)
    return chosen if batch.all_random else torch.where(batch.temperature > 0, chosen, greedy)
