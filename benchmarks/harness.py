"""The shared benchmark harness: cases, providers, modes, timing, memory, the agreement gate,
result rows and the summary table.

Every ``benchmarks/bench_<family>.py`` declares a list of :class:`Case` objects (an op, a variant,
a scale and an input builder) and calls :func:`main`. For each case the harness

1. builds the inputs once (seeded) and runs the reference once, forward and backward, with a fixed
   upstream gradient;
2. for each provider (``reference``, ``reference+compile``, ``gather``, ``gather+compile`` (the
   hand-written natural formulation of ``peers.py``, eager and compiled), ``cpp``, ``triton``,
   ``cuda``: those available for the device), runs the op on the same inputs and compares the output and every
   gradient with the reference; a provider that disagrees is recorded as ``mismatch`` and never
   timed ("a speedup is never reported on a red gate");
3. times each mode (``fwd``: forward under ``no_grad``; ``bwd``: ``autograd.grad(...,
   retain_graph=True)`` of one forward graph; ``full``: forward + backward), with warm-up and
   repeats, the providers' samples interleaved on CPU, and reports the median and the 20th/80th
   percentiles;
4. measures memory in a separate, untimed run (see :func:`measure_memory`);
5. appends one JSON line per (case, provider, mode) to ``benchmarks/results/<family>.jsonl`` and
   prints a table of medians and speedups computed within this run.

Speedups are ``time(baseline) / time(provider)``: ``12.0x`` means twelve times faster than the
baseline, ``0.5x`` twice as slow.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch._functorch.config  # not imported by `import torch` alone (run_cases sets an option)

import lps_fast
from lps_fast import allocator
from lps_fast import _backend

try:
    from . import peers, summary
except ImportError:  # run as a script
    import peers
    import summary

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

PROVIDERS = summary.PROVIDERS
FAST_PROVIDERS = summary.FAST_PROVIDERS
BASELINES = summary.BASELINES
MODES = summary.MODES


# ------------------------------------------------------------------------------------------------
# Scales


@dataclass(frozen=True)
class Scale:
    """One problem size: ``B`` graphs, ``k`` samples each, ``n`` nodes, ``C`` edge (or 3-vector)
    channels. Node-level features use ``F`` channels."""

    name: str
    B: int
    k: int
    n: int
    C: int
    F: int = 64

    def describe(self) -> str:
        return f"B={self.B} k={self.k} n={self.n} C={self.C}"


# The paper's scales: PATTERN with 4 edge channels, EXP with its adjacency as one edge
# channel, n-body with 2 channels (positions and velocities as 3-vectors; q_i q_j and adjacency
# on edges). Node-level features are F = 64 wide everywhere (a typical backbone width).
PAPER_SCALES = {
    "pattern": Scale("PATTERN", B=8, k=4, n=188, C=4),
    "exp": Scale("EXP", B=32, k=10, n=64, C=1),
    "nbody": Scale("n-body", B=100, k=20, n=5, C=2),
}
# "large": out of cache on a CPU (B k = 128 edge tensors of 128 x 128 x 4 = 34 MB out, node ops
# with F = 256 features) while a CPU run of the dense O(k n^3) reference stays within a second per
# call; on CUDA the GPU issue's B k = 1024, n = 188.
LARGE_SCALES = {
    "cpu": Scale("large", B=8, k=16, n=128, C=4, F=256),
    "cuda": Scale("large", B=64, k=16, n=188, C=4, F=256),
}
QUICK_SCALE = Scale("quick", B=2, k=3, n=7, C=2, F=5)
SCALE_ORDER = ("pattern", "exp", "nbody", "large")


def scales_for(device: torch.device, names: Sequence[str], quick: bool) -> List[Scale]:
    if quick:
        return [QUICK_SCALE]
    chosen = []
    for name in names:
        key = name.strip().lower().replace("-", "")
        if key in PAPER_SCALES:
            chosen.append(PAPER_SCALES[key])
        elif key == "large":
            chosen.append(LARGE_SCALES["cuda" if device.type == "cuda" else "cpu"])
        elif key == "quick":
            chosen.append(QUICK_SCALE)
        else:
            raise SystemExit(f"unknown scale {name!r}; choose from {', '.join(SCALE_ORDER)}, quick")
    return chosen


# ------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Inputs:
    """Positional arguments of the op; ``grad_args`` are the positions that get gradients."""

    args: tuple
    grad_args: Tuple[int, ...]

    def fresh(self) -> "Inputs":
        """Leaves that require grad (the stored args stay untouched)."""
        args = list(self.args)
        for index in self.grad_args:
            args[index] = args[index].detach().clone().requires_grad_(True)
        return Inputs(tuple(args), self.grad_args)

    def grad_tensors(self) -> List[torch.Tensor]:
        return [self.args[i] for i in self.grad_args]

    def to_dtype(self, dtype: torch.dtype) -> "Inputs":
        """The same values with every floating tensor cast (for a float64 reference)."""
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in self.args)
        return Inputs(args, self.grad_args)


@dataclass
class Case:
    """One benchmark case: ``op`` (a public name of ``lps_fast``) on inputs from ``make``.

    ``bytes_moved`` is the least number of bytes the forward pass must read and write (None where
    the op has no clear byte count, e.g. compute-bound Sinkhorn); GB/s is reported for ``fwd``.
    ``exact_forward`` compares the forward output bit for bit (gathers); otherwise with
    ``atol``/``rtol``. ``output_index`` picks the differentiated output of an op returning a tuple.
    """

    family: str
    op: str
    variant: str
    scale: Scale
    make: Callable[[torch.device, torch.dtype, torch.Generator], Inputs]
    shape: str = ""
    bytes_moved: Optional[Callable[[Inputs, int], int]] = None
    exact_forward: bool = False
    atol: float = 1e-5
    rtol: float = 1e-5
    grad_atol: float = 1e-5
    grad_rtol: float = 1e-5
    output_index: Optional[int] = None
    modes: Tuple[str, ...] = MODES

    @property
    def name(self) -> str:
        return self.op + (f"/{self.variant}" if self.variant else "")


def nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------------
# Environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no", "--", "lps_fast", "csrc", "kernels"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> Optional[Tuple[float, float, float]]:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        return None


def keep_freed_memory() -> str:
    """Make glibc malloc keep freed memory (``lps_fast.allocator``): the benchmarks time the ops,
    not the page faults of fresh output buffers, whatever ran before them in the process.
    Returns a description for the result rows."""
    return allocator.keep_freed_memory(honour_environment=False)


def environment(device: torch.device) -> Dict[str, object]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    info = lps_fast.backend_info()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "lps_fast": lps_fast.__version__,
        "commit": _git_commit(),
        "cpu_extension": info["cpu_extension"]["loaded"],
        "cuda_extension": info["cuda_extension"]["loaded"],
        "load_avg": load_average(),
        "malloc": allocator.setting(),
    }


def results_path(out: Optional[str], quick: bool, family: str) -> Optional[Path]:
    """The JSONL file a script's ``--out`` names: by default ``results/<family>.jsonl`` (none for a
    ``--quick`` smoke run), ``none`` for no file."""
    if out is None:
        return None if quick else RESULTS_DIR / f"{family}.jsonl"
    return None if out.lower() == "none" else Path(out)


def append_rows(rows: Sequence[dict], out: Optional[Path]) -> None:
    """Append ``rows`` to ``out`` as JSON lines (nothing without a file or rows)."""
    if out is None or not rows:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def stamped(rows: Sequence[dict], env: Dict[str, object], family: str, quick: bool,
            load: Optional[Tuple[float, float, float]], **extra) -> List[dict]:
    """``rows`` with the run's identity and machine in front: run id, family, time, machine,
    threads, commit, torch, malloc, quick, the load at the start and ``extra``."""
    run_id = f"{env['date']}-{os.getpid()}"
    return [{"run_id": run_id, "family": family,
             "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": "cpu",
             "machine": f"{env['host']} ({env['cpu']}, {env['cores']} cores)", "threads": env["threads"],
             "commit": env["commit"], "torch": env["torch"], "malloc": env["malloc"], "quick": bool(quick),
             "load_avg_1min": (load or (None,))[0], **extra, **row} for row in rows]


def format_environment(env: Dict[str, object], copy_gbps: Optional[float]) -> str:
    lines = [
        f"date {env['date']}  host {env['host']}  commit {env['commit']}",
        f"cpu {env['cpu']} ({env['cores']} cores, torch threads {env['threads']})  gpu {env['gpu'] or 'none'}",
        f"python {env['python']}  torch {env['torch']}  triton {env['triton'] or 'none'}  lps_fast {env['lps_fast']}",
        f"device {env['device']}  load average {env['load_avg']}  malloc {env['malloc']}",
    ]
    if copy_gbps is not None:
        lines.append(f"memcpy ceiling {copy_gbps:.1f} GB/s (copy of a large tensor on {env['device']}, read + write)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    inner: int
    first_call_s: float


def _quantile(sorted_values: List[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def time_cpu(fn: Callable[[], object], warmup: int, repeats: int, budget_s: float,
             min_sample_s: float = 5e-5) -> Timing:
    """Median and 20/80 percentiles of ``fn`` in ms, with ``time.perf_counter``.

    Each sample averages ``inner`` back-to-back calls so that a sample lasts at least
    ``min_sample_s`` (microsecond ops would otherwise measure the timer); fewer than ``repeats``
    samples (at least 3) are taken when ``repeats`` samples would exceed ``budget_s``.
    """
    start = time.perf_counter()
    fn()  # the first call may compile: timed apart, never a sample
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    fn()
    estimate = max(time.perf_counter() - start, 1e-7)
    # more warm-up only where it is cheap: a slow op is warm after two calls
    for _ in range(max(0, warmup - 2) if estimate > 0.01 else max(0, warmup - 1)):
        fn()
    inner = max(1, min(10_000, math.ceil(min_sample_s / estimate)))
    count = max(3, min(repeats, int(budget_s / (estimate * inner))))
    samples = []
    # no collection inside the samples (gc.collect() itself costs ~0.2 s with dynamo imported)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(count):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - start) / inner * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), count, inner,
                  first_call)


# ops faster than this get one untimed call before each interleaved sample (warm caches)
REWARM_BELOW_S = 5e-3


class CacheFlush:
    """Writes a buffer larger than the last-level cache, so that the next call starts with cold
    caches (the CPU counterpart of the L2 flush that ``triton.testing.do_bench`` does on CUDA):
    every provider is timed from the same cache state, whatever ran before it."""

    def __init__(self, megabytes: int = 64):
        self.buffer = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buffer.fill_(1.0)


def time_cpu_interleaved(fns: Dict[str, Callable[[], object]], warmup: int, repeats: int, budget_s: float,
                         min_sample_s: float = 5e-5, flush: Optional[Callable[[], None]] = None) -> Dict[str, Timing]:
    """:func:`time_cpu` for several providers of one measurement, sampled in alternating rounds.

    On a machine shared with other work the load drifts during a measurement; taking every
    provider's samples spread over the same rounds (in alternating order) exposes them all to the
    same drift, so that their ratio, the number that matters, stays fair. Each provider keeps its
    own sample count (``repeats``, fewer for slow ops within ``budget_s``, at least 3) and its own
    ``inner`` grouping of back-to-back calls. A sample of an op under ``REWARM_BELOW_S`` starts
    after one untimed call of the same op, so that it runs on the warm caches it would have in a
    back-to-back loop, whatever ran before it in the round. With ``flush``, every sample is one
    call that starts after ``flush()`` (cold caches) instead.
    """
    first, inner, count, rewarm = {}, {}, {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()  # the first call may compile: timed apart, never a sample
        first[name] = time.perf_counter() - start
        start = time.perf_counter()
        fn()
        estimate = max(time.perf_counter() - start, 1e-7)
        for _ in range(max(0, warmup - 2) if estimate > 0.01 else max(0, warmup - 1)):
            fn()
        inner[name] = 1 if flush is not None else max(1, min(10_000, math.ceil(min_sample_s / estimate)))
        rewarm[name] = flush is None and estimate < REWARM_BELOW_S
        count[name] = max(3, min(repeats, int(budget_s / (estimate * inner[name]))))
    rounds = max(count.values(), default=0)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    # no collection inside the samples (gc.collect() itself costs ~0.2 s with dynamo imported)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                # spread each provider's samples evenly over the rounds
                if (round_index * count[name]) // rounds == ((round_index + 1) * count[name]) // rounds:
                    continue
                fn, calls = fns[name], inner[name]
                if flush is not None:
                    flush()
                elif rewarm[name]:
                    fn()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - start) / calls * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    timings = {}
    for name, values in samples.items():
        values.sort()
        timings[name] = Timing(statistics.median(values), _quantile(values, 0.2), _quantile(values, 0.8),
                               len(values), inner[name], first[name])
    return timings


def time_cuda(fn: Callable[[], object], warmup: int, repeats: int, budget_s: float,
              device: torch.device) -> Timing:
    """Median and 20/80 percentiles in ms on CUDA: ``triton.testing.do_bench`` when triton is
    importable (it synchronizes and flushes L2 between calls), else CUDA events."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    first_call = time.perf_counter() - start
    try:
        from triton.testing import do_bench
    except Exception:
        do_bench = None
    if do_bench is not None:
        rep_ms = max(25.0, min(budget_s * 1e3, 200.0))
        median, p20, p80 = do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(median), float(p20), float(p80), -1, 1, first_call)
    for _ in range(max(1, warmup)):
        fn()
    synchronize(device)
    samples = []
    for _ in range(max(3, repeats)):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end))
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples), 1,
                  first_call)


