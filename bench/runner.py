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

from .providers import PROVIDERS
from .timing import prepare, time_step

REPO = Path(__file__).resolve().parent.parent
NAN = float("nan")


class Progress:
    """A one-line progress bar on stderr (no tqdm dependency)."""

    def __init__(self, total: int, width: int = 24):
        self.total, self.done, self.width, self.t0 = max(total, 1), 0, width, time.perf_counter()
        self.tty, self.printed_tenth = sys.stderr.isatty(), -1

    def show(self, label: str):
        filled = self.width * self.done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        secs = time.perf_counter() - self.t0
        line = f"[{bar}] {self.done}/{self.total} {secs:5.0f}s {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:118].ljust(118))
        elif 10 * self.done // self.total > self.printed_tenth:  # a log file: one line per 10%
            self.printed_tenth = 10 * self.done // self.total
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def advance(self, label: str = ""):
        self.done += 1
        self.show(label)

    def close(self):
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine() or "cpu"
    import os

    return f"{cpu} cpu ({os.cpu_count()} cores)"


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
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": commit,
            "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    head = text[0] if text else ""
    if isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in head:
        return "OOM"
    return f"{type(err).__name__}: {head}"[:100]


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
    """Benchmark everything; a failure becomes a NaN row with a note, never an exception."""
    work = plan(cases, providers, modes)
    if meta is None:
        meta = run_meta(cases[0].device) if cases else {}
    meta = {k: meta[k] for k in ("device", "torch", "triton", "commit", "timestamp")}
    progress = Progress(sum(len(m) for _, _, m in work))
    rows, t_start, inputs_of = [], time.perf_counter(), {}
    for case, name, case_modes in work:
        if case not in inputs_of:  # same inputs for every provider of a case
            inputs_of.clear()
            _cleanup(case.device, collect=True)
            inputs_of[case] = case.make_inputs()
        inputs = inputs_of[case]
        fn, build_err = None, None
        if time.perf_counter() - t_start > budget_s:
            build_err = "skipped: time budget spent"
        else:
            try:
                fn = PROVIDERS[name].build(case)
            except Exception as e:  # noqa: BLE001
                build_err = _short(e)
                _cleanup(case.device, collect=True)
        for mode in case_modes:
            progress.show(f"{case.op} {name} {mode} N={case.N}")
            row = _measure(case, name, mode, fn, inputs, quick, build_err, budget_s, t_start)
            row.update(meta)
            rows.append(row)
            if row["note"] and math.isnan(row["ms_median"]):
                sys.stderr.write(f"\n! {case.op} {name} {mode} {case.shape}: {row['note']}\n")
            if on_row:
                on_row(row)
            progress.advance(f"{case.op} {name} {mode} N={case.N}")
        del fn
        _cleanup(case.device)
    progress.close()
    return rows


def _measure(case, name, mode, fn, inputs, quick, err, budget_s, t_start) -> dict:
    ms = (NAN, NAN, NAN)
    peak, note = NAN, err or ""
    if not err and time.perf_counter() - t_start > budget_s:
        note = "skipped: time budget spent"
    elif not err:
        prep, failed = None, False
        try:
            prep = prepare(fn, inputs, case, mode, warmup=1 if quick else 2)
            peak = prep.peak_mem_mb
            ms = time_step(prep, case.device, quick)
            if name == "compile":
                note = f"warm-up incl. compile {prep.warmup_s:.1f}s"
        except Exception as e:  # noqa: BLE001
            note = _short(e)
            failed = True
        finally:
            del prep
            for t in inputs:
                t.grad = None
            _cleanup(case.device, collect=failed)
    return {"op": case.op, "provider": name, "mode": mode, "shape": case.shape,
            "dtype": case.dtype_name, "ms_median": ms[0], "ms_p20": ms[1], "ms_p80": ms[2],
            "throughput": case.throughput(mode, ms[0]), "throughput_unit": case.throughput_unit,
            "peak_mem_mb": peak, "N": case.N, "note": note}
