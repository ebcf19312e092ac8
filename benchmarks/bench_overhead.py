"""Per-call overhead of the public ops: tiny shapes, where a call is all overhead.

For each op, microseconds per call of: the public op with validation on (the default: shape
checks, and on the reference path the permutation-value check), the public op with validation
off (``lps_fast.validation(False)``, as inside the model's group transforms), the registered
kernel called directly (``torch.ops.lps_fast.<op>``: the dispatcher and nothing else) and the
hand-written gather peer (``peers.py``), all sampled in alternating rounds on one thread.

    python benchmarks/bench_overhead.py
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

try:
    from . import harness, peers
except ImportError:  # run as a script
    import harness
    import peers

import lps_fast

B, K, N, F = 2, 2, 4, 4


def _args() -> Dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    perm = torch.argsort(torch.rand(B, K, N, generator=g), dim=-1)
    R = torch.linalg.qr(torch.randn(B, K, 3, 3, generator=g))[0]
    return {
        "permute_nodes": (torch.randn(B, N, F, generator=g), perm),
        "permute_edges": (torch.randn(B, N, N, F, generator=g), perm),
        "unpermute_mean": (torch.randn(B, K, N, F, generator=g), perm),
        "frame_apply": (torch.randn(B, N, 3, 2, generator=g), R, perm),
    }


def _variants(op: str, args: tuple, backend: str) -> Dict[str, Callable[[], object]]:
    public, kernel = getattr(lps_fast, op), getattr(torch.ops.lps_fast, op)

    def checked():
        with lps_fast.use_backend(backend):
            return public(*args)

    def trusted():
        with lps_fast.use_backend(backend), lps_fast.validation(False):
            return public(*args)

    fns = {"checked": checked, "trusted": trusted}
    if backend == "cpp":
        fns["kernel"] = lambda: kernel(*args)
        fns["gather"] = lambda: peers.PEERS[op](*args)
    return fns


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per measurement (default 0.5)")
    parser.add_argument("--out", default=str(harness.RESULTS_DIR / "overhead.jsonl"), help="'none' to skip")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = harness.environment(torch.device("cpu"))
    backends = [b for b in ("cpp", "reference") if b in lps_fast._backend.providers]
    rows = []
    for op, op_args in _args().items():
        for backend in backends:
            timings = harness.time_cpu_interleaved(_variants(op, op_args, backend), warmup=3, repeats=50,
                                                   budget_s=args.budget)
            for variant, timing in timings.items():
                rows.append({"date": env["date"], "commit": env["commit"], "machine": env["cpu"],
                             "threads": env["threads"], "load_avg_1min": (harness.load_average() or (None,))[0],
                             "op": op, "backend": backend, "variant": variant,
                             "us_per_call": round(timing.median_ms * 1e3, 3)})
    print(harness.format_environment(env, None))
    print(f"\nmicroseconds per call at B={B} k={K} n={N} F={F} (median); load average {harness.load_average()}")
    header = ["op", "backend", "checked", "trusted", "kernel", "gather"]
    lines = []
    for op in _args():
        for backend in backends:
            cell = {r["variant"]: r["us_per_call"] for r in rows if r["op"] == op and r["backend"] == backend}
            lines.append([op, backend] + [f"{cell[v]:.2f}" if v in cell else "-" for v in header[2:]])
    print(harness.summary.markdown(header, lines, textual=2))
    if args.out.lower() != "none":
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(harness.exit_status(main()))
