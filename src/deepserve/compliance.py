"""A compliance filter plugin: refuses requests whose text matches configured patterns
(400 naming the rule; the ledger records the refusal and why).

    deepserve serve --plugin deepserve.compliance:ComplianceFilter --plugin-config p.toml

    # p.toml
    [compliance]
    rules = [
      { name = "card-number", pattern = '\\b(?:\\d[ -]?){13,16}\\b' },
      { name = "internal", pattern = "(?i)project nightingale" },
    ]
    # or plain patterns, named by their position: patterns = ["(?i)secret"]

Every text a request carries is checked: message contents (text parts too), the
prompt, and tool-call arguments.
"""

from __future__ import annotations

import re
from typing import Any

from deepserve.errors import DeepserveError
from deepserve.plugins import PluginRequest, Rejected


class ComplianceFilter:
    """Refuses requests whose text matches any rule."""

    name = "compliance"

    def __init__(self, settings: dict[str, Any]) -> None:
        rules = list(settings.get("rules", []))
        rules += [{"name": f"patterns[{i}]", "pattern": p}
                  for i, p in enumerate(settings.get("patterns", []))]
        if not rules:
            raise DeepserveError("the compliance filter has no rules: give [compliance] "
                                 "rules = [{name = ..., pattern = ...}] or patterns = [...] "
                                 "in --plugin-config", param="plugin_config")
        self.rules: list[tuple[str, re.Pattern[str]]] = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict) or "pattern" not in rule:
                raise DeepserveError(f"compliance rules[{i}] needs a pattern",
                                     param="plugin_config")
            try:
                self.rules.append((str(rule.get("name", f"rules[{i}]")),
                                   re.compile(str(rule["pattern"]))))
            except re.error as exc:
                raise DeepserveError(f"compliance rule {rule.get('name', i)!r}: pattern "
                                     f"{rule['pattern']!r} is not a valid regular expression "
                                     f"({exc})", param="plugin_config") from None

    def before_request(self, req: PluginRequest) -> None:
        text = "\n".join(_texts(req.body))
        for name, pattern in self.rules:
            if pattern.search(text):
                raise Rejected(f"request refused by the compliance filter: its text matches "
                               f"rule {name!r}; remove that content and send it again",
                               reason=f"compliance rule {name!r} ({pattern.pattern})",
                               code="compliance_rejected")


def _texts(body: dict[str, Any]) -> list[str]:
    out: list[str] = []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        out.append(prompt)
    elif isinstance(prompt, list):
        out += [p for p in prompt if isinstance(p, str)]
    for m in body.get("messages") or []:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [str(part.get("text", "")) for part in content if isinstance(part, dict)]
        for call in m.get("tool_calls") or []:
            if isinstance(call, dict):
                out.append(str((call.get("function") or {}).get("arguments", "")))
    return out
