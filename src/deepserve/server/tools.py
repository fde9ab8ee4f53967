"""Tool calling: tools into the prompt, tool calls out of the generated text.

Three output formats, picked from the chat template:

- ``hermes`` (templates that write ``<tool_call>``: Qwen2.5, Hermes):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call;
- ``llama3`` (templates with ``<|python_tag|>``/ipython: Llama 3.1+):
  ``{"name": ..., "parameters": {...}}``;
- ``generic``, for templates without tool support (the default SmolLM2): the tool
  schemas go into a system preamble, and the model answers
  ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``.

Templates that take ``tools`` get them natively, with earlier calls and tool results
in the history as the template expects them. ``tool_choice: "required"`` or a named
function constrains the output with a grammar (llguidance), so the call always parses
and its arguments always validate against the tool's JSON schema.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from deepserve.errors import DeepserveError
from deepserve.protocol.models import ChatCompletionRequest
from deepserve.server.tool_stream import CallScanner

logger = logging.getLogger(__name__)

GENERIC_PREAMBLE = (
    "You can call the tools listed below. To call one or more of them, reply with only a "
    "JSON object of this form and nothing else:\n"
    '{{"tool_calls": [{{"name": "<tool name>", "arguments": {{<the arguments, as the '
    'tool\'s parameters describe them>}}}}]}}\n{rule}Tools:\n{tools}')


# A forced call is one JSON object without optional whitespace (fewer tokens), and
# at most this many calls in one turn (small models otherwise repeat calls until the
# token limit cuts the JSON).
COMPACT = {"x-guidance": {"whitespace_flexible": False}}
MAX_PARALLEL_CALLS = 8


@dataclass
class ToolPlan:
    """How one request's tools are offered and read back."""

    tools: list[dict[str, Any]]  # the OpenAI tool objects
    choice: str  # auto | required | named
    name: str | None  # the function a named tool_choice asks for
    parallel: bool
    fmt: str  # generic | hermes | llama3
    native: bool  # the chat template takes ``tools`` itself

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")


def tool_format(template: str | None) -> tuple[str, bool]:
    """(output format, whether the template renders tools) for a chat template."""
    template = template or ""
    native = re.search(r"\btools\b", template) is not None
    if "<tool_call>" in template:
        return "hermes", native
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3", native
    return "generic", False


