"""Block manager, scheduler, sampler and detokenizer, through small real objects."""

from __future__ import annotations

import itertools

import pytest
import torch

from deepserve import DeepserveError, SamplingParams
from deepserve.engine.block_manager import BlockManager
from deepserve.engine.detokenizer import IncrementalDetokenizer
from deepserve.engine.sampler import Sampler
from deepserve.engine.scheduler import Scheduler
from deepserve.engine.sequence import Sequence

_ids = iter(range(10**6))


def seq(tokens, **params):
    return Sequence(next(_ids), f"r{next(_ids)}", 0, list(tokens), SamplingParams(**params), 0.0)


# -- block manager ------------------------------------------------------------------------------
def test_blocks_allocate_free_and_refcount():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = seq(range(6))
    assert bm.ensure(a, 6) and len(a.block_table) == 2
    b = seq(range(10))
    assert not bm.ensure(b, 12) and b.block_table == []  # all-or-nothing
    assert bm.ensure(b, 8)
    assert bm.num_free == 0
    bm.free(a)
    assert bm.num_free == 2 and a.block_table == []


def test_prefix_cache_shares_blocks_and_evicts_lru():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    a = seq(list(range(10)))
    assert bm.match_prefix(a) == 0
    bm.ensure(a, 10)
    a.num_computed = 10
    bm.register_computed(a)  # two full blocks become findable
    b = seq([*range(8), 99, 98, 97])
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert bm.ref_count[a.block_table[0]] == 2
    # A prompt that is entirely cached still leaves its last token to compute.
    c = seq(list(range(8)))
    assert bm.match_prefix(c) == 4
    bm.free(b)
    bm.free(c)
    bm.free(a)
    assert bm.num_free == 6
    # Cached blocks survive until allocation pressure evicts them.
    d = seq(list(range(9)))
    assert bm.match_prefix(d) == 8
    bm.free(d)
    e = seq([7] * 24)
    assert bm.ensure(e, 24)  # needs all six blocks: evicts the cached ones
    assert bm.cached == {}
    bm.free(e)
    assert bm.match_prefix(seq(list(range(9)))) == 0
    assert 0 < bm.hit_rate < 1


# -- scheduler ----------------------------------------------------------------------------------
def test_scheduler_chunks_long_prompts_and_respects_budget():
    bm = BlockManager(64, 4, True)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8, enable_chunked_prefill=True)
    long, short = seq(range(20)), seq(range(100, 103))
    s.add(long)
    s.add(short)
    batch = s.schedule()
    assert [(x.seq_id, n) for x, n in batch.items] == [(long.seq_id, 8)]
    long.num_computed += 8
    batch = s.schedule()
    assert [n for _, n in batch.items] == [8]
    long.num_computed += 8
    batch = s.schedule()  # 4 left of the long prompt, then the short one fits in the budget
    assert [(x.seq_id, n) for x, n in batch.items] == [(long.seq_id, 4), (short.seq_id, 3)]


def test_scheduler_preempts_newest_when_blocks_run_out():
    bm = BlockManager(4, 4, False)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, enable_chunked_prefill=True)
    a, b = seq(range(8)), seq(range(8))
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert len(batch.items) == 2
    for x, n in batch.items:
        x.num_computed += n
        x.tokens.append(1)  # sampled a token: now needs a 3rd block each
    batch = s.schedule()
    assert batch.num_preempted == 1
    assert [x for x, _ in batch.items] == [a]
    assert b.num_computed == 0 and b.block_table == [] and s.waiting[0] is b
    assert b.tokens[-1] == 1  # output kept, recomputed later


def test_scheduler_respects_max_num_seqs_and_priority():
    bm = BlockManager(64, 4, False)
    s = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64, enable_chunked_prefill=True)
    seqs = [seq(range(3)) for _ in range(3)]
    urgent = seq(range(3))
    urgent.priority = -1
    for x in seqs:
        s.add(x)
    s.add(urgent)
    batch = s.schedule()
    assert [x for x, _ in batch.items] == [urgent, seqs[0]]


