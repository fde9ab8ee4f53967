"""A model split across two Ray nodes: a Ray cluster of two real nodes started on this
machine (``ray.cluster_utils.Cluster``: a head and a second raylet, one CPU each), a
placement group that puts one bundle on each (``STRICT_SPREAD``), rank 0 an actor in the
first bundle running the engine, rank 1 the Ray actor it starts in the second
(``--distributed-executor-backend ray``)."""

from __future__ import annotations

import sys

import pytest
from prompts import PROMPTS

from deepserve import LLM, SamplingParams

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'deepserve[ray]')")

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


class Replica:
    """Rank 0: the engine, in bundle 0 of the placement group."""

    def __init__(self, path: str, kind: str) -> None:
        self.llm = LLM(model=path, dtype="float32", show_progress=False,
                       kv_cache_memory="16MiB", num_threads=1,
                       distributed_executor_backend="ray",
                       **{f"{k}_parallel_size": 2 for k in kind.split("+")})

    def generate(self, prompts: list[str]) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in self.llm.generate(prompts, GREEDY)]

    def lose_rank(self) -> str:
        """Kill rank 1's actor: the replica must say so, and refuse to compute."""
        import time

        group = self.llm.engine.parallel
        ray.kill(group.actors[0])
        deadline = time.monotonic() + 30
        while group.failed is None and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            self.generate(PROMPTS[:1])
        except Exception as exc:
            return f"{group.failed} | {type(exc).__name__}: {exc}"
        return "generated"

    def nodes(self) -> list[str]:
        """The Ray node of each rank."""
        return [ray.get_runtime_context().get_node_id(), *self.llm.engine.parallel.nodes]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.add_node(num_cpus=2)  # (logical CPUs: tensor x pipeline places two ranks a node)
    ray.init(address=c.address, log_to_driver=False)
    # the actor class above travels by value (the tests folder is not importable there)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.mark.parametrize("kind", ["pipeline", "tensor"])
def test_one_model_across_two_ray_nodes_equals_one_process(kind, cluster, tiny_llama_dir):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    ray.get(pg.ready(), timeout=120)
    actor = ray.remote(num_cpus=1)(Replica).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0)).remote(
        str(tiny_llama_dir), kind)
    try:
        nodes = ray.get(actor.nodes.remote(), timeout=300)
        assert len(set(nodes)) == 2  # rank 0 and rank 1 on different Ray nodes
        got = ray.get(actor.generate.remote(PROMPTS[:3]), timeout=300)
        one = LLM(model=str(tiny_llama_dir), dtype="float32", show_progress=False,
                  kv_cache_memory="16MiB")
        assert got == [o.outputs[0].token_ids for o in one.generate(PROMPTS[:3], GREEDY)]
        # an actor (or its node) lost: the replica fails with a clear error, no hang
        lost = ray.get(actor.lose_rank.remote(), timeout=120)
        assert "rank 1 (a Ray actor)" in lost and "RankFailed" in lost
    finally:
        ray.kill(actor)
        remove_placement_group(pg)


def test_tensor_and_pipeline_ranks_across_two_ray_nodes(cluster, tiny_llama_dir):
    """TP=2 x PP=2 as Ray actors in one placement group over both nodes: the same
    greedy tokens as one process."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 1}] * 4, strategy="PACK")
    ray.get(pg.ready(), timeout=120)
    actor = ray.remote(num_cpus=1)(Replica).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0)).remote(
        str(tiny_llama_dir), "tensor+pipeline")
    try:
        nodes = ray.get(actor.nodes.remote(), timeout=300)
        assert len(nodes) == 4 and len(set(nodes)) == 2  # four ranks over both nodes
        got = ray.get(actor.generate.remote(PROMPTS[:3]), timeout=300)
        one = LLM(model=str(tiny_llama_dir), dtype="float32", show_progress=False,
                  kv_cache_memory="16MiB")
        assert got == [o.outputs[0].token_ids for o in one.generate(PROMPTS[:3], GREEDY)]
    finally:
        ray.kill(actor)
        remove_placement_group(pg)


def test_a_ray_serve_replica_spans_both_nodes(cluster, tiny_llama_dir):
    """``deepserve ray-serve`` with a tier split in two stages on Ray actors: the
    deployment reserves a bundle per rank, STRICT_SPREAD puts them on both nodes, and
    the OpenAI route answers as one process would."""
    import httpx
    from ray import serve
    from server_utils import free_port

    from deepserve.deploy.ray_serve import RayServeConfig, run

    port = free_port()
    cfg = RayServeConfig.from_dict({"ray": {"host": "127.0.0.1", "port": port}, "tiers": {
        "lite": {"models": ["lite"], "min_replicas": 1, "max_replicas": 1, "num_cpus": 1,
                 "placement_strategy": "STRICT_SPREAD",
                 "engine": {"model": str(tiny_llama_dir), "dtype": "float32",
                            "kv_cache_memory": "16MiB", "num_threads": 1,
                            "pipeline_parallel_size": 2,
                            "distributed_executor_backend": "ray"}}}})
    assert cfg.tiers[0].deployment_options()["placement_group_bundles"] == [{"CPU": 1.0}] * 2
    run(cfg, blocking=False)
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300, json={
            "model": "lite", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        one = LLM(model=str(tiny_llama_dir), dtype="float32", show_progress=False,
                  kv_cache_memory="16MiB")
        assert r.json()["choices"][0]["text"] == one.generate([PROMPTS[0]], GREEDY)[0] \
            .outputs[0].text
    finally:
        serve.shutdown()
