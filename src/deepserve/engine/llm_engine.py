"""The synchronous engine: add requests, call ``step()``, collect outputs."""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from deepserve.config import EngineConfig
from deepserve.engine import malloc, setup
from deepserve.engine.block_manager import BlockManager
from deepserve.engine.checks import check_chars, check_request
from deepserve.engine.detokenizer import IncrementalDetokenizer
from deepserve.engine.model_runner import ModelRunner
from deepserve.engine.sampler import Sampler
from deepserve.engine.scheduler import Scheduler
from deepserve.engine.sequence import CompletionOutput, RequestOutput, Sequence, SequenceStatus
from deepserve.engine.stats import EngineStats
from deepserve.engine.structured import GrammarCompiler
from deepserve.errors import DeepserveError
from deepserve.layers.kv_cache import bytes_per_token as kv_bytes_per_token
from deepserve.layers.quantized import weight_bytes
from deepserve.loader.chat_tokens import encode_chat
from deepserve.loader.resolve import resolve_model
from deepserve.loader.tokenizer import eos_token_ids
from deepserve.loader.weights import open_checkpoint
from deepserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    arrival: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class LLMEngine:
    """One model replica: owns tokenizer, model runner, scheduler and KV blocks."""

    def __init__(self, config: EngineConfig | None = None, show_progress: bool = True) -> None:
        config, started = config or EngineConfig(), time.perf_counter()
        malloc.tune_process(config.num_threads)  # threads; freed activations kept
        self.device = setup.pick_device(config.device)
        self.dtype = setup.pick_dtype(config.dtype, self.device)
        self.config = config = config.with_auto_kv(self.dtype)
        path, kind = resolve_model(config.model)
        self.model_path = path
        self.model_name = setup.served_name(config, path, kind)
        ckpt = open_checkpoint(path, kind)
        self.model_config = mcfg = ckpt.model_config()
        self.max_model_len = setup.context_length(config, mcfg)
        self.parallel, local, shard = setup.parallel(  # other ranks start loading now
            config, path, kind, mcfg, self.max_model_len)
        with ThreadPoolExecutor(1) as pool:  # the tokenizer loads while the weights do
            tokenizer = pool.submit(setup.tokenizer_for, config, path, kind)
            torch.manual_seed(config.seed)  # unseeded requests: repeatable, as vLLM's --seed
            # The one decision on deepserve's CPU kernels, for layers, metadata, sampler.
            self.use_kernels = setup.use_cpu_kernels(config, self.device)
            self.model = setup.build_model(ckpt, local, config, self.max_model_len, self.dtype,
                                           self.device, self.use_kernels, show_progress, shard,
                                           settle=tokenizer.result)
            self.tokenizer = tokenizer.result()
        self.eos_token_ids = eos_token_ids(self.tokenizer, path, kind)
        self.max_token_chars = setup.max_token_chars(self.tokenizer)
        self.weight_bytes = weight_bytes(self.model)
        self.num_blocks = setup.kv_blocks(config, self.kv_bytes_per_token, self.max_model_len,
                                          self.device)
        self.kv_tokens = self.num_blocks * config.block_size
        self.block_manager = BlockManager(self.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.enable_chunked_prefill)
        sampler = Sampler(mcfg.vocab_size, self.eos_token_ids, use_kernel=self.use_kernels)
        self.runner = ModelRunner(self.model, self.num_blocks, config.block_size, self.dtype,
                                  self.device, sampler, kv_kind=config.kv_cache_dtype,
                                  use_kernels=self.use_kernels)
        setup.start_parallel(self)
        self.grammars = GrammarCompiler(self.tokenizer, mcfg.vocab_size, self.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self._seq_ids, self._request_ids = itertools.count(), itertools.count()
        self.num_steps = 0
        self.failures: dict[str, BaseException] = {}
        self.consecutive_failures, self.max_consecutive_failures = 0, 3
        setup.attach_slo(self)  # --slo-ttft-ms / --slo-tpot-ms: adaptive batching
        self.latest_stats = self.publish_stats()
        malloc.freeze_heap()  # the loaded model out of the collector's full passes
        setup.log_loaded(self, time.perf_counter() - started)

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model_config, self.dtype, self.config.kv_cache_dtype)

    # -- requests -----------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int] | None = None,
                        messages: list[dict[str, Any]] | None = None,
                        chat_options: dict[str, Any] | None = None,
                        literal_content: bool = True) -> tuple[str | None, list[int]]:
        """Prompt text or chat messages -> (text, token ids). Raises DeepserveError.
        ``chat_options`` go to the chat template (tools, add_generation_prompt, ...).
        ``literal_content``: control-token spellings in messages stay text
        (``loader/chat_tokens.py``)."""
        param = "messages" if messages is not None else "prompt"
        if messages is not None:
            self.check_chars(sum(len(str(m.get("content") or "")) for m in messages), param)
            prompt, ids = encode_chat(self.tokenizer, messages, chat_options, literal_content)
            if not prompt:
                raise DeepserveError("prompt is empty; give at least one token of text",
                                     param="prompt")
            self.check_chars(len(prompt), param)
            return prompt, ids
        if isinstance(prompt, str):
            if not prompt:
                raise DeepserveError("prompt is empty; give at least one token of text",
                                     param="prompt")
            self.check_chars(len(prompt), param)
            ids = self.tokenizer.encode(prompt, add_special_tokens=messages is None)
            return prompt, ids
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise DeepserveError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                     f"[0, {self.model_config.vocab_size})", param="prompt")
            return None, list(prompt)
        raise DeepserveError("prompt must be a non-empty string or a non-empty list of "
                             "token ids", param="prompt")

    def check_chars(self, chars: int, param: str) -> None:
        """Reject text too long for the context before tokenizing it (``checks``)."""
        check_chars(self, chars, param)

    def check_request(self, prompt_ids: list[int], params: SamplingParams,
                      param: str = "messages") -> None:
        """Reject what can never run (see ``checks.check_request``)."""
        check_request(self, prompt_ids, params, param)

    def add_request(self, request_id: str | None, prompt: str | list[int] | None,
                    params: SamplingParams, prompt_ids: list[int] | None = None,
                    arrival: float | None = None, priority: int = 0,
                    cache_salt: str | None = None, validated: bool = False,
                    tenant: str = "", weight: float = 1.0) -> str:
        """Queue a request. ``cache_salt``: only requests with the same salt share
        prefix-cache blocks (tenant isolation); None shares with other unsalted ones.
        ``validated``: the caller already ran ``check_request`` on these ids and params."""
        if prompt_ids is None:
            prompt, prompt_ids = self.tokenize_prompt(prompt)
            validated = False
        if not validated:
            self.check_request(prompt_ids, params)
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise DeepserveError(f"request id {request_id!r} is running", param="request_id")
        arrival, seqs, detoks = arrival if arrival is not None else time.time(), [], []
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, index, prompt_ids, params, arrival,
                           priority)
            seq.cache_salt = cache_salt
            seq.tenant, seq.weight = tenant, weight
            if params.seed is not None:
                # Any 64-bit seed, and seed + index wraps instead of overflowing.
                seq.generator = torch.Generator().manual_seed((params.seed + index) % 2**64)
            if params.constraint is not None:
                seq.matcher = self.grammars.matcher(
                    self.grammars.compile(*params.constraint, params.guided_param),
                    params.guided_param)
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                                 params.skip_special_tokens, params.stop,
                                                 params.include_stop_str_in_output))
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, prompt if isinstance(prompt, str)
                                             else None, prompt_ids, params, seqs, detoks, arrival)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request now; its blocks return to the pool. False if it was unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.finished:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                self.scheduler.remove(seq)
        self.publish_stats()
        return True

    def stop_choice(self, request_id: str, index: int, reason: str) -> RequestOutput | None:
        """Finish one continuation of a request now (finish_reason "stop", ``reason`` as
        its stop_reason); the request's final output when that was its last one."""
        req = self.requests.get(request_id)
        if req is None or not 0 <= index < len(req.seqs) or req.seqs[index].finished:
            return None
        seq = req.seqs[index]
        seq.stop_reason = reason
        self._finish(seq, "stop")
        self.publish_stats()
        if not req.finished:
            return None
        out = self._output(request_id, time.time())
        del self.requests[request_id]
        return out

    def fail(self, request_id: str, exc: BaseException) -> None:
        """Stop one request because of an internal error; ``pop_failures`` hands it on."""
        if self.abort(request_id):
            self.failures[request_id] = exc

    def pop_failures(self) -> dict[str, BaseException]:
        """Requests that failed since the last call (their blocks are already freed)."""
        failed, self.failures = self.failures, {}
        return failed

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, detokenize; return changed requests."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        timings = self.runner.timings
        timings["schedule"] += time.perf_counter() - t0
        touched: set[str] = set()
        now = time.time()
        for seq in batch.out_of_memory or []:
            logger.warning("request %s needs more KV blocks than the pool has; stopping it "
                           "with finish_reason=length", seq.request_id)
            self._finish(seq, "length")
            touched.add(seq.request_id)
        sampled: dict[int, int] = {}
        if batch.items:
            try:
                sampled = self.runner.execute(batch.items)
            except Exception as exc:
                # The batch's requests fail; the engine and every other request go on.
                # Steps that keep failing mean a broken engine: raise, the caller stops.
                self.consecutive_failures += 1
                logger.exception("engine step failed (%d in a row); failing the %d request(s) "
                                 "in it", self.consecutive_failures, len(batch.items))
                if self.consecutive_failures >= self.max_consecutive_failures or \
                        (self.parallel is not None and self.parallel.failed):
                    raise
                for seq, _ in batch.items:
                    self.fail(seq.request_id, exc)
            else:
                self.consecutive_failures = 0
                self.num_steps += 1
                now = time.time()
        t1 = time.perf_counter()
        for i, (seq, n) in enumerate(batch.items):
            if seq.request_id not in self.requests:
                continue  # failed in this step
            try:
                seq.num_computed += n
                self.block_manager.register_computed(seq)
                if i in sampled:
                    self._append(seq, sampled[i], now)
                    touched.add(seq.request_id)
                elif seq.embedding is not None and not seq.finished:
                    self._finish(seq, "stop")  # pooled: nothing is generated
                    touched.add(seq.request_id)
            except Exception as exc:  # one request's bad state fails that request only
                logger.exception("request %s failed while processing its token",
                                 seq.request_id)
                self.fail(seq.request_id, exc)
        outputs = [self._output(rid, now) for rid in touched if rid in self.requests]
        for out in outputs:
            if out.finished:
                del self.requests[out.request_id]
        timings["postprocess"] += time.perf_counter() - t1
        self.publish_stats()
        return outputs

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        req = self.requests[seq.request_id]
        seq.tokens.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        detok = req.detoks[seq.index]
        p = seq.params
        is_eos = token in self.eos_token_ids and not p.ignore_eos
        if not is_eos:
            detok.add(token)
        if seq.matcher is not None:
            if not is_eos:
                seq.matcher.consume_token(token)
            if seq.matcher.is_error():
                # The constraint itself failed (e.g. a grammar too large to build): the
                # request ends with the reason, never with output that breaks it.
                why = seq.matcher.get_error().strip().splitlines()[0]
                return self.fail(seq.request_id, DeepserveError(
                    f"the output constraint failed during generation ({why}): no output "
                    "can satisfy it here; simplify it", param=p.guided_param, status=422,
                    code="constraint_failed"))
            if seq.matcher.is_stopped() and not is_eos:
                return self._finish(seq, "stop")
        if seq.num_output >= p.min_tokens:
            if is_eos:
                return self._finish(seq, "stop")
            if token in p.stop_token_ids:
                seq.stop_reason = token
                return self._finish(seq, "stop")
            if detok.stopped_on is not None:
                seq.stop_reason = detok.stopped_on
                return self._finish(seq, "stop")
        if (p.max_tokens is not None and seq.num_output >= p.max_tokens) or \
                seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)

    def _output(self, request_id: str, now: float) -> RequestOutput:
        req = self.requests[request_id]
        outs = []
        for seq, detok in zip(req.seqs, req.detoks, strict=True):
            outs.append(CompletionOutput(
                index=seq.index, text=detok.visible_text(seq.finished),
                token_ids=seq.output_ids, finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None))
        finished = req.finished
        if finished and req.finished_time is None:
            req.finished_time = now
        cached = min((s.num_cached_tokens or 0) for s in req.seqs)
        prompt_lps = None
        if req.params.prompt_logprobs is not None:
            got = req.seqs[0].prompt_logprobs
            prompt_lps = [None] + [got.get(p) for p in range(1, len(req.prompt_ids))]
        return RequestOutput(request_id, req.prompt, req.prompt_ids, outs, finished,
                             num_cached_tokens=cached, arrival_time=req.arrival,
                             first_token_time=req.first_token_time,
                             finished_time=req.finished_time, prompt_logprobs=prompt_lps,
                             embedding=req.seqs[0].embedding)

    def prompt_logits(self, prompt_ids: list[int], last_n: int = 1) -> torch.Tensor:
        """Next-token logits after a prompt, computed through the paged cache (no
        sampling, blocks freed after). For correctness and quality checks.

        ``last_n > 1`` returns the logits of the last n positions, [n, vocab]."""
        if self.requests:
            raise DeepserveError("prompt_logits needs an idle engine", param="prompt_ids")
        seq = Sequence(-1, "logits", 0, prompt_ids, SamplingParams(max_tokens=1), time.time())
        if not self.block_manager.ensure(seq, len(prompt_ids)):
            raise DeepserveError("prompt does not fit in the KV cache", param="prompt_ids")
        try:
            # Two passes, so the scored positions attend over K/V read back from the
            # cache (as decoding does): a quantized KV cache shows in these logits.
            split = len(prompt_ids) - last_n
            if split > 0:
                self.runner.logits_for([(seq, split)])
                seq.num_computed = split
            logits = self.runner.logits_for([(seq, last_n)], last_n)
            return logits[0] if last_n == 1 else logits
        finally:
            self.block_manager.free(seq)

    # -- stats ----------------------------------------------------------------------------
    def publish_stats(self) -> EngineStats:
        """Replace the published snapshot (after a step, an add or an abort)."""
        bm = self.block_manager
        self.latest_stats = EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used,
            prefix_cache_queried_tokens=bm.queried_tokens,
            prefix_cache_hit_tokens=bm.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions, num_steps=self.num_steps,
            max_num_seqs=self.config.max_num_seqs, **self.runner.utilization.snapshot(),
            **self.scheduler.limits())
        return self.latest_stats

    def stats(self) -> dict[str, float]:
        """The current state as a dict (a fresh snapshot; call from the engine's thread)."""
        snap = self.publish_stats()
        return {"num_running": snap.num_running, "num_waiting": snap.num_waiting,
                "kv_cache_usage": snap.kv_cache_usage, "kv_blocks_total": snap.kv_blocks_total,
                "kv_blocks_used": snap.kv_blocks_used,
                "prefix_cache_hit_rate": snap.prefix_cache_hit_rate,
                "prefix_cache_queried_tokens": snap.prefix_cache_queried_tokens,
                "prefix_cache_hit_tokens": snap.prefix_cache_hit_tokens,
                "num_preemptions": snap.num_preemptions}
