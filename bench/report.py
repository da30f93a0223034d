"""Results out: CSV (written row by row, so a killed run keeps what it measured), JSON,
a markdown table and a plot."""
from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

COLUMNS = ["op", "provider", "mode", "shape", "dtype", "device", "ms_median", "ms_p20", "ms_p80",
           "throughput", "throughput_unit", "peak_mem_mb", "status", "note", "torch", "triton", "commit",
           "timestamp"]
STATUSES = ("ok", "n/a", "failed", "skipped")  # skipped: the --budget-s time budget was spent


def file_stem(device_name: str, timestamp: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    stamp = re.sub(r"[^0-9T]", "", timestamp[:19]).replace("T", "-")  # YYYYMMDD-HHMMSS
    return f"bench_{slug}_{stamp}"


class CsvWriter:
    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS, extrasaction="ignore")
        self._w.writeheader()
        self._f.flush()

    def write(self, row: dict):
        self._w.writerow({k: _fmt(v) for k, v in row.items()})
        self._f.flush()

    def close(self):
        self._f.close()


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return v


def write_json(path: Path, rows: list, meta: dict):
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
             for r in rows]
    path.write_text(json.dumps({"meta": meta, "rows": clean}, indent=1, default=str))


def _cell(row) -> str:
    if row["status"] != "ok":
        return {"failed": "**FAILED**"}.get(row["status"], row["status"])
    return f"{row['ms_median']:.3g} ms, {row['throughput']:.3g} {row['throughput_unit']}"


def _by_case(rows: list):
    """{(op, mode, shape, dtype): {provider: row}}, in first-seen order."""
    cells = {}
    for r in rows:
        cells.setdefault((r["op"], r["mode"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    return cells


def status_notes(rows: list) -> list:
    """One line per distinct reason (n/a, skipped) or error (failed), naming what it covers."""
    groups = {}
    for r in rows:
        if r["status"] != "ok":
            what = groups.setdefault((r["status"], r["provider"], r["note"]), {})
            modes, lengths = what.setdefault(r["op"], (set(), set()))
            modes.add(r["mode"])
            lengths.add(r["N"])
    lines = []
    for (status, provider, note), ops in groups.items():
        covers = "; ".join(f"{op} {','.join(m for m in ('fwd', 'bwd', 'fwd+bwd') if m in modes)} "
                           f"N={','.join(str(n) for n in sorted(lengths))}"
                           for op, (modes, lengths) in ops.items())
        lines.append(f"{status.upper() if status == 'failed' else status}: {provider} ({covers}): {note}")
    return lines


def markdown_table(rows: list, providers: list, ceilings: dict | None = None) -> str:
    """One line per (op, mode, shape), one column per provider: 'ms, throughput'; then why any
    cell holds no time."""
    cells = _by_case(rows)
    providers = [p for p in providers if any(r["provider"] == p for r in rows)]  # no empty columns
    head = ["op", "mode", "shape", "dtype"] + providers
    if ceilings:
        head.append("ours/ceiling")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_provider in cells.items():
        line = list(key)
        for p in providers:
            r = by_provider.get(p)
            line.append(_cell(r) if r else "-")
        if ceilings:
            line.append(_fraction(by_provider.get("ours"), ceilings))
        lines.append("| " + " | ".join(line) + " |")
    if ceilings:
        lines.append("\nceilings: " + ", ".join(f"{k}={v:.4g}" for k, v in ceilings.items()
                                                   if isinstance(v, (int, float))))
    notes = status_notes(rows)
    if notes:
        lines.append("\nnot measured:\n" + "\n".join(f"- {n}" for n in notes))
    return "\n".join(lines)


def summary_table(rows: list, ours_names) -> str:
    """The headline: per (op, mode, shape), ours against the fastest provider that is not one of our
    kernels. speedup = their ms / our ms (> 1: ours is faster)."""
    head = "| op | mode | shape | ours | best other | speedup |\n|---|---|---|---|---|---|"
    lines, speedups = [], {}  # speedups: (op, mode) -> [their ms / our ms, ...] over the shapes both measured
    for (op, mode, shape, _), by_provider in _by_case(rows).items():
        ours = by_provider.get("ours")
        others = [r for p, r in by_provider.items() if p not in ours_names and r["status"] == "ok"]
        if not ours:
            continue
        best = min(others, key=lambda r: r["ms_median"]) if others else None
        mine = f"{ours['ms_median']:.3g} ms" if ours["status"] == "ok" else _cell(ours)
        theirs = f"{best['provider']} {best['ms_median']:.3g} ms" if best else "none measured"
        speedup = "-"
        if best and ours["status"] == "ok":
            ratio = best["ms_median"] / ours["ms_median"]
            speedups.setdefault((op, mode), []).append(ratio)
            speedup = f"{ratio:.2f}x"
        lines.append(f"| {op} | {mode} | {shape} | {mine} | {theirs} | {speedup} |")
    if not lines:
        return ""
    means = ["| op | mode | shapes | geometric-mean speedup | range |", "|---|---|---|---|---|"]
    for (op, mode), ratios in speedups.items():
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        means.append(f"| {op} | {mode} | {len(ratios)} | {geo:.2f}x | {min(ratios):.2f}x - {max(ratios):.2f}x |")
    return ("ours vs the fastest other provider, per op and mode (geometric mean over the shapes where both were "
            "measured)\n\n" + "\n".join(means) + "\n\n"
            "per shape (speedup = their time / ours; > 1: ours is faster)\n\n" + head + "\n" + "\n".join(lines))


def _fraction(row, ceilings) -> str:
    if not row or row["status"] != "ok":
        return "-"
    peak = ceilings.get("copy_GB/s") if row["throughput_unit"] == "GB/s" else ceilings.get(
        "matmul_TFLOP/s")
    return f"{100 * row['throughput'] / peak:.0f}%" if peak else "-"


_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 3)), "P")]


