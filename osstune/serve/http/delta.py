"""What generated tokens add to a reply, in the shape of OpenAI's streamed `delta`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # set on a call's first delta only
    name: str | None = None
    arguments: str = ""


@dataclass
class Delta:
    """What one or more tokens added to a reply."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def add(self, other: Delta) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        for call in other.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last.index == call.index and call.id is None:
                last.arguments += call.arguments
            else:
                self.tool_calls.append(ToolCallDelta(call.index, call.id, call.name, call.arguments))

    def __add__(self, other: Delta) -> Delta:
        out = Delta(self.content, self.reasoning, [ToolCallDelta(**c.__dict__) for c in self.tool_calls])
        out.add(other)
        return out
