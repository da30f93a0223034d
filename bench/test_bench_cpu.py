"""pytest-benchmark suite for the CPU paths, parametrized from bench.cases.default_cases.

    pytest bench --benchmark-only          # the default CPU matrix (same cases as python -m bench)
    pytest bench                           # without --benchmark-only: the quick matrix, as a smoke test
    BENCH_QUICK=1 pytest bench --benchmark-only

Each test warms its provider up first (torch.compile happens there, outside the measurement).
"""
import os

import pytest
import torch

from bench.cases import default_cases
from bench.providers import PROVIDERS, default_providers, not_applicable
from bench.timing import prepare


def _quick(config) -> bool:
    return os.environ.get("BENCH_QUICK") == "1" or not config.getoption("benchmark_only", False)


def pytest_generate_tests(metafunc):
    if "item" not in metafunc.fixturenames:
        return
    quick = _quick(metafunc.config)
    items = [(case, name, mode)
             for case in default_cases("cpu", quick)
             for name in default_providers("cpu", quick) if PROVIDERS[name].applies(case)
             for mode in case.modes if not not_applicable(name, case, mode)]
    ids = [f"{c.op}-{m}-{p}-N{c.N}" for c, p, m in items]
    metafunc.parametrize("item", items, ids=ids)


@pytest.fixture(scope="module")
def _package():
    return pytest.importorskip("routing_kernels")


def test_cpu(item, benchmark, request, _package):
    case, name, mode = item
    inputs = case.make_inputs()
    fn = PROVIDERS[name].build(case)
    prep = prepare(fn, inputs, case, mode, warmup=1, memory=False)

    def rep():
        for t in prep.leaves:
            t.grad = None
        prep.step()

    benchmark.group = f"{case.op} {mode} {case.shape}"
    benchmark.extra_info.update(op=case.op, provider=name, mode=mode, shape=case.shape,
                                dtype=case.dtype_name, unit=case.throughput_unit,
                                torch=torch.__version__)
    if case.op == "routed_attention":
        benchmark.extra_info["flops"] = case.flops(mode)
    else:
        benchmark.extra_info["bytes"] = case.bytes_moved(mode)
    if _quick(request.config):
        benchmark.pedantic(rep, rounds=3)  # smoke run: a few rounds, not pytest-benchmark's 1 s
    else:
        benchmark(rep)
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["throughput"] = case.throughput(mode, stats.median * 1e3)
