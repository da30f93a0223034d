"""Run cases x providers x modes in one process, on the same inputs, into rows."""
from __future__ import annotations

import datetime
import gc
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .providers import PROVIDERS, not_applicable
from .timing import expected_calls, prepare, time_step

REPO = Path(__file__).resolve().parent.parent
NAN = float("nan")
# A measurement starts only if BUDGET_MARGIN x its estimate fits the budget left: under load the estimate
# ran short (sdpa 16K bwd: 127 s estimated, 191 s measured at load average 8 on 2 cores).
BUDGET_MARGIN = 1.25


class Progress:
    """A one-line progress bar on stderr (no tqdm dependency), with an estimate of the time left."""

    def __init__(self, total: int, width: int = 24):
        self.total, self.done, self.width, self.t0 = max(total, 1), 0, width, time.perf_counter()
        self.tty, self.printed_tenth = sys.stderr.isatty(), -1

    def show(self, label: str, left_s=None):
        filled = self.width * self.done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        secs = time.perf_counter() - self.t0
        eta = f" ~{_minutes(left_s)} left" if left_s is not None else ""
        line = f"[{bar}] {self.done}/{self.total} {_minutes(secs)}{eta} {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:118].ljust(118))
        elif 10 * self.done // self.total > self.printed_tenth:  # a log file: one line per 10%
            self.printed_tenth = 10 * self.done // self.total
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def advance(self, label: str = "", left_s=None):
        self.done += 1
        self.show(label, left_s)

    def close(self):
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _minutes(secs: float) -> str:
    secs = max(0, int(round(secs)))
    return f"{secs // 60}m{secs % 60:02d}s"


class Eta:
    """Seconds left, from what this run measured so far. A measurement costs about
    expected_calls(step) repetitions of its step plus a fixed part (compilation); the step of an
    item not yet run is that of the most alike measured item, scaled by its work (bytes or FLOPs):
    the same shape in another mode first (exact up to the mode's work factor), then the same mode at
    another N (our work, not a dense baseline's: SDPA's cost grows N^2 where routed FLOPs grow N),
    then less alike; the fixed part carries over, or is the provider's compile_s_guess when the
    match is another provider's."""

    def __init__(self):
        self.done = []  # (case, provider, mode, step_s, fixed_s, wall_s)

    def add(self, case, name, mode, ms, wall_s):
        step = ms * 1e-3 if ms > 0 and math.isfinite(ms) else math.nan
        fixed = wall_s - expected_calls(mode, step, case.device) * step if step == step else math.nan
        self.done.append((case, name, mode, step, max(fixed, 0.0), wall_s))

    def item_s(self, case, name, mode):
        timed = [d for d in self.done if d[3] == d[3]]
        d = self._nearest(timed, case, mode, (
            lambda d: (d[1], d[0]) == (name, case),
            lambda d: (d[1], d[0].op, d[2], d[0].family) == (name, case.op, mode, case.family),
            lambda d: (d[1], d[0].op, d[2]) == (name, case.op, mode),
            lambda d: (d[1], d[0].op) == (name, case.op),
            lambda d: d[0].op == case.op))
        if d is None:
            walls = [d[5] for d in self.done]
            return sum(walls) / len(walls) if walls else None
        step = d[3] * case.work(mode) / d[0].work(d[2])
        # compilation depends on the mode (fwd+bwd reuses the graph bwd compiled): same mode if measured
        same_mode = self._nearest(timed, case, mode, (lambda d: (d[1], d[2]) == (name, mode),))
        fixed = (same_mode or d)[4] if (same_mode or d)[1] == name else PROVIDERS[name].compile_s_guess
        return fixed + expected_calls(mode, step, case.device) * step

    @staticmethod
    def _nearest(done, case, mode, rules):
        """The measured item of the first rule that matches any, nearest in work; None if none does."""
        for alike in rules:
            near = [d for d in done if alike(d)]
            if near:
                return min(near, key=lambda d: abs(math.log(case.work(mode) / d[0].work(d[2]))))
        return None

    def left_s(self, todo, budget_left_s=math.inf):
        """todo: (case, provider, mode) not yet measured, the next one first; None until something was
        measured. Measurements start until the budget is spent: the next one may run past it."""
        if not self.done:
            return None
        left = sum(self.item_s(*item) or 0.0 for item in todo)
        if todo and budget_left_s < left:
            left = max(budget_left_s, 0.0) + (self.item_s(*todo[0]) or 0.0)
        return left


def cpu_model() -> str:
    """'model name' of /proc/cpuinfo (e.g. "AMD EPYC 7B13"), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_simd() -> str:
    """The widest x86 SIMD the CPU reports (our C++ kernels dispatch on it at run time)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return "unknown"
    return next((x for x in ("avx512f", "avx2", "avx", "sse4_2") if x in flags), "unknown")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import os

    return f"{cpu_model()} ({os.cpu_count()} cores)"


