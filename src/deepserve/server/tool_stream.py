"""Tool calls read out of generated text while it grows.

``CallScanner`` is fed the text of one choice piece by piece (as it streams) and keeps,
for each call it has seen start, the function's name and the raw text of its arguments
so far. That gives three things:

- streamed calls send ``delta.tool_calls`` argument fragments as they are generated;
- a turn cut by ``max_tokens`` keeps its complete calls (the partial one is dropped);
- a forced turn stops at a call that repeats the one before it.

Calls are JSON objects with ``name`` and ``arguments`` (or ``parameters``), found where
every output format puts them: the root object (``<tool_call>`` blocks, Llama 3's
single call), the items of a root array, or the items of the root object's
``tool_calls`` array (the generic format). Text outside JSON (``<tool_call>`` tags) is
skipped. The scanner keeps its state between pieces, so a turn is scanned once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class PartialCall:
    """One call as far as it has been generated (offsets into the scanned text)."""

    start: int
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    args_is_string: bool = False
    done: bool = False  # its closing brace was seen
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class _Frame:
    kind: str  # "{" or "["
    call: PartialCall | None = None  # the call this object is
    key: str | None = None  # the key whose value comes next (objects)
    expect: str = "key"  # objects: key | colon | value | comma; arrays: value | comma


class CallScanner:
    """Incremental JSON reader for tool calls (see the module docstring)."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[PartialCall] = []
        self._stack: list[_Frame] = []
        self._in_string = False
        self._escape = False
        self._string_start = 0
        self._string_role: str | None = None  # "key", "name", "args" or None
        self._in_scalar = False
        self._scalar_role: str | None = None

    # -- reading ---------------------------------------------------------------------
    def feed(self, piece: str) -> None:
        base = len(self.text)
        self.text += piece
        for offset, ch in enumerate(piece):
            self._char(base + offset, ch)

    def _call_level(self) -> bool:
        """Whether an object opening now is a call (see the module docstring)."""
        s = self._stack
        if not s:
            return True
        if s[-1].kind != "[":
            return False
        return len(s) == 1 or (len(s) == 2 and s[0].kind == "{" and s[0].key == "tool_calls")

    def _value_starts(self, pos: int) -> str | None:
        """A value begins at ``pos`` inside the top frame: what it is to the call."""
        if not self._stack:
            return None
        top = self._stack[-1]
        if top.kind == "{":
            top.expect = "comma"
            if top.call is not None:
                if top.key == "name":
                    return "name"
                if top.key in ARGUMENT_KEYS and top.call.args_start is None:
                    top.call.args_start = pos
                    return "args"
        else:
            top.expect = "comma"
        return None

    def _args_end(self, pos: int) -> None:
        """The value that just ended (at ``pos``, inclusive) closes a call's arguments
        when the top frame is that call."""
        top = self._stack[-1] if self._stack else None
        if top is not None and top.call is not None and top.key in ARGUMENT_KEYS and \
                top.call.args_start is not None and top.call.args_end is None:
            top.call.args_end = pos + 1

    def _char(self, pos: int, ch: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                self._string_done(pos)
            return
        if self._in_scalar:
            if ch.isalnum() or ch in "+-.":
                return
            self._in_scalar = False
            if self._scalar_role == "args":
                self._args_end(pos - 1)
        if ch in " \t\r\n":
            return
        if not self._stack and ch not in "{[":
            return  # text around the JSON (tags, prose)
        top = self._stack[-1] if self._stack else None
        if ch == '"':
            self._in_string = True
            self._string_start = pos
            if top is not None and top.kind == "{" and top.expect == "key":
                self._string_role = "key"
            else:
                self._string_role = self._value_starts(pos)
                if self._string_role == "args":
                    top.call.args_is_string = True  # type: ignore[union-attr]
            return
        if ch in "{[":
            call = None
            if ch == "{" and self._call_level():
                call = PartialCall(start=pos)
                self.calls.append(call)
            role = self._value_starts(pos)
            self._stack.append(_Frame(ch, call, expect="key" if ch == "{" else "value"))
            if role == "args":
                pass  # ends when this frame closes
            return
        if ch in "}]":
            if not self._stack:
                return
            frame = self._stack.pop()
            if frame.call is not None:
                frame.call.done = True
            self._args_end(pos)
            return
        if top is None:
            return
        if ch == ":":
            top.expect = "value"
            return
        if ch == ",":
            top.expect = "key" if top.kind == "{" else "value"
            if top.kind == "{":
                top.key = None
            return
        # a number, true, false or null
        self._in_scalar = True
        self._scalar_role = self._value_starts(pos)

    def _string_done(self, pos: int) -> None:
        top = self._stack[-1] if self._stack else None
        raw = self.text[self._string_start:pos + 1]
        if self._string_role == "key" and top is not None:
            try:
                top.key = json.loads(raw)
            except ValueError:
                top.key = None
            top.expect = "colon"
        elif self._string_role == "name" and top is not None and top.call is not None:
            try:
                top.call.name = json.loads(raw)
            except ValueError:
                top.call.name = None
        elif self._string_role == "args":
            self._args_end(pos)
        self._string_role = None

    # -- what was read ---------------------------------------------------------------
    def args_text(self, call: PartialCall) -> str:
        """The arguments' raw text generated so far ('' before they start)."""
        if call.args_start is None:
            return ""
        end = call.args_end if call.args_end is not None else len(self.text)
        return self.text[call.args_start:end]

    def complete(self, call: PartialCall, names: set[str]) -> dict[str, Any] | None:
        """The OpenAI tool call, if this one is whole and valid: a known name and
        arguments that are a JSON object (or a string holding one)."""
        if not call.done or call.name not in names or call.args_end is None:
            return None
        raw = self.args_text(call).strip()
        try:
            value = json.loads(raw)
            if call.args_is_string:
                raw = value
                value = json.loads(value)
        except (ValueError, TypeError):
            return None
        if not isinstance(value, dict):
            return None
        return {"id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": raw}}

    def named(self, names: set[str]) -> list[PartialCall]:
        """Calls whose name is known and offered (complete or not)."""
        return [c for c in self.calls if c.name in names]


def same_call(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two calls of one function with equal arguments (as JSON values)."""
    if a["function"]["name"] != b["function"]["name"]:
        return False
    try:
        return json.loads(a["function"]["arguments"]) == json.loads(b["function"]["arguments"])
    except ValueError:
        return a["function"]["arguments"] == b["function"]["arguments"]
