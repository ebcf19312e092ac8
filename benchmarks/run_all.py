"""Run every benchmark family in one process and print one table at the end.

    python benchmarks/run_all.py                         # CPU, every family, scale and provider
    python benchmarks/run_all.py --device cuda           # the same on a GPU (triton, cuda providers)
    python benchmarks/run_all.py --families permute,sinkhorn --scales pattern --modes full
    python benchmarks/run_all.py --quick                 # a smoke test of every script
    python benchmarks/run_all.py --families step         # only the end-to-end training step
    python benchmarks/run_all.py --families vn           # only the learned distribution's network
    python benchmarks/run_all.py --families vn_matmul    # only that network's matrix products

Every other option is passed to each op family's ``bench_<family>.py`` (see ``--help`` of any of
them); the training-step benchmark (``step``, ``bench_step.py``), the distribution network's
(``vn``, ``bench_vn.py``) and its matrix products' (``vn_matmul``, ``bench_vn_matmul.py``), all CPU
only and run last, take ``--quick`` and ``--threads`` (the step also ``--raw-malloc``) from them and
their own defaults otherwise. Results
are appended to ``benchmarks/results/<family>.jsonl``; ``benchmarks/report.py`` turns them into the
tables of BENCHMARKS.md and ``benchmarks/plot.py`` into charts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

try:
    from . import (bench_frame, bench_gram_schmidt, bench_permute, bench_sinkhorn, bench_step, bench_vn,
                   bench_vn_matmul, harness, summary)
except ImportError:  # run as a script
    import bench_frame
    import bench_gram_schmidt
    import bench_permute
    import bench_sinkhorn
    import bench_step
    import bench_vn
    import bench_vn_matmul
    import harness
    import summary

FAMILIES = {
    "permute": bench_permute,
    "frame": bench_frame,
    "sinkhorn": bench_sinkhorn,
    "gram_schmidt": bench_gram_schmidt,
}
STEP = "step"
VN = "vn"
VN_MATMUL = "vn_matmul"


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    names = list(FAMILIES) + [STEP, VN, VN_MATMUL]
    parser.add_argument("--families", default=",".join(names), help="comma list of " + ", ".join(names))
    parser.add_argument("--results", default=None,
                        help="folder for the <family>.jsonl files (default benchmarks/results; none with --quick)")
    args, rest = parser.parse_known_args(argv)
    if any(a == "--out" or a.startswith("--out=") for a in rest):
        raise SystemExit("run_all.py writes one file per family: use --results FOLDER instead of --out")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for family in families:
        if family not in names:
            raise SystemExit(f"unknown family {family!r}; choose from {', '.join(names)}")
    rest = list(rest)
    # the memcpy ceiling is measured once, under the device and thread settings of the run
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--device", default="cpu")
    peek.add_argument("--threads", type=int, default=None)
    peek.add_argument("--quick", action="store_true")
    peek.add_argument("--raw-malloc", action="store_true")
    known, _ = peek.parse_known_args(rest)
    op_families = [f for f in families if f in FAMILIES]
    copy_gbps = None
    if op_families and not known.quick:
        import torch

        if known.threads is not None:
            torch.set_num_threads(known.threads)
        if known.device == "cpu" and not known.raw_malloc:
            harness.keep_freed_memory()
        copy_gbps = harness.measure_copy_gbps(torch.device(known.device))
    rows: List[dict] = []
    start = time.perf_counter()
    for family in op_families:
        module = FAMILIES[family]
        family_start = time.perf_counter()
        out = [] if args.results is None else ["--out", str(Path(args.results) / f"{module.FAMILY}.jsonl")]
        rows += harness.main(module.FAMILY, module.__doc__.splitlines()[0], module.build_cases, rest + out,
                             copy_gbps=copy_gbps)
        print(f"{family}: {time.perf_counter() - family_start:.0f} s\n", flush=True)
    if op_families:
        print(f"\nall op families ({time.perf_counter() - start:.0f} s); medians in ms, "
              "speedup = time(baseline) / time(fast)")
        print(summary.format_table(rows))
    # the CPU-only families, each a script of its own taking --quick, --threads and --out
    for family, module, what in ((STEP, bench_step, "the training-step benchmark runs"),
                                 (VN, bench_vn, "the fused VN layers run"),
                                 (VN_MATMUL, bench_vn_matmul, "the kernel runs")):
        if family not in families:
            continue
        if known.device != "cpu":
            print(f"{family}: {what} on the CPU only; skipped for --device {known.device}")
            continue
        script_args = ["--quick"] if known.quick else []
        script_args += [] if known.threads is None else ["--threads", str(known.threads)]
        script_args += ["--raw-malloc"] if family == STEP and known.raw_malloc else []
        script_args += [] if args.results is None else ["--out", str(Path(args.results) / f"{module.FAMILY}.jsonl")]
        rows += module.main(script_args)
    return rows


if __name__ == "__main__":
    sys.exit(harness.exit_status(main()))
