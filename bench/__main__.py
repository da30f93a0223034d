"""python -m bench [--quick | --full] [--ops ...] [--modes ...] [--providers ...] [--device ...] [--out DIR]

Exit status 1 when any measurement failed (its error is in the table, the CSV and the JSON)."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from .cases import MODES, OPS, default_cases
from .providers import PROVIDERS, default_providers
from .report import STATUSES, CsvWriter, file_stem, markdown_table, plot, summary_table, write_json


# The default CPU run measures in ~4 minutes on an idle 2-core VM; the budget (torch.compile last; no
# measurement estimated to end past it is started) keeps it under 5 minutes, with ~15 s of start-up and
# file writing, when other work slows the machine down (what it skips is recorded as "skipped").
DEFAULT_CPU_BUDGET_S = 270.0


def _csv_list(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return items
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny shapes")
    size.add_argument("--full", action="store_true",
                      help="the long CPU matrix (~25 min on 2 cores): eager/compile/flex where the "
                           "default sizes them away for time, and routed_attention at 64K")
    p.add_argument("--ops", type=_csv_list(OPS), default=list(OPS), help="comma list")
    p.add_argument("--modes", type=_csv_list(MODES), default=list(MODES), help="fwd,bwd,fwd+bwd")
    p.add_argument("--providers", type=_csv_list(PROVIDERS), default=None,
                   help="comma list (default: eager,compile,ours; quick: eager,ours)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--ceilings", action="store_true",
                   help="measure copy GB/s and matmul TFLOP/s first, report fractions of them")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for CPU runs (1 is steadier on a shared machine)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no measurement after this many seconds, nor one estimated to end after "
                        f"them (default: {DEFAULT_CPU_BUDGET_S:.0f} for the default CPU run, so that it ends "
                        "within 5 minutes even on a loaded machine; no limit otherwise)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from .runner import run, run_meta
    from .timing import guard_cpu_memory

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    providers = args.providers or default_providers(device, args.quick)
    if args.budget_s is None:
        default_cpu = device == "cpu" and not (args.quick or args.full)
        args.budget_s = DEFAULT_CPU_BUDGET_S if default_cpu else math.inf
    cases = [c for c in default_cases(device, args.quick, args.full) if c.op in args.ops]
    meta = run_meta(device)
    meta.update(quick=args.quick, full=args.full, argv=sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    meta["cpu_threads"] = torch.get_num_threads()
    if device == "cpu":
        meta["memory_guard"] = guard_cpu_memory()
    try:
        import routing_kernels

        meta["build_info"] = routing_kernels.build_info()
    except Exception as e:  # noqa: BLE001 - the table still shows which providers failed
        meta["build_info"] = f"unavailable: {type(e).__name__}: {e}"
    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"commit {meta['commit']}", file=sys.stderr)

    ceilings = None
    if args.ceilings:
        from .ceilings import measure_ceilings

        ceilings = measure_ceilings(device, quick=args.quick)
        meta["ceilings"] = ceilings
        print(f"ceilings: {ceilings}", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / file_stem(meta["device"], meta["timestamp"])
    writer = CsvWriter(stem.with_suffix(".csv"))
    t0, cpu0 = time.perf_counter(), time.process_time()
    meta["load_avg_1min_start"] = _load_avg()
    try:
        rows = run(cases, providers, args.modes, quick=args.quick, budget_s=args.budget_s,
                   on_row=writer.write, meta=meta)
    finally:
        writer.close()
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["cpu_s"] = round(time.process_time() - cpu0, 1)  # CPU seconds this process got (all threads)
    meta["load_avg_1min_end"] = _load_avg()

    table = markdown_table(rows, providers, ceilings)
    resources_md = ""
    try:  # registers, spills, shared memory, occupancy of the kernels this run used (bench/resources.py)
        from .resources import bench_section

        meta["resources"], resources_md = bench_section(device)
        resources_md = f"\n## GPU kernel resources\n\n{resources_md}"
    except Exception as e:  # noqa: BLE001 - the timings matter more
        meta["resources"] = f"unavailable: {type(e).__name__}: {e}"
    summary = summary_table(rows, [n for n, p in PROVIDERS.items() if p.ours])
    title = f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['commit']}"
    if meta.get("cpu_simd"):
        title = title.replace(" | torch", f" {meta['cpu_simd']} | torch", 1)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    done = (f"{len(rows)} rows ({tally}) in {meta['wall_s']:.0f} s ({meta['cpu_s']:.0f} CPU s; 1-min load "
            f"average {meta['load_avg_1min_start']} at the start, {meta['load_avg_1min_end']} at the end)")
    loads = [x for x in (meta["load_avg_1min_start"], meta["load_avg_1min_end"]) if x is not None]
    if loads and max(loads) > 1.5 * (os.cpu_count() or 1):  # other work shared the cores
        done += (f"\n\n**Loaded machine** (load average up to {max(loads)} on {os.cpu_count()} cores): "
                 "times are inflated, multi-threaded baselines (SDPA, eager matmuls) more than single-pass "
                 "kernels; compare ratios with care.")
    command = " ".join(["python -m bench"] + meta["argv"])
    header = f"# {title}\n\n{meta['timestamp']}; `{command}`: {done}\n"
    stem.with_suffix(".md").write_text(f"{header}\n## Summary\n\n{summary}\n\n## All measurements\n\n{table}\n"
                                       f"{resources_md}")
    write_json(stem.with_suffix(".json"), rows, meta)
    plotted = plot(stem.with_suffix(".png"), rows, title, ceilings, providers)
    written = [stem.with_suffix(s) for s in (".csv", ".json", ".md")]
    written += [stem.with_suffix(".png")] if plotted else []
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    print(table)
    print(f"\n{summary}\n\n{done}")
    return 1 if counts["failed"] else 0


def _load_avg():
    try:
        return round(os.getloadavg()[0], 1)
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
