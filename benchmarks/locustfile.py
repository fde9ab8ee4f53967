"""Locust load for an OpenAI-compatible server (deepserve or any other).

    pip install locust
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 \
        --users 8 --spawn-rate 8 --run-time 60s --headless

Each user streams chat completions from the shipped chat prompt set and reports time
to first token as its own request type ("TTFT"), next to the whole request.
"""

from __future__ import annotations

import json
import random
import time

from locust import HttpUser, between, task

from deepserve.bench.workloads import chat_prompts

PROMPTS = [p["prompt"] for p in chat_prompts()]


class ChatUser(HttpUser):
    wait_time = between(0.0, 0.5)

    @task
    def chat(self) -> None:
        body = {"messages": [{"role": "user", "content": random.choice(PROMPTS)}],
                "max_tokens": 64, "stream": True}
        start = time.perf_counter()
        first = None
        with self.client.post("/v1/chat/completions", json=body, stream=True,
                              catch_response=True, name="chat (stream)") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            for line in resp.iter_lines():
                if not line or not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if first is None and event.get("choices"):
                    first = time.perf_counter() - start
                    self.environment.events.request.fire(
                        request_type="TTFT", name="chat", response_time=first * 1000,
                        response_length=0, exception=None, context={})
            resp.success()
