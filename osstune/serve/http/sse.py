"""Server-sent events as the OpenAI streaming API writes them: `data: <json>` blocks, then `data: [DONE]`."""

from __future__ import annotations

import json

DONE = "data: [DONE]\n\n"


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