def measure_copy_gbps(device: torch.device, megabytes: int = 256, repeats: int = 10) -> float:
    """The memcpy ceiling: GB/s of ``dst.copy_(src)`` for a large tensor, counting the bytes read
    and the bytes written."""
    count = megabytes * 2**20 // 4
    src = torch.rand(count, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    if device.type == "cuda":
        timing = time_cuda(fn, 3, repeats, 1.0, device)
    else:
        timing = time_cpu(fn, 2, repeats, 5.0)
    return 2 * nbytes(src) / (timing.median_ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# Providers


def available_providers(op: str, device: torch.device) -> Dict[str, str]:
    """``{provider: reason}`` for every provider that cannot run ``op`` on ``device`` here."""
    missing = {}
    for name in PROVIDERS:
        if name in ("gather", "gather+compile") and op not in peers.PEERS:
            missing[name] = "no hand-written formulation of this op"
        if name in BASELINES:
            continue
        if name not in _backend.providers:
            missing[name] = _backend.unavailable_providers().get(name, "not loaded")
        elif not _backend._offers(name, op, device.type):
            provider = _backend.providers[name]
            served = device.type in provider.devices or "*" in provider.devices
            missing[name] = provider.missing_reason or ("not built for this op" if served else f"does not serve {device.type}")
        elif name == "triton" and device.type == "cpu":
            missing[name] = "the Triton interpreter (TRITON_INTERPRET=1) is a test path, not timed"
    return missing


@dataclass
class Runner:
    """How one provider calls the op: ``call(*args)`` under the provider's backend setting."""

    provider: str
    call: Callable
    backend: Optional[str]

    def __call__(self, *args):
        if self.backend is None:
            return self.call(*args)
        with lps_fast.use_backend(self.backend):
            return self.call(*args)


def make_runner(provider: str, op: str) -> Runner:
    if provider in ("gather", "gather+compile"):
        function = peers.PEERS[op]
    else:
        function = getattr(lps_fast.reference, op)
    if provider in summary.COMPILED:
        # A fresh compilation per case (of the reference function with its input checks, or of
        # the hand-written peer); static shapes, no graph break allowed. Compiled lazily by the
        # first (untimed) call, while run_cases has donated buffers off (see there).
        torch._dynamo.reset()
        return Runner(provider, torch.compile(function, fullgraph=True, dynamic=False), None)
    if provider == "gather":
        return Runner(provider, function, None)
    # Eager providers run the public op, which validates its inputs and calls the forced provider,
    # exactly as a user's call would.
    return Runner(provider, getattr(lps_fast, op), provider)


# ------------------------------------------------------------------------------------------------
# Running one provider: outputs, gradients, the gate


def _outputs(result) -> Tuple[torch.Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _target(case: Case, result) -> torch.Tensor:
    outputs = _outputs(result)
    return outputs[case.output_index or 0]


def upstream_gradient(target: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(target.shape, generator=generator, dtype=torch.float64).to(target.dtype).to(target.device)


def run_once(runner: Runner, case: Case, inputs: Inputs, upstream: Optional[torch.Tensor]):
    """Outputs (detached) and gradients of the grad args for one forward (+ backward) pass."""
    leaves = inputs.fresh()
    with torch.enable_grad():
        result = runner(*leaves.args)
    outputs = tuple(t.detach() for t in _outputs(result))
    grads = ()
    if upstream is not None and leaves.grad_args:
        target = _target(case, result)
        grads = torch.autograd.grad(target, leaves.grad_tensors(), upstream, allow_unused=True)
        grads = tuple(None if g is None else g.detach() for g in grads)
    return outputs, grads


def compare(case: Case, inputs: Inputs, got, expected, exact64=None) -> Optional[str]:
    """None when ``got`` agrees with ``expected`` (outputs, grads); else what differs.

    Gathers must match bit for bit; other values within ``atol + rtol |e|``, or, where the
    float32 reference is itself off, no further from the float64 reference ``exact64`` than
    twice the float32 reference is (ill-conditioned reductions round differently in any order).
    """
    got_outputs, got_grads = got
    ref_outputs, ref_grads = expected
    more_outputs, more_grads = exact64 if exact64 is not None else ((), ())
    problems = []

    def check(name, a, e, e64, exact, atol, rtol):
        if a is None or e is None:
            if (a is None) != (e is None):
                problems.append(f"{name}: one side has no value")
            return
        if a.shape != e.shape or a.dtype != e.dtype:
            problems.append(f"{name}: {tuple(a.shape)} {a.dtype} vs reference {tuple(e.shape)} {e.dtype}")
            return
        a, e = a.detach().cpu(), e.detach().cpu()
        if exact or not e.is_floating_point():
            bad = a != e
            if e.is_floating_point():
                bad &= ~(torch.isnan(a) & torch.isnan(e))
        else:
            bad = ~torch.isclose(a.double(), e.double(), atol=atol, rtol=rtol, equal_nan=True)
            if bool(bad.any()) and e64 is not None:
                e64 = e64.detach().cpu().double()
                own_error = (e.double() - e64).abs()
                bad &= (a.double() - e64).abs() > 2 * own_error + atol + rtol * e64.abs()
        if bool(bad.any()):
            worst = (a.double() - e.double()).abs().nan_to_num(float("inf")).max().item() if e.is_floating_point() else float("nan")
            first = tuple(int(i) for i in bad.nonzero()[0])
            problems.append(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
                            f"(largest {worst:.3g}, first at {first}, atol={atol}, rtol={rtol})")

    def at(values, index):
        return values[index] if index < len(values) else None

    for index, (a, e) in enumerate(zip(got_outputs, ref_outputs)):
        check(f"output {index}", a, e, at(more_outputs, index), case.exact_forward, case.atol, case.rtol)
    for index, (position, a, e) in enumerate(zip(inputs.grad_args, got_grads, ref_grads)):
        check(f"grad of argument {position}", a, e, at(more_grads, index), False, case.grad_atol, case.grad_rtol)
    return "; ".join(problems) or None


# ------------------------------------------------------------------------------------------------
# The timed callables of each mode


def mode_callable(runner: Runner, case: Case, inputs: Inputs, mode: str,
                  upstream: Optional[torch.Tensor]) -> Callable[[], object]:
    if mode == "fwd":
        args = inputs.args

        def forward():
            with torch.no_grad():
                return runner(*args)

        return forward
    leaves = inputs.fresh()
    tensors = leaves.grad_tensors()
    if mode == "bwd":
        with torch.enable_grad():
            target = _target(case, runner(*leaves.args))

        def backward():
            return torch.autograd.grad(target, tensors, upstream, retain_graph=True, allow_unused=True)

        return backward

    def forward_backward():
        with torch.enable_grad():
            target = _target(case, runner(*leaves.args))
        return torch.autograd.grad(target, tensors, upstream, allow_unused=True)

    return forward_backward


# ------------------------------------------------------------------------------------------------
# Memory


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2; hide them during the run."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of bytes allocated by ``fn`` above what was live at its start, on the CPU.

    torch keeps no CPU allocation statistics, so this replays the allocation and free events
    that the profiler records (``profile_memory=True``) in time order, at operator granularity:
    a temporary that an operator allocates and frees inside itself is not seen.
    """
    with _quiet_stderr(), torch.autograd.profiler.profile(profile_memory=True) as prof:
        result = fn()
        del result
    events = sorted(prof.function_events, key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak


def saved_and_output_bytes(runner: Runner, case: Case, inputs: Inputs) -> Tuple[int, int]:
    """``(saved, output)`` bytes after one forward pass with grad: ``saved`` sums the unique
    storages that autograd keeps for the backward pass (seen by ``saved_tensors_hooks``), not
    counting the inputs' and outputs' own storages, which live anyway."""
    leaves = inputs.fresh()
    seen: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = runner(*leaves.args)
    outputs = [t for t in _outputs(result) if isinstance(t, torch.Tensor)]
    alive = {t.untyped_storage().data_ptr() for t in leaves.args if isinstance(t, torch.Tensor)}
    alive |= {t.untyped_storage().data_ptr() for t in outputs}
    saved = sum(size for ptr, size in seen.items() if ptr not in alive)
    return saved, sum(nbytes(t) for t in outputs)


def measure_memory(fn: Callable[[], object], runner: Runner, case: Case, inputs: Inputs, mode: str,
                   device: torch.device) -> Dict[str, Optional[float]]:
    """Memory of one more call of the (already warm) timed callable ``fn``: ``peak_MB`` in every
    mode; in ``full`` mode also ``saved_MB`` and ``out_MB`` of one forward pass with grad."""
    mb = 2.0**20
    peak = cuda_peak_bytes(fn, device) if device.type == "cuda" else cpu_peak_bytes(fn)
    memory = {"peak_MB": round(peak / mb, 6)}
    if mode == "full":
        saved, out = saved_and_output_bytes(runner, case, inputs)
        memory["saved_MB"] = round(saved / mb, 6)
        memory["out_MB"] = round(out / mb, 6)
    return memory


# ------------------------------------------------------------------------------------------------
# The run


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    providers: Tuple[str, ...]
    modes: Tuple[str, ...]
    repeats: int
    warmup: int
    budget_s: float
    memory: bool
    seed: int
    out: Optional[Path]
    quiet: bool = False
    cold_cache: bool = False


def _log(settings: Settings, message: str) -> None:
    if not settings.quiet:
        print(message, flush=True)


def run_cases(cases: Sequence[Case], settings: Settings, family: str,
              env: Optional[Dict[str, object]] = None, copy_gbps: Optional[float] = None) -> List[dict]:
    # Donated buffers forbid a second backward through one compiled graph, which the bwd mode
    # times (retain_graph=True); they save memory, not time. Off while the run compiles.
    config = torch._functorch.config
    previous = config.donated_buffer
    config.donated_buffer = False
    try:
        return _run_cases(cases, settings, family, env, copy_gbps)
    finally:
        config.donated_buffer = previous


def _run_cases(cases: Sequence[Case], settings: Settings, family: str,
               env: Optional[Dict[str, object]], copy_gbps: Optional[float]) -> List[dict]:
    device = settings.device
    env = env or environment(device)
    run_id = f"{env['date']}-{os.getpid()}"
    rows: List[dict] = []
    flush = CacheFlush() if settings.cold_cache and device.type == "cpu" else None
    for case in cases:
        generator = torch.Generator().manual_seed(settings.seed)
        inputs = case.make(device, settings.dtype, generator)
        shape = case.shape or case.scale.describe()
        modes = [m for m in settings.modes if m in case.modes]
        needs_grad = any(m != "fwd" for m in modes) and bool(inputs.grad_args)
        reference = make_runner("reference", case.op)
        probe = run_once(reference, case, inputs, None)
        target_shape_source = probe[0][case.output_index or 0]
        upstream = upstream_gradient(target_shape_source, settings.seed) if needs_grad else None
        expected = run_once(reference, case, inputs, upstream) if needs_grad else probe
        exact64 = None
        if settings.dtype != torch.float64:
            # the float64 reference, for reductions that the float32 reference itself rounds off
            exact64 = run_once(reference, case, inputs.to_dtype(torch.float64),
                               None if upstream is None else upstream.double())
        missing = available_providers(case.op, device)
        _log(settings, f"\n{family}: {case.name} @ {case.scale.name} ({shape})")
        runners: Dict[str, Runner] = {}
        base_rows: Dict[str, dict] = {}
        gate_seconds: Dict[str, float] = {}
        for provider in settings.providers:
            if provider in missing:
                _log(settings, f"  {provider:18s} skipped: {missing[provider]}")
                continue
            base_row = {
                "run_id": run_id,
                "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "device": str(device),
                "device_name": env["gpu"] or env["cpu"],
                "machine": f"{env['host']} ({env['cpu']}, {env['cores']} cores)",
                "threads": env["threads"],
                "commit": env["commit"],
                "torch": env["torch"],
                "family": family,
                "op": case.op,
                "variant": case.variant,
                "case": case.name,
                "scale": case.scale.name,
                "shape": shape,
                "dtype": str(settings.dtype).replace("torch.", ""),
                "provider": provider,
                "copy_gbps": None if copy_gbps is None else round(copy_gbps, 2),
                "load_avg_1min": (load_average() or (None,))[0],
                "malloc": env["malloc"],
                "cache": "cold" if flush is not None else "warm",
            }
            try:
                runner = make_runner(provider, case.op)
                start = time.perf_counter()
                got = run_once(runner, case, inputs, upstream)
                gate_seconds[provider] = time.perf_counter() - start
                problem = None if provider == "reference" else compare(case, inputs, got, expected, exact64)
            except Exception as exc:  # a provider that crashes is reported, not fatal
                problem = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if problem is not None:
                _log(settings, f"  {provider:18s} RED GATE, not timed: {problem}")
                for mode in modes:
                    rows.append({**base_row, "mode": mode, "status": "mismatch", "error": problem,
                                 "median_ms": None, "p20_ms": None, "p80_ms": None})
                continue
            runners[provider] = runner
            base_rows[provider] = base_row
        for mode in modes:
            fns: Dict[str, Callable[[], object]] = {}
            for provider, runner in runners.items():
                try:
                    fns[provider] = mode_callable(runner, case, inputs, mode, upstream)
                except Exception as exc:
                    row = {**base_rows[provider], "mode": mode, "status": "error",
                           "error": f"{type(exc).__name__}: {exc}", "median_ms": None}
                    rows.append(row)
                    _log(settings, f"  {provider:18s} {mode:4s} ERROR {row['error']}")
            timings: Dict[str, Timing] = {}
            errors: Dict[str, str] = {}
            if device.type == "cuda":
                for provider, fn in fns.items():
                    try:
                        timings[provider] = time_cuda(fn, settings.warmup, settings.repeats, settings.budget_s, device)
                    except Exception as exc:
                        errors[provider] = f"{type(exc).__name__}: {exc}"
            else:
                try:
                    timings = time_cpu_interleaved(fns, settings.warmup, settings.repeats, settings.budget_s,
                                                   flush=flush)
                except Exception as exc:
                    # find the provider that fails, time the others one by one
                    for provider, fn in fns.items():
                        try:
                            timings[provider] = time_cpu(fn, settings.warmup, settings.repeats, settings.budget_s)
                        except Exception as exc:
                            errors[provider] = f"{type(exc).__name__}: {exc}"
            for provider in fns:
                row = {**base_rows[provider], "mode": mode, "status": "ok"}
                if provider in errors:
                    row.update(status="error", error=errors[provider], median_ms=None)
                    rows.append(row)
                    _log(settings, f"  {provider:18s} {mode:4s} ERROR {row['error']}")
                    continue
                timing = timings[provider]
                row.update(median_ms=round(timing.median_ms, 5), p20_ms=round(timing.p20_ms, 5),
                           p80_ms=round(timing.p80_ms, 5), repeats=timing.repeats, inner=timing.inner)
                if provider in summary.COMPILED:
                    first = timing.first_call_s if mode == "fwd" else max(timing.first_call_s, gate_seconds[provider])
                    row["first_call_s"] = round(first, 3)
                gbps = None
                if mode == "fwd" and case.bytes_moved is not None:
                    gbps = case.bytes_moved(inputs, settings.dtype.itemsize) / (timing.median_ms * 1e-3) / 1e9
                row["gbps"] = None if gbps is None else round(gbps, 2)
                if settings.memory and mode in ("fwd", "full"):
                    try:
                        row.update(measure_memory(fns[provider], runners[provider], case, inputs, mode, device))
                    except Exception as exc:
                        row["memory_error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                _log(settings, "  " + _row_line(row))
    if settings.out is not None and rows:
        settings.out.parent.mkdir(parents=True, exist_ok=True)
        with open(settings.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


def _row_line(row: dict) -> str:
    text = (f"{row['provider']:18s} {row['mode']:4s} {row['median_ms']:10.4f} ms "
            f"[{row['p20_ms']:.4f}, {row['p80_ms']:.4f}]")
    if row.get("gbps") is not None:
        text += f"  {row['gbps']:7.2f} GB/s"
    if row.get("peak_MB") is not None:
        text += f"  peak {row['peak_MB']:.2f} MB"
    if row.get("saved_MB") is not None:
        text += f"  saved {row['saved_MB']:.2f} MB"
    return text


# ------------------------------------------------------------------------------------------------
# Command line


def parser(description: str, default_scales: Sequence[str] = SCALE_ORDER) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--providers", default=",".join(PROVIDERS),
                   help="comma list of " + ", ".join(PROVIDERS) + " (unavailable ones are skipped)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, bwd, full")
    p.add_argument("--scales", default=",".join(default_scales), help="comma list of " + ", ".join(SCALE_ORDER))
    p.add_argument("--cases", default="", help="comma list of case names to keep (substring match); default all")
    p.add_argument("--repeats", type=int, default=50, help="timed samples per measurement (default 50)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="seconds of timed calls per measurement; slow ops take fewer samples, at least 3 (default 1.0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run (default: torch's default, the core count)")
    p.add_argument("--cold-cache", action="store_true",
                   help="CPU: write a 64 MB buffer before each sample, so every call starts with cold caches "
                        "(default: warm caches, as in a back-to-back loop)")
    p.add_argument("--raw-malloc", action="store_true",
                   help="leave glibc malloc as it is (default on CPU: keep freed memory, see keep_freed_memory)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--no-memory", action="store_true", help="skip the (untimed) memory measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, 2 repeats, no torch.compile unless asked for, no result file unless --out: a smoke test")
    p.add_argument("--out", default=None,
                   help="JSON-lines file to append to (default benchmarks/results/<family>.jsonl; 'none' to skip)")
    p.add_argument("--quiet", action="store_true", help="print only the environment header and the table")
    return p


def _split(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def settings_from_args(args: argparse.Namespace, family: str, argv: Optional[Sequence[str]]) -> Settings:
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and not args.raw_malloc and not args.quick:
        keep_freed_memory()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    providers = _split(args.providers)
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
    explicit_providers = argv is not None and any(a.startswith("--providers") for a in argv)
    if args.quick and not explicit_providers:
        providers = [p for p in providers if p not in summary.COMPILED]
    modes = _split(args.modes)
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if args.out is None:
        out = None if args.quick else RESULTS_DIR / f"{family}.jsonl"
    elif args.out.lower() == "none":
        out = None
    else:
        out = Path(args.out)
    return Settings(
        device=device,
        dtype=getattr(torch, args.dtype),
        providers=tuple(providers),
        modes=tuple(modes),
        repeats=2 if args.quick else args.repeats,
        warmup=1 if args.quick else args.warmup,
        budget_s=0.005 if args.quick else args.budget,
        memory=not args.no_memory,
        seed=args.seed,
        out=out,
        quiet=args.quiet,
        cold_cache=args.cold_cache,
    )


def exit_status(rows: Sequence[dict]) -> int:
    """The process exit status of a benchmark run: 1 when any provider failed the agreement
    gate or raised, so that scripts and CI see a red gate without reading the table."""
    bad = [r for r in rows if r.get("status") in ("mismatch", "error")]
    for row in bad:
        print(f"{row['status'].upper()}: {row.get('provider')} {row.get('case')} @ {row.get('scale')} {row.get('mode')}: "
              f"{str(row.get('error'))[:200]}", file=sys.stderr)
    return 1 if bad else 0


def main(family: str, description: str,
         build_cases: Callable[[List[Scale], torch.device, torch.dtype], List[Case]],
         argv: Optional[Sequence[str]] = None, default_scales: Sequence[str] = SCALE_ORDER,
         copy_gbps: Optional[float] = None) -> List[dict]:
    """Parse the command line, run the family's cases and print the environment and the table."""
    args = parser(description, default_scales).parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    settings = settings_from_args(args, family, argv_list)
    scales = scales_for(settings.device, _split(args.scales), args.quick)
    cases = build_cases(scales, settings.device, settings.dtype)
    wanted = _split(args.cases)
    if wanted:
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    env = environment(settings.device)
    if copy_gbps is None and not args.quick:
        copy_gbps = measure_copy_gbps(settings.device)
    print(format_environment(env, copy_gbps), flush=True)
    if settings.device.type == "cpu":
        print("memory: peak_MB = profiler-recorded CPU allocation peak above the start (operator granularity); "
              "saved_MB = storages autograd keeps for backward beyond inputs and outputs", flush=True)
    rows = run_cases(cases, settings, family, env, copy_gbps)
    end_load = load_average()
    print(f"\n{family}: medians in ms; 'cpp vs ref' = time(reference) / time(cpp), higher is faster; "
          f"RED = failed the agreement gate, not timed. Load average at the end: {end_load}")
    print(summary.format_table(rows), flush=True)
    if settings.out is not None and rows:
        print(f"rows appended to {settings.out}")
    return rows
