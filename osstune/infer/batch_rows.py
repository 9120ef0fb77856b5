"""Input rows of `osstune generate`: chat rows of osstune's data formats -> harmony prompts.

A row is read by the data layer (`osstune.data.formats.read_rows`, `parse_row(training=False)`) and
rendered for completion by `osstune.data.render.render_prompt`, so the prompt is exactly the context a
fine-tuned model saw in training (system message, reasoning effort, developer instructions, tools).
What the model is asked to write is the assistant turn after the last user or tool message:

- a conversation that ends with a user or tool message is the prompt as it is;
- one that ends with the assistant's turn (a training or evaluation row) has that turn removed and
  kept as the row's `reference` answer;
- a pair row without its answer (`{"prompt": ...}`, `{"question": ...}`, `{"instruction": ...,
  "input"?: ...}`) is the user message alone.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from osstune.data.conversation import Conversation, parse_row
from osstune.data.errors import Problem, RowError
from osstune.data.formats import read_rows
from osstune.data.render import RenderOptions, render_prompt

# The data layer's pair shapes (question key, answer key): a row of the first key alone is a prompt.
_PAIRS = (("prompt", "completion"), ("question", "answer"), ("instruction", "output"))
_NO_ANSWER = "(no answer)"  # stands in for the missing answer while the data layer parses the row


@dataclass(frozen=True)
class PromptRow:
    index: int  # 0-based position among the file's rows (the per-row seed is seed + index)
    line: int  # 1-based line where the row starts
    id: str | int  # the row's own "id", else its line number
    # Harmony tokens ending with <|start|>assistant; 4 bytes a token, as a file of many long prompts
    # is held whole (a list of Python ints takes 36).
    prompt: array
    reference: str | None = None  # the final answer of a removed assistant turn

    @cached_property
    def digest(self) -> str:
        """Identifies the prompt, so a resumed output can be checked against its input."""
        data = b"".join(t.to_bytes(4, "little") for t in self.prompt)
        return hashlib.sha256(data).hexdigest()[:16]


def read_prompts(path: str | Path, options: RenderOptions = RenderOptions()) -> tuple[list[PromptRow], list[Problem]]:
    """Every row of the file as a prompt, and the rows that are not (file:line: reason)."""
    rows: list[PromptRow] = []
    problems: list[Problem] = []
    for index, raw in enumerate(read_rows(path)):
        if raw.error is not None:
            problems.append(Problem(str(path), raw.line, raw.error))
            continue
        try:
            rows.append(prompt_row(raw.value, index, raw.line, options))
        except RowError as e:
            problems.append(Problem(str(path), raw.line, str(e)))
    return rows, problems


def prompt_row(value, index: int, line: int, options: RenderOptions = RenderOptions()) -> PromptRow:
    """One decoded JSON row as a prompt; raises `RowError` saying what to change."""
    own_id = value.get("id") if isinstance(value, dict) else None
    if own_id is not None and (isinstance(own_id, bool) or not isinstance(own_id, (str, int))):
        raise RowError(f'"id" is {own_id!r}; a row id must be a string or an integer')
    answered = True
    if isinstance(value, dict) and "messages" not in value:
        for first, second in _PAIRS:
            if first in value and second not in value:
                value, answered = {**value, second: _NO_ANSWER}, False
                break
    if isinstance(value, dict) and "id" in value:
        value = {k: v for k, v in value.items() if k != "id"}  # ours, not an ignored key
    conversation, reference = _split_answer(parse_row(value, training=False).conversation)
    return PromptRow(
        index=index,
        line=line,
        id=own_id if own_id is not None else line,
        prompt=array("I", render_prompt(conversation, options)),
        reference=reference if answered else None,
    )


def _split_answer(conversation: Conversation) -> tuple[Conversation, str | None]:
    """The conversation up to its last user or tool message, and the final answer after it (if any)."""
    messages = conversation.messages
    last = max((i for i, m in enumerate(messages) if m.role in ("user", "tool")), default=-1)
    if last < 0:
        raise RowError("the row has no user message: there is nothing for the model to answer")
    answer = messages[last + 1 :]
    reference = next((m.content for m in reversed(answer) if m.content), None)
    return replace(conversation, messages=messages[: last + 1]), reference
