"""Prometheus metrics of one server, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from deepserve.engine.async_engine import AsyncEngine
from deepserve.engine.sequence import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """Engine gauges read at scrape time, and per-request counters and histograms."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model"]
        m = model_name

        def gauge(name: str, doc: str, fn: object) -> None:
            g = Gauge(name, doc, labels, registry=r)
            g.labels(m).set_function(fn)  # type: ignore[arg-type]

        # Read from the engine's published snapshot, never from its live objects.
        gauge("deepserve_num_requests_running", "Sequences in the running batch",
              lambda: engine.stats.num_running)
        gauge("deepserve_num_requests_waiting", "Sequences waiting to be scheduled",
              lambda: engine.stats.num_waiting)
        gauge("deepserve_model_flops_utilization", "Model FLOPs per second over the last "
              "10 s against this machine's measured peak (0-1)", lambda: engine.stats.mfu)
        gauge("deepserve_memory_bandwidth_utilization", "Bytes moved (weights, KV cache) per "
              "second over the last 10 s against this machine's measured peak (0-1)",
              lambda: engine.stats.bandwidth_utilization)
        gauge("deepserve_peak_flops", "This machine's measured peak FLOP/s (compute dtype)",
              lambda: engine.stats.peak_flops)
        gauge("deepserve_peak_memory_bandwidth_bytes", "This machine's measured peak "
              "read bandwidth, bytes/s", lambda: engine.stats.peak_bytes_per_s)
        gauge("deepserve_scheduler_token_budget", "Token budget the scheduler chose for its "
              "last step (adaptive with --slo-ttft-ms/--slo-tpot-ms)",
              lambda: engine.stats.token_budget)
        gauge("deepserve_scheduler_batch_limit", "Batch cap the scheduler chose for its last "
              "step", lambda: engine.stats.batch_limit)
        gauge("deepserve_pricing_utilization", "The utilization pricing rules read: the "
              "busiest of KV-cache use, batch occupancy, MFU and bandwidth (0-1)",
              lambda: engine.stats.utilization)
        gauge("deepserve_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0-1)",
              lambda: engine.stats.kv_cache_usage)
        gauge("deepserve_kv_cache_blocks_total", "KV-cache blocks in the pool",
              lambda: engine.stats.kv_blocks_total)
        gauge("deepserve_kv_cache_blocks_used", "KV-cache blocks held by sequences",
              lambda: engine.stats.kv_blocks_used)
        gauge("deepserve_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache "
              "over prompt tokens looked up, since start",
              lambda: engine.stats.prefix_cache_hit_rate)
        gauge("deepserve_num_preemptions", "Sequences preempted since start",
              lambda: engine.stats.num_preemptions)
        self.prompt_tokens = Counter("deepserve_prompt_tokens", "Prompt tokens processed",
                                     labels, registry=r).labels(m)
        self.cached_tokens = Counter("deepserve_prompt_cached_tokens",
                                     "Prompt tokens served from the prefix cache", labels,
                                     registry=r).labels(m)
        self.generation_tokens = Counter("deepserve_generation_tokens", "Tokens generated",
                                         labels, registry=r).labels(m)
        self.requests = Counter("deepserve_requests", "Finished requests by finish reason",
                                ["model", "finish_reason"], registry=r)
        self.errors = Counter("deepserve_request_errors", "Requests answered with an error",
                              ["model", "status"], registry=r)
        self.ttft = Histogram("deepserve_time_to_first_token_seconds", "Time to first token",
                              labels, buckets=_LATENCY_BUCKETS, registry=r).labels(m)
        self.tpot = Histogram("deepserve_time_per_output_token_seconds",
                              "Mean time per output token after the first", labels,
                              buckets=_LATENCY_BUCKETS, registry=r).labels(m)
        self.e2e = Histogram("deepserve_e2e_request_latency_seconds", "End-to-end latency",
                             labels, buckets=_LATENCY_BUCKETS, registry=r).labels(m)
        self.model = m

    def observe(self, out: RequestOutput, finish_reason: str) -> None:
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.cached_tokens.inc(out.num_cached_tokens)
        generated = out.num_output_tokens
        self.generation_tokens.inc(generated)
        self.requests.labels(self.model, finish_reason).inc()
        end = out.finished_time or out.arrival_time
        self.e2e.observe(max(0.0, end - out.arrival_time))
        if out.first_token_time is not None:
            self.ttft.observe(max(0.0, out.first_token_time - out.arrival_time))
            per_seq = max(1, generated // max(1, len(out.outputs)))
            if per_seq > 1:
                self.tpot.observe(max(0.0, end - out.first_token_time) / (per_seq - 1))