# -- sampler ------------------------------------------------------------------------------------
def _logits(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_sampler_greedy_topk_topp_minp():
    sampler = Sampler(vocab_size=5, eos_token_ids={4})
    logits = _logits([[0.0, 3.0, 1.0, 2.0, -1.0]] * 4)
    seqs = [seq([1], temperature=0), seq([1], temperature=1.0, top_k=1),
            seq([1], temperature=1.0, top_p=0.1), seq([1], temperature=1.0, min_p=0.9)]
    for _ in range(20):
        assert sampler(logits, seqs) == [1, 1, 1, 1]
    # top_k=2 only ever picks the two best tokens
    picks = {sampler(logits[:1], [seq([1], temperature=2.0, top_k=2)])[0] for _ in range(200)}
    assert picks == {1, 3}


def test_sampler_penalties_and_min_tokens():
    sampler = Sampler(vocab_size=5, eos_token_ids={4})
    s = seq([0], temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    s.tokens += [1, 1]  # output so far: token 1 twice -> 3 - 2*2 - 2 = -3
    assert sampler(_logits([[0.0, 3.0, 1.0, 2.0, -1.0]]), [s]) == [3]
    r = seq([3], temperature=0, repetition_penalty=4.0)  # prompt token 3 penalized too
    assert sampler(_logits([[0.0, 3.0, 1.0, 2.0, -1.0]]), [r]) == [1]
    r2 = seq([1], temperature=0, repetition_penalty=4.0)
    assert sampler(_logits([[0.0, 3.0, 1.0, 2.0, -1.0]]), [r2]) == [3]
    m = seq([1], temperature=0, min_tokens=2, stop_token_ids=[3])
    assert sampler(_logits([[0.0, 1.0, 1.5, 2.0, 9.0]]), [m]) == [2]


def test_sampler_seeded_rows_are_reproducible_and_logprobs():
    sampler = Sampler(vocab_size=50, eos_token_ids=set())
    logits = torch.randn(3, 50)

    def run():
        seqs = [seq([1], temperature=1.0, seed=7, logprobs=3) for _ in range(3)]
        for s in seqs:
            s.generator = torch.Generator().manual_seed(7)
        return sampler(logits, seqs), seqs

    first, seqs = run()
    second, _ = run()
    assert first == second
    lp = seqs[0].logprobs[0]
    ref = torch.log_softmax(logits[0], -1)
    assert lp.token_id == first[0] and lp.logprob == pytest.approx(float(ref[first[0]]))
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()


# -- detokenizer --------------------------------------------------------------------------------
def test_detokenizer_never_emits_half_a_character(tiny_llm):
    tok = tiny_llm.tokenizer
    text = "naïve 東京 🎉 done"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], True, [], False)
    seen = []
    for t in ids:
        d.add(t)
        seen.append(d.text)
        assert "\ufffd" not in d.text
    assert d.text == text
    assert any(a == b for a, b in itertools.pairwise(seen))  # held back mid-character at least once


def test_detokenizer_stop_strings_split_across_tokens(tiny_llm):
    tok = tiny_llm.tokenizer
    ids = tok.encode("alpha beta STOP gamma", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], True, ["STOP"], False)
    for t in ids:
        d.add(t)
        if d.stopped_on:
            break
    assert d.stopped_on == "STOP" and d.text == "alpha beta "
    d2 = IncrementalDetokenizer(tok, [], True, ["a b"], True)
    for t in tok.encode("xa bz", add_special_tokens=False):
        d2.add(t)
        if d2.stopped_on:
            break
    assert d2.text == "xa b"


# -- parameters and requests --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(n=0), "n"),
    (dict(top_k=-3), "top_k"), (dict(min_p=2), "min_p"), (dict(logprobs=50), "logprobs"),
    (dict(presence_penalty=5), "presence_penalty"), (dict(min_tokens=9, max_tokens=3),
                                                     "min_tokens"),
])
def test_bad_sampling_values_name_the_parameter(kwargs, name):
    with pytest.raises(DeepserveError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == name and name in str(err.value)


def test_bad_prompts_raise_one_error_type(tiny_llm):
    with pytest.raises(DeepserveError, match="prompt is empty"):
        tiny_llm.generate("")
    with pytest.raises(DeepserveError, match="context is 512 tokens"):
        tiny_llm.generate("word " * 600)
    with pytest.raises(DeepserveError, match="lower max_tokens"):
        tiny_llm.generate("hello", SamplingParams(max_tokens=600))
    with pytest.raises(DeepserveError, match="outside the vocabulary"):
        tiny_llm.generate([[1, 10**7]])
    assert tiny_llm.engine.stats()["kv_blocks_used"] == 0


def test_n_stop_and_max_tokens(tiny_llm):
    out = tiny_llm.generate("Hello", SamplingParams(n=3, temperature=1.0, seed=3,
                                                    max_tokens=7, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 7 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    greedy = tiny_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12,
                                                       ignore_eos=True))[0]
    stop_id = greedy.token_ids[5]
    stopped = tiny_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12,
                                                        ignore_eos=True,
                                                        stop_token_ids=[stop_id]))[0]
    first = greedy.token_ids.index(stop_id)
    assert stopped.token_ids == greedy.token_ids[:first + 1]
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == stop_id
    word = greedy.text[len(greedy.text) // 2:][:3]
    if word.strip():
        cut = tiny_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12,
                                                        ignore_eos=True, stop=[word]))[0]
        assert cut.finish_reason == "stop" and word not in cut.text
        assert greedy.text.startswith(cut.text)
    lp = tiny_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, logprobs=2))[0]
    assert len(lp.outputs[0].logprobs) == len(lp.token_ids)
    assert all(x.top[0][0] == x.token_id for x in lp.outputs[0].logprobs)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_sampler_draws_follow_the_distribution_and_skip_zero_probability(use_kernel):
    from deepserve import kernels

    if use_kernel and not kernels.available():
        pytest.skip(f"CPU kernels not built: {kernels.unavailable_reason()}")
    sampler = Sampler(vocab_size=5, eos_token_ids=set())
    sampler.use_kernel = use_kernel
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0])
    logits = probs.log().unsqueeze(0).repeat(400, 1)  # log(0) = -inf: never drawn
    seqs = [seq([1], temperature=1.0) for _ in range(400)]
    draws = []
    for _ in range(10):
        draws += sampler(logits, seqs)
    counts = torch.bincount(torch.tensor(draws), minlength=5).float() / len(draws)
    assert counts[3] == 0 and counts[4] == 0
    # 4000 draws: the standard error of each frequency is under 0.008
    assert torch.allclose(counts[:3], probs[:3], atol=0.03), counts


