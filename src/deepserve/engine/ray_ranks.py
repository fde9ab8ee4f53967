"""The other ranks of a split model as Ray actors (``--distributed-executor-backend
ray``), so a replica can span machines: one actor per rank, placed in the caller's
placement group when it runs in one (a Ray Serve replica deployed with
``placement_group_bundles``: rank r in bundle r), else in a new group of one bundle
per rank (``PACK``).

What differs from the local processes of ``engine/parallel.py``:

- **Rendezvous**: rank 0 serves the TCP store on its node's address, which Ray reports
  (``ray.util.get_node_ip_address``); each actor is handed it.
- **Steps**: rank 0 broadcasts each step's pickled inputs over a second gloo group
  (its own long timeout: an idle replica waits there), instead of down a pipe.
- **Replies** at start ("ready" or the error) go through the store.
- **Failure**: each actor's loop is one long Ray task; a watcher thread waits on those
  tasks, and one that ends (the actor died, or its node) marks the replica failed.
  Actors share the fate of the process that created them.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

import torch

CONTROL_TIMEOUT = timedelta(days=7)  # an idle replica's ranks wait this long for a step


def broadcast_bytes(group: Any, blob: bytes | None) -> bytes:
    """Rank 0 sends ``blob`` to every rank of ``group``; the others get it."""
    n = torch.tensor([len(blob) if blob is not None else 0], dtype=torch.int64)
    group.broadcast(n, 0).wait()
    data = (torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob is not None
            else torch.empty(int(n.item()), dtype=torch.uint8))
    group.broadcast(data, 0).wait()
    return blob if blob is not None else data.numpy().tobytes()


class StoreChannel:
    """A Ray rank's messages: steps by broadcast from rank 0, replies through the store."""

    def __init__(self, control: Any, store: Any, rank: int) -> None:
        self.control, self.store, self.rank = control, store, rank

    def recv_bytes(self) -> bytes:
        return broadcast_bytes(self.control, None)

    def send_bytes(self, blob: bytes) -> None:
        self.store.set(f"reply{self.rank}", blob)


class RayRank:
    """One rank as a Ray actor: ``run`` is its whole life (load, then serve steps)."""

    def run(self, mode: str, rank: int, size: int, host: str, port: int, config: Any,
            path: Any, kind: str, max_model_len: int, threads: int) -> None:
        import ray

        from deepserve.engine.parallel import _group, _layer_group, _store, serve_rank

        store = _store(port, size, master=False, host=host)
        store.set(f"node{rank}", ray.get_runtime_context().get_node_id())
        group = _group(store, rank, size)
        layers = _layer_group(store, mode, rank, group, config)
        control = _group(store, rank, size, "control", CONTROL_TIMEOUT)
        serve_rank(mode, rank, size, group, StoreChannel(control, store, rank), config, path,
                   kind, max_model_len, threads, layers)


def start_ranks(mode: str, size: int, host: str, port: int, config: Any, path: Any,
                kind: str, max_model_len: int, threads: int) -> tuple[list, list]:
    """Create the actors of ranks 1..size-1 and start their loops: (actors, loop tasks)."""
    import ray
    from ray.util.placement_group import get_current_placement_group, placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not ray.is_initialized():
        ray.init(address="auto", log_to_driver=False)
    pg, first = get_current_placement_group(), 1  # rank r in the replica's bundle r
    if pg is None:
        pg, first = placement_group([{"CPU": threads}] * (size - 1), strategy="PACK"), 0
        ray.get(pg.ready(), timeout=120)
    actor = ray.remote(num_cpus=0)(RayRank)  # its bundle holds the CPUs for it
    actors, loops = [], []
    for rank in range(1, size):
        a = actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=rank - 1 + first)).remote()
        actors.append(a)
        loops.append(a.run.remote(mode, rank, size, host, port, config, path, kind,
                                  max_model_len, threads))
    return actors, loops


def nodes(store: Any, size: int) -> list[str]:
    """The Ray node of each rank but 0, in rank order."""
    return [store.get(f"node{r}").decode() for r in range(1, size)]


def replies(store: Any, size: int, timeout: float) -> list[tuple[str, Any]]:
    """Each rank's start-up reply from the store, in rank order."""
    keys = [f"reply{r}" for r in range(1, size)]
    store.wait(keys, timedelta(seconds=timeout))
    return [pickle.loads(store.get(k)) for k in keys]


def send_step(control: Any, blob: bytes) -> None:
    broadcast_bytes(control, blob)
