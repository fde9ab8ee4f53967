"""The Responses API's streamed events, made from chat chunks (see ``responses``)."""

from __future__ import annotations

import json
from typing import Any

from deepserve.server.responses import (
    _id,
    chat_logprobs_to_output,
    finish,
    message_item,
    reasoning_item,
)


class EventStream:
    """Chat chunks -> the Responses API's typed SSE events."""

    def __init__(self, body: dict[str, Any], max_tool_calls: int | None) -> None:
        self.body = body
        self.seq = 0
        self.output: list[dict[str, Any]] = []  # finished items, in order
        self.open: dict[str, Any] | None = None  # the item being generated
        self.text = ""
        self.logprobs: list[Any] = []
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> item
        self.max_tool_calls = max_tool_calls

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def start(self) -> list[str]:
        return [self.event("response.created", response=self.body),
                self.event("response.in_progress", response=self.body)]

    def _index(self) -> int:
        return len(self.output)

    def _open(self, item: dict[str, Any]) -> list[str]:
        out = self.close()
        self.open = item
        self.text = ""
        out.append(self.event("response.output_item.added", output_index=self._index(),
                              item=item | ({"content": []} if item["type"] != "function_call"
                                           else {}) | {"status": "in_progress"}))
        if item["type"] == "message":
            out.append(self.event("response.content_part.added", item_id=item["id"],
                                  output_index=self._index(), content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": [],
                                        "logprobs": []}))
        return out

    def close(self, status: str = "completed") -> list[str]:
        """Finish the open item (its done events); it joins the output."""
        item, self.open = self.open, None
        if item is None:
            return []
        at = self._index()
        out = []
        if item["type"] == "message":
            item = message_item(self.text, item["id"], status, self.logprobs)
            part = item["content"][0]
            out += [self.event("response.output_text.done", item_id=item["id"],
                               output_index=at, content_index=0, text=self.text,
                               logprobs=self.logprobs),
                    self.event("response.content_part.done", item_id=item["id"],
                               output_index=at, content_index=0, part=part)]
        elif item["type"] == "reasoning":
            item = reasoning_item(self.text, item["id"], status)
            out.append(self.event("response.reasoning_text.done", item_id=item["id"],
                                  output_index=at, content_index=0, text=self.text))
        else:
            item = item | {"arguments": self.text, "status": status}
            out.append(self.event("response.function_call_arguments.done",
                                  item_id=item["id"], output_index=at, name=item["name"],
                                  arguments=self.text))
        out.append(self.event("response.output_item.done", output_index=at, item=item))
        self.output.append(item)
        return out

    def feed(self, chunk: dict[str, Any]) -> list[str]:
        out: list[str] = []
        for choice in chunk["choices"]:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self.open is None or self.open["type"] != "reasoning":
                    out += self._open(reasoning_item("", status="in_progress"))
                self.text += delta["reasoning_content"]
                out.append(self.event("response.reasoning_text.delta",
                                      item_id=self.open["id"],  # type: ignore[index]
                                      output_index=self._index(), content_index=0,
                                      delta=delta["reasoning_content"]))
            if delta.get("content"):
                if self.open is None or self.open["type"] != "message":
                    out += self._open(message_item("", status="in_progress"))
                lps = chat_logprobs_to_output(choice.get("logprobs"))
                self.logprobs += lps
                self.text += delta["content"]
                out.append(self.event("response.output_text.delta",
                                      item_id=self.open["id"],  # type: ignore[index]
                                      output_index=self._index(), content_index=0,
                                      delta=delta["content"], logprobs=lps))
            for call in delta.get("tool_calls") or []:
                k = call["index"]
                if self.max_tool_calls is not None and k >= self.max_tool_calls:
                    continue
                if "id" in call:
                    item = {"type": "function_call", "id": _id("fc"), "call_id": call["id"],
                            "name": call["function"]["name"], "arguments": ""}
                    self.calls[k] = item
                    out += self._open(item)
                piece = call.get("function", {}).get("arguments")
                if piece and self.open is not None and self.open is self.calls.get(k):
                    self.text += piece
                    out.append(self.event("response.function_call_arguments.delta",
                                          item_id=self.open["id"],
                                          output_index=self._index(), delta=piece))
        return out

    def end(self, final_calls: list[dict[str, Any]], finish_reason: str | None,
            usage: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """Close what is open and send the final response (only complete calls in it)."""
        keep = {c["id"] for c in final_calls}
        status = "incomplete" if (self.open is not None and self.open["type"] ==
                                  "function_call" and self.open["call_id"] not in keep) \
            else "completed"
        out = self.close(status)
        output = [i for i in self.output if i["type"] != "function_call"
                  or i["call_id"] in keep]
        final = finish(self.body, output, finish_reason, usage)
        kind = "response.incomplete" if final["status"] == "incomplete" else \
            "response.completed"
        out.append(self.event(kind, response=final))
        return out, final
