"""The compact table that ends `benchmarks/gpu_check.sh`: every measured row of the given JSONL
files (all runs in them), the fast/reference ratios, achieved bandwidth against the measured
copy ceiling, the issue's GPU targets, and the faster of triton and cuda per op (the suggested
default for `lps_fast/_backend.py` CUDA_PREFERENCE).

    python benchmarks/gpu_summary.py OUT_DIR/*.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

FAST = ("triton", "cuda")
# Ops whose bytes define their speed: the >= 70% of copy bandwidth target applies to them.
BANDWIDTH_OPS = ("permute_nodes", "permute_edges", "unpermute_mean", "unpermute_edges_mean", "frame_apply",
                 "frame_unapply_mean")


def load(paths: List[str]) -> List[dict]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def grouped(rows: List[dict]) -> Dict[Tuple[str, str, str], Dict[str, dict]]:
    table: Dict[Tuple[str, str, str], Dict[str, dict]] = defaultdict(dict)
    for row in rows:
        table[(row["case"], row["scale"], row["mode"])][row["provider"]] = row  # later runs win
    return table


def median(entry: Dict[str, dict], provider: str) -> Optional[float]:
    row = entry.get(provider)
    if row is None or row.get("status") != "ok" or row.get("median_ms") is None:
        return None
    return row["median_ms"]


def fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    rows = load(args.files)
    if not rows:
        print("no benchmark rows")
        return
    table = grouped(rows)
    copy_gbps = max((r.get("copy_gbps") or 0) for r in rows)
    device = rows[0].get("device_name", "?")
    print(f"device: {device}   copy ceiling: {copy_gbps:.0f} GB/s   times in ms (median)")
    header = f"{'case':34s} {'scale':8s} {'mode':4s} {'ref':>8s} {'ref+c':>8s} {'triton':>8s} {'cuda':>8s}" \
             f" {'xref':>7s} {'xref+c':>7s} {'GB/s':>6s} {'%copy':>5s}"
    print(header)
    mismatches = []
    wins: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    targets = []
    for (case, scale, mode), entry in sorted(table.items()):
        for provider, row in entry.items():
            if row.get("status") not in ("ok", None):
                mismatches.append(f"{case} {scale} {mode} {provider}: {row.get('status')}")
        ref, compiled = median(entry, "reference"), median(entry, "reference+compile")
        fast = {p: median(entry, p) for p in FAST}
        present = {p: t for p, t in fast.items() if t is not None}
        best = min(present, key=present.get) if present else None
        best_ms = present.get(best) if best else None
        gbps = entry[best].get("gbps") if best else None
        share = 100.0 * gbps / copy_gbps if gbps and copy_gbps else None
        x_ref = ref / best_ms if ref and best_ms else None
        x_compiled = compiled / best_ms if compiled and best_ms else None
        print(f"{case:34s} {scale:8s} {mode:4s} {fmt(ref):>8s} {fmt(compiled):>8s} {fmt(fast['triton']):>8s}"
              f" {fmt(fast['cuda']):>8s} {fmt(x_ref, 1):>7s} {fmt(x_compiled, 1):>7s} {fmt(gbps, 0):>6s}"
              f" {fmt(share, 0):>5s}")
        op = next(iter(entry.values()))["op"]
        if len(present) == 2 and mode == "full":
            for provider, t in present.items():
                wins[op][provider].append(t)
        if x_compiled is not None and x_compiled < 1.0:
            targets.append(f"MISSED {case} {scale} {mode}: slower than torch.compile(reference) ({x_compiled:.2f}x)")
        if scale == "large" and mode == "fwd" and op in BANDWIDTH_OPS and share is not None:
            verdict = "met" if share >= 70 else "MISSED"
            targets.append(f"{verdict} {case} large fwd: {share:.0f}% of copy bandwidth (target 70%)")
        if op == "sinkhorn_sort" and mode == "full" and x_ref is not None:
            verdict = "met" if x_ref >= 10 and (x_compiled is None or x_compiled >= 2) else "MISSED"
            targets.append(f"{verdict} {case} {scale} fwd+bwd: {x_ref:.1f}x reference, "
                           f"{fmt(x_compiled, 1)}x compiled (targets 10x, 2x)")
    print()
    print("targets (issue: GPU path):")
    for line in targets or ["(no rows to judge)"]:
        print("  " + line)
    print()
    print("faster GPU provider per op (geometric mean of fwd+bwd times where both ran):")
    for op, by_provider in sorted(wins.items()):
        means = {p: math.exp(sum(math.log(t) for t in ts) / len(ts)) for p, ts in by_provider.items()}
        order = sorted(means, key=means.get)
        print(f"  {op:22s} {order[0]:7s} ({', '.join(f'{p} {means[p]:.3f} ms' for p in order)})")
    if mismatches:
        print()
        print("AGREEMENT FAILURES (never timed):")
        for line in mismatches:
            print("  " + line)


if __name__ == "__main__":
    main()
