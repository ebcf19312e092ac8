"""Seeded reproduction runs and the report written from them (``lps-fast results``).

    lps-fast results run nbody-epochs nbody-time --seeds 0,1,2   # the runs, recorded under docs/results/runs
    lps-fast results report                                      # docs/results/summary.json and docs/RESULTS.md

A *suite* is one comparison: a task, the distributions compared, and what is held equal
(``equal_epochs``: the same number of epochs; ``equal_time``: the same wall-clock budget, every
distribution of a seed training at the same time, one process and one thread each, so they get
the same share of the machine; ``protocol``: an untrained model's evaluation). Every run is a
plain ``lps-fast train`` in its own process with one torch thread, seeded, into
``<root>/<suite>/<distribution>/seed<N>/`` (its ``config.json``, ``log.jsonl``, ``metrics.json``
and ``run.json``: the command, the machine, the wall time and the load). Checkpoints are removed
unless asked to keep them: the records are what the report reads.

The report aggregates the records over seeds (mean and standard deviation), writes
``summary.json`` (one entry per run, and the aggregates) and ``RESULTS.md`` with tables, the
statements the numbers support (computed, not typed in), learning curves and the learned
distribution's concentration over training. Nothing in them is written by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .plot import read_log
from .recipes import get_recipe

DEFAULT_ROOT = Path("docs/results/runs")
DEFAULT_REPORT = Path("docs/results")
DEFAULT_MARKDOWN = Path("docs/RESULTS.md")


@dataclass(frozen=True)
class Suite:
    """One comparison of distributions on one task."""

    name: str
    task: str
    comparison: str  # "equal_epochs", "equal_time" or "protocol"
    distributions: Tuple[str, ...]
    options: Dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    def command(self, distribution: str, seed: int, out: Path, data: Optional[str] = None) -> List[str]:
        args = [sys.executable, "-m", "lps_fast.cli", "train", self.task, "--distribution", distribution,
                "--seed", str(seed), "--threads", "1", "--quiet", "--out", str(out)]
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
            else:
                args += [flag, str(value)]
        if data is not None and self.task in ("exp-classify", "exp-iso", "graph8c"):
            args += ["--data", data]
        return args


_NBODY = ("learned", "uniform", "canonical", "none")
SUITES: Dict[str, Suite] = {suite.name: suite for suite in (
    Suite("nbody-epochs", "nbody", "equal_epochs", _NBODY, dict(epochs=20, n_val=500),
          "n-body, the CPU default model (transformer over particles, vn-dgcnn distribution), 20 epochs each"),
    Suite("nbody-long", "nbody", "equal_epochs", ("learned", "uniform"), dict(epochs=60, n_val=500),
          "n-body, learned vs group averaging for 60 epochs each (does the learned distribution pull ahead later?)"),
    Suite("nbody-time", "nbody", "equal_time", _NBODY, dict(time_budget="4m", n_val=500),
          "n-body, the same models, 4 minutes of wall-clock time each, the four trained at once"),
    Suite("exp-classify", "exp-classify", "equal_epochs", ("learned", "uniform"), dict(epochs=40),
          "EXP-classify, the CPU default MLP (4224 -> 512 -> 512 -> 2) with the batch-norm GIN, 40 epochs"),
    Suite("pattern", "pattern", "equal_time", ("learned", "uniform"), dict(time_budget="4m"),
          "PATTERN, the CPU default ViT (width 96, 4 blocks), 4 minutes each, both at once"),
    Suite("exp-iso", "exp-iso", "protocol", ("learned", "uniform", "none"), dict(iso_seeds=100),
          "EXP-iso, untrained CPU default MLP, 100 model seeds (the paper's protocol) and the noise control"),
    Suite("graph8c", "graph8c", "protocol", ("learned", "uniform", "none"), dict(iso_seeds=100),
          "GRAPH8c, untrained CPU default MLP, 100 model seeds (the paper's protocol) and the noise control"),
)}


# ---------------------------------------------------------------------------------------------
# Running


def machine_description() -> str:
    """CPU model and core count (the lscpu model name where readable)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, no GPU"


