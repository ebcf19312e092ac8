"""Turn the result files into the markdown tables of BENCHMARKS.md.

    python benchmarks/report.py                          # print the latest CPU run of every family
    python benchmarks/report.py --device cuda            # the latest CUDA run
    python benchmarks/report.py --update BENCHMARKS.md   # rewrite the generated sections in place

For each family the latest run (one ``run_id``) on the device is used, so every ratio compares
numbers taken in the same run. The generated section sits between the markers
``<!-- results:<device>:begin -->`` and ``<!-- results:<device>:end -->``; the training-step
table (``step.jsonl``, CPU) between ``<!-- results:step:begin -->`` and ``<!-- results:step:end -->``
where the file has those markers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

try:
    from . import summary
except ImportError:  # run as a script
    import summary

BENCH_DIR = Path(__file__).resolve().parent
FAMILIES = ("permute", "frame", "sinkhorn", "gram_schmidt")


def family_rows(results: Path, device: str) -> dict:
    out = {}
    for family in FAMILIES:
        path = results / f"{family}.jsonl"
        if path.exists():
            rows = summary.latest_run(summary.load_rows(path), device)
            if rows:
                out[family] = rows
    return out


def describe_run(rows: Sequence[dict]) -> str:
    first = rows[0]
    dates = sorted(r["timestamp"] for r in rows)
    copy = first.get("copy_gbps")
    text = (f"{first['machine']}, {first['device']} ({first['device_name']}), torch {first['torch']}, "
            f"{first['threads']} threads, commit {first['commit']}, {dates[0]} to {dates[-1]}")
    if copy:
        text += f"; memcpy ceiling {copy:.1f} GB/s"
    loads = [r["load_avg_1min"] for r in rows if r.get("load_avg_1min") is not None]
    if loads:
        text += f"; 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the run"
    return text


def render(results: Path, device: str) -> str:
    by_family = family_rows(results, device)
    if not by_family:
        return f"(no {device} results in {results})"
    parts: List[str] = []
    all_rows: List[dict] = []
    for family, rows in by_family.items():
        all_rows += rows
        parts.append(f"### {family}\n")
        parts.append(f"Run: {describe_run(rows)}.\n")
        shapes = {}
        for r in rows:
            shapes.setdefault((r["case"], r["scale"]), r["shape"])
        scales = [s for s in summary.SCALES if any(r["scale"] == s for r in rows)]
        for scale in scales:
            scale_rows = [r for r in rows if r["scale"] == scale]
            described = sorted({r["shape"] for r in scale_rows})
            parts.append(f"**{scale}** ({'; '.join(described)})\n")
            header, lines = summary.table(scale_rows, with_scale=False)
            parts.append(summary.markdown(header, lines, textual=2) + "\n")
        if family == "sinkhorn" and any(r.get("peak_MB") is not None for r in rows):
            header, lines = summary.memory_table(rows)
            parts.append("Memory (peak MB: allocation peak above the start of the call; saved MB: what autograd "
                         "keeps for the backward pass beyond inputs and outputs):\n")
            parts.append(summary.markdown(header, lines, textual=3) + "\n")
        red = [r for r in rows if r.get("status") == "mismatch"]
        if red:
            seen = set()
            parts.append("Red gates (not timed):\n")
            for r in red:
                key = (r["case"], r["scale"], r["provider"])
                if key not in seen:
                    seen.add(key)
                    parts.append(f"- {r['provider']} {r['case']} @ {r['scale']}: {r['error']}")
            parts.append("")
    fast = [p for p in summary.FAST_PROVIDERS if any(r["provider"] == p for r in all_rows)]
    for provider in fast:
        lines = [list(line) for line in summary.peer_targets(all_rows, provider)]
        if lines:
            met = sum(line[-1].startswith("met") for line in lines)
            parts.append(f"### Against the fastest peer ({provider}, PATTERN and EXP)\n")
            parts.append(f"{met} of {len(lines)} (case, scale, mode) meet their target: >= "
                         f"{summary.PEER_SPEEDUP:g}x the fastest peer, or, where the forward moves its bytes at >= "
                         f"{summary.COPY_BOUND_FRACTION:g} of the copy bandwidth (copy-bound), >= 1x forward and >= "
                         f"{summary.COPY_BOUND_FULL_SPEEDUP:g}x forward + backward.\n")
            header = ["case", "scale", "mode", "best peer", f"{provider} vs best", f"{provider} fwd / copy", "verdict"]
            parts.append(summary.markdown(header, lines, textual=4) + "\n")
    for provider in fast:
        parts.append(f"### Targets ({provider})\n")
        lines = [[name, verdict, evidence] for name, verdict, evidence in summary.targets(all_rows, provider)]
        parts.append(summary.markdown(["target", "verdict", "measured"], lines, textual=3) + "\n")
    return "\n".join(parts)


def render_step(results: Path) -> Optional[str]:
    """The latest full (not --quick) training-step run of each task as markdown, or None."""
    path = results / "step.jsonl"
    if not path.exists():
        return None
    try:
        from . import bench_step
    except ImportError:  # run as a script
        import bench_step
    full = [r for r in summary.load_rows(path) if not r.get("quick")]
    rows = []
    for task in dict.fromkeys(bench_step.label(r) for r in full):  # a task with a preset is its own table part
        rows += summary.latest_run([r for r in full if bench_step.label(r) == task])
    if not rows:
        return None
    parts = []
    for task in dict.fromkeys(bench_step.label(r) for r in rows):
        task_rows = [r for r in rows if bench_step.label(r) == task]
        first = task_rows[0]
        loads = [r["load_avg_1min"] for r in task_rows if r.get("load_avg_1min") is not None]
        parts.append(f"Run ({task}): {first['machine']}, torch {first['torch']}, {first['threads']} thread(s), "
                     f"commit {first['commit']}, {first['timestamp']}, {first.get('rounds', '?')} rounds"
                     + (f"; 1-minute load average {loads[0]:.1f} at its start." if loads else "."))
        parts.append("")
    parts += [bench_step.format_table(rows, markdown=True), ""]
    parts += [f"- {line}" for line in bench_step.ratios(rows)]
    notes = [f"- {bench_step.label(r)} {r['distribution']}/{r['path']}: not timed ({r['error']})" for r in rows
             if r.get("status") != "ok"]
    if notes:
        parts += [""] + notes
    return "\n".join(parts)


def render_vn(results: Path) -> Optional[str]:
    """The latest full (not --quick) run of bench_vn.py as markdown, or None."""
    path = results / "vn.jsonl"
    if not path.exists():
        return None
    rows = summary.latest_run([r for r in summary.load_rows(path) if not r.get("quick")])
    if not rows:
        return None
    try:
        from . import bench_vn
    except ImportError:  # run as a script
        import bench_vn
    first = rows[0]
    load = first.get("load_avg_1min")
    parts = [f"Run: {first['machine']}, torch {first['torch']}, {first['threads']} thread(s), commit {first['commit']}, "
             f"{first['timestamp']}" + (f"; 1-minute load average {load:.1f} at its start." if load is not None else "."),
             "", "Shapes: " + "; ".join(f"{scale} {shape}" for scale, shape in
                                        dict.fromkeys((r["scale"], r["shape"]) for r in rows)) + ".", "",
             bench_vn.format_table(rows, markdown=True)]
    notes = [f"- {r['scale']} {r['mode']} {r['provider']}: not timed ({r['status']}: {r.get('error')})" for r in rows
             if r["status"] != "ok"]
    if notes:
        parts += [""] + notes
    return "\n".join(parts)


def update(path: Path, device: str, text: str) -> None:
    begin, end = f"<!-- results:{device}:begin -->", f"<!-- results:{device}:end -->"
    content = path.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"{path} has no {begin} ... {end} markers")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n\n{text.rstrip()}\n\n{end}{tail}")


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", default=str(BENCH_DIR / "results"), help="folder of <family>.jsonl files")
    parser.add_argument("--update", default=None, help="markdown file whose generated section to rewrite")
    args = parser.parse_args(argv)
    text = render(Path(args.results), args.device)
    if args.update:
        update(Path(args.update), args.device, text)
        step = render_step(Path(args.results)) if args.device == "cpu" else None
        if step is not None and "<!-- results:step:begin -->" in Path(args.update).read_text():
            update(Path(args.update), "step", step)
        vn = render_vn(Path(args.results)) if args.device == "cpu" else None
        if vn is not None and "<!-- results:vn:begin -->" in Path(args.update).read_text():
            update(Path(args.update), "vn", vn)
        print(f"updated {args.update}")
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
    sys.exit(0)
