"""Reading result rows back and summarizing them: medians, speedups, memory and the targets.

No torch import: ``report.py`` and ``plot.py`` run on a results file alone.
Speedups are ``time(baseline) / time(provider)`` within one run: ``12.0x`` means twelve times
faster than the baseline, ``0.5x`` twice as slow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

PROVIDERS = ("reference", "reference+compile", "gather", "gather+compile", "cpp", "triton", "cuda")
FAST_PROVIDERS = ("cpp", "triton", "cuda")
# The peers every fast provider is compared with: the dense reference and the hand-written natural
# formulation (benchmarks/peers.py), each eager and under torch.compile.
BASELINES = ("reference", "reference+compile", "gather", "gather+compile")
COMPILED = ("reference+compile", "gather+compile")
MODES = ("fwd", "bwd", "full")
SCALES = ("PATTERN", "EXP", "n-body", "large", "quick")
SHORT = {"reference": "ref", "reference+compile": "ref+c", "gather": "gat", "gather+compile": "gat+c", "cpp": "cpp",
         "triton": "triton", "cuda": "cuda"}


# ------------------------------------------------------------------------------------------------
# Rows


def load_rows(path: Path) -> List[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def latest_run(rows: Sequence[dict], device: Optional[str] = None) -> List[dict]:
    """The rows of the most recent run (by ``run_id``) on ``device`` (``cpu``, ``cuda``...)."""
    if device is not None:
        rows = [r for r in rows if r["device"].split(":")[0] == device.split(":")[0]]
    if not rows:
        return []
    last = max(rows, key=lambda r: r["run_id"])["run_id"]
    return [r for r in rows if r["run_id"] == last]


def key_order(rows: Sequence[dict]) -> List[Tuple[str, str, str]]:
    """(case, scale, mode) in first-seen order of cases, then scale order, then mode order."""
    cases: List[str] = []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
    present = {(r["case"], r["scale"], r["mode"]) for r in rows}
    scales = [s for s in SCALES if any(r["scale"] == s for r in rows)]
    scales += sorted({r["scale"] for r in rows} - set(scales))
    return [(c, s, m) for s in scales for c in cases for m in MODES if (c, s, m) in present]


def group(rows: Iterable[dict]) -> Dict[Tuple[str, str, str], Dict[str, dict]]:
    """``{(case, scale, mode): {provider: row}}``."""
    grouped: Dict[Tuple[str, str, str], Dict[str, dict]] = {}
    for r in rows:
        grouped.setdefault((r["case"], r["scale"], r["mode"]), {})[r["provider"]] = r
    return grouped


def median(entry: Dict[str, dict], provider: str) -> Optional[float]:
    row = entry.get(provider)
    if row is None or row.get("status") != "ok":
        return None
    return row.get("median_ms")


def ratio(entry: Dict[str, dict], fast: str, baseline: str) -> Optional[float]:
    a, b = median(entry, fast), median(entry, baseline)
    if a is None or b is None or a <= 0:
        return None
    return b / a


def fmt_ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    if value >= 0.01:
        return f"{value:.3f}"
    return f"{value:.4f}"


def fmt_ratio(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}x" if value >= 100 else f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def fmt_mb(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _cell(entry: Dict[str, dict], provider: str) -> str:
    row = entry.get(provider)
    if row is None:
        return "-"
    if row.get("status") == "mismatch":
        return "RED"
    if row.get("status") != "ok":
        return "ERR"
    return fmt_ms(row.get("median_ms"))


def providers_in(rows: Sequence[dict]) -> List[str]:
    return [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]


def best_peer(entry: Dict[str, dict]) -> Tuple[Optional[str], Optional[float]]:
    """The fastest peer (``BASELINES``) that passed the gate: ``(provider, median ms)``."""
    timed = [(median(entry, p), p) for p in BASELINES if median(entry, p) is not None]
    if not timed:
        return None, None
    value, provider = min(timed)
    return provider, value


def copy_fraction(row: Optional[dict]) -> Optional[float]:
    """GB/s of a forward row as a fraction of the run's measured copy bandwidth."""
    if not row or row.get("status") != "ok" or not row.get("gbps") or not row.get("copy_gbps"):
        return None
    return row["gbps"] / row["copy_gbps"]


