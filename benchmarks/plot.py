"""Bar charts of the speedups in the result files (one PNG per family and device).

    python benchmarks/plot.py                      # latest CPU run of every family
    python benchmarks/plot.py --device cuda --outdir /tmp/plots

Each chart has one panel per mode (fwd, bwd, full); a group of bars per (case, scale); one bar
per (fast provider, baseline): time(baseline) / time(fast), on a log axis with a line at 1x.
Needs matplotlib (pinned in requirements.txt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

try:
    from . import summary
except ImportError:  # run as a script
    import summary

BENCH_DIR = Path(__file__).resolve().parent
FAMILIES = ("permute", "frame", "sinkhorn", "gram_schmidt")


def series(rows: Sequence[dict], mode: str) -> Tuple[List[str], Dict[str, List[Optional[float]]]]:
    """Labels ``case @ scale`` and ``{"cpp vs ref": [speedup or None, ...], ...}`` for one mode."""
    grouped = summary.group(rows)
    keys = [k for k in summary.key_order(rows) if k[2] == mode]
    providers = summary.providers_in(rows)
    pairs = [(f, b) for f in providers if f in summary.FAST_PROVIDERS for b in summary.BASELINES if b in providers]
    labels = [f"{case} @ {scale}" for case, scale, _ in keys]
    values = {f"{summary.SHORT[f]} vs {summary.SHORT[b]}": [summary.ratio(grouped[k], f, b) for k in keys]
              for f, b in pairs}
    return labels, values


def plot_family(rows: Sequence[dict], family: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in summary.MODES if any(r["mode"] == m for r in rows)]
    count = max(len(series(rows, m)[0]) for m in modes)
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8.0, 0.45 * count + 2), 4.5 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        labels, values = series(rows, mode)
        width = 0.8 / max(1, len(values))
        for index, (name, ratios) in enumerate(values.items()):
            xs = [i + (index - (len(values) - 1) / 2) * width for i in range(len(labels))]
            heights = [r if r is not None else float("nan") for r in ratios]
            ax.bar(xs, heights, width=width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"{family}: {mode}")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
        ax.grid(axis="y", which="both", alpha=0.3)
    first = rows[0]
    fig.suptitle(f"{first['device_name']} ({first['device']}), commit {first['commit']}, {first['timestamp'][:10]}",
                 fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", default=str(BENCH_DIR / "results"), help="folder of <family>.jsonl files")
    parser.add_argument("--outdir", default=None, help="where to write the PNGs (default: the results folder)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/plot.py needs matplotlib, which is not installed here "
                         "(it is in requirements.txt); report.py gives the same numbers as tables")
    results = Path(args.results)
    outdir = Path(args.outdir) if args.outdir else results
    written = []
    for family in FAMILIES:
        path = results / f"{family}.jsonl"
        if not path.exists():
            continue
        rows = summary.latest_run(summary.load_rows(path), args.device)
        if not rows:
            continue
        target = outdir / f"{family}-{args.device}.png"
        plot_family(rows, family, target)
        written.append(target)
        print(f"wrote {target}")
    if not written:
        print(f"no {args.device} results in {results}")
    return written


if __name__ == "__main__":
    main()
    sys.exit(0)
