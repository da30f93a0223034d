"""Benchmark harness for routing_kernels: `python -m bench --help` (see bench/README.md)."""
