"""Tenant isolation and fault isolation inside the engine: digest-checked prefix cache,
cache salts, and one failing request never stopping the others."""

from __future__ import annotations

import asyncio

import pytest

from deepserve import DeepserveError, SamplingParams
from deepserve.engine.async_engine import AsyncEngine, RequestFailedError
from deepserve.engine.block_manager import BlockManager
from deepserve.engine.sequence import Sequence

_ids = iter(range(10**6))


def seq(tokens, salt=None):
    s = Sequence(next(_ids), f"r{next(_ids)}", 0, list(tokens), SamplingParams(), 0.0)
    s.cache_salt = salt
    return s


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    assert bm.ensure(s, s.num_tokens)
    s.num_computed = s.num_tokens
    bm.register_computed(s)
    return s


def test_colliding_digests_never_serve_another_prompts_blocks():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    bm.digest = lambda parent, tokens: b"same"  # every block collides
    a = computed(bm, seq(range(12)))
    b = seq([50, 51, 52, 53, 54, 55, 56, 57, 58])
    assert bm.match_prefix(b) == 0 and b.block_table == []  # digest hit, tokens differ
    # The same tokens are still found: the check is on content, not only on the digest.
    c = seq(list(range(9)))
    assert bm.match_prefix(c) == 4  # first block; the second's digest is held by block 0
    assert c.block_table == a.block_table[:1]


def test_child_of_an_evicted_parent_is_not_reused():
    bm = BlockManager(num_blocks=2, block_size=2, enable_prefix_caching=True)
    bm.digest = lambda parent, tokens: bytes(tokens)  # ignores the parent: collides on it
    a = computed(bm, seq([1, 2, 3, 4]))  # block x = [1,2] -> block y = [3,4]
    x, y = a.block_table
    bm.free(a)
    bm.evictable.move_to_end(y)  # the parent is now the least recently used
    c = computed(bm, seq([7, 7]))  # evicts x and reuses it for [7,7]
    assert c.block_table == [x]
    bm.free(c)
    # [7,7] is found in block x; [3,4] in block y was computed after [1,2], not [7,7].
    assert bm.match_prefix(seq([7, 7, 3, 4, 5])) == 2


def test_salts_share_nothing_and_same_salt_shares():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    prompt = list(range(13))
    computed(bm, seq(prompt, salt="tenant-a"))
    assert bm.match_prefix(seq(prompt, salt="tenant-b")) == 0
    assert bm.match_prefix(seq(prompt)) == 0
    assert bm.match_prefix(seq(prompt, salt="tenant-a")) == 12


def test_all_colliding_hashes_still_give_the_right_tokens(tiny_llm):
    engine = tiny_llm.engine
    prompts = [list(range(100, 140)), list(range(200, 240)), list(range(100, 120)) +
               list(range(300, 320))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    clean = [o.token_ids for o in tiny_llm.generate(prompts, params)]
    bm = engine.block_manager
    saved = bm.digest
    bm.digest = lambda parent, tokens: b"x" * 32
    try:
        for _ in range(2):  # the second round finds whatever the first one cached
            assert [o.token_ids for o in tiny_llm.generate(prompts, params)] == clean
    finally:
        bm.digest = saved


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny_llm):
    engine = AsyncEngine(engine=tiny_llm.engine)
    runner = tiny_llm.engine.runner
    real = runner.execute
    calls = {"n": 0}

    def broken_once(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel fault")
        return real(items)

    async def one(prompt):
        outs = [o async for o in engine.generate(prompt, SamplingParams(max_tokens=4,
                                                                        temperature=0))]
        return outs[-1]

    runner.execute = broken_once
    try:
        with pytest.raises(RequestFailedError) as info:
            asyncio.run(one([5, 6, 7]))
        assert info.value.status == 500 and "simulated kernel fault" in info.value.message
        out = asyncio.run(one([5, 6, 7]))  # the engine still serves
        assert out.finished and len(out.token_ids) == 4
        assert engine.dead is None
    finally:
        runner.execute = real
        engine.shutdown()
    assert tiny_llm.engine.stats()["kv_blocks_used"] == 0


def test_one_requests_bad_token_fails_only_that_request(tiny_llm):
    eng = tiny_llm.engine
    real = eng._append

    def append(seq, token, now):
        if seq.request_id == "bad":
            raise ValueError("bad state in one request")
        return real(seq, token, now)

    eng._append = append
    try:
        eng.add_request("bad", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0))
        eng.add_request("good", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0))
        done = {}
        failed = {}
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out
            failed.update(eng.pop_failures())
        assert set(failed) == {"bad"} and "good" in done
        assert len(done["good"].token_ids) == 3
    finally:
        del eng._append
    assert eng.stats()["kv_blocks_used"] == 0


def test_seed_outside_64_bits_is_a_clear_error_and_wraps_inside(tiny_llm):
    with pytest.raises(DeepserveError, match="64 bits"):
        SamplingParams(seed=2**70)
    params = SamplingParams(n=2, seed=2**64 - 1, max_tokens=3)  # seed + 1 wraps to 0
    out = tiny_llm.generate([[1, 2, 3]], params)[0]
    assert [len(o.token_ids) for o in out.outputs] == [3, 3]
