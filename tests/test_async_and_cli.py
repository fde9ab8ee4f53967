"""AsyncEngine (streaming, abort) and the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from deepserve import SamplingParams
from deepserve.engine.async_engine import AsyncEngine


def test_async_engine_streams_concurrently_and_aborts(tiny_llm):
    engine = AsyncEngine(engine=tiny_llm.engine)

    async def full(prompt: str) -> list[int]:
        last = None
        async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=8,
                                                                ignore_eos=True)):
            assert last is None or len(out.token_ids) >= len(last.token_ids)
            last = out
        assert last is not None and last.finished
        return last.token_ids

    async def abandon() -> None:
        gen = engine.generate("abandon me", SamplingParams(max_tokens=400, ignore_eos=True))
        async for _ in gen:
            break
        await gen.aclose()

    async def main():
        results = await asyncio.gather(*(full(p) for p in ["one", "two", "three", "four"]),
                                       abandon())
        await asyncio.sleep(0.3)
        return results

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    offline = tiny_llm.generate(["one", "two", "three", "four"],
                                SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert results[:4] == [o.token_ids for o in offline]
    assert tiny_llm.engine.stats()["kv_blocks_used"] == 0
    assert not tiny_llm.engine.has_unfinished()


def test_async_engine_hands_a_steps_outputs_over_in_one_wake_up(tiny_llm):
    """Six streams decoding together: every output arrives, in order and as offline
    greedy decoding gives it, while the engine thread wakes the event loop about once a
    step, not once an output (each wake-up is a cross-thread call and a write to the
    loop's self-pipe)."""
    engine = AsyncEngine(engine=tiny_llm.engine)
    prompts = ["one", "two", "three", "four", "five", "six"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    received = []

    async def full(prompt: str) -> list[int]:
        last = None
        async for out in engine.generate(prompt, params):
            received.append(out)
            assert last is None or out.token_ids[:len(last.token_ids)] == last.token_ids
            last = out
        assert last is not None and last.finished
        return last.token_ids

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            wakeups.append(args[0])
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counted
        return await asyncio.gather(*(full(p) for p in prompts)), wakeups

    try:
        results, wakeups = asyncio.run(main())
    finally:
        engine.shutdown()
    offline = tiny_llm.generate(prompts, params)
    assert results == [o.token_ids for o in offline]
    assert len(received) >= 6 * 8
    assert 0 < len(wakeups) <= len(received) // 2, (len(wakeups), len(received))


def test_a_request_whose_event_loop_closed_is_aborted_and_the_engine_goes_on(tiny_llm):
    """A caller's event loop closes with its request still generating (the generator is
    never closed, so no abort comes): the engine thread cannot hand it anything more. It
    aborts that request, frees its blocks and serves the next request from another loop."""
    engine = AsyncEngine(engine=tiny_llm.engine)
    orphan_loop = asyncio.new_event_loop()

    async def first_output():
        gen = engine.generate("left behind", SamplingParams(max_tokens=400, ignore_eos=True),
                              request_id="orphan")
        return gen, await gen.__anext__()

    gen, first = orphan_loop.run_until_complete(first_output())
    orphan_loop.close()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def full() -> list[int]:
        last = None
        async for out in engine.generate("one", params):
            last = out
        return last.token_ids

    try:
        got = asyncio.run(asyncio.wait_for(full(), 60))
        assert "orphan" not in tiny_llm.engine.requests  # aborted, not left to run to 400
        deadline = time.monotonic() + 30
        while tiny_llm.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        engine.shutdown()
    assert not first.finished and engine.dead is None
    assert got == tiny_llm.generate(["one"], params)[0].token_ids
    assert tiny_llm.engine.stats()["kv_blocks_used"] == 0
    del gen


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepserve.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_generate_json_matches_offline(llm_bf16):
    proc = _cli("generate", "The capital of France is", "--max-tokens", "8", "--json",
                "--kv-cache-memory", "64MiB", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    offline = llm_bf16.generate("The capital of France is",
                                SamplingParams(temperature=0, max_tokens=8))[0]
    assert data["token_ids"] == offline.token_ids
    assert data["text"] == offline.text and data["completion_tokens"] == 8
    assert "KV cache" in proc.stderr and "tokens" in proc.stderr


def test_cli_errors_are_clear(tmp_path):
    proc = _cli("generate", "hi", "--model", str(tmp_path / "missing.gguf"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("generate", "hi", "--temperature", "-1", "--kv-cache-memory", "64MiB")
    assert proc.returncode == 2 and "temperature" in proc.stderr


def test_cli_chat_streams_a_reply():
    proc = subprocess.run([sys.executable, "-m", "deepserve.cli", "chat", "--max-tokens", "16",
                           "--kv-cache-memory", "64MiB"],
                          input="Name the capital city of France.\n\n", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
