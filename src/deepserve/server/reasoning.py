"""Reasoning output: text inside ``<think>...</think>`` goes to ``reasoning_content``.

``--reasoning-parser deepseek_r1`` (or a chat template that writes ``<think>``) turns it
on. The parser is fed the generated text piece by piece, as it streams, and splits it
into reasoning and answer; a tag cut across two pieces is held back until it is whole.

Where the reasoning starts: after a ``<think>`` at the very start of the output, or at
once when the prompt itself ends inside ``<think>`` (templates that open the block for
the model). Without a closing tag, everything after the opening is reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

REASONING_PARSERS = ("deepseek_r1",)
OPEN, CLOSE = "<think>", "</think>"


def template_thinks(template: str | None) -> bool:
    """A chat template that uses <think> blocks (DeepSeek-R1 and its distills, Qwen3)."""
    return bool(template) and CLOSE in template


def prompt_opens_thinking(prompt: str) -> bool:
    """The rendered prompt ends inside an open <think> block."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """Incremental <think> splitter for one choice."""

    def __init__(self, starts_inside: bool = False) -> None:
        self.state = "reasoning" if starts_inside else "start"
        self.pending = ""  # text that may be the start of a tag
        self.trim = False
        self.reasoning = ""
        self.content = ""

    def feed(self, text: str, final: bool = False) -> Split:
        """Split the next piece of text; ``final`` flushes what was held back."""
        out = Split()
        buf = self.pending + text
        self.pending = ""
        while buf:
            if self.state == "start":
                stripped = buf.lstrip()
                if not stripped:
                    self.pending = buf
                    buf = ""
                    break
                if stripped.startswith(OPEN):
                    self.state = "reasoning"
                    buf = stripped[len(OPEN):]
                    continue
                if OPEN.startswith(stripped) and not final:
                    self.pending = buf  # maybe "<thi": wait for more
                    buf = ""
                    break
                self.state = "content"
                continue
            if self.state == "reasoning":
                at = buf.find(CLOSE)
                if at >= 0:
                    out.reasoning += buf[:at]
                    self.state = "content"
                    self.trim = True  # the newlines after </think> belong to neither part
                    buf = buf[at + len(CLOSE):]
                    continue
                keep = 0 if final else _partial_suffix(buf, CLOSE)
                out.reasoning += buf[:len(buf) - keep]
                self.pending = buf[len(buf) - keep:]
                buf = ""
                break
            if self.trim:
                buf = buf.lstrip("\n")
                if not buf:
                    break
                self.trim = False
            out.content += buf
            buf = ""
        if final and self.pending:
            if self.state == "reasoning":
                out.reasoning += self.pending
            else:
                out.content += self.pending
            self.pending = ""
        self.reasoning += out.reasoning
        self.content += out.content
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def split_reasoning(text: str, starts_inside: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole output."""
    p = ReasoningParser(starts_inside)
    p.feed(text, final=True)
    return (p.reasoning if p.state != "start" and (p.reasoning or starts_inside or
                                                   OPEN in text) else None), p.content
