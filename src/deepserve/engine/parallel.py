"""A model split across processes on one host, on torch.distributed (gloo on CPUs).

**Tensor parallelism** (``--tensor-parallel-size N``): N processes each hold 1/N of
every layer's attention heads (and their KV cache) and of its MLP, and sum their
partial outputs with all-reduces. **Pipeline parallelism**
(``--pipeline-parallel-size N``): N processes each hold a contiguous range of whole
layers (and their KV cache); each step's hidden states go from stage to stage and back
to rank 0 (gloo send / recv). A step is cut into micro-batches (its decode rows in
``MICRO_BATCHES`` x N groups, its prefill chunks in as many more): a stage runs one
while the next stage runs the one before, so the stages overlap; the head and the
sampler wait for the last. Both at once: T x P ranks, each stage split T ways (its
own gloo group), tensor rank t of a stage passing to tensor rank t of the next.
**Expert parallelism**
(``--expert-parallel-size N``, MoE models): N processes each hold 1/N of every MoE
layer's routed experts and a whole copy of the rest (attention replicated); every rank
routes every token, runs the tokens routed to its own experts, and one all-reduce per
MoE layer adds the ranks' outputs (the dispatch is the replicated router, the combine
the all-reduce; ``--expert-dispatch all-to-all`` sends the tokens instead). With
``--tensor-parallel-size N`` too (the same N): attention split by heads as above, the
experts spread whole over those same ranks; the all-reduce after each MLP sums them.

- **Rank 0** is the engine's own process: scheduler, sampler, detokenizer, the
  replicated embedding and head. Each step it sends the step's inputs (token ids,
  positions, attention metadata: a few KB) to every other rank through a pipe, then
  runs its own shard of the forward pass.
- **Ranks 1..N-1** are worker processes started by rank 0 (``spawn``). Each loads its
  shard of the checkpoint (GGUF blocks sliced along block boundaries, never
  requantized), builds its share of the KV pool (same blocks, its KV heads), and runs
  every step it is sent, meeting rank 0 in the all-reduces (or, as a pipeline stage,
  taking the previous stage's hidden states and passing its own on).
- **Per layer**: QKV and gate/up are column-parallel (each rank its heads and its rows
  of the MLP), the output projection and down are row-parallel (each rank its input
  columns) followed by one all-reduce each: 2 x hidden values per token per layer.
- **Failure**: a rank that dies closes its pipe and its gloo connections. Rank 0's
  watcher thread sees the process end and marks the group failed: the step in flight
  and every later one raise ``RankFailed``, so the engine reports itself dead (503 on
  /health) and the server exits; workers exit when rank 0's pipe closes. A step that
  fails on rank 0 itself leaves the others inside its exchanges: rank 0 kills them at
  once and fails the same way.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from deepserve.engine.parallel_plan import part, plan, stage_group_size, threads_per_rank
from deepserve.errors import DeepserveError
from deepserve.models.config import ModelConfig
from deepserve.models.parallel import gather_logits, micro_batches, set_group

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 120.0  # rendezvous and every collective
MICRO_BATCHES = 1  # per stage; 2 and 4 measured 5% and 21% slower (BENCHMARKS.md)


class RankFailed(RuntimeError):
    """A tensor-parallel rank died: this replica cannot compute any more steps."""


def _store(port: int, size: int, master: bool, host: str = "127.0.0.1") -> Any:
    """The rendezvous: rank 0 serves a TCP store (``port`` 0: a free one) on loopback, or
    on its node's address when the ranks are Ray actors."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, size, master, timedelta(seconds=JOIN_TIMEOUT_S),
                         wait_for_workers=False)


def _group(store: Any, rank: int, size: int, prefix: str = "",
           timeout: timedelta = timedelta(seconds=JOIN_TIMEOUT_S)) -> Any:
    """This replica's own gloo group (not torch's default group: one process may hold
    several replicas, as the tests do)."""
    import torch.distributed as dist

    if prefix:
        store = dist.PrefixStore(prefix, store)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