def test_sampler_kernel_draws_equal_the_torch_draws_for_the_same_uniforms():
    """Both paths invert the same CDF: same seeds, same tokens (long vocabulary rows)."""
    from deepserve import kernels

    if not kernels.available():
        pytest.skip(f"CPU kernels not built: {kernels.unavailable_reason()}")
    torch.manual_seed(0)
    logits = torch.randn(16, 49152) * 3
    logits[:, 7] = float("-inf")
    picks = []
    for use_kernel in (False, True):
        sampler = Sampler(vocab_size=49152, eos_token_ids=set())
        sampler.use_kernel = use_kernel
        seqs = [seq([1], temperature=0.8, seed=i) for i in range(16)]
        for i, s in enumerate(seqs):
            s.generator = torch.Generator().manual_seed(i)
        picks.append(sampler(logits, seqs))
    same = sum(a == b for a, b in zip(*picks, strict=True))
    # float32 sums in a different order can move a draw that lands on a boundary
    assert same >= 15 and 7 not in picks[1], picks


def _tenant(tokens, tenant, weight=1.0):
    s = seq(tokens, max_tokens=100)
    s.tenant, s.weight = tenant, weight
    return s


def test_a_second_tenant_gets_its_share_of_a_full_batch_at_once():
    """A hog fills the batch; a light tenant's request is admitted at the next step (the
    hog's newest sequence preempted), not after the hog's sequences finish."""
    bm = BlockManager(256, 4, False)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, enable_chunked_prefill=True)
    hog = [_tenant([1, 2, 3], "hog") for _ in range(8)]
    for h in hog:
        s.add(h)
    for _ in range(3):  # the hog alone uses every place
        for q, n in s.schedule().items:
            q.num_computed += n
            q.tokens.append(7)
    assert [q.tenant for q in s.running] == ["hog"] * 4
    light = _tenant([4, 5], "light")
    s.add(light)
    batch = s.schedule()
    assert light in [q for q, _ in batch.items] and light in s.running
    assert sum(q.tenant == "hog" for q in s.running) == 3
    assert s.num_preemptions == 1


def test_a_tenants_prefill_takes_at_most_its_share_of_the_step():
    bm = BlockManager(256, 4, False)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, enable_chunked_prefill=True)
    big = _tenant(list(range(200)), "big", weight=1.0)
    small = _tenant(list(range(40)), "small", weight=3.0)
    s.add(big)
    s.add(small)
    batch = dict((q.tenant, n) for q, n in s.schedule().items)
    assert batch == {"big": 16, "small": 40}  # 64 tokens split 1:3, the rest unused by big
    alone = Scheduler(BlockManager(256, 4, False), 8, 64, True)
    alone.add(_tenant(list(range(200)), "big"))
    assert alone.schedule().items[0][1] == 64  # one tenant: the whole budget


def test_an_auto_cache_is_fp16_where_auto_compute_fell_back_to_float32():
    """kv_cache_dtype auto follows the compute dtype, except on a CPU without native bf16
    (dtype auto gave float32): fp16 there, as llama.cpp's cache. An explicit float32, a
    bf16 engine and an explicit cache type stay as asked."""
    from deepserve.config import EngineConfig

    assert EngineConfig().with_auto_kv(torch.float32).kv_cache_dtype == "fp16"
    assert EngineConfig().with_auto_kv(torch.bfloat16).kv_cache_dtype == "auto"
    assert EngineConfig(dtype="float32").with_auto_kv(torch.float32).kv_cache_dtype == "auto"
    assert EngineConfig(kv_cache_dtype="int8").with_auto_kv(torch.float32).kv_cache_dtype \
        == "int8"