def table(rows: Sequence[dict], with_scale: bool = True, with_gbps: bool = True) -> Tuple[List[str], List[List[str]]]:
    """Header and lines: medians per provider; then for each fast provider its speedup over the
    reference, over the fastest peer of the case (named in the next column), and, forward only,
    its GB/s and that as a fraction of the copy bandwidth."""
    providers = providers_in(rows)
    fast = [p for p in providers if p in FAST_PROVIDERS]
    peers = [b for b in BASELINES if b in providers]
    header = ["case"] + (["scale"] if with_scale else []) + ["mode"]
    header += [f"{SHORT[p]} ms" for p in providers]
    for p in fast:
        if "reference" in peers:
            header.append(f"{SHORT[p]} vs ref")
        if peers:
            header += [f"{SHORT[p]} vs best", "best"]
    show_gbps = with_gbps and any(r.get("gbps") for r in rows if r["provider"] in fast)
    if show_gbps:
        for p in fast:
            header += [f"{SHORT[p]} GB/s", f"{SHORT[p]} / copy"]
    grouped = group(rows)
    lines = []
    for key in key_order(rows):
        case, scale, mode = key
        entry = grouped[key]
        line = [case] + ([scale] if with_scale else []) + [mode]
        line += [_cell(entry, p) for p in providers]
        best, best_ms = best_peer(entry)
        for p in fast:
            if "reference" in peers:
                line.append(fmt_ratio(ratio(entry, p, "reference")))
            if peers:
                mine = median(entry, p)
                line.append(fmt_ratio(best_ms / mine if best_ms and mine else None))
                line.append(SHORT[best] if best else "-")
        if show_gbps:
            for p in fast:
                row = entry.get(p)
                gbps = row.get("gbps") if row and row.get("status") == "ok" else None
                fraction = copy_fraction(row)
                line.append("-" if gbps is None else f"{gbps:.1f}")
                line.append("-" if fraction is None else f"{fraction:.2f}")
        lines.append(line)
    return header, lines


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table (printed at the end of a run)."""
    if not rows:
        return "(no rows)"
    header, lines = table(rows)
    return text(header, lines, textual=3)  # case, scale, mode are left-aligned


def text(header: Sequence[str], lines: Sequence[Sequence[str]], textual: int = 0) -> str:
    """A fixed-width text table: the first ``textual`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) if i < textual else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for line in lines:
        out.append("  ".join(v.ljust(w) if i < textual else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


def markdown(header: Sequence[str], lines: Sequence[Sequence[str]], textual: int = 2) -> str:
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join("---" if i < textual else "---:" for i in range(len(header))) + "|")
    for line in lines:
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def memory_table(rows: Sequence[dict], cases: Sequence[str] = (), modes: Sequence[str] = ("fwd", "full")) \
        -> Tuple[List[str], List[List[str]]]:
    """Peak MB (and saved MB) per provider, and each fast provider's peak as a fraction of the
    reference's."""
    providers = providers_in(rows)
    fast = [p for p in providers if p in FAST_PROVIDERS]
    header = ["case", "scale", "mode"] + [f"{SHORT[p]} peak MB" for p in providers]
    header += [f"{SHORT[p]} saved MB" for p in providers]
    header += [f"{SHORT[p]} / ref peak" for p in fast]
    grouped = group(rows)
    lines = []
    for key in key_order(rows):
        case, scale, mode = key
        if (cases and case not in cases) or mode not in modes:
            continue
        entry = grouped[key]
        line = [case, scale, mode]

        def value(p, field):
            row = entry.get(p)
            return row.get(field) if row and row.get("status") == "ok" else None

        line += [fmt_mb(value(p, "peak_MB")) for p in providers]
        line += [fmt_mb(value(p, "saved_MB")) for p in providers]
        for p in fast:
            ref, got = value("reference", "peak_MB"), value(p, "peak_MB")
            line.append("-" if not ref or got is None else f"{got / ref:.3f}")
        lines.append(line)
    return header, lines


# ------------------------------------------------------------------------------------------------
# Targets of the CPU kernels (fast provider = cpp)


def _speedup(grouped, case, scale, mode, fast, baseline="reference"):
    entry = grouped.get((case, scale, mode))
    return None if entry is None else ratio(entry, fast, baseline)


def _status(grouped, case, scale, mode, fast):
    entry = grouped.get((case, scale, mode), {})
    row = entry.get(fast)
    return None if row is None else row.get("status")


def _worst(items: List[Tuple[float, str]], shown: int = 12) -> str:
    text = "; ".join(t for _, t in items[:shown])
    if len(items) > shown:
        text += f"; and {len(items) - shown} more between {fmt_ratio(items[shown][0])} and {fmt_ratio(items[-1][0])}"
    return text


def targets(rows: Sequence[dict], fast: str = "cpp") -> List[Tuple[str, str, str]]:
    """``(target, verdict, evidence)`` for each CPU kernel target, from one run's rows."""
    grouped = group(rows)
    scales = [s for s in SCALES if any(r["scale"] == s for r in rows)]
    results = []

    def headline(name, case, mode, threshold, scale="PATTERN"):
        value = _speedup(grouped, case, scale, mode, fast)
        if value is None:
            status = _status(grouped, case, scale, mode, fast)
            verdict = "red gate" if status == "mismatch" else "not measured"
            results.append((name, verdict, f"{case} {mode} @ {scale}: no {fast} timing ({status or 'absent'})"))
            return
        others = []
        for s in scales:
            if s != scale:
                v = _speedup(grouped, case, s, mode, fast)
                if v is not None:
                    others.append(f"{s} {fmt_ratio(v)}")
        evidence = f"{fmt_ratio(value)} at {scale}" + (f" (other scales: {', '.join(others)})" if others else "")
        results.append((name, "met" if value >= threshold else "not met", evidence))

    headline("permute_edges forward >= 10x at PATTERN", "permute_edges", "fwd", 10.0)
    headline("permute_edges fwd+bwd without soft >= 5x", "permute_edges", "full", 5.0)
    headline("permute_edges fwd+bwd with soft >= 1.5x", "permute_edges/soft", "full", 1.5)
    headline("sinkhorn_sort fwd+bwd >= 5x", "sinkhorn_sort", "full", 5.0)

    # sinkhorn memory: full-mode peak of the fast provider <= 1/4 of the reference's
    entry = grouped.get(("sinkhorn_sort", "PATTERN", "full"), {})
    ref_row, fast_row = entry.get("reference"), entry.get(fast)
    if ref_row and fast_row and ref_row.get("peak_MB") and fast_row.get("peak_MB") is not None:
        fraction = fast_row["peak_MB"] / ref_row["peak_MB"]
        evidence = (f"peak {fmt_mb(fast_row['peak_MB'])} MB vs reference {fmt_mb(ref_row['peak_MB'])} MB "
                    f"= {fraction:.3f} at PATTERN (fwd+bwd)")
        others = []
        for s in scales:
            e = grouped.get(("sinkhorn_sort", s, "full"), {})
            r, f = e.get("reference"), e.get(fast)
            if s != "PATTERN" and r and f and r.get("peak_MB") and f.get("peak_MB") is not None:
                others.append(f"{s} {f['peak_MB'] / r['peak_MB']:.3f}")
        if others:
            evidence += f" (other scales: {', '.join(others)})"
        results.append(("sinkhorn_sort peak memory <= 1/4 of the reference", "met" if fraction <= 0.25 else "not met",
                        evidence))
    else:
        results.append(("sinkhorn_sort peak memory <= 1/4 of the reference", "not measured", "no full-mode peak"))

    # every other op >= 2x at every scale (all modes)
    named = {"permute_edges", "sinkhorn_sort"}  # ops with targets of their own, above
    below, measured, red = [], 0, []
    for (case, scale, mode), entry in grouped.items():
        if next(iter(entry.values()))["op"] in named:
            continue
        status = entry.get(fast, {}).get("status")
        if status == "mismatch":
            red.append(f"{case} {mode} @ {scale}")
            continue
        value = ratio(entry, fast, "reference")
        if value is None:
            continue
        measured += 1
        if value < 2.0:
            below.append((value, f"{case} {mode} @ {scale}: {fmt_ratio(value)}"))
    below.sort()
    evidence = f"{measured - len(below)} of {measured} (case, scale, mode) at >= 2x"
    if below:
        evidence += "; below, worst first: " + _worst(below)
    if red:
        evidence += "; red gate: " + "; ".join(red)
    results.append(("every other op >= 2x at every scale", "met" if measured and not below and not red else
                    "not met", evidence))

    # no op slower than torch.compile(reference)
    slower, measured = [], 0
    for (case, scale, mode), entry in grouped.items():
        value = ratio(entry, fast, "reference+compile")
        if value is None:
            continue
        measured += 1
        if value < 1.0:
            slower.append((value, f"{case} {mode} @ {scale}: {fmt_ratio(value)}"))
    slower.sort()
    if measured:
        evidence = f"{measured - len(slower)} of {measured} (case, scale, mode) at >= 1x"
        if slower:
            evidence += "; slower, worst first: " + _worst(slower)
        results.append(("no op slower than torch.compile(reference)", "met" if not slower else "not met", evidence))
    else:
        results.append(("no op slower than torch.compile(reference)", "not measured", "no reference+compile rows"))
    return results


# ------------------------------------------------------------------------------------------------
# Targets against the fastest peer (PATTERN and EXP scales, forward and forward + backward)

PEER_SPEEDUP = 1.5
# A memory-bound op whose forward already moves its bytes at this fraction of the copy bandwidth
# cannot be 1.5x faster than a peer that does the same; it must then not be slower (forward), be
# COPY_BOUND_FULL_SPEEDUP faster forward + backward (its backward is a reduction with room left).
COPY_BOUND_FRACTION = 0.8
COPY_BOUND_FULL_SPEEDUP = 1.2


def peer_targets(rows: Sequence[dict], fast: str = "cpp", scales: Sequence[str] = ("PATTERN", "EXP"),
                 modes: Sequence[str] = ("fwd", "full")) -> List[Tuple[str, str, str, str, str, str, str]]:
    """``(case, scale, mode, best peer, speedup, copy fraction, verdict)`` for every measured
    (case, scale, mode): ``>= 1.5x`` the fastest peer, or, where the forward runs at >= 0.8 of
    the copy bandwidth, ``>= 1x`` forward and ``>= 1.2x`` forward + backward."""
    grouped = group(rows)
    out = []
    for case, scale, mode in key_order(rows):
        if scale not in scales or mode not in modes:
            continue
        entry = grouped[(case, scale, mode)]
        mine = median(entry, fast)
        best, best_ms = best_peer(entry)
        if mine is None or best is None:
            status = (entry.get(fast) or {}).get("status", "absent")
            out.append((case, scale, mode, SHORT.get(best, "-") if best else "-", "-", "-", f"not measured ({status})"))
            continue
        speedup = best_ms / mine
        fraction = copy_fraction(grouped.get((case, scale, "fwd"), {}).get(fast))
        copy_bound = fraction is not None and fraction >= COPY_BOUND_FRACTION
        needed = (1.0 if mode == "fwd" else COPY_BOUND_FULL_SPEEDUP) if copy_bound else PEER_SPEEDUP
        verdict = ("met" if speedup >= needed else "not met") + f" (>= {needed:g}x{', copy-bound' if copy_bound else ''})"
        out.append((case, scale, mode, SHORT[best], fmt_ratio(speedup),
                    "-" if fraction is None else f"{fraction:.2f}", verdict))
    return out