class Parallel:
    """Rank 0's side: starts the other ranks, hands them each step, watches them."""

    def __init__(self, config: Any, path: Path, kind: str, full: ModelConfig,
                 max_model_len: int) -> None:
        self.mode, size = plan(config, full)
        self.size = size
        self.tp = stage_group_size(self.mode, config)  # ranks that split each layer
        self.layer_mode = "expert" if self.mode == "expert" else "tensor"
        self.shard = part(self.mode, 0, size, full, self.tp)
        self.failed: str | None = None
        self.on_fail: Any = None  # called from the watcher thread when a rank dies
        self.backend = config.distributed_executor_backend
        threads = threads_per_rank(config, size)
        torch.set_num_threads(threads)
        self.conns, self.procs, self.actors = [], [], []
        if self.backend == "ray":  # ranks as Ray actors, on any node (engine/ray_ranks.py)
            from deepserve.engine import ray_ranks

            host = _ray_host()
            store = _store(0, size, master=True, host=host)
            self.actors, self._loops = ray_ranks.start_ranks(
                self.mode, size, host, store.port, config, path, kind, max_model_len,
                threads)
            self.group = _group(store, 0, size)
            self.layer_group = _layer_group(store, self.mode, 0, self.group, config)
            self.control = _group(store, 0, size, "control", ray_ranks.CONTROL_TIMEOUT)
            self._store = store
            self._start_watch()
            return
        store = _store(0, size, master=True)
        port = store.port
        ctx = multiprocessing.get_context("spawn")
        for rank in range(1, size):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker, name=f"deepserve-rank{rank}", daemon=True,
                               args=(self.mode, rank, size, port, there, config, path, kind,
                                     max_model_len, threads))
            proc.start()
            there.close()
            self.conns.append(here)
            self.procs.append(proc)
        self.group = _group(store, 0, size)
        self.layer_group = _layer_group(store, self.mode, 0, self.group, config)
        self._store = store
        self._start_watch()

    def _start_watch(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="deepserve-rank-watch",
                                         daemon=True)
        self._watcher.start()
        import atexit

        atexit.register(self.close)  # the other ranks end with this process

    def start(self, num_blocks: int, dtype: torch.dtype, kv_kind: str) -> None:
        """Give every rank the KV pool's size; wait until each has loaded its shard."""
        self.send(("pool", (num_blocks, dtype, kv_kind)))
        for rank, (status, detail) in enumerate(self._replies(), 1):
            if status == "ready" and self.backend == "ray":
                from deepserve.engine.ray_ranks import nodes

                self.nodes = nodes(self._store, self.size)  # where ranks 1.. run
            if status != "ready":
                self.close()
                raise DeepserveError(f"{self.mode}-parallel rank {rank} failed: {detail}",
                                     param=f"{self.mode.split('+')[0]}_parallel_size")
        stages = self.size // self.tp if self.mode != "expert" else 1
        logger.info("%s parallel: %d ranks on this host (gloo), %d threads each%s", self.mode,
                    self.size, torch.get_num_threads(), "" if stages == 1 else
                    "; layers " + ", ".join(
                        f"{s.first}-{s.last - 1}" for s in (part("pipeline", r, stages,
                                                                 self.shard.full)
                                                            for r in range(stages))))

    def wrap(self, model: torch.nn.Module) -> None:
        """Make rank 0's forward hand each step to the other ranks first."""
        local = model.forward

        def forward(input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                    meta: Any) -> torch.Tensor:
            self.send(("step", (input_ids, positions, meta)))
            try:
                if self.mode in ("tensor", "expert"):
                    return local(input_ids, positions, kv_caches, meta)
                # micro-batches: stage 1 runs the first while this rank runs the next
                out, pending, stages = None, [], self.size // self.tp
                for i, (rows, ids, pos, m) in enumerate(
                        micro_batches(input_ids, positions, meta, MICRO_BATCHES * stages)):
                    x = local(ids, pos, kv_caches, m).contiguous()
                    if out is None:
                        out = torch.empty(input_ids.shape[0], x.shape[1], dtype=x.dtype)
                    pending += [(x, self.group.send([x], self.tp, i)),  # on to stage 1 ...
                                (None, self.group.recv([out[rows]], self.size - self.tp, i))]
                for _, work in pending:  # ... and back from the last
                    work.wait()
                return out
            except Exception as exc:
                raise self._broken(exc) from exc

        model.forward = forward  # type: ignore[method-assign]
        if self.tp > 1:  # the head split by vocabulary: stage 0's ranks, their columns
            local_logits, group = model.logits, self.layer_group
            vocab = self.shard.full.vocab_size

            def logits(hidden: torch.Tensor) -> torch.Tensor:
                self.send(("logits", (tuple(hidden.shape), hidden.dtype)))
                try:  # (sent as float32: exact for every compute dtype)
                    group.broadcast(hidden.float().contiguous(), 0).wait()
                    return gather_logits(local_logits(hidden), group, self.tp, vocab)
                except Exception as exc:
                    raise self._broken(exc) from exc

            model.logits = logits  # type: ignore[method-assign]
            model.greedy_tokens = lambda hidden: None  # this rank's columns are not all

    def _broken(self, exc: Exception) -> RankFailed:
        """Rank 0 failed inside an exchange: the other ranks are still in it, and none
        can be trusted to meet the next one, so they are stopped now (not at a gloo
        timeout) and this replica stops."""
        if not self.failed:
            self.failed = (f"{self.mode}-parallel rank 0's step failed part-way "
                           f"({type(exc).__name__}: {exc}); the ranks are out of step, so "
                           "this replica stops")
            logger.error("%s", self.failed)
        self.close(at_once=True)
        return RankFailed(self.failed)

    def _replies(self) -> list[tuple[str, Any]]:
        """Each rank's start-up reply: down its pipe, or (Ray) through the store."""
        if self.backend == "ray":
            from deepserve.engine import ray_ranks

            while not self.failed:
                try:
                    return ray_ranks.replies(self._store, self.size, 1.0)
                except RuntimeError:  # not all there yet
                    continue
            return [("error", self.failed)] * (self.size - 1)
        out = []
        for conn in self.conns:
            try:
                out.append(pickle.loads(conn.recv_bytes()))
            except (EOFError, OSError):
                out.append(("error", "it exited while loading"))
        return out

    def send(self, message: tuple) -> None:
        if self.failed:
            raise RankFailed(self.failed)
        blob = pickle.dumps(message)
        try:
            if self.backend == "ray":
                from deepserve.engine.ray_ranks import send_step

                send_step(self.control, blob)
            for conn in self.conns:
                conn.send_bytes(blob)
        except (OSError, RuntimeError) as exc:
            self.failed = self.failed or f"a {self.mode}-parallel rank is gone ({exc})"
            raise RankFailed(self.failed) from exc

    def _watch(self) -> None:
        if self.backend == "ray":
            import ray

            done, _ = ray.wait(self._loops, num_returns=1, timeout=None)
            if getattr(self, "_closing", False):
                return
            try:
                ray.get(done[0])
                why = "returned"
            except Exception as exc:  # the actor or its node died
                why = f"failed: {str(exc).strip().splitlines()[0][:200]}"
            rank = self._loops.index(done[0]) + 1
            self.failed = (f"{self.mode}-parallel rank {rank} (a Ray actor) {why}; this "
                           "replica cannot compute and stops")
            logger.error("%s", self.failed)
            if self.on_fail is not None:
                self.on_fail()
            return
        from multiprocessing.connection import wait

        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs, 1)}
        while sentinels:
            for s in wait(list(sentinels)):
                rank, proc = sentinels.pop(s)
                if getattr(self, "_closing", False):
                    return
                self.failed = (f"{self.mode}-parallel rank {rank} exited (code "
                               f"{proc.exitcode}); this replica cannot compute and stops")
                logger.error("%s", self.failed)
                if self.on_fail is not None:
                    self.on_fail()
                return

    def close(self, at_once: bool = False) -> None:
        """Stop the other ranks (``at_once``: killed, as they may be blocked inside an
        exchange that will never complete)."""
        if getattr(self, "_closing", False):
            return
        self._closing = True
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(("stop", None)))
                conn.close()
            except OSError:
                pass
        for proc in self.procs:
            proc.join(0 if at_once else 10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _ray_host() -> str:
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", log_to_driver=False)
    return ray.util.get_node_ip_address()


def _worker(mode: str, rank: int, size: int, port: int, conn: Any, config: Any, path: Path,
            kind: str, max_model_len: int, threads: int) -> None:
    """A local rank process: join the group, then ``serve_rank``."""
    store = _store(port, size, master=False)
    group = _group(store, rank, size)
    serve_rank(mode, rank, size, group, conn, config, path, kind, max_model_len, threads,
               _layer_group(store, mode, rank, group, config))


def _layer_group(store: Any, mode: str, rank: int, group: Any, config: Any) -> Any:
    """The group that splits this rank's layers: the replica's for tensor or expert
    parallelism alone, its stage's tensor ranks with both kinds, none for stages."""
    if mode != "tensor+pipeline":
        return None if mode == "pipeline" else group
    tp = config.tensor_parallel_size
    return _group(store, rank % tp, tp, f"stage{rank // tp}")


def serve_rank(mode: str, rank: int, size: int, group: Any, conn: Any, config: Any,
               path: Path, kind: str, max_model_len: int, threads: int,
               layer_group: Any = None) -> None:
    """Rank ``rank``: load its part, build its KV pool, run every step it is sent
    (``conn``: a pipe, or a Ray rank's ``StoreChannel``). With tensor and pipeline
    parallelism, ranks ``s * tp`` .. are stage s; each passes its micro-batches' hidden
    states to the same tensor rank of the next stage (the last stage's rank 0: to rank 0)."""
    from deepserve.engine import setup
    from deepserve.layers.kv_cache import cache_for
    from deepserve.loader.weights import open_checkpoint

    torch.set_num_threads(threads)
    try:
        ckpt = open_checkpoint(path, kind)
        tp = stage_group_size(mode, config)
        shard = part(mode, rank, size, ckpt.model_config(), tp)
        device = setup.pick_device(config.device)
        dtype = setup.pick_dtype(config.dtype, device)
        model = setup.build_model(ckpt, shard.local, config, max_model_len, dtype, device,
                                  setup.use_cpu_kernels(config, device), False, shard=shard)
        if layer_group is not None:
            set_group(model, layer_group, "expert" if mode == "expert" else "tensor",
                      config.expert_dispatch)
        _, (num_blocks, kv_dtype, kv_kind) = pickle.loads(conn.recv_bytes())
        slots = num_blocks * config.block_size
        caches = [cache_for(shard.local, slots, kv_dtype, kv_kind, device)
                  for _ in range(shard.local.num_layers)]
    except Exception as exc:  # tell rank 0 why, then leave
        conn.send_bytes(pickle.dumps(("error", f"{type(exc).__name__}: {exc}")))
        return
    conn.send_bytes(pickle.dumps(("ready", None)))
    with torch.inference_mode():
        while True:
            try:
                what, payload = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError, RuntimeError):
                return  # rank 0 is gone
            if what == "stop":
                return
            if what == "logits":  # this rank's columns of the head, gathered on rank 0
                if rank < tp:  # (stage 0's tensor ranks)
                    shape, h_dtype = payload
                    h = torch.empty(shape, dtype=torch.float32)
                    layer_group.broadcast(h, 0).wait()
                    gather_logits(model.logits(h.to(h_dtype)), layer_group, tp,
                                  shard.full.vocab_size)
                continue
            input_ids, positions, meta = payload
            if mode in ("tensor", "expert"):
                model(input_ids, positions, caches, meta)
                continue
            sent, stage, stages = [], rank // tp, size // tp
            to = rank + tp if stage < stages - 1 else (0 if rank % tp == 0 else None)
            for i, (_, ids, pos, m) in enumerate(
                    micro_batches(input_ids, positions, meta, MICRO_BATCHES * stages)):
                hidden = None
                if stage:  # from the same tensor rank of the stage before
                    hidden = torch.empty(ids.shape[0], shard.full.hidden_size, dtype=dtype)
                    group.recv([hidden], rank - tp, i).wait()
                out = model(ids, pos, caches, m, hidden=hidden).contiguous()
                if to is not None:
                    sent.append((out, group.send([out], to, i)))
            for _, work in sent:
                work.wait()
