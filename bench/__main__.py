"""python -m bench [--quick] [--ops ...] [--modes ...] [--providers ...] [--device ...] [--out DIR]"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from .cases import MODES, OPS, default_cases
from .providers import PROVIDERS, default_providers
from .report import CsvWriter, file_stem, markdown_table, plot, write_json


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
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny shapes")
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
    p.add_argument("--budget-s", type=float, default=math.inf,
                   help="stop starting new measurements after this many seconds")
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
    cases = [c for c in default_cases(device, args.quick) if c.op in args.ops]
    meta = run_meta(device)
    meta.update(quick=args.quick, argv=sys.argv[1:])
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
    t0 = time.perf_counter()
    try:
        rows = run(cases, providers, args.modes, quick=args.quick, budget_s=args.budget_s,
                   on_row=writer.write, meta=meta)
    finally:
        writer.close()
    meta["wall_s"] = round(time.perf_counter() - t0, 1)

    table = markdown_table(rows, providers, ceilings)
    resources_md = ""
    try:  # registers, spills, shared memory, occupancy of the kernels this run used (bench/resources.py)
        from .resources import bench_section

        meta["resources"], resources_md = bench_section(device)
        resources_md = f"\n## GPU kernel resources\n\n{resources_md}"
    except Exception as e:  # noqa: BLE001 - the timings matter more
        meta["resources"] = f"unavailable: {type(e).__name__}: {e}"
    title = f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['commit']}"
    stem.with_suffix(".md").write_text(f"# {title}\n\n{meta['timestamp']}\n\n{table}\n{resources_md}")
    write_json(stem.with_suffix(".json"), rows, meta)
    plotted = plot(stem.with_suffix(".png"), rows, title, ceilings, providers)
    written = [stem.with_suffix(s) for s in (".csv", ".json", ".md")]
    written += [stem.with_suffix(".png")] if plotted else []
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
