"""Steps (what one timed repetition runs), timing, and peak memory.

Modes:
  fwd      forward under torch.no_grad()
  bwd      backward only: the forward runs once outside the timed region and its graph is kept
           (retain_graph=True); input grads are set to None before every repetition
  fwd+bwd  forward and backward in each repetition
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import numpy as np
import torch


@dataclasses.dataclass
class Prepared:
    step: callable  # one timed repetition
    once: callable  # one full untimed run for the memory pass (forward, + backward if any)
    leaves: list  # inputs whose .grad is reset before each repetition
    warmup_s: float  # seconds spent warming up (includes torch.compile for that provider)
    peak_mem_mb: float  # NaN when not measured


def _zero(leaves):
    for t in leaves:
        t.grad = None


def prepare(fn, inputs, case, mode, warmup: int = 1, memory: bool = True, seed: int = 1):
    """Warm fn up for `mode` (compiling it if needed), measure its peak memory once (before
    the bwd step keeps a graph alive) and return the step to time. The memory pass is a full run
    too, so with memory=True the step has run warmup + 1 times before it is timed. The first
    warm-up of the backward modes is also the call that gives the output shapes for the grads."""
    pick = case.pick_outputs
    leaves = [t for t in inputs if t.requires_grad] if mode != "fwd" else []
    t0 = time.perf_counter()
    if mode == "fwd":
        def once():
            with torch.no_grad():
                fn(*inputs)
        for _ in range(warmup):
            once()
        grads = None
    else:
        outs = [o for o in pick(fn(*inputs)) if o.requires_grad]
        if not outs:
            raise RuntimeError("no output requires grad")
        gen = torch.Generator(device=outs[0].device).manual_seed(seed)
        grads = [torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype) for o in outs]
        torch.autograd.backward(outs, grads)  # warm-up 1
        del outs

        def once():
            outs = [o for o in pick(fn(*inputs)) if o.requires_grad]
            torch.autograd.backward(outs, grads)
        for _ in range(warmup - 1):
            _zero(leaves)
            once()
    _sync(case.device)
    warmup_s = time.perf_counter() - t0
    peak = peak_memory_mb(once, leaves, inputs, case.device) if memory else float("nan")

    if mode == "bwd":
        kept = [o for o in pick(fn(*inputs)) if o.requires_grad]

        def step():
            torch.autograd.backward(kept, grads, retain_graph=True)
    else:
        step = once
    return Prepared(step, once, leaves, warmup_s, peak)


CPU_MIN_REPS, CPU_MAX_REPS, CPU_REP_S = 3, 20, 1.0  # repetitions: at least 3, up to 20 or 1 s


def expected_calls(mode: str, step_s: float, device: str) -> float:
    """About how many times prepare() + time_step() run the step of `mode`, whose repetition takes
    step_s seconds: warm-up, the memory pass, (bwd: one more forward), the timed repetitions. For the
    progress bar's estimate of the time left, not for anything measured."""
    step_s = max(step_s, 1e-6)
    if str(device).startswith("cuda"):
        reps = 0.125 / step_s + 2  # do_bench: 25 ms warm-up + 100 ms of repetitions, + its estimate
    else:
        reps = min(CPU_MAX_REPS, max(CPU_MIN_REPS, CPU_REP_S / step_s))
    return reps + (3 if mode == "bwd" else 2)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_step(prep: Prepared, device: str, quick: bool) -> tuple:
    """(median, p20, p80) in ms."""
    if str(device).startswith("cuda"):
        from triton.testing import do_bench

        warm, rep = (1, 5) if quick else (25, 100)  # ms of warm-up / measurement
        ms = do_bench(prep.step, warmup=warm, rep=rep, grad_to_none=prep.leaves or None,
                      quantiles=[0.5, 0.2, 0.8])
        return tuple(float(v) for v in ms)
    # CPU: wall clock per repetition after warm-up (prepare() already warmed up)
    reps, min_reps, max_s = (2, 2, 0.0) if quick else (CPU_MAX_REPS, CPU_MIN_REPS, CPU_REP_S)
    times, deadline = [], time.perf_counter() + max_s
    while len(times) < reps and (len(times) < min_reps or time.perf_counter() < deadline):
        _zero(prep.leaves)
        t0 = time.perf_counter()
        prep.step()
        times.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = np.percentile(times, [50, 20, 80])
    return float(med), float(p20), float(p80)


def peak_memory_mb(once, leaves, inputs, device: str) -> float:
    """Peak memory of one full run (fwd, or fwd+bwd for the bwd modes), inputs included.

    CUDA: torch.cuda.max_memory_allocated (everything live in the process, which is the inputs
    and this run). CPU: tracemalloc does not see torch's allocator, so we replay the allocation
    events of torch.profiler(profile_memory=True) and add the bytes of the inputs.
    """
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _zero(leaves)
        once()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    _zero(leaves)
    live = sum(t.numel() * t.element_size() for t in inputs)
    return (live + _cpu_peak_alloc_bytes(once)) / 2**20


def _cpu_peak_alloc_bytes(run) -> float:
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # private-ish profiler API: report "unknown" rather than fail
        return float("nan")
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == torch.autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return float(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines on fd 2 from C++; keep the progress bar readable."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def guard_cpu_memory(fraction: float = 0.85) -> str:
    """Cap the address space so a too-big CPU case fails with an allocation error (recorded as
    NaN) instead of calling the kernel's OOM killer on the whole run. Linux only; best effort."""
    try:
        import resource

        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        with open("/proc/self/status") as f:
            vm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))
        limit = vm + int(fraction * info["MemAvailable"])
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or limit < soft:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        return f"address space capped at {limit / 2**30:.1f} GiB"
    except Exception as e:  # noqa: BLE001 - never block a run over this
        return f"no memory cap ({type(e).__name__})"
