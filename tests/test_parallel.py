"""Tensor and pipeline parallelism on one host (processes started by deepserve, gloo):
the greedy output of a model split 2 or 3 ways equals the single process's, token for
token in float32; GGUF blocks split along block boundaries agree with the unsplit
blocks up to near-ties; pipeline stages, which change no arithmetic, equal the single
process exactly on the blocks too; a rank that dies stops the replica with an error,
never a hang."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import torch
from prompts import PROMPTS
from server_utils import ServerProcess

from deepserve import LLM, SamplingParams
from deepserve.errors import DeepserveError

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _tokens(llm: LLM, prompts: list[str]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def _same_logits(one: LLM, two: LLM) -> None:
    """Every position's logits of four prompts within 1e-4 of their scale."""
    for prompt in PROMPTS[:4]:
        ids = one.engine.tokenizer.encode(prompt)
        a = one.engine.prompt_logits(ids, last_n=len(ids))
        b = two.engine.prompt_logits(ids, last_n=len(ids))
        assert (a - b).abs().max() < 1e-4 * a.abs().max()


@pytest.mark.parametrize("kind", ["tensor", "pipeline"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_ranks_equal_one_process_on_tiny_random_models(kind, arch, tiny_llama_dir,
                                                           tiny_qwen2_dir):
    path = str(tiny_llama_dir if arch == "llama" else tiny_qwen2_dir)
    one = LLM(model=path, dtype="float32", show_progress=False, kv_cache_memory="16MiB")
    two = LLM(model=path, dtype="float32", show_progress=False, kv_cache_memory="16MiB",
              num_threads=1, **{f"{kind}_parallel_size": 2})
    try:
        if kind == "tensor":
            model = two.engine.model
            assert model.layers[0].num_heads == 2  # each rank: half the heads
            vocab = model.config.vocab_size  # and half the vocabulary
            assert (model.embed_tokens.lo, model.embed_tokens.hi) == (0, vocab // 2)
            assert model.lm_head.weight.shape[0] == vocab // 2
        else:
            assert len(two.engine.model.layers) == 1  # stage 0: the first of two layers
        assert _tokens(two, PROMPTS[:4]) == _tokens(one, PROMPTS[:4])
    finally:
        two.engine.parallel.close()


def test_tensor_and_pipeline_together_equal_one_process(tiny_llama_dir):
    """TP=2 x PP=2: four ranks, two stages of one layer, each split two ways by heads,
    MLP rows and vocabulary; hidden states go from each tensor rank to its peer in the
    next stage. Greedy tokens equal one process's in float32."""
    one = LLM(model=str(tiny_llama_dir), dtype="float32", show_progress=False,
              kv_cache_memory="16MiB")
    four = LLM(model=str(tiny_llama_dir), dtype="float32", show_progress=False,
               kv_cache_memory="16MiB", num_threads=1, tensor_parallel_size=2,
               pipeline_parallel_size=2)
    try:
        model = four.engine.model
        assert four.engine.parallel.size == 4 and four.engine.parallel.mode == "tensor+pipeline"
        assert len(model.layers) == 1 and model.layers[0].num_heads == 2
        assert model.embed_tokens.hi == model.config.vocab_size // 2
        assert _tokens(four, PROMPTS[:4]) == _tokens(one, PROMPTS[:4])
        assert _tokens(four, PROMPTS[4:5]) == _tokens(one, PROMPTS[4:5])
    finally:
        four.engine.parallel.close()


def test_gguf_blocks_split_three_ways_are_as_close_to_float32_as_unsplit_blocks(llm_fp32):
    """The default model's Q4_1 / Q8_0 blocks, cut at block boundaries. The block
    kernels quantize activations to int8 with scales over each rank's own columns, so
    split and unsplit blocks differ by rounding: both are held to the dense float32
    model (teacher-forced log-probabilities of the generated tokens), the split one
    no further from it than the unsplit one, and choosing the same token wherever the
    unsplit model's top two are 0.3 apart."""
    one = LLM(dtype="float32", show_progress=False, kv_cache_memory="64MiB")
    three = LLM(dtype="float32", show_progress=False, kv_cache_memory="64MiB",
                tensor_parallel_size=3, num_threads=1)
    try:
        assert three.engine.parallel.size == 3
        for prompt in PROMPTS[:3]:
            out = one.generate([prompt], GREEDY)[0]
            ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
            n = len(out.outputs[0].token_ids)
            chosen = torch.tensor(ids[-n:]).unsqueeze(1)

            def scores(llm: LLM, ids: list[int], n: int) -> torch.Tensor:
                # the logits at positions -n-1 .. -2 chose the n generated tokens
                logits = llm.engine.prompt_logits(ids, last_n=n + 1)[:-1].float()
                return torch.log_softmax(logits, -1)

            a, b, ref = (scores(m, ids, n) for m in (one, three, llm_fp32))
            top2 = a.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 0.3
            assert (a.argmax(-1) == b.argmax(-1))[clear].all()
            unsplit = (a.gather(1, chosen) - ref.gather(1, chosen)).abs().max()
            split = (b.gather(1, chosen) - ref.gather(1, chosen)).abs().max()
            assert split <= 1.5 * unsplit + 0.02, (float(split), float(unsplit))
    finally:
        three.engine.parallel.close()


def test_the_default_model_in_three_stages_equals_one_process_on_its_blocks():
    one = LLM(dtype="float32", show_progress=False, kv_cache_memory="64MiB")
    three = LLM(dtype="float32", show_progress=False, kv_cache_memory="64MiB",
                pipeline_parallel_size=3, num_threads=1)
    try:
        assert len(three.engine.model.layers) == 10  # layers 0-9 of 30
        assert _tokens(three, PROMPTS[:3]) == _tokens(one, PROMPTS[:3])
    finally:
        three.engine.parallel.close()


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, default_gguf):
    """Tiny random Qwen3-MoE (8 experts) and DeepSeek-V3 (shared experts, a corrected
    router) checkpoints, and the Qwen3-MoE one as a GGUF with Q8_0 expert blocks."""
    from tiny_models import write_gguf, write_tiny

    d = tmp_path_factory.mktemp("tiny-moe")
    qwen = write_tiny(d / "qwen3_moe", "qwen3_moe", default_gguf)
    write_tiny(d / "deepseek_v3", "deepseek_v3", default_gguf)
    write_gguf(qwen, "qwen3_moe", d / "qwen3_moe.gguf", default_gguf, qtype=8)
    return {"qwen3_moe": d / "qwen3_moe", "deepseek_v3": d / "deepseek_v3",
            "qwen3_moe-gguf": d / "qwen3_moe.gguf"}


@pytest.mark.parametrize("dispatch", ["all-reduce", "all-to-all"])
@pytest.mark.parametrize("which", ["qwen3_moe", "deepseek_v3", "qwen3_moe-gguf"])
def test_two_expert_parallel_ranks_equal_one_process(which, dispatch, tiny_moe):
    """Greedy tokens equal in float32, with either exchange (all-to-all: each rank
    routes half the tokens, the rows travel to their experts' rank and back; the
    DeepSeek model's shared experts split too). On Q8_0 expert blocks the kernels round
    each layer's activations to 8 bits, so the ranks' different order of adding the
    experts' outputs (1e-7) can flip a rounding; on this random model, whose top two
    tokens are often 0.02 apart, that changes greedy choices: there every position's
    logits are compared instead."""
    path = str(tiny_moe[which])
    one = LLM(model=path, dtype="float32", show_progress=False, kv_cache_memory="16MiB")
    two = LLM(model=path, dtype="float32", show_progress=False, kv_cache_memory="16MiB",
              expert_parallel_size=2, num_threads=1, expert_dispatch=dispatch)
    try:
        moe = next(layer.moe for layer in two.engine.model.layers if layer.moe is not None)
        assert (moe.lo, moe.hi, moe.experts.num_experts) == (0, 4, 4)  # half of 8
        assert moe.ep_dispatch == dispatch
        if which.endswith("gguf"):
            assert moe.experts.gate_up.dtype == torch.uint8  # its half of the blocks
            _same_logits(one, two)
        else:
            assert _tokens(two, PROMPTS[:4]) == _tokens(one, PROMPTS[:4])
            # one sequence: a decode step of one token leaves rank 1 none to route
            assert _tokens(two, PROMPTS[4:5]) == _tokens(one, PROMPTS[4:5])
    finally:
        two.engine.parallel.close()


def test_tensor_and_expert_parallel_over_the_same_two_ranks_equal_one_process(tiny_moe):
    """--tensor-parallel-size 2 --expert-parallel-size 2 on Q8_0 GGUF blocks: attention
    split by heads, the dense layer's MLP by rows, each rank holding 4 of every MoE
    layer's 8 experts whole; one all-reduce after each MLP sums the experts' outputs.
    Every position's logits against one process (blocks: as above)."""
    path = str(tiny_moe["qwen3_moe-gguf"])
    one = LLM(model=path, dtype="float32", show_progress=False, kv_cache_memory="16MiB")
    two = LLM(model=path, dtype="float32", show_progress=False, kv_cache_memory="16MiB",
              tensor_parallel_size=2, expert_parallel_size=2, num_threads=1)
    try:
        layers = two.engine.model.layers
        assert layers[0].num_heads == 2 and layers[0].num_kv_heads == 1  # of 4 and 2
        moe = layers[0].moe
        assert (moe.lo, moe.hi, moe.experts.num_experts, moe.ep_group) == (0, 4, 4, None)
        assert moe.experts.gate_up.dtype == torch.uint8  # its half of the blocks
        assert layers[1].moe is None and layers[0].tp_group is not None
        _same_logits(one, two)
    finally:
        two.engine.parallel.close()


def test_a_server_split_by_tensor_and_experts_answers_as_one_process(tiny_moe, tmp_path):
    """The same split through the real server, float32 safetensors: greedy completions
    equal one process's."""
    path = str(tiny_moe["qwen3_moe"])
    one = LLM(model=path, dtype="float32", show_progress=False, kv_cache_memory="16MiB")
    want = [o.outputs[0].text for o in one.generate(PROMPTS[:3], GREEDY)]
    server = ServerProcess("--model", path, "--tensor-parallel-size", "2",
                           "--expert-parallel-size", "2", "--num-threads", "1", "--dtype",
                           "float32", "--no-warmup", log_dir=tmp_path)
    try:
        for prompt, text in zip(PROMPTS[:3], want, strict=True):
            r = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
                "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == text
    finally:
        server.stop()


def test_expert_parallel_combinations_that_cannot_work_are_refused(tiny_moe):
    qwen, deepseek = str(tiny_moe["qwen3_moe"]), str(tiny_moe["deepseek_v3"])
    with pytest.raises(DeepserveError, match="add --expert-parallel-size 2"):
        LLM(model=qwen, show_progress=False, tensor_parallel_size=2)
    with pytest.raises(DeepserveError, match="cannot be combined with "
                                             "--pipeline-parallel-size 2"):
        LLM(model=qwen, show_progress=False, expert_parallel_size=2,
            pipeline_parallel_size=2)
    with pytest.raises(DeepserveError, match="themselves: give --expert-parallel-size 2"):
        LLM(model=qwen, show_progress=False, expert_parallel_size=4, tensor_parallel_size=2)
    with pytest.raises(DeepserveError, match="latent attention: serve it with "
                                             "--expert-parallel-size alone"):
        LLM(model=deepseek, show_progress=False, expert_parallel_size=2,
            tensor_parallel_size=2)
    with pytest.raises(DeepserveError, match="drop --expert-dispatch all-to-all"):
        LLM(model=qwen, show_progress=False, expert_parallel_size=2, tensor_parallel_size=2,
            expert_dispatch="all-to-all")


@pytest.mark.parametrize("kernels_on", [True, False])
def test_micro_batches_of_a_mixed_step_compute_what_the_whole_step_does(tiny_llama_dir,
                                                                       kernels_on):
    """A pipeline step cut into micro-batches (decode rows in groups, prefill chunks in
    groups, each with its own slice of the metadata) gives the hidden states of the
    whole step, on a step that mixes decodes with a new prompt's prefill."""
    from deepserve.models.parallel import micro_batches

    llm = LLM(model=str(tiny_llama_dir), dtype="float32", show_progress=False,
              kv_cache_memory="16MiB", cpu_kernels=kernels_on)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", prompt, params)
    engine.step()  # three prefills; now they decode
    for i, prompt in enumerate(PROMPTS[3:5]):
        engine.add_request(f"n{i}", prompt, params)
    batch = engine.scheduler.schedule()
    ids, pos, meta, _, _ = engine.runner.prepare(batch.items)
    assert meta.num_decode == 3 and len(meta.prefills) == 2
    caches, model = engine.runner.kv_caches, engine.model
    with torch.inference_mode():
        whole = model(ids, pos, caches, meta)
        parts = micro_batches(ids, pos, meta, 2)
        assert [p[0] for p in parts] == [slice(0, 1), slice(1, 3),
                                         slice(3, 3 + meta.prefills[0].num_tokens),
                                         slice(3 + meta.prefills[0].num_tokens, len(ids))]
        cut = torch.cat([model(i, p, caches, m) for _, i, p, m in parts])
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-5)


def test_a_step_that_fails_on_rank_0_stops_the_ranks_at_once(tiny_llama_dir, monkeypatch):
    """Rank 0's forward raising part-way leaves rank 1 inside that step's all-reduces:
    rank 0 kills it at once (not after the 120 s gloo timeout) and the engine fails,
    rather than sending the next step to a rank still in the old one."""
    from deepserve.engine.parallel import RankFailed

    two = LLM(model=str(tiny_llama_dir), dtype="float32", show_progress=False,
              kv_cache_memory="16MiB", num_threads=1, tensor_parallel_size=2)
    try:
        assert _tokens(two, PROMPTS[:1])  # the ranks work
        layer = two.engine.model.layers[1]

        def broken(*args, **kwargs):
            raise RuntimeError("injected fault in layer 1")
        monkeypatch.setattr(layer, "forward", broken)
        monkeypatch.setattr(layer, "forward_fused", broken)
        started = time.monotonic()
        with pytest.raises(RankFailed, match="rank 0's step failed part-way"):
            _tokens(two, PROMPTS[:2])
        proc = two.engine.parallel.procs[0]
        proc.join(10)
        assert not proc.is_alive()
        assert time.monotonic() - started < 20
        with pytest.raises(RankFailed):  # and stays stopped
            _tokens(two, PROMPTS[:1])
    finally:
        two.engine.parallel.close()


def test_logits_gathered_from_uneven_vocabulary_shares():
    """A vocabulary that does not divide: ranks hold ceil(V / N) columns, the last
    fewer; rank 0 gets every column in order (three gloo ranks in threads)."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from deepserve.models.parallel import gather_logits, vocab_range

    vocab, size = 10, 3
    assert [vocab_range(r, size, vocab) for r in range(size)] == [(0, 4), (4, 8), (8, 10)]
    full = torch.randn(5, vocab)
    store = dist.TCPStore("127.0.0.1", 0, size, True, timedelta(seconds=30),
                          wait_for_workers=False)
    got = {}

    def rank(r: int) -> None:
        s = store if r == 0 else dist.TCPStore("127.0.0.1", store.port, size, False,
                                               timedelta(seconds=30))
        group = dist.ProcessGroupGloo(s, r, size, timedelta(seconds=30))
        lo, hi = vocab_range(r, size, vocab)
        got[r] = gather_logits(full[:, lo:hi].clone(), group, size, vocab)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert torch.equal(got[0], full)
    assert torch.equal(got[2], full[:, 8:])


def test_sizes_that_cannot_work_are_refused(tiny_llama_dir):
    with pytest.raises(DeepserveError, match="more than this model's 2 layers"):
        LLM(model=str(tiny_llama_dir), show_progress=False, pipeline_parallel_size=3)
    with pytest.raises(DeepserveError, match="needs a mixture-of-experts model"):
        LLM(model=str(tiny_llama_dir), show_progress=False, expert_parallel_size=2,
            tensor_parallel_size=2)
    with pytest.raises(DeepserveError, match="needs a mixture-of-experts model"):
        LLM(model=str(tiny_llama_dir), show_progress=False, expert_parallel_size=2)
    with pytest.raises(DeepserveError, match="expert_dispatch='scatter' is invalid"):
        LLM(model=str(tiny_llama_dir), show_progress=False, expert_dispatch="scatter")
    with pytest.raises(DeepserveError, match="add --expert-parallel-size"):
        LLM(model=str(tiny_llama_dir), show_progress=False, expert_dispatch="all-to-all")


def test_a_size_that_does_not_divide_names_the_sizes_that_work():
    with pytest.raises(DeepserveError) as err:
        LLM(show_progress=False, tensor_parallel_size=2)
    assert "9 attention heads, 3 KV heads" in str(err.value)
    assert "sizes that work: 1, 3" in str(err.value)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_three_ranks_serve_the_default_model_and_a_killed_rank_stops_the_replica(
        llm_fp32, tmp_path):
    server = ServerProcess("--tensor-parallel-size", "3", "--num-threads", "1", "--dtype",
                           "float32", "--quantization", "none", "--no-warmup",
                           "--kv-cache-memory", "96MiB", log_dir=tmp_path)
    try:
        want = [o.outputs[0].text for o in llm_fp32.generate(PROMPTS[:3], GREEDY)]
        for prompt, text in zip(PROMPTS[:3], want, strict=True):
            r = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
                "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == text
            assert r.json()["usage"]["completion_tokens"] == 16
        ranks = [p for p in _children(server.proc.pid)
                 if "deepserve" in open(f"/proc/{p}/cmdline").read()
                 or "multiprocessing" in open(f"/proc/{p}/cmdline").read()]
        assert len(ranks) >= 2, ranks
        for p in ranks:
            os.kill(p, signal.SIGKILL)
        started = time.monotonic()
        try:
            r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
                "prompt": "Hello", "max_tokens": 4})
            assert r.status_code >= 500
        except httpx.HTTPError:
            pass  # the server may already be gone: that is the point
        server.proc.wait(60)
        assert server.proc.returncode != 0
        assert time.monotonic() - started < 60
        assert "tensor-parallel rank" in server.log()
    finally:
        server.stop()
