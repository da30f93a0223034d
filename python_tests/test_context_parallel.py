"""Context-parallel routed attention on CPU with gloo, 2 and 4 processes: every rank's output and dq/dk/dv
equal the single-process op's rows on the full sequences (selection exactly), and bad input on one rank
raises on every rank instead of hanging. Each world size spawns its processes once and runs every case
inside them (context_parallel_cases.py): process start-up, not the cases, is most of the cost."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 150  # a hang (a rank stuck in a collective) fails here instead of stalling CI

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")


def _worker(rank, world, init_file, out_dir, job):
    import torch
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import context_parallel_cases as cases
        # the world-2 spawn also runs the bad-input calls: one process start-up less (~15 s on 2 cores)
        result = {"cases": cases.run_all(rank, world),
                  "bad": cases.run_bad_inputs(rank, world) if job == "cases+bad" else {}}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _spawn(world, job):
    """Run job on `world` ranks: the per-rank results, or a message when any rank hangs past TIMEOUT_S."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), tmp, job), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                return f"{job} on {world} ranks did not finish in {TIMEOUT_S} s (a rank hangs)"
        results = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                results.append(json.load(f))
        return results


_RESULTS = {}


def _results(world):
    """The spawn's per-rank results, run once per world size (a hang is reported once, not per test)."""
    if world not in _RESULTS:
        _RESULTS[world] = _spawn(world, "cases+bad" if world == 2 else "cases")
    if isinstance(_RESULTS[world], str):
        pytest.fail(_RESULTS[world])
    return _RESULTS[world]


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_single_process(world):
    failures = {f"rank {r}: {name}": msg for r, res in enumerate(_results(world))
                for name, msg in res["cases"].items()}
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(f"{k}\n{v}" for k, v in failures.items())


def test_context_parallel_bad_input_raises_on_every_rank():
    """Bad input on one rank (or ranks that disagree) raises on every rank within TIMEOUT_S, and a valid call
    afterwards still works (no rank was left inside a collective)."""
    results = _results(2)
    assert all(res["bad"] for res in results)
    for rank, res in enumerate(results):
        for name, what in res["bad"].items():
            assert what in ("raised", "ok"), f"rank {rank}, {name}: {what}"
