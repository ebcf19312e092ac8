"""Learning curves from the ``log.jsonl`` of one or more runs, as a PNG.

    lps-fast plot runs/main/learned runs/main/none runs/main/uniform --out curves.png
    python -m lps_fast.train.plot RUN [RUN ...] --out curves.png --x time

Each run folder (or a ``log.jsonl`` file) becomes one line per panel: the training loss and the
validation metric (the task's own, or ``--metric``) against epochs, optimizer steps or
wall-clock time. The run's name in the legend is its folder name, with the distribution and
test result from ``metrics.json`` when present.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

X_AXES = {"epoch": "epoch", "step": "step", "time": "time"}


def read_log(path) -> List[Dict]:
    """The records of a ``log.jsonl`` (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path} (a run folder holds log.jsonl)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
    return records


def _summary(run: Path) -> Optional[Dict]:
    folder = run if run.is_dir() else run.parent
    metrics = folder / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.is_file() else None


def _label(run: Path, summary: Optional[Dict]) -> str:
    folder = run if run.is_dir() else run.parent
    if not summary:
        return folder.name
    metric = summary.get("metric")
    test = summary.get("test", {}).get(metric)
    details = [] if summary.get("distribution") == folder.name else [str(summary.get("distribution"))]
    if isinstance(test, (int, float)):
        details.append(f"test {metric} {test:.4g}")
    return f"{folder.name} ({', '.join(details)})" if details else folder.name


def plot_runs(runs: Sequence, out, metric: Optional[str] = None, x: str = "epoch", log_scale: Optional[bool] = None,
              title: Optional[str] = None) -> Path:
    """Draw the curves of ``runs`` into ``out`` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    runs = [Path(run) for run in runs]
    if not runs:
        raise ValueError("no runs to plot")
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    chosen_metric = metric
    drawn = 0  # runs whose log has the metric
    available = set()
    for run in runs:
        records = read_log(run)
        summary = _summary(run)
        name = chosen_metric or (summary or {}).get("metric")
        if name is None:
            candidates = [key[4:] for key in (records[0] if records else {}) if key.startswith("val_") and key != "val_loss"]
            name = candidates[0] if candidates else "loss"
        chosen_metric = name
        xs = [record.get(X_AXES[x]) for record in records]
        label = _label(run, summary)
        loss_axis.plot(xs, [record.get("train_loss") for record in records], marker=".", label=label)
        values = [(xv, record.get(f"val_{name}")) for xv, record in zip(xs, records) if record.get(f"val_{name}") is not None]
        available.update(key[4:] for record in records for key in record if key.startswith("val_"))
        if values:
            drawn += 1
            metric_axis.plot([v[0] for v in values], [v[1] for v in values], marker=".", label=label)
    if not drawn:
        plt.close(figure)
        logged = ", ".join(sorted(available)) or "none"
        raise ValueError(f"no run logs a validation {chosen_metric!r}; the logs have: {logged} (choose with --metric)")
    loss_scale = log_scale if log_scale is not None else True
    if loss_scale:
        loss_axis.set_yscale("log")
    if log_scale or (log_scale is None and chosen_metric in ("mse", "loss")):
        metric_axis.set_yscale("log")
    xlabel = {"epoch": "epoch", "step": "optimizer step", "time": "seconds"}[x]
    loss_axis.set(xlabel=xlabel, ylabel="training loss", title="training loss")
    metric_axis.set(xlabel=xlabel, ylabel=f"validation {chosen_metric}", title=f"validation {chosen_metric}")
    for axis in (loss_axis, metric_axis):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (holding log.jsonl) or log.jsonl files")
    parser.add_argument("--out", default="curves.png", help="PNG file to write (default: %(default)s)")
    parser.add_argument("--metric", default=None,
                        help="validation metric to draw (default: the task's, e.g. mse or accuracy)")
    parser.add_argument("--x", choices=sorted(X_AXES), default="epoch", help="horizontal axis (default: %(default)s)")
    parser.add_argument("--title", default=None, help="a title above the panels")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m lps_fast.train.plot", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.runs, args.out, metric=args.metric, x=args.x, title=args.title)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
