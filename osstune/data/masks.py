"""Which tokens of a rendered conversation are trained.

We read the message structure back from harmony's tokens instead of predicting it: every message
starts with <|start|> and its header runs to <|message|> (message text never contains control tokens:
harmony encodes text as plain characters). So the masks follow exactly what harmony rendered, earlier
chain of thought dropped or not.

What is trained is what the model generates at inference. The prompt ends with `<|start|>assistant`;
the model writes `<|channel|>...<|message|>...` up to <|end|>, and after an <|end|> it goes on by
itself with the next `<|start|>assistant...`; it stops at <|return|> (final answer) or <|call|>
(tool call). Hence, for each trained assistant message:
  - the tokens after `<|start|>assistant` through its closing token are trained;
  - its `<|start|>assistant` is trained too when the previous message is an assistant message that
    ended with <|end|> (the model wrote those two tokens), and is prompt otherwise.
System, developer, user and tool tokens are never trained.

Policies (`train_on`), for the assistant messages:
  "last"  : those after the last user message, i.e. the last turn (default). This is one complete
            generation of the model, analysis, tool calls and final answer, with the context it has at
            inference. Earlier turns are context: harmony shows them with their analysis dropped and
            their final answer closed by <|end|>, which is not how the model produced them.
  "final" : only the final-channel answers of the last turn.
  "all"   : every assistant message, earlier turns included.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from osstune.data.conversation import Conversation
from osstune.data.render import assistant_parts, harmony_encoding
from osstune.data.vocab import NAMED_SPECIAL_TOKENS

TRAIN_ON = ("last", "final", "all")

START = NAMED_SPECIAL_TOKENS["<|start|>"]
END = NAMED_SPECIAL_TOKENS["<|end|>"]
MESSAGE = NAMED_SPECIAL_TOKENS["<|message|>"]
CHANNEL = NAMED_SPECIAL_TOKENS["<|channel|>"]
CLOSERS = (END, NAMED_SPECIAL_TOKENS["<|return|>"], NAMED_SPECIAL_TOKENS["<|call|>"])


@dataclass(frozen=True)
class Segment:
    """One rendered message: tokens [start, stop) of the conversation."""

    start: int
    stop: int
    author: str  # "system", "developer", "user", "assistant" or the tool's name ("functions.f")
    channel: str | None  # "analysis", "commentary", "final" or None


def segments(tokens: np.ndarray, encoding=None) -> list[Segment]:
    """Split rendered harmony tokens (T,) into messages."""
    encoding = encoding or harmony_encoding()
    starts = np.flatnonzero(tokens == START)
    if len(starts) == 0 or starts[0] != 0:
        raise AssertionError("harmony output does not begin with <|start|>")  # internal invariant
    stops = [*starts[1:].tolist(), len(tokens)]
    out = []
    for start, stop in zip(starts.tolist(), stops, strict=True):
        if tokens[stop - 1] not in CLOSERS:
            raise AssertionError(f"harmony message at token {start} does not end with <|end|>, <|return|> or <|call|>")
        body = tokens[start + 1 : stop]
        header_end = int(np.argmax(body == MESSAGE))  # the first <|message|>; there is one per message
        channel_at = np.flatnonzero(body[:header_end] == CHANNEL)
        name_end = int(channel_at[0]) if len(channel_at) else header_end
        # Before <|channel|> the header reads "author" or "author to=recipient" (either order is legal
        # harmony, but openai-harmony writes the recipient here).
        author = encoding.decode(body[:name_end].tolist()).split(" to=")[0].strip()
        channel = None
        if len(channel_at):
            channel = encoding.decode(body[name_end + 1 : header_end].tolist()).split(" ")[0]
        out.append(Segment(start, stop, author, channel))
    return out


def train_mask(tokens: np.ndarray, train_on: str = "last", encoding=None) -> np.ndarray:
    """bool (T,): True where a token of the rendered conversation (T,) is a training target."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}; expected one of {', '.join(TRAIN_ON)}")
    encoding = encoding or harmony_encoding()
    segs = segments(tokens, encoding)
    header = _assistant_header(encoding)
    users = [i for i, s in enumerate(segs) if s.author == "user"]
    first_of_last_turn = users[-1] + 1 if users else 0
    mask = np.zeros(len(tokens), dtype=bool)
    for i, seg in enumerate(segs):
        if seg.author != "assistant":
            continue
        if train_on != "all" and i < first_of_last_turn:
            continue
        if train_on == "final" and seg.channel != "final":
            continue
        if tokens[seg.start : seg.start + len(header)].tolist() != header:
            raise AssertionError(f"assistant message at token {seg.start} does not start with <|start|>assistant")
        prev = segs[i - 1] if i else None
        model_wrote_header = prev is not None and prev.author == "assistant" and tokens[prev.stop - 1] == END
        mask[seg.start if model_wrote_header else seg.start + len(header) : seg.stop] = True
    return mask


@functools.cache
def _assistant_header_cached(encoding) -> tuple[int, ...]:
    return tuple(encoding.encode("<|start|>assistant", allowed_special={"<|start|>"}))


def _assistant_header(encoding) -> list[int]:
    # `<|start|>assistant`: what the inference prompt ends with (render_conversation_for_completion).
    return list(_assistant_header_cached(encoding))


def untrained_mask(tokens: np.ndarray, conversation: Conversation, encoding=None) -> np.ndarray | None:
    """bool (T,): True over the rendered messages of assistant messages with `weight: 0` (OpenAI's
    fine-tuning format: kept as context, not trained); None when the row has none.

    Each assistant segment is matched, in order, to the next harmony message of the row that renders
    to the same tokens (the last token aside: the row's last answer ends with <|return|> rendered in
    place, <|end|> alone); messages harmony left out of the context are skipped that way."""
    if all(m.trained for m in conversation.messages):
        return None
    encoding = encoding or harmony_encoding()
    parts = assistant_parts(conversation)
    mask = np.zeros(len(tokens), dtype=bool)
    j = 0
    for seg in segments(tokens, encoding):
        if seg.author != "assistant":
            continue
        body = tokens[seg.start : seg.stop - 1].tolist()
        while j < len(parts) and parts[j][1][:-1] != body:
            j += 1
        if j == len(parts):
            raise AssertionError(f"assistant message at token {seg.start} matches no message of the row")
        if not conversation.messages[parts[j][0]].trained:
            mask[seg.start : seg.stop] = True
        j += 1
    return mask
