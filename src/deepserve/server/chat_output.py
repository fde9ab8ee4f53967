"""A chat choice's generated text -> what the OpenAI API returns: ``content``,
``reasoning_content`` and ``tool_calls``, whole or as stream deltas.

The text first passes the reasoning parser (when on), then the tool-call reader (when
the request offers tools). While streaming under ``tool_choice: auto`` the answer is
held back only if it starts like a tool call; plain answers stream as they come.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deepserve.server.reasoning import ReasoningParser
from deepserve.server.tools import ToolPlan, argument_pieces, may_be_a_call, parse_tool_calls


@dataclass
class ChatContext:
    """Per request: what to read out of each choice's text."""

    tools: ToolPlan | None = None
    reasoning: bool = False
    starts_inside: bool = False  # the prompt ends inside <think>


@dataclass
class ChoiceResult:
    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]]

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.tool_calls else engine_reason


def shape(ctx: ChatContext, text: str) -> ChoiceResult:
    """A finished choice's message parts."""
    reasoning = None
    if ctx.reasoning:
        p = ReasoningParser(ctx.starts_inside)
        p.feed(text, final=True)
        text = p.content
        reasoning = p.reasoning if p.state != "start" else None
    if ctx.tools is not None:
        content, calls = parse_tool_calls(text, ctx.tools)
        if calls:
            return ChoiceResult(content, reasoning, calls)
    return ChoiceResult(text, reasoning, [])


@dataclass
class ChoiceStream:
    """One choice's stream: feed text deltas, get OpenAI ``delta`` objects back."""

    ctx: ChatContext
    reasoner: ReasoningParser | None = None
    mode: str = "stream"  # stream | undecided | hold
    held: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.ctx.reasoning:
            self.reasoner = ReasoningParser(self.ctx.starts_inside)
        if self.ctx.tools is not None:
            self.mode = "hold" if self.ctx.tools.forced else "undecided"

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        content = text
        if self.reasoner is not None:
            split = self.reasoner.feed(text, final)
            content = split.content
            if split.reasoning:
                self.reasoning += split.reasoning
                deltas.append({"reasoning_content": split.reasoning})
        if self.mode == "undecided" and content:
            self.held += content
            content = ""
            decided = may_be_a_call(self.held)
            if decided is False:
                self.mode, content, self.held = "stream", self.held, ""
            elif decided:
                self.mode = "hold"
        elif self.mode == "hold":
            self.held += content
            content = ""
        if content:
            deltas.append({"content": content})
        if final and self.mode != "stream" and self.held:
            assert self.ctx.tools is not None
            rest, calls = parse_tool_calls(self.held, self.ctx.tools)
            self.held = ""
            if calls:
                self.tool_calls = calls
                if rest:
                    deltas.append({"content": rest})
                for k, call in enumerate(calls):
                    fn = call["function"]
                    deltas.append({"tool_calls": [{"index": k, "id": call["id"],
                                                   "type": "function", "function": {
                                                       "name": fn["name"], "arguments": ""}}]})
                    deltas.extend({"tool_calls": [{"index": k, "function": {
                        "arguments": piece}}]} for piece in argument_pieces(fn["arguments"]))
            else:
                deltas.append({"content": rest})
        return deltas

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.tool_calls else engine_reason
