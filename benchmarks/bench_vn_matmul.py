"""Benchmark ``lps_fast::vn_matmul``, the matrix products of the vector-neuron network's layers.

Every layer of the n-body distribution network (``VNDGCNN``, hidden 64: 21 vector channels) maps
each node's three coordinates through one small stacked weight: one training batch is 400 samples
of 5 particles, so 6000 rows against a weight of tens of columns. The cases are the network's own
products, forward (``x @ w``) and backward (``g @ w^T`` and ``x^T @ g``, the input's and the
weight's gradients, timed together as one training step needs them):

* ``conv1``: (6000, 2) @ (2, 84), the first edge convolution's four maps;
* ``conv2``: (6000, 21) @ (21, 84), the second's;
* ``conv3``: (6000, 42) @ (42, 22), the per-node layer with its shared direction;
* ``std1``: (6000, 42) @ (42, 42); ``std2``: (6000, 21) @ (21, 20).

Providers: ``torch`` (``torch.matmul`` and ``x.t().mm(g)``: what the layers ran before, BLAS on
this machine), ``torch+compile`` (the same under ``torch.compile``) and ``vn_matmul`` (the op and
``vn_matmul_backward``). Each provider first passes a float64 agreement gate against ``torch``;
float32 is timed, in alternating rounds, one thread.

    python benchmarks/bench_vn_matmul.py
    python benchmarks/bench_vn_matmul.py --quick     # a smoke test
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

try:
    from . import harness
except ImportError:  # run as a script
    import harness

FAMILY = "vn_matmul"
PROVIDERS = ("torch", "torch+compile", "vn_matmul")
MODES = ("fwd", "bwd")
CASES = {"conv1": (6000, 2, 84), "conv2": (6000, 21, 84), "conv3": (6000, 42, 22), "std1": (6000, 42, 42),
         "std2": (6000, 21, 20)}
QUICK_CASES = {"tiny": (37, 5, 19)}


def _torch_fwd(x, w):
    return torch.matmul(x, w)


def _torch_bwd(g, x, w):
    return torch.matmul(g, w.t()), x.t().mm(g)


def _callable(provider: str, mode: str, x, w, g) -> Callable[[], object]:
    if provider == "vn_matmul":
        if mode == "fwd":
            return lambda: torch.ops.lps_fast.vn_matmul(x, w)
        return lambda: torch.ops.lps_fast.vn_matmul_backward(g, x, w, True)
    fn = _torch_fwd if mode == "fwd" else _torch_bwd
    if provider == "torch+compile":
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    return (lambda: fn(x, w)) if mode == "fwd" else (lambda: fn(g, x, w))


def _outputs(result) -> List[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def run(cases: Dict[str, tuple], providers: Sequence[str], modes: Sequence[str], repeats: int, budget: float,
        seed: int, log: Callable[[str], None]) -> List[dict]:
    rows = []
    for name, (R, K, M) in cases.items():
        torch._dynamo.reset()  # each case compiles afresh (not a recompilation of the last one's)
        gen = torch.Generator().manual_seed(seed)
        x, w, g = torch.randn(R, K, generator=gen), torch.randn(K, M, generator=gen), torch.randn(R, M, generator=gen)
        for mode in modes:
            fns, status = {}, {}
            expected = _outputs(_callable("torch", mode, x.double(), w.double(), g.double())())
            for provider in providers:
                try:
                    got = _outputs(_callable(provider, mode, x.double(), w.double(), g.double())())
                    problem = None
                    for a, b in zip(got, expected):
                        if not torch.allclose(a, b, rtol=1e-10, atol=1e-10 * b.abs().max().item()):
                            problem = f"differs from torch.matmul by {(a - b).abs().max().item():.3g} in float64"
                    fn = _callable(provider, mode, x, w, g)
                    fn()
                except Exception as exc:  # a provider that fails is reported, not fatal
                    status[provider] = ("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    continue
                if problem is not None:
                    status[provider] = ("mismatch", problem)
                    continue
                fns[provider] = fn
                status[provider] = ("ok", None)
            timings = harness.time_cpu_interleaved(fns, warmup=3, repeats=repeats, budget_s=budget)
            flops = 2 * R * K * M * (1 if mode == "fwd" else 2)
            for provider in providers:
                t = timings.get(provider)
                rows.append({"case": name, "shape": f"({R}, {K}) @ ({K}, {M})", "provider": provider, "mode": mode,
                             "status": status[provider][0], "error": status[provider][1],
                             "median_ms": None if t is None else round(t.median_ms, 4),
                             "p20_ms": None if t is None else round(t.p20_ms, 4),
                             "p80_ms": None if t is None else round(t.p80_ms, 4),
                             "samples": None if t is None else t.repeats,
                             "gflops": None if t is None else round(flops / t.median_ms / 1e6, 1)})
                log(f"  {name} {mode} {provider}: " + (f"{t.median_ms:.3f} ms" if t else ": ".join(status[provider])))
    return rows


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    by_key = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    keys = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    header = ["case", "mode", "shape"] + [f"{p} ms" for p in PROVIDERS] + ["vn_matmul GFLOP/s", "vs best peer"]
    lines = []
    total = {p: 0.0 for p in PROVIDERS}
    for case, mode in keys:
        ms = {p: (by_key.get((case, mode, p)) or {}).get("median_ms") for p in PROVIDERS}
        for p in PROVIDERS:
            total[p] += ms[p] or 0.0
        peers = [ms[p] for p in PROVIDERS if p != "vn_matmul" and ms[p]]
        ours = ms["vn_matmul"]
        lines.append([case, mode, by_key[(case, mode, "vn_matmul")]["shape"]]
                     + [harness.summary.fmt_ms(ms[p]) if ms[p] else "-" for p in PROVIDERS]
                     + [str((by_key.get((case, mode, "vn_matmul")) or {}).get("gflops") or "-"),
                        f"{min(peers) / ours:.2f}x" if peers and ours else "-"])
    if all(total.values()):
        best = min(total[p] for p in PROVIDERS if p != "vn_matmul")
        lines.append(["all", "fwd+bwd", "-"] + [harness.summary.fmt_ms(total[p]) for p in PROVIDERS]
                     + ["-", f"{best / total['vn_matmul']:.2f}x"])
    if markdown:
        return harness.summary.markdown(header, lines, textual=3)
    return harness.summary.text(header, lines)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma list of " + ", ".join(PROVIDERS))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of samples per case and mode, about")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny shape, eager providers only: a smoke test")
    parser.add_argument("--out", default=None,
                        help="JSONL file to append to (default benchmarks/results/vn_matmul.jsonl; none with --quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lps_fast::vn_matmul", "CPU"):
        raise SystemExit("lps_fast::vn_matmul is not built (the compiled CPU extension is not loaded)")
    if args.quick:
        providers = [p for p in providers if not p.endswith("+compile")]
    else:
        harness.keep_freed_memory()
    env = harness.environment(torch.device("cpu"))
    print(harness.format_environment(env, None), flush=True)
    load = harness.load_average()
    rows = run(QUICK_CASES if args.quick else CASES, providers, MODES, 3 if args.quick else args.repeats,
               0.2 if args.quick else args.budget, args.seed, lambda message: print(message, flush=True))
    rows = harness.stamped(rows, env, FAMILY, args.quick, load)
    print(f"\nvn_matmul: medians in ms, {env['threads']} thread(s), float32; 'vs best peer' = time(fastest of "
          f"torch, torch+compile) / time(vn_matmul); load average at the end {harness.load_average()}")
    print(format_table(rows))
    out = harness.results_path(args.out, args.quick, FAMILY)
    harness.append_rows(rows, out)
    if out is not None and rows:
        print(f"rows appended to {out}")
    return rows


if __name__ == "__main__":
    sys.exit(harness.exit_status(main()))
