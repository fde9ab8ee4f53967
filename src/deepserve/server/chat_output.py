"""A chat choice's generated text -> what the OpenAI API returns: ``content``,
``reasoning_content`` and ``tool_calls``, whole or as stream deltas.

The text first passes the reasoning parser (when on), then the tool-call reader (when
the request offers tools). While streaming under ``tool_choice: auto`` the answer is
held back only if it starts like a tool call; plain answers stream as they come.

Tool calls stream as they are generated: a call's id and name as soon as its name is
complete, then its arguments in fragments (the raw JSON text, as the model writes it).
A turn cut by ``max_tokens`` keeps its complete calls; a forced turn with parallel calls
stops at a call that repeats the previous one with the same arguments (the repeat is
held back while it matches, and dropped: small models otherwise repeat a call until the
token limit). The format's own text (``{"tool_calls": ...}``) never becomes content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from deepserve.server.reasoning import ReasoningParser
from deepserve.server.tool_stream import CallScanner, same_call
from deepserve.server.tools import ToolPlan, may_be_a_call, read_calls

_CALL_FORMAT = re.compile(r'^\s*(<tool_call>|<\|python_tag\|>|\{\s*"tool_calls")')


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
    repeated: bool = False  # the turn was stopped at a repeated call

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg

    def finish_reason(self, engine_reason: str | None) -> str | None:
        # A turn cut by max_tokens says so, with the complete calls it holds.
        if self.tool_calls and engine_reason != "length":
            return "tool_calls"
        return engine_reason


def shape(ctx: ChatContext, text: str) -> ChoiceResult:
    """A finished choice's message parts."""
    stream = ChoiceStream(ctx)
    stream.feed(text, final=True)
    return stream.result()


@dataclass
class ChoiceStream:
    """One choice's stream: feed text deltas, get OpenAI ``delta`` objects back."""

    ctx: ChatContext
    reasoner: ReasoningParser | None = None
    mode: str = "stream"  # stream | undecided | hold
    held: str = ""  # text read as (maybe) tool calls
    reasoning: str = ""
    content: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    scanner: CallScanner = field(default_factory=CallScanner)
    sent: dict[int, int] = field(default_factory=dict)  # call -> argument chars sent
    repeated: bool = False  # a forced turn repeated its previous call: stop generating
    finished: bool = False

    def __post_init__(self) -> None:
        if self.ctx.reasoning:
            self.reasoner = ReasoningParser(self.ctx.starts_inside)
        if self.ctx.tools is not None:
            self.mode = "hold" if self.ctx.tools.forced else "undecided"

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        if self.finished:
            return []
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
                self.scanner.feed(self.held)
                deltas += self._call_deltas()
        elif self.mode == "hold" and content and not self.repeated:
            self.held += content
            self.scanner.feed(content)
            content = ""
            deltas += self._call_deltas()
        elif self.mode == "hold":
            content = ""
        if content:
            self.content.append(content)
            deltas.append({"content": content})
        if final or self.repeated:
            deltas += self._finish()
        return deltas

    def _call_deltas(self) -> list[dict[str, Any]]:
        """Deltas for what the calls gained since the last piece."""
        plan = self.ctx.tools
        assert plan is not None
        deltas: list[dict[str, Any]] = []
        named = self.scanner.named(plan.names)
        for k, call in enumerate(named):
            if plan.forced and plan.parallel and k > 0:
                prev = self.scanner.complete(named[k - 1], plan.names)
                if prev is not None and prev["function"]["name"] == call.name:
                    mine = self.scanner.complete(call, plan.names)
                    if mine is not None and same_call(mine, prev):
                        self.repeated = True
                        break
                    if k not in self.sent and prev["function"]["arguments"].startswith(
                            self.scanner.args_text(call).strip()):
                        break  # so far the same call again: held back
            if k not in self.sent:
                self.sent[k] = 0
                deltas.append({"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                               "function": {"name": call.name,
                                                            "arguments": ""}}]})
            if call.args_is_string:  # arguments as a JSON string: sent whole, decoded
                whole = self.scanner.complete(call, plan.names)
                piece = whole["function"]["arguments"] if whole and not self.sent[k] else ""
            else:
                piece = self.scanner.args_text(call)[self.sent[k]:]
            if piece:
                self.sent[k] += len(piece)
                deltas.append({"tool_calls": [{"index": k, "function": {"arguments": piece}}]})
        return deltas

    def _finish(self) -> list[dict[str, Any]]:
        self.finished = True
        if self.mode == "stream" or not self.held:
            return []
        plan = self.ctx.tools
        assert plan is not None
        deltas = self._call_deltas() if not self.repeated else []
        rest, calls, is_format = read_calls(self.scanner, plan, self.held)
        if self.repeated:
            calls = calls[:len(self.sent)]  # up to the repeat, which is dropped
        self.tool_calls = calls
        if not is_format and (plan.forced or _CALL_FORMAT.match(self.held)):
            rest, is_format = None, True  # a cut call: never the format's text as content
        if rest:
            self.content.append(rest)
            deltas.append({"content": rest})
        return deltas

    def result(self) -> ChoiceResult:
        reasoning = None
        if self.reasoner is not None and self.reasoner.state != "start":
            reasoning = self.reasoning
        text = "".join(self.content)
        content = text if (text or not (self.tool_calls or self.mode == "hold")) else None
        return ChoiceResult(content, reasoning, self.tool_calls, self.repeated)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return self.result().finish_reason(engine_reason)
