"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand: a few
counters and histograms need no client library. Engine-side totals come from `EngineStats`."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

from osstune.serve.types import EngineStats

# Buckets in seconds, from sub-millisecond inter-token gaps to minutes-long requests.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    """What the HTTP layer observes; `render(stats)` adds the engine's snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, HTTP status) -> count
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self.in_flight = 0

    def request_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def observe_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_tokens(self, seconds_per_token: float, tokens: int) -> None:
        with self._lock:
            self.itl.observe(seconds_per_token, tokens)

    def observe_request(self, seconds: float) -> None:
        with self._lock:
            self.e2e.observe(seconds)

    def render(self, stats: EngineStats) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        with self._lock:
            metric(
                "osstune_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
                [f'osstune_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())],
            )
            metric("osstune_time_to_first_token_seconds", "histogram", "Arrival to first generated token.",
                   self.ttft.lines("osstune_time_to_first_token_seconds"))
            metric("osstune_inter_token_latency_seconds", "histogram", "Time between generated tokens of a request.",
                   self.itl.lines("osstune_inter_token_latency_seconds"))
            metric("osstune_request_latency_seconds", "histogram", "Arrival to last token of an engine request.",
                   self.e2e.lines("osstune_request_latency_seconds"))
            in_flight = self.in_flight
        gauges = (
            ("osstune_requests_in_flight", in_flight, "Engine requests the server holds (running or queued)."),
            ("osstune_num_requests_running", stats.num_running, "Requests in the engine's running batch."),
            ("osstune_num_requests_waiting", stats.num_waiting, "Requests queued in the engine."),
            ("osstune_kv_cache_usage_ratio", stats.kv_usage, "Fraction of KV-cache blocks in use."),
            ("osstune_kv_blocks_used", stats.kv_blocks_used, "KV-cache blocks in use."),
            ("osstune_kv_blocks_total", stats.kv_blocks_total, "KV-cache blocks in all."),
        )
        for name, value, help_text in gauges:
            metric(name, "gauge", help_text, [f"{name} {value}"])
        counters = (
            ("osstune_prompt_tokens_total", stats.prompt_tokens_total, "Prompt tokens prefilled."),
            ("osstune_generation_tokens_total", stats.generation_tokens_total, "Tokens generated."),
            ("osstune_prefix_cache_hit_tokens_total", stats.prefix_cache_hit_tokens_total, "Prompt tokens served from the prefix cache."),
            ("osstune_num_preemptions_total", stats.num_preempted_total, "Requests preempted for KV space."),
            ("osstune_engine_requests_finished_total", stats.requests_finished_total, "Engine requests finished."),
        )
        for name, value, help_text in counters:
            metric(name, "counter", help_text, [f"{name} {value}"])
        return "\n".join(lines) + "\n"