def plot(path: Path, rows: list, title: str, ceilings: dict | None = None,
         providers: list | None = None) -> bool:
    """Throughput vs N, one subplot per (op, mode), one line per provider and shape family (the shape
    without N and B, e.g. Hkv=8 vs Hkv=2): colour = provider, line style and marker = family, the same in
    every subplot; the legend names the parts of the family that differ within the subplot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed, no plot written", file=sys.stderr)
        return False
    ok = [r for r in rows if r["status"] == "ok"]
    panels = list(dict.fromkeys((r["op"], r["mode"]) for r in ok))
    providers = providers or list(dict.fromkeys(r["provider"] for r in rows))
    colour = {p: f"C{i}" for i, p in enumerate(providers)}
    if not panels:
        return False
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.9 * nrows), squeeze=False)
    for ax, (op, mode) in zip(axes.flat, panels):
        sel = [r for r in ok if (r["op"], r["mode"]) == (op, mode)]
        unit = sel[0]["throughput_unit"]
        families = list(dict.fromkeys(r["family"] for r in sel))
        varying = _varying_parts(families)
        for prov in providers:
            for i, fam in enumerate(families):
                pts = sorted((r["N"], r["throughput"]) for r in sel
                             if r["provider"] == prov and r["family"] == fam)
                if not pts:
                    continue
                line, marker = _STYLES[i % len(_STYLES)]
                label = f"{prov} {varying[fam]}".strip()
                ax.plot(*zip(*pts), marker=marker, linestyle=line, label=label, color=colour[prov])
        ceiling = (ceilings or {}).get("copy_GB/s" if unit == "GB/s" else "matmul_TFLOP/s")
        if ceiling:
            ax.axhline(ceiling, color="gray", linestyle="--", linewidth=1, label="ceiling")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        common = _common_parts(families)
        ax.set_title(f"{op} {mode}" + (f"\n{common}" if common else ""), fontsize=9)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _common_parts(families: list) -> str:
    sets = [set(f.split()) for f in families]
    shared = set.intersection(*sets) if sets else set()
    return " ".join(t for t in families[0].split() if t in shared) if families else ""


def _varying_parts(families: list) -> dict:
    """family -> its tokens that not every family of the subplot shares ("Hkv=2"), or ""."""
    shared = set(_common_parts(families).split())
    return {f: " ".join(t for t in f.split() if t not in shared) for f in families}