def _load() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _source_revision() -> Optional[str]:
    """The git commit of the working tree the runs use (with ``+changes`` when it differs), if any."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _finish(process: subprocess.Popen, out: Path, command: List[str], started: float, load: Optional[float],
            keep_checkpoints: bool, revision: Optional[str] = None) -> bool:
    code = process.wait()
    record = {"command": shlex.join(command[1:]), "python": command[0], "exit_code": code, "revision": revision,
              "machine": machine_description(), "wall_seconds": time.time() - started,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "load_at_start": load,
              "load_at_end": _load()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    if not keep_checkpoints:
        for checkpoint in out.glob("*.pt"):
            checkpoint.unlink()
    return code == 0


def run_suites(names: Sequence[str], seeds: Sequence[int], root: Path = DEFAULT_ROOT, jobs: int = 2,
               data: Optional[str] = None, keep_checkpoints: bool = False, skip_done: bool = True,
               distributions: Optional[Sequence[str]] = None) -> List[Path]:
    """Run every (distribution, seed) of the suites; returns the run folders that failed.

    ``equal_time`` suites start the distributions of one seed together (same budget, same share
    of the machine); the other runs go ``jobs`` at a time. With ``skip_done`` a run whose
    ``metrics.json`` exists is not repeated, so an interrupted batch resumes. ``distributions``
    runs only those of each suite's distributions.
    """
    failed: List[Path] = []
    revision = _source_revision()
    for name in names:
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    for name in names:
        suite = SUITES[name]
        chosen = [d for d in suite.distributions if distributions is None or d in distributions]
        groups: List[List[Tuple[str, int]]]
        if suite.comparison == "equal_time":
            groups = [[(d, seed) for d in chosen] for seed in seeds]
            limit = max(len(chosen), 1)
        else:
            groups = [[(d, seed) for seed in seeds for d in chosen]]
            limit = jobs
        for group in groups:
            queue = [(d, seed) for d, seed in group
                     if not (skip_done and (root / suite.name / d / f"seed{seed}" / "metrics.json").is_file())]
            running: List[Tuple[Any, ...]] = []
            while queue or running:
                while queue and len(running) < limit:
                    distribution, seed = queue.pop(0)
                    out = root / suite.name / distribution / f"seed{seed}"
                    command = suite.command(distribution, seed, out, data)
                    out.mkdir(parents=True, exist_ok=True)
                    log = open(out / "stdout.txt", "w")
                    print(f"[{time.strftime('%H:%M:%S')}] {suite.name}: {distribution} seed {seed}", flush=True)
                    running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), out, command,
                                    time.time(), _load(), log))
                time.sleep(1.0)
                for entry in [e for e in running if e[0].poll() is not None]:
                    running.remove(entry)
                    process, out, command, started, load, log = entry
                    ok = _finish(process, out, command, started, load, keep_checkpoints, revision)
                    log.close()
                    if not ok:
                        failed.append(out)
                        print(f"  failed: {out} (see {out / 'stdout.txt'})", flush=True)
    return failed


# ---------------------------------------------------------------------------------------------
# Reading the records


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_log(path: Path) -> List[Dict[str, Any]]:
    return read_log(path) if path.is_file() else []


def _metric_key(task: str) -> Tuple[str, str]:
    """``(metric name in metrics.json, its key in summary.json)``."""
    metric = get_recipe(task).metric
    return metric, {"mse": "test_mse", "accuracy": "test_accuracy",
                    "weighted_accuracy": "test_weighted_accuracy"}.get(metric, f"test_{metric}")


def collect(root: Path = DEFAULT_ROOT) -> List[Dict[str, Any]]:
    """One entry per finished run under ``root`` (the ``runs`` list of summary.json)."""
    runs = []
    for metrics_path in sorted(root.glob("*/*/seed*/metrics.json")):
        folder = metrics_path.parent
        suite_name = folder.parent.parent.name
        suite = SUITES.get(suite_name)
        metrics = json.loads(metrics_path.read_text())
        record = _read_json(folder / "run.json") or {}
        log = _read_log(folder / "log.jsonl")
        task = metrics["task"]
        metric, key = _metric_key(task)
        entry: Dict[str, Any] = {
            "task": task, "suite": suite_name,
            "comparison": suite.comparison if suite else ("main" if suite_name == "main" else "other"),
            "distribution": metrics["distribution"], "seed": metrics["seed"],
            "epochs": metrics.get("epochs"), "steps": metrics.get("steps"),
            "minutes": round(metrics.get("train_seconds", 0.0) / 60.0, 3),
            "machine": record.get("machine", "unknown"), "load_at_start": record.get("load_at_start"),
            "samples": metrics.get("samples"), "eval_samples": metrics.get("eval_samples"),
            "test_samples": metrics.get("test_samples"), "preset": metrics.get("preset"),
            "command": record.get("command"), "folder": str(folder),
        }
        test = metrics.get("test", {})
        if get_recipe(task).trained:
            entry[key] = test.get(metric)
            entry["best_epoch"] = metrics.get("best_epoch")
            concentration = {name: [r.get(f"val_concentration_{name}") for r in log]
                             for name in ("permutation", "rotation")}
            for name, values in concentration.items():
                values = [v for v in values if v is not None]
                if values:
                    entry[f"concentration_{name}_first"] = values[0]
                    entry[f"concentration_{name}_last"] = values[-1]
        else:
            for name in ("pairs", "pairs_separated", "pairs_not_separated", "pairs_above_noise", "control_separated",
                         "control_pairs", "noise_floor_l1", "union_seeds", "union_pairs_separated",
                         "union_pairs_not_separated", "union_control_separated", "union_control_pairs"):
                if name in test:
                    entry[name] = test[name]
        runs.append(entry)
    return runs


def _mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and std over seeds per (suite, distribution)."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["suite"], run["distribution"]), []).append(run)
    rows = []
    for (suite, distribution), members in groups.items():
        task = members[0]["task"]
        row: Dict[str, Any] = {"suite": suite, "task": task, "comparison": members[0]["comparison"],
                               "distribution": distribution, "seeds": sorted(m["seed"] for m in members)}
        numeric = sorted({k for m in members for k, v in m.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seed",)})
        for key in numeric:
            mean, std = _mean_std([m.get(key) for m in members])
            if mean is not None:
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        rows.append(row)
    order = ["main"] + list(SUITES)
    first = ("learned", "uniform", "canonical", "frame", "none")
    rows.sort(key=lambda r: (order.index(r["suite"]) if r["suite"] in order else len(order),
                             first.index(r["distribution"]) if r["distribution"] in first else len(first),
                             r["distribution"]))
    return rows


# ---------------------------------------------------------------------------------------------
# Writing the report


_LABELS = {"learned": "learned (LPS)", "uniform": "group averaging", "canonical": "canonicalization",
           "none": "no symmetrization", "frame": "frame averaging"}


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _pm(row: Dict[str, Any], key: str, digits: int = 4) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "-"
    return f"{_fmt(mean, digits)} ± {_fmt(std, 2)}"


def _trained_table(rows: Sequence[Dict[str, Any]]) -> List[str]:
    key = _metric_key(rows[0]["task"])[1]
    lines = ["| distribution | seeds | test metric (mean ± std) | epochs | steps | minutes | concentration at the "
             "start -> end (permutation; rotation) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        conc = []
        for name in ("permutation", "rotation"):
            first, last = row.get(f"concentration_{name}_first_mean"), row.get(f"concentration_{name}_last_mean")
            if first is not None:
                conc.append(f"{first:.2f} -> {last:.2f}")
        lines.append(f"| {_LABELS.get(row['distribution'], row['distribution'])} | {len(row['seeds'])} | "
                     f"{_pm(row, key)} | {_fmt(row.get('epochs_mean'), 3)} | {_fmt(row.get('steps_mean'), 4)} | "
                     f"{_fmt(row.get('minutes_mean'), 3)} | {'; '.join(conc) or '-'} |")
    return lines


def _protocol_table(rows: Sequence[Dict[str, Any]]) -> List[str]:
    lines = ["| distribution | pairs | separated by one model (L1 > 1e-3) | by any of the 100 seeds (paper) | "
             "beyond the noise control (p99) | control: graphs 'separated' from a relabelled copy, one model / "
             "any seed |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {_LABELS.get(row['distribution'], row['distribution'])} | {_fmt(row.get('pairs_mean'))} | "
                     f"{_fmt(row.get('pairs_separated_mean'))} | {_fmt(row.get('union_pairs_separated_mean'))} | "
                     f"{_fmt(row.get('pairs_above_noise_mean'))} | {_fmt(row.get('control_separated_mean'))} / "
                     f"{_fmt(row.get('union_control_separated_mean'))} of {_fmt(row.get('control_pairs_mean'))} |")
    return lines


def _statements(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """What the numbers of one suite say about learned vs the others (computed)."""
    by = {row["distribution"]: row for row in rows}
    if "learned" not in by:
        return []
    task = rows[0]["task"]
    if not get_recipe(task).trained:
        learned = by["learned"]
        out = [f"- Learned: {_fmt(learned.get('pairs_separated_mean'))} of {_fmt(learned.get('pairs_mean'))} pairs "
               f"separated by one model, {_fmt(learned.get('union_pairs_separated_mean'))} by any of "
               f"{_fmt(learned.get('union_seeds_mean'))} seeds; {_fmt(learned.get('pairs_above_noise_mean'))} "
               f"beyond the noise control."]
        return out
    higher = get_recipe(task).higher_is_better
    key = _metric_key(task)[1]
    learned = by["learned"].get(f"{key}_mean")
    learned_std = by["learned"].get(f"{key}_std") or 0.0
    out = []
    for name, row in by.items():
        if name == "learned" or row.get(f"{key}_mean") is None or learned is None:
            continue
        other, other_std = row[f"{key}_mean"], row.get(f"{key}_std") or 0.0
        better = learned > other if higher else learned < other
        margin = abs(learned - other)
        relative = f" ({abs(learned / other - 1) * 100:.0f}% {'lower' if learned < other else 'higher'})" if other else ""
        if min(len(by["learned"].get("seeds", [])), len(row.get("seeds", []))) < 2:
            spread = " (one seed: no spread to compare the gap with)"
        elif margin > learned_std + other_std:
            spread = ", by more than the two standard deviations summed"
        else:
            spread = ", within the spread of the seeds"
        out.append(f"- Learned vs {_LABELS.get(name, name)}: {_fmt(learned)} vs {_fmt(other)}{relative}: learned is "
                   f"{'ahead' if better else 'behind'}{spread}")
    return out


def _targets(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The reproduction targets, each met or not, with the measurements beside it (computed)."""
    by = {(r["suite"], r["distribution"]): r for r in rows}
    lines = ["## Where the targets stand", "",
             "| target | met | measured |", "|---|---|---|"]

    def nbody(suite: str, label: str) -> None:
        learned, uniform = by.get((suite, "learned")), by.get((suite, "uniform"))
        if not learned or not uniform:
            return
        a, b = learned["test_mse_mean"], uniform["test_mse_mean"]
        steps = f"{_fmt(learned.get('steps_mean'))} vs {_fmt(uniform.get('steps_mean'))} steps"
        concentration = ""
        if learned.get("concentration_permutation_last_mean") is not None:
            concentration = (f"; permutation concentration at the end {learned['concentration_permutation_last_mean']:.2f}"
                             f" (uniform {uniform.get('concentration_permutation_last_mean', float('nan')):.2f}), "
                             f"rotation {learned.get('concentration_rotation_last_mean', float('nan')):.2f} (uniform "
                             f"{uniform.get('concentration_rotation_last_mean', float('nan')):.2f})")
        lines.append(f"| n-body: learned at or below group averaging, {label} | {'yes' if a <= b else 'no'} | "
                     f"{_pm(learned, 'test_mse')} vs {_pm(uniform, 'test_mse')} ({len(learned['seeds'])} "
                     f"seed{'s' if len(learned['seeds']) != 1 else ''}; "
                     f"{steps}{concentration}) |")

    nbody("nbody-epochs", "equal epochs (20)")
    nbody("nbody-long", "equal epochs (60)")
    nbody("nbody-time", "equal wall-clock time")
    nbody("main", "the main job's budget")
    learned = by.get(("exp-classify", "learned"))
    if learned:
        accuracy = learned["test_accuracy_mean"]
        lines.append(f"| EXP-classify: learned test accuracy >= 0.99 | {'yes' if accuracy >= 0.99 else 'no'} | "
                     f"{_pm(learned, 'test_accuracy')} after {_fmt(learned.get('epochs_mean'))} epochs (the paper "
                     f"trains 2,000); permutation concentration {learned.get('concentration_permutation_first_mean', 0):.2f}"
                     f" -> {learned.get('concentration_permutation_last_mean', 0):.2f} |")
    return lines + [""] if len(lines) > 4 else []


