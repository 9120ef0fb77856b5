"""What crosses the engine's boundary: requests in, streamed outputs and statistics out.

Plain dataclasses with no torch: the scheduler, the KV block manager, the engine loop and the HTTP
server all speak these, so each is testable without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# harmony's stop tokens for assistant actions: <|return|> ends a final answer, <|call|> a tool call.
HARMONY_STOP_TOKENS = (200002, 200012)

FINISH_REASONS = ("stop", "length", "abort", "error")


class RequestError(ValueError):
    """A request the engine cannot run as given. `field` names the offending input (for the HTTP
    layer's 400 error object); the message says what is wrong and what to do."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. temperature 0 is greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    seed: int | None = None  # per-request generator: the same seed gives the same tokens
    stop_token_ids: tuple[int, ...] = HARMONY_STOP_TOKENS
    ignore_stop: bool = False  # generate exactly max_tokens (benchmarks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = (
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 is greedy)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 keeps every token)"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise RequestError(f"{name}={getattr(self, name)!r} must be {expected}", field=name)


@dataclass
class RequestOutput:
    """One streamed update of a request: the tokens new since the previous update.

    The last update of a request has `finished=True` and a `finish_reason`: "stop" (a stop token,
    which is the last of `new_token_ids`), "length" (max_tokens or the context reached), "abort"
    (cancelled by the client or the engine's shutdown) or "error" (`error` says why).
    """

    request_id: str
    new_token_ids: list[int]
    num_output_tokens: int  # generated so far, these included
    num_prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None


@dataclass
class EngineStats:
    """A snapshot for /metrics and the start-up report."""

    num_running: int = 0
    num_waiting: int = 0
    num_preempted_total: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    block_size: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_hit_tokens_total: int = 0
    requests_finished_total: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
