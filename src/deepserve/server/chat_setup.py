"""A chat request -> what the engine runs: the tool plan, the messages as the chat
template takes them, the template's options, and the sampling parameters.

Chat completions, the Responses API and ``/tokenize`` all go through ``chat_setup``, so
the prompt ``/tokenize`` counts is the prompt chat runs.

``reasoning_effort`` switches the template's thinking where the template has a switch
(``enable_thinking``, as Qwen3's; ``thinking``, as DeepSeek-V3.1's): ``none`` and
``minimal`` turn thinking off, the others on. ``chat_template_kwargs`` still win.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from deepserve.protocol.models import ChatCompletionRequest, check_metadata
from deepserve.sampling_params import SamplingParams
from deepserve.server.params import sampling_params
from deepserve.server.tools import ToolPlan, constraint, plan_tools, render_history

THINKING_SWITCHES = ("enable_thinking", "thinking")


def thinking_switch(template: str | None) -> str | None:
    """The chat template's variable that turns thinking on or off, if it has one."""
    for name in THINKING_SWITCHES:
        if template and re.search(rf"\b{name}\b\s*(is\s+defined|is\s+not\s+defined|==|"
                                  rf"\)|%\}}|and|or|else)", template):
            return name
    return None


@dataclass
class ChatSetup:
    plan: ToolPlan | None
    params: SamplingParams
    messages: list[dict[str, Any]]
    options: dict[str, Any]  # for the chat template


def template_options(req: ChatCompletionRequest, plan: ToolPlan | None,
                     template: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {"add_generation_prompt": req.add_generation_prompt}
    switch = thinking_switch(template)
    if switch and req.reasoning_effort is not None:
        options[switch] = req.reasoning_effort not in ("none", "minimal")
    options.update(req.chat_template_kwargs or {})
    if plan is not None and plan.native:
        options["tools"] = plan.tools
    return options


def chat_setup(req: ChatCompletionRequest, template: str | None,
               default_max_tokens: int | None = None) -> ChatSetup:
    """Raises DeepserveError (400) naming the field for what cannot run."""
    check_metadata(req.metadata)
    plan = plan_tools(req, template)
    params = sampling_params(req, default_max_tokens, constraint(plan) if plan else None)
    messages = render_history(req, plan, template)
    return ChatSetup(plan, params, messages, template_options(req, plan, template))
