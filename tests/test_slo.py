"""SLO-aware adaptive batching: the step-time model, the controller's choices, and a real
engine that keeps its steps under the TPOT target while the queue drains."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from deepserve.engine.slo import MIN_CHUNK, SLOController, StepModel


def seq(prompt_len: int, computed: int, arrival: float | None = None) -> SimpleNamespace:
    return SimpleNamespace(prompt_len=prompt_len, num_computed=computed,
                           arrival=arrival if arrival is not None else time.time())


def trained(tpot_ms: float | None = 40, ttft_ms: float | None = None) -> SLOController:
    """A controller that has seen steps costing 10 ms + 0.1 ms per token."""
    c = SLOController(ttft_ms, tpot_ms, max_tokens=2048, max_seqs=64)
    for tokens in (1, 8, 32, 512, 64, 200, 16, 300):
        c.model.add(tokens, 0.010 + 0.0001 * tokens)
    return c


def test_the_step_model_recovers_a_linear_cost():
    m = StepModel()
    assert m.coefficients() is None
    for tokens in (1, 4, 16, 64, 256, 1024):
        m.add(tokens, 0.02 + 0.0005 * tokens)
    a, b = m.coefficients()
    assert a == pytest.approx(0.02, rel=1e-6) and b == pytest.approx(0.0005, rel=1e-6)


def test_decodes_bound_the_budget_and_the_batch():
    c = trained(tpot_ms=40)
    running = [seq(100, 120) for _ in range(10)]  # ten decoding
    budget, cap = c.plan(running, [])
    # (40 ms - 10 ms) / 0.1 ms = 300 tokens fit in a step; so do 300 decodes (cap 64).
    assert budget == 300 and cap == 64
    tight = trained(tpot_ms=13)
    budget, cap = tight.plan(running, [])
    assert budget == max(10 + MIN_CHUNK, 30) and cap == 30  # prefill chunks shrink
    assert tight.plan([], [seq(500, 0)])[0] == 2048  # nothing decoding: full prefill


def test_a_request_near_its_ttft_target_gets_the_whole_budget():
    c = trained(tpot_ms=13, ttft_ms=200)
    running = [seq(100, 120) for _ in range(10)]
    assert c.plan(running, [seq(400, 0, arrival=time.time())])[0] == 30
    late = seq(400, 0, arrival=time.time() - 0.15)  # 150 ms of its 200 ms gone
    assert c.plan(running, [late])[0] == 10 + 400  # the decodes and its whole prompt
    c.decode_step_s = 0.020  # decodes already over their 13 ms: no slack, it waits
    assert c.plan(running, [late])[0] == 30


def test_measured_decode_steps_correct_the_batch_cap():
    c = trained(tpot_ms=40)
    running = [seq(100, 120) for _ in range(20)]
    assert c.plan(running, [])[1] == 64
    decode = [(s, 1) for s in running]
    t = 0.0
    # Slower than the model says: over 40 ms (a step is judged when the next starts).
    for took in (0.050, 0.050, 0.050, 0.010):
        c.observe(decode, t, t + took)
        t += took
        c.plan(running, [])
    low = c.plan(running, [])[1]
    assert low < 64 * 0.9
    for _ in range(5):  # fast steps let it grow again, one at a time
        c.observe(decode, t, t + 0.010)
        t += 0.010
    assert c.plan(running, [])[1] == low + 5


def test_without_a_fit_the_configured_limits_hold():
    c = SLOController(None, 40, max_tokens=512, max_seqs=8)
    assert c.plan([seq(10, 20)], []) == (512, 8)


def test_a_real_engine_adapts_and_publishes_its_choice(tiny_llm):
    from deepserve import SamplingParams
    from deepserve.engine.setup import attach_slo

    engine = tiny_llm.engine
    engine.config = type(engine.config).from_kwargs(
        **{**vars(engine.config), "slo_tpot_ms": 5.0, "slo_ttft_ms": 2000.0})
    attach_slo(engine)
    try:
        outs = tiny_llm.generate([f"Prompt {i} " * 20 for i in range(12)],
                                 SamplingParams(max_tokens=8, ignore_eos=True))
        assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
        stats = engine.publish_stats()
        assert stats.token_budget == engine.scheduler.slo.budget
        assert engine.scheduler.slo.model.coefficients() is not None  # it learned
    finally:
        engine.scheduler.slo = None
        engine.runner.step_observers.clear()


def test_bad_targets_are_named():
    from deepserve.config import EngineConfig
    from deepserve.errors import DeepserveError

    with pytest.raises(DeepserveError, match="slo_tpot_ms=0 is invalid: give a target"):
        EngineConfig(slo_tpot_ms=0)