def plan_tools(req: ChatCompletionRequest, template: str | None) -> ToolPlan | None:
    """The request's tool plan, or None when no tool may be called. Raises 400s."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise DeepserveError("tool_choice needs tools; send the tools the model may call",
                                 param="tool_choice")
        return None
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise DeepserveError("tools have duplicate function names; give each a unique name",
                             param="tools")
    name = None
    if choice is None or choice == "auto":
        kind = "auto"
    elif choice == "none":
        return None
    elif choice == "required":
        kind = "required"
    else:
        kind, name = "named", choice.function.name
        if name not in names:
            raise DeepserveError(f"tool_choice names function {name!r}, which is not among "
                                 f"the tools ({', '.join(names)})", param="tool_choice")
    from deepserve.engine.structured import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, json_depth

    for i, t in enumerate(req.tools):
        size = len(json.dumps(t.function.parameters))
        if size > MAX_SCHEMA_BYTES:
            raise DeepserveError(f"tools[{i}].function.parameters is {size} bytes; at most "
                                 f"{MAX_SCHEMA_BYTES} are allowed: shorten it",
                                 param=f"tools[{i}].function.parameters")
        depth = json_depth(t.function.parameters)
        if depth > MAX_SCHEMA_DEPTH:
            raise DeepserveError(f"tools[{i}].function.parameters is nested {depth} levels "
                                 f"deep; at most {MAX_SCHEMA_DEPTH} are allowed: flatten it",
                                 param=f"tools[{i}].function.parameters")
    fmt, native = tool_format(template)
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    parallel = req.parallel_tool_calls is not False and kind != "named"
    return ToolPlan(tools, kind, name, parallel, fmt, native)


def _arguments(call: Any) -> dict[str, Any] | str:
    try:
        value = json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments
    return value if isinstance(value, dict) else call.function.arguments


def render_history(req: ChatCompletionRequest, plan: ToolPlan | None,
                   template: str | None) -> list[dict[str, Any]]:
    """Chat messages for the template, with earlier tool calls and results in them: as
    the template expects them where it supports tools, else as plain text."""
    native = tool_format(template)[1]
    calls_by_id: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text":
                    raise DeepserveError(f"messages[{i}].content has a part of type "
                                         f"{part.get('type')!r}; this model takes text only",
                                         param=f"messages[{i}].content")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        content = content or ""
        if m.tool_calls and m.role != "assistant":
            raise DeepserveError(f"messages[{i}] has tool_calls but role {m.role!r}; only "
                                 "assistant messages carry tool calls",
                                 param=f"messages[{i}].tool_calls")
        if m.role == "tool":
            if not m.tool_call_id:
                raise DeepserveError(f"messages[{i}] has role 'tool' but no tool_call_id; "
                                     "give the id of the call it answers",
                                     param=f"messages[{i}].tool_call_id")
            name = calls_by_id.get(m.tool_call_id, m.name or "")
            if native:
                out.append({"role": "tool", "content": content, "tool_call_id":
                            m.tool_call_id, "name": name})
            else:
                out.append({"role": "user", "content": f"Result of tool call "
                            f"{m.tool_call_id} ({name}): {content}"})
            continue
        msg: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name  # for templates that render speaker names
        if m.tool_calls:
            for c in m.tool_calls:
                calls_by_id[c.id] = c.function.name
            if native:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c)}}
                    for c in m.tool_calls]
            else:
                calls = [{"name": c.function.name, "arguments": _arguments(c)}
                         for c in m.tool_calls]
                msg["content"] = (content + "\n" if content else "") + json.dumps(
                    {"tool_calls": calls}, ensure_ascii=False)
        out.append(msg)
    if plan is not None and not plan.native:
        rule = ""
        if plan.choice == "required":
            rule = "You must call at least one tool.\n"
        elif plan.choice == "named":
            rule = f"You must call the tool {plan.name}.\n"
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in plan.tools)
        preamble = GENERIC_PREAMBLE.format(rule=rule, tools=listing)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = out[0] | {"content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def _call_schema(tool: dict[str, Any], key: str) -> dict[str, Any]:
    fn = tool["function"]
    params = dict(fn.get("parameters") or {"type": "object", "properties": {}})
    if "properties" in params and "additionalProperties" not in params:
        # Only the declared arguments (as OpenAI's strict mode): still valid against the
        # tool's own schema, and a small model cannot ramble on with invented keys.
        params["additionalProperties"] = False
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, key: params},
            "required": ["name", key], "additionalProperties": False}


def constraint(plan: ToolPlan) -> tuple[str, Any] | None:
    """The grammar that forces a call for ``required`` and named tool_choice."""
    if not plan.forced:
        return None
    tools = [t for t in plan.tools if plan.choice != "named"
             or t["function"]["name"] == plan.name]
    if plan.fmt == "llama3":
        return ("json", {"anyOf": [_call_schema(t, "parameters") for t in tools]} | COMPACT)
    one = {"anyOf": [_call_schema(t, "arguments") for t in tools]}
    if plan.fmt == "hermes":
        block = '"<tool_call>\\n" %json ' + json.dumps(one) + ' "\\n</tool_call>"'
        more = f' ("\\n" call)~0..{MAX_PARALLEL_CALLS - 1}' if plan.parallel else ""
        return ("grammar", f"start: call{more}\ncall: {block}")
    calls: dict[str, Any] = {"type": "array", "items": one, "minItems": 1,
                             "maxItems": MAX_PARALLEL_CALLS if plan.parallel else 1}
    return ("json", {"type": "object", "properties": {"tool_calls": calls},
                     "required": ["tool_calls"], "additionalProperties": False} | COMPACT)


def read_calls(scanner: CallScanner, plan: ToolPlan, text: str
               ) -> tuple[str | None, list[dict[str, Any]], bool]:
    """(content, complete calls, whether the text is in the call format) of a scanned
    output. A call cut short (by max_tokens) is dropped and logged; the text of the
    format itself never becomes content."""
    names = plan.names
    named = scanner.named(names)
    calls = [c for c in (scanner.complete(p, names) for p in named) if c is not None]
    if len(calls) < len(named):
        logger.info("dropped %d incomplete tool call(s) of %d (the output was cut before "
                    "they closed)", len(named) - len(calls), len(named))
    if not named:
        return text, [], False
    content = None
    if "<tool_call>" in text:
        rest = re.sub(r"<tool_call>.*?(</tool_call>|$)", "", text.strip(), flags=re.S)
        content = rest.strip() or None
    return content, calls, True


def parse_tool_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) from a finished output; plain text -> (text, [])."""
    scanner = CallScanner()
    scanner.feed(text)
    content, calls, _ = read_calls(scanner, plan, text)
    return content, calls


def may_be_a_call(text: str) -> bool | None:
    """While streaming under tool_choice auto: True if the output so far may be a tool
    call (hold it back), False if it is plain text, None if too early to tell."""
    head = text.lstrip()
    if not head:
        return None
    if head[0] in "{[":
        return True
    for tag in ("<tool_call>", "<|python_tag|>"):
        if head.startswith(tag) or tag.startswith(head):
            return True if head.startswith(tag) else None
    return False


