"""Workloads: random-token prompts, a shared-prefix workload, and a chat prompt set."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass
class BenchRequest:
    """One request of a workload: a prompt (text) or chat messages, and its output length."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    max_tokens: int
    prompt_len: int | None = None  # tokens by the workload's tokenizer, when known


def _lengths(rng: random.Random, n: int, mean: int, spread: float) -> list[int]:
    """Uniform in [mean*(1-spread), mean*(1+spread)], at least 1."""
    lo, hi = max(1, int(mean * (1 - spread))), max(1, int(mean * (1 + spread)))
    return [rng.randint(lo, hi) for _ in range(n)]


def _random_text(tokenizer: Any, rng: random.Random, length: int) -> tuple[str, int]:
    special = set(tokenizer.all_special_ids)
    ids = [rng.randrange(1000, min(len(tokenizer), 40000)) for _ in range(length)]
    ids = [i for i in ids if i not in special]
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def random_workload(tokenizer: Any, n: int, input_len: int, output_len: int,
                    spread: float = 0.0, seed: int = 0) -> list[BenchRequest]:
    """Prompts of random tokens (decoded to text) with set input and output lengths."""
    rng = random.Random(seed)
    ins = _lengths(rng, n, input_len, spread)
    outs = _lengths(rng, n, output_len, spread)
    reqs = []
    for i, o in zip(ins, outs, strict=True):
        text, count = _random_text(tokenizer, rng, i)
        reqs.append(BenchRequest(text, None, o, count))
    return reqs


def shared_prefix_workload(tokenizer: Any, n: int, prefix_len: int, suffix_len: int,
                           output_len: int, num_prefixes: int = 1,
                           seed: int = 0) -> list[BenchRequest]:
    """Many requests sharing a long system prompt (the prefix cache's case)."""
    rng = random.Random(seed)
    prefixes = [_random_text(tokenizer, rng, prefix_len)[0] for _ in range(num_prefixes)]
    reqs = []
    for i in range(n):
        suffix, _ = _random_text(tokenizer, rng, suffix_len)
        prompt = prefixes[i % num_prefixes] + "\n\nQuestion: " + suffix
        reqs.append(BenchRequest(prompt, None, output_len,
                                 len(tokenizer.encode(prompt, add_special_tokens=False))))
    return reqs


def chat_prompts() -> list[dict[str, Any]]:
    """The chat prompt set shipped with deepserve (written for it, Apache-2.0)."""
    text = resources.files("deepserve.bench").joinpath("chat_prompts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def chat_workload(n: int, output_len: int, seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    items = chat_prompts()
    picks = [items[rng.randrange(len(items))] for _ in range(n)]
    return [BenchRequest(None, [{"role": "user", "content": p["prompt"]}],
                         int(p.get("max_tokens", output_len))) for p in picks]


def file_workload(path: str, output_len: int) -> list[BenchRequest]:
    """A prompts file: one prompt per line, or JSONL with "prompt" (and "max_tokens")."""
    reqs = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            item = json.loads(line)
            reqs.append(BenchRequest(item["prompt"], None,
                                     int(item.get("max_tokens", output_len))))
        else:
            reqs.append(BenchRequest(line, None, output_len))
    return reqs