def run_meta(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                capture_output=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        commit = "unknown"
    meta = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": commit,
            "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if not device.startswith("cuda"):
        meta.update(cpu_model=cpu_model(), cpu_simd=cpu_simd())
    return meta


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    head = text[0] if text else ""
    if isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in head:
        return f"OOM: {head}"[:160]  # the allocator's line says how many bytes were asked for
    return f"{type(err).__name__}: {head}"[:160]


def _cleanup(device: str, collect: bool = False):
    # Tensors and autograd graphs die by refcount; a full gc pass costs ~0.2 s once dynamo is
    # imported, so only between cases and after failures (tracebacks keep frames alive).
    if collect:
        gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def plan(cases, providers, modes) -> list:
    """(case, provider, [modes]) in run order; providers that do not apply are left out.
    torch.compile runs after everything else: its warm-up costs seconds to a minute per case, so
    under a time budget it is the one left unmeasured, not our kernels."""
    out = []
    for case in cases:
        for name in providers:
            if PROVIDERS[name].applies(case):
                case_modes = [m for m in case.modes if m in modes]
                if case_modes:
                    out.append((case, name, case_modes))
    return sorted(out, key=lambda item: item[1] == "compile")  # stable: order kept otherwise


def run(cases, providers, modes, *, quick=False, budget_s=math.inf, on_row=None, meta=None):
    """Benchmark everything; never raises for a provider. Each row has a status:
    ok, n/a (a known reason, in the note), failed (the error, in the note), skipped (time budget:
    no measurement starts after budget_s seconds, nor one that the estimate says would end after it)."""
    work = plan(cases, providers, modes)
    if meta is None:
        meta = run_meta(cases[0].device) if cases else {}
    meta = {k: meta[k] for k in ("device", "torch", "triton", "commit", "timestamp")}
    todo = [(case, name, mode) for case, name, case_modes in work for mode in case_modes
            if not not_applicable(name, case, mode)]
    progress, eta = Progress(len(todo)), Eta()
    rows, t_start, inputs_of = [], time.perf_counter(), {}
    for case, name, case_modes in work:
        runnable = [m for m in case_modes if not not_applicable(name, case, m)]
        if runnable and case not in inputs_of:  # same inputs for every provider of a case
            inputs_of.clear()
            _cleanup(case.device, collect=True)
            inputs_of[case] = case.make_inputs()
        fn, build_err = None, None
        if not runnable:
            pass
        elif time.perf_counter() - t_start > budget_s:
            build_err = "skipped", "time budget spent"
        else:
            t_build = time.perf_counter()
            try:
                fn = PROVIDERS[name].build(case)
            except Exception as e:  # noqa: BLE001
                build_err = "failed", _short(e)
                _cleanup(case.device, collect=True)
            t_build = time.perf_counter() - t_build
        for mode in case_modes:
            reason = not_applicable(name, case, mode)
            label = f"{case.op} {name} {mode} N={case.N}"
            if reason:
                row = _row(case, name, mode, "n/a", reason)
            else:
                progress.show(label, eta.left_s(todo, budget_s - (time.perf_counter() - t_start)))
                t0 = time.perf_counter()
                status = build_err
                est = eta.item_s(case, name, mode) if math.isfinite(budget_s) else None
                if not status and est is not None and t0 - t_start + BUDGET_MARGIN * est > budget_s:
                    status = "skipped", f"time budget: its estimate would end past {budget_s:.0f} s"
                row = _measure(case, name, mode, fn, inputs_of[case], quick, status, budget_s, t_start)
                row["estimate_s"] = None if est is None else round(est, 1)
                row["wall_s"] = round(time.perf_counter() - t0 + t_build, 2)
                t_build = 0.0
                todo.remove((case, name, mode))
                if row["status"] != "skipped":
                    eta.add(case, name, mode, row["ms_median"], row["wall_s"])
            row.update(meta)
            rows.append(row)
            if row["status"] == "failed":
                sys.stderr.write(f"\n! {case.op} {name} {mode} {case.shape}: {row['note']}\n")
            if on_row:
                on_row(row)
            if not reason:
                progress.advance(label, eta.left_s(todo, budget_s - (time.perf_counter() - t_start)))
        del fn
        _cleanup(case.device)
    progress.close()
    return rows


def _row(case, name, mode, status, note, ms=(NAN, NAN, NAN), peak=NAN) -> dict:
    return {"op": case.op, "provider": name, "mode": mode, "shape": case.shape,
            "dtype": case.dtype_name, "ms_median": ms[0], "ms_p20": ms[1], "ms_p80": ms[2],
            "throughput": case.throughput(mode, ms[0], name), "throughput_unit": case.throughput_unit,
            "peak_mem_mb": peak, "status": status, "note": note, "N": case.N, "family": case.family}


def _measure(case, name, mode, fn, inputs, quick, err, budget_s, t_start) -> dict:
    if err:
        return _row(case, name, mode, *err)
    if time.perf_counter() - t_start > budget_s:
        return _row(case, name, mode, "skipped", "time budget spent")
    prep, failed = None, None
    try:
        prep = prepare(fn, inputs, case, mode, warmup=1)
        peak = prep.peak_mem_mb
        ms = time_step(prep, case.device, quick)
        note = f"warm-up incl. compile {prep.warmup_s:.1f}s" if name == "compile" else ""
        if not all(math.isfinite(v) and v > 0 for v in ms):
            failed = f"non-positive or non-finite time {ms}"
    except Exception as e:  # noqa: BLE001
        failed = _short(e)
    finally:
        del prep
        for t in inputs:
            t.grad = None
        _cleanup(case.device, collect=failed is not None)
    if failed:
        return _row(case, name, mode, "failed", failed)
    return _row(case, name, mode, "ok", note, ms, peak)
