"""Benchmarks: offline throughput, an OpenAI-protocol load generator, reports and plots."""
