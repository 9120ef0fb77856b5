"""Errors answered to a client, in the OpenAI error format.

`{"error": {"message", "type", "param", "code"}}`: `param` names the offending field (what the
`openai` client exposes as `BadRequestError.param`), so a client can tell which input to change.
"""

from __future__ import annotations

from dataclasses import dataclass

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_error"}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param, code="invalid_value" if param else None)
