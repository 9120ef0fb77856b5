"""What every endpoint needs: the engine, the model ids, the admission limit and the metrics."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from osstune.serve.http.errors import ApiError, bad_request
from osstune.serve.http.generation import Admission, Choice
from osstune.serve.http.metrics import Metrics
from osstune.serve.types import RequestError, SamplingParams


@dataclass
class ServerContext:
    engine: Any  # osstune.serve.async_engine.AsyncEngine
    model_id: str  # the base model's id in /v1/models
    max_in_flight: int  # engine requests held at once (running + queued); more get 429
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.admission = Admission(self.max_in_flight, self.metrics)
        self._tokenizer = None

    @property
    def model_ids(self) -> list[str]:
        return [self.model_id, *self.engine.adapter_names]

    def adapter_for(self, model: str) -> str | None:
        """The engine adapter of a request's `model` (None: the base model)."""
        if model == self.model_id:
            return None
        if model in self.engine.adapter_names:
            return model
        raise ApiError(
            400, f"model {model!r} is not served here; GET /v1/models lists {', '.join(map(repr, self.model_ids))}",
            "model", code="model_not_found",
        )

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from osstune.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer()
        return self._tokenizer

    def start_choices(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        adapter: str | None,
        make_parser: Any,
        stops: tuple[str, ...],
        field_names: dict[str, str],
        prefix: str,
    ) -> list[Choice]:
        """Add one engine request per (prompt, params) pair, all or none: a refused one aborts the
        others. Engine RequestErrors become 400s naming the client's field (`field_names` maps the
        engine's names, e.g. max_tokens -> max_completion_tokens)."""
        self.admission.take(len(prompts))
        choices: list[Choice] = []
        try:
            for index, (prompt, p) in enumerate(zip(prompts, params)):
                stream = self.engine.add_request(prompt, p, request_id=f"{prefix}-{index}-{secrets.token_hex(4)}", adapter=adapter)
                choices.append(Choice(self.engine, stream, make_parser(), stops, index))
        except RequestError as e:
            for c in choices:
                c.close()
            self.admission.give(len(prompts))
            raise bad_request(str(e), field_names.get(e.field or "", e.field)) from None
        except RuntimeError as e:  # the engine stopped (shutting down, or after an internal error)
            for c in choices:
                c.close()
            self.admission.give(len(prompts))
            raise ApiError(503, str(e), headers={"Retry-After": "5"}) from None
        except BaseException:
            for c in choices:
                c.close()
            self.admission.give(len(prompts))
            raise
        return choices