def _plot_curves(runs: Sequence[Dict[str, Any]], suite: str, out: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    members = [r for r in runs if r["suite"] == suite]
    if not members:
        return None
    task = members[0]["task"]
    metric = get_recipe(task).metric
    has_concentration = any(k.startswith("concentration_") for m in members for k in m)
    panels = 2 if has_concentration else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    colours = {"learned": "C0", "uniform": "C1", "canonical": "C2", "none": "C3", "frame": "C4"}
    x_key = "time" if members[0]["comparison"] == "equal_time" else "epoch"
    for member in members:
        log = _read_log(Path(member["folder"]) / "log.jsonl")
        xs = [r[x_key] / (60.0 if x_key == "time" else 1.0) for r in log if f"val_{metric}" in r]
        ys = [r[f"val_{metric}"] for r in log if f"val_{metric}" in r]
        label = _LABELS.get(member["distribution"], member["distribution"]) if member["seed"] == min(
            m["seed"] for m in members if m["distribution"] == member["distribution"]) else None
        axes[0][0].plot(xs, ys, color=colours.get(member["distribution"]), alpha=0.8, label=label)
        if has_concentration and member["distribution"] in ("learned", "uniform"):
            for name, style in (("permutation", "-"), ("rotation", "--")):
                values = [(r[x_key] / (60.0 if x_key == "time" else 1.0), r[f"val_concentration_{name}"])
                          for r in log if r.get(f"val_concentration_{name}") is not None]
                if values:
                    axes[0][1].plot(*zip(*values), style, color=colours.get(member["distribution"]), alpha=0.8,
                                    label=f"{_LABELS[member['distribution']]}, {name}" if label else None)
    axes[0][0].set_xlabel("minutes" if x_key == "time" else "epoch")
    axes[0][0].set_ylabel(f"validation {metric}")
    if metric == "mse":
        axes[0][0].set_yscale("log")
    axes[0][0].legend(fontsize=8)
    axes[0][0].set_title(f"{suite}: validation {metric} (every seed)")
    if has_concentration:
        axes[0][1].set_xlabel("minutes" if x_key == "time" else "epoch")
        axes[0][1].set_ylabel("concentration of the k samples")
        axes[0][1].set_title("1 = one deterministic sample; uniform level for reference")
        axes[0][1].legend(fontsize=7)
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def import_main_job(folder: Path, root: Path = DEFAULT_ROOT) -> List[Path]:
    """Record the runs of a finished ``lps-fast main`` (``folder`` = its ``--out``) under
    ``root/main/<distribution>/seed<N>`` as the report's ``main`` comparison."""
    summary = _read_json(folder / "summary.json")
    if summary is None:
        raise FileNotFoundError(f"{folder / 'summary.json'} not found: run lps-fast main first")
    recorded = []
    for row in summary["rows"]:
        source = folder / row["distribution"]
        metrics = _read_json(source / "metrics.json")
        if metrics is None:
            continue
        target = root / "main" / row["distribution"] / f"seed{metrics['seed']}"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "log.jsonl", "metrics.json"):
            if (source / name).is_file():
                (target / name).write_text((source / name).read_text())
        record = {"command": "lps-fast main", "exit_code": 0, "machine": machine_description(),
                  "wall_seconds": summary.get("total_seconds"), "load_at_start": None, "load_at_end": _load(),
                  "threads_per_model": summary.get("threads_per_model")}
        (target / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        recorded.append(target)
    return recorded


def write_report(root: Path = DEFAULT_ROOT, out: Path = DEFAULT_REPORT, markdown: Path = DEFAULT_MARKDOWN) -> Dict[str, Any]:
    """Write ``summary.json`` and the Markdown report from the records under ``root``."""
    runs = collect(root)
    rows = aggregate(runs)
    summary = {"generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "root": str(root),
               "machines": sorted({r["machine"] for r in runs}), "runs": runs, "aggregates": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = _markdown(runs, rows, out, markdown)
    markdown.write_text("\n".join(lines) + "\n")
    return summary


def _markdown(runs, rows, out: Path, markdown: Path) -> List[str]:
    machines = sorted({r["machine"] for r in runs}) or ["(no runs)"]
    lines = [
        "# Reproduction results",
        "",
        "Written by `lps-fast results report` from the run records under "
        f"`{DEFAULT_ROOT}` (each run: `config.json`, `log.jsonl`, `metrics.json`, `run.json`); the "
        "runs themselves by `lps-fast results run SUITE --seeds 0,1,2`. Do not edit by hand: rerun the report.",
        "",
        f"**Machine:** {', '.join(machines)}. Every run: one process, one torch thread (`--threads 1`), the "
        "compiled CPU kernels, the task's CPU defaults (`lps-fast tasks`; the paper's settings are "
        "`--preset paper`, sized for a GPU) plus the options of its suite below. Means and standard deviations "
        "are over seeds (model, noise and data order; the data sets are the same). The load average when each "
        "run started is in `summary.json`: other work shared the machine, which slows runs but does not change "
        "equal-epoch results; equal-time runs of one seed ran side by side under the same load.",
        "",
        "**The CPU budget is far below the paper's** (n-body: 10,000 epochs on a GPU; EXP: 2,000 epochs; "
        "PATTERN: ViT-Base). Where a figure of the paper is not reached, the tables show where the runs stand "
        "and the curves show whether they were still improving.",
        "",
    ]
    by_suite: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        by_suite.setdefault(row["suite"], []).append(row)
    lines += _targets(rows)
    for suite_name, suite_rows in by_suite.items():
        suite = SUITES.get(suite_name)
        task = suite_rows[0]["task"]
        recipe = get_recipe(task)
        title = suite.summary if suite else (
            "the main job (`lps-fast main`, what `make demo` runs): n-body, three models trained at once for the same "
            "wall-clock time" if suite_name == "main" else task)
        lines += [f"## {suite_name}: {title}", ""]
        members = [r for r in runs if r["suite"] == suite_name]
        example = next((r for r in members if r["distribution"] == "learned"), members[0] if members else None)
        if example and example.get("command") and suite is not None:
            command = example["command"]
            if command.startswith("-m lps_fast.cli "):
                command = "lps-fast " + command[len("-m lps_fast.cli "):]
            lines += ["```bash", f"lps-fast results run {suite_name} --seeds "
                      f"{','.join(str(s) for s in suite_rows[0]['seeds'])}", f"# each run is, e.g.: {command}", "```",
                      ""]
        lines += [f"Paper: {recipe.paper}.", ""]
        lines += _trained_table(suite_rows) if recipe.trained else _protocol_table(suite_rows)
        lines.append("")
        lines += _statements(suite_rows)
        plot = _plot_curves(runs, suite_name, out) if recipe.trained else None
        if plot is not None:
            relative = os.path.relpath(plot, markdown.parent)
            lines += ["", f"![{suite_name}]({relative})"]
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="run suites of seeded runs (one torch thread each)")
    run.add_argument("suites", nargs="+", metavar="SUITE", help=f"one or more of: {', '.join(SUITES)}")
    run.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    run.add_argument("--jobs", type=int, default=2, help="runs at a time for equal-epoch suites (default 2)")
    run.add_argument("--distributions", help="comma-separated subset of each suite's distributions (default all)")
    run.add_argument("--root", default=str(DEFAULT_ROOT), help=f"where the records go (default {DEFAULT_ROOT})")
    run.add_argument("--data", help="folder of exp.npz / graph8c.g6 (default: the usual search path)")
    run.add_argument("--keep-checkpoints", action="store_true", help="keep best.pt / last.pt of every run")
    run.add_argument("--again", action="store_true", help="rerun runs that already have metrics.json")
    report = actions.add_parser("report", help="write summary.json and RESULTS.md from the records")
    report.add_argument("--root", default=str(DEFAULT_ROOT))
    report.add_argument("--out", default=str(DEFAULT_REPORT), help="folder of summary.json and the plots")
    report.add_argument("--markdown", default=str(DEFAULT_MARKDOWN))
    report.add_argument("--main-job", metavar="DIR",
                        help="first record the runs of a finished `lps-fast main --out DIR` (default runs/main) as the "
                             "'main' comparison")
    actions.add_parser("suites", help="list the suites")


def main(args: argparse.Namespace) -> int:
    if args.action == "suites":
        for suite in SUITES.values():
            print(f"{suite.name:<14} {suite.comparison:<13} {', '.join(suite.distributions):<36} {suite.summary}")
        return 0
    if args.action == "run":
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds expects comma-separated whole numbers, got {args.seeds!r}") from None
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        only = None if not args.distributions else tuple(d.strip() for d in args.distributions.split(","))
        failed = run_suites(args.suites, seeds, Path(args.root), args.jobs, args.data, args.keep_checkpoints,
                            skip_done=not args.again, distributions=only)
        if failed:
            print(f"{len(failed)} run(s) failed: " + ", ".join(str(f) for f in failed))
            return 1
        return 0
    if args.main_job:
        for target in import_main_job(Path(args.main_job), Path(args.root)):
            print(f"recorded {target}")
    summary = write_report(Path(args.root), Path(args.out), Path(args.markdown))
    print(f"{len(summary['runs'])} runs -> {Path(args.out) / 'summary.json'} and {args.markdown}")
    return 0


__all__ = ["Suite", "SUITES", "run_suites", "collect", "aggregate", "write_report", "import_main_job",
           "machine_description"]
