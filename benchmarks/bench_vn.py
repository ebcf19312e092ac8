"""Benchmark the learned distribution's vector-neuron network (``VNDGCNN``): the fused layers.

The n-body distribution runs ``lps_fast.nn.VNDGCNN`` on every sample (B k noisy copies of the
input). Its layers run either as the fused kernel ``lps_fast::vn_layer`` (batch norm, leaky ReLU
and the kNN edge convolution's max-pool in one pass, no edge tensors; the default on CPU) or as
the composed PyTorch formulation (what the reference backend and devices without the kernel
run). Providers, all on the same module and inputs:

* ``composed``: the composed layers, eager (``lps_fast.use_backend("reference")``);
* ``composed+compile``: ``torch.compile`` of the module with the composed layers: the peer a
  user would pick, since inductor fuses the elementwise chain itself;
* ``fused``: the fused kernel, eager (the default path);
* ``fused+compile``: ``torch.compile`` of the module with the fused kernel (inductor compiles the
  rest of the network around the custom op).

Modes: ``fwd`` (eval mode, no grad: the network at test time), ``full`` (train mode, forward
and backward with the input's gradient too) and ``train`` (train mode, forward and backward to
the parameters alone: a training step's share, since the learned distribution's input is noise
plus data; the fused provider then runs the whole network as one op, ``lps_fast::vn_dgcnn``). Every provider passes an agreement gate against
``composed`` before it is timed: outputs and input/parameter gradients within 1e-8 of each
tensor's scale, in float64 (in float32 a rounding difference can flip a max-pool or kNN selection
between near-equal candidates, which changes that entry by O(1): torch.compile of the composed
layers does so too). Timing is float32; samples alternate between providers
(``harness.time_cpu_interleaved``).

    python benchmarks/bench_vn.py                 # one thread, the n-body and point-cloud scales
    python benchmarks/bench_vn.py --providers composed,fused --modes full
    python benchmarks/bench_vn.py --quick         # a smoke test: tiny shapes, no compile
    python benchmarks/bench_vn.py --device cuda   # on a GPU: the Triton kernel against the composed layers
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

try:
    from . import harness
except ImportError:  # run as a script
    import harness

import lps_fast
from lps_fast.nn import VNDGCNN

FAMILY = "vn"
PROVIDERS = ("composed", "composed+compile", "fused", "fused+compile")
MODES = ("fwd", "full", "train")
# name: (samples N, nodes n, 3-vector channels C, neighbours K); hidden 64 as the paper's network
SCALES = {
    "nbody": (400, 5, 2, 4),  # batch 100 x k = 4 samples of 5 particles (positions, velocities)
    "points": (64, 64, 1, 16),  # 64 samples of a 64-point cloud, 16 neighbours
}
QUICK_SCALES = {"tiny": (6, 7, 2, 3)}


def _inputs(N: int, n: int, C: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, n, 3, C, generator=gen)


def _callable(provider: str, net: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    backend = "reference" if provider.startswith("composed") else None
    module = copy.deepcopy(net).train(mode != "fwd")
    if provider.endswith("+compile"):
        torch._dynamo.reset()  # a fresh cache: every (scale, mode, dtype) would otherwise count as a recompile
        with lps_fast.use_backend(backend):
            module = torch.compile(module, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(1)
    weights = None

    def forward():
        with lps_fast.use_backend(backend), torch.no_grad():
            return module(x)

    def full():
        nonlocal weights
        with lps_fast.use_backend(backend):
            xg = x.detach().requires_grad_(mode == "full")
            frame, scores = module(xg)
            if weights is None:
                weights = (torch.randn(frame.shape, generator=gen).to(frame), torch.randn(scores.shape, generator=gen).to(scores))
            loss = (frame * weights[0]).sum() + (scores * weights[1]).sum()
            for p in module.parameters():
                p.grad = None
            loss.backward()
            return frame, scores, xg.grad, [p.grad for p in module.parameters()]

    return forward if mode == "fwd" else full


def _flatten(result) -> List[Optional[torch.Tensor]]:
    out = []
    for item in result:
        if isinstance(item, (list, tuple)):
            out += list(item)
        else:
            out.append(item)
    return out


def _agree(result, expected, tolerance: float) -> Optional[str]:
    """None, or what disagrees (max error within ``tolerance`` of each tensor's scale)."""
    got, want = _flatten(result), _flatten(expected)
    for index, (a, b) in enumerate(zip(got, want)):
        if (a is None) != (b is None):
            return f"output {index}: gradient presence differs"
        if a is None:
            continue
        error, scale = float((a - b).abs().max().detach()), float(b.abs().max().detach())
        if not error <= tolerance * (scale + 1e-3):
            return f"output {index}: max error {error:.3g} at scale {scale:.3g}"
    return None


def run(scales: Dict[str, tuple], providers: Sequence[str], modes: Sequence[str], repeats: int, budget: float,
        seed: int, log: Callable[[str], None], device: torch.device = torch.device("cpu")) -> List[dict]:
    rows = []
    for scale, (N, n, C, K) in scales.items():
        torch.manual_seed(seed)
        # dropout off: runs comparable across providers
        net = VNDGCNN(C, hidden=64, neighbours=K, dropout=0.0).to(device)
        x = _inputs(N, n, C, seed).to(device)
        for mode in modes:
            fns, status = {}, {}
            expected = None
            for provider in providers:
                if provider.startswith("fused") and not lps_fast.nn.fused_vn_available(x):
                    status[provider] = ("unavailable", f"no fused vn_layer kernel for {device.type} tensors here")
                    continue
                try:
                    # the gate runs in float64, where the max-pool's and the kNN's selections do
                    # not flip on rounding differences; the timed run is float32
                    result = _callable(provider, net.double(), x.double(), mode)()
                    if expected is None:
                        expected = result
                    problem = _agree(result, expected, 1e-8)
                    fn = _callable(provider, net.float(), x, mode)
                    fn()
                except Exception as exc:  # a provider that fails is reported, not fatal
                    status[provider] = ("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    continue
                if problem is not None:
                    status[provider] = ("mismatch", problem)
                    continue
                fns[provider] = fn
                status[provider] = ("ok", None)
            if device.type == "cuda":
                timings = {name: harness.time_cuda(fn, 3, repeats, budget, device) for name, fn in fns.items()}
            else:
                timings = harness.time_cpu_interleaved(fns, warmup=3, repeats=repeats, budget_s=budget)
            for provider in providers:
                if provider not in status:
                    continue
                t = timings.get(provider)
                row = {"case": "VNDGCNN", "scale": scale, "shape": f"N={N} n={n} C={C} K={K} hidden=64",
                       "provider": provider, "mode": mode, "status": status[provider][0],
                       "error": status[provider][1],
                       "median_ms": None if t is None else round(t.median_ms, 4),
                       "p20_ms": None if t is None else round(t.p20_ms, 4),
                       "p80_ms": None if t is None else round(t.p80_ms, 4),
                       "samples": None if t is None else t.repeats,
                       "first_call_s": None if t is None else round(t.first_call_s, 3)}
                rows.append(row)
                log(f"  {scale} {mode} {provider}: " + (f"{t.median_ms:.3f} ms" if t else ": ".join(status[provider])))
    return rows


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """Medians per scale and mode, with the fused kernel's speedup over each peer."""
    by_key = {(r["scale"], r["mode"], r["provider"]): r.get("median_ms") for r in rows if r["status"] == "ok"}
    header = ["scale", "mode"] + [f"{p} ms" for p in PROVIDERS] + ["fused vs composed", "fused vs composed+compile",
                                                                  "fused+compile vs composed+compile"]
    lines = []
    for scale, mode in dict.fromkeys((r["scale"], r["mode"]) for r in rows):
        ms = {p: by_key.get((scale, mode, p)) for p in PROVIDERS}

        def ratio(a, b):
            return "-" if not ms[a] or not ms[b] else f"{ms[b] / ms[a]:.2f}x"

        lines.append([scale, mode] + [harness.summary.fmt_ms(ms[p]) if ms[p] else "-" for p in PROVIDERS]
                     + [ratio("fused", "composed"), ratio("fused", "composed+compile"),
                        ratio("fused+compile", "composed+compile")])
    if markdown:
        return harness.summary.markdown(header, lines, textual=2)
    return harness.summary.text(header, lines)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma list of " + ", ".join(PROVIDERS))
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    parser.add_argument("--scales", default=",".join(SCALES), help="comma list of " + ", ".join(SCALES))
    parser.add_argument("--device", default="cpu", help="cpu (default; the C++ kernel) or cuda (the Triton kernel)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of samples per provider and mode, about")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, eager providers only: a smoke test")
    parser.add_argument("--out", default=None,
                        help="JSONL file to append to (default benchmarks/results/vn.jsonl; none with --quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
    if args.quick:
        providers = [p for p in providers if not p.endswith("+compile")]
        scales = QUICK_SCALES
    else:
        scales = {name: SCALES[name] for name in (s.strip() for s in args.scales.split(",")) if name}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    device = torch.device(args.device)
    env = harness.environment(device)
    print(harness.format_environment(env, None), flush=True)
    load = harness.load_average()
    rows = run(scales, providers, modes, 3 if args.quick else args.repeats, 0.2 if args.quick else args.budget,
               args.seed, lambda message: print(message, flush=True), device)
    run_id = f"{env['date']}-{os.getpid()}"
    rows = [{"run_id": run_id, "family": FAMILY,
             "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": device.type,
             "machine": f"{env['host']} ({env['gpu'] or env['cpu']}, {env['cores']} cores)", "threads": env["threads"],
             "commit": env["commit"], "torch": env["torch"], "quick": bool(args.quick),
             "load_avg_1min": (load or (None,))[0], **row} for row in rows]
    print(f"\nvn: medians in ms of VNDGCNN, {env['threads']} thread(s); 'A vs B' = time(B) / time(A); "
          f"load average at the end {harness.load_average()}")
    print(format_table(rows))
    out = harness.results_path(args.out, args.quick, FAMILY)
    harness.append_rows(rows, out)
    if out is not None and rows:
        print(f"rows appended to {out}")
    return rows


if __name__ == "__main__":
    sys.exit(harness.exit_status(main()))
