"""Benchmark one training step end to end: each task's default model, as ``lps-fast train`` builds it.

One step is what the trainer runs per batch: draw the noise, the symmetrized forward pass, the task
loss plus the distribution's auxiliary losses, the backward pass, gradient clipping (where the
recipe clips) and AdamW. It is timed for each distribution (``learned``, ``uniform`` = group
averaging, ``none`` = the plain backbone) on each path:

* ``fast``: the default backend (the compiled kernels);
* ``reference``: the pure-PyTorch reference path (``backend="reference"``);
* ``compile``: the fast path with the model under ``torch.compile`` (a path that fails to compile
  is reported with the error, not timed).

The model is whatever ``lps_fast.train.recipes.build_model`` builds for the resolved default
configuration, so this measures the library as a user trains it, whatever the distribution's
network looks like. All variants of one task are stepped in alternating rounds (the order reversed
every other round), so that load on a shared machine affects them alike; medians over the rounds.

Each eager path also gets a per-stage breakdown from instrumented steps in the same rounds: the
distribution (its forward, with the noise draw), the transform of the inputs
(``group.transform_inputs``), the backbone, the average (``group.transform_output``), the
backward pass and the optimizer (clipping, ``step``, ``zero_grad``); ``other`` is the rest of the
step (input checks, the loss). The stages are timed by wrapping those calls on the model (forward
hooks, bound methods), in the order ``Symmetrize.forward`` makes them.

    python benchmarks/bench_step.py                         # nbody and pattern, one thread
    python benchmarks/bench_step.py --tasks nbody --distributions learned,uniform --paths fast,reference
    python benchmarks/bench_step.py --tasks exp-classify    # any task of lps_fast.train.recipes
    python benchmarks/bench_step.py --tasks nbody --preset paper   # the paper's own model sizes and samples
    python benchmarks/bench_step.py --quick                 # tiny models, a few rounds: a smoke test
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

try:
    from . import harness
except ImportError:  # run as a script
    import harness

from lps_fast.train import recipes
from lps_fast.train.config import TrainConfig

FAMILY = "step"
DEFAULT_TASKS = ("nbody", "pattern")
DISTRIBUTIONS = ("learned", "uniform", "none")
PATHS = ("fast", "reference", "compile")
STAGES = ("distribution", "transform", "backbone", "average", "backward", "optimizer", "other")
# tiny models for --quick (every task's recipe accepts these)
QUICK_OVERRIDES = dict(batch_size=4, width=16, layers=1, heads=2, dist_width=8, dist_layers=1, samples=2,
                       patch_size=16)


class StageClock:
    """Accumulates wall time per stage while ``active``; wraps the model's stage calls."""

    def __init__(self):
        self.active = False
        self.times: Dict[str, float] = {}
        self._open: Dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        if self.active:
            self.times[stage] = self.times.get(stage, 0.0) + seconds

    def wrap(self, stage: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - start)

        return timed

    def hook(self, module: torch.nn.Module, stage: str) -> None:
        def before(*_):
            self._open[stage] = time.perf_counter()

        def after(*_):
            self.add(stage, time.perf_counter() - self._open.pop(stage))

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)


class Variant:
    """One (distribution, path) model with its optimizer and its step function."""

    def __init__(self, task: str, distribution: str, path: str, overrides: Dict[str, object], seed: int,
                 batch, info):
        config = recipes.resolve(TrainConfig(task=task, distribution=distribution,
                                             backend="reference" if path == "reference" else "fast",
                                             **overrides))
        self.task, self.distribution, self.path = task, distribution, path
        self.config = config
        self.recipe = recipes.get_recipe(config.task)
        self.info = info
        self.batch = batch
        self.inputs = recipes.make_inputs(batch, info)
        torch.manual_seed(seed)
        self.model = recipes.build_model(config, info).train()
        self.optimizer = recipes.make_optimizer(self.model.parameters(), lr=config.lr or 1e-3,
                                                weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.clock: Optional[StageClock] = None
        self.call = self.model
        if path == "compile":
            self.call = torch.compile(self.model)
        else:
            self._instrument()

    def _instrument(self) -> None:
        clock = self.clock = StageClock()
        model = self.model
        clock.hook(model.distribution, "distribution")
        clock.hook(model.backbone, "backbone")
        # instance attributes shadow the group's bound methods for this model only
        model.group.transform_inputs = clock.wrap("transform", model.group.transform_inputs)
        model.group.transform_output = clock.wrap("average", model.group.transform_output)
        model.draw_noise = clock.wrap("distribution", model.draw_noise)

    @property
    def name(self) -> str:
        return f"{self.distribution}/{self.path}"

    def step(self, staged: bool = False) -> Dict[str, float]:
        """One training step; with ``staged``, the seconds of each stage (and ``total``)."""
        clock = self.clock if staged else None
        if clock is not None:
            clock.times, clock.active = {}, True
        start = time.perf_counter()
        noise = self.model.draw_noise(self.inputs, generator=self.generator)
        output, aux = self.call(self.inputs, noise=noise)
        loss = recipes.task_loss(self.recipe, output, self.batch, self.info.num_classes)
        objective = loss + sum(aux.values()) if aux else loss
        mark = time.perf_counter()
        objective.backward()
        backward = time.perf_counter() - mark
        mark = time.perf_counter()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        optimizer = time.perf_counter() - mark
        total = time.perf_counter() - start
        if clock is None:
            return {"total": total}
        clock.active = False
        times = dict(clock.times, backward=backward, optimizer=optimizer)
        times["other"] = total - sum(times.values())
        times["total"] = total
        return times


def load_batch(task: str, overrides: Dict[str, object]):
    """One training batch of the task's default size (the first ``batch_size`` training graphs)."""
    config = recipes.resolve(TrainConfig(task=task, **overrides))
    sizes = {}
    if config.task in ("nbody", "pattern"):
        sizes = dict(n_train=config.batch_size, n_val=1, n_test=1)
    splits = recipes.load_splits(recipes.resolve(TrainConfig(task=task, **overrides, **sizes)))
    loader = splits.train.loader(batch_size=config.batch_size)
    return next(iter(loader)), splits.info


def run_task(task: str, distributions: Sequence[str], paths: Sequence[str], overrides: Dict[str, object],
             rounds: int, budget_s: float, seed: int, log: Callable[[str], None]) -> List[dict]:
    batch, info = load_batch(task, overrides)
    variants: List[Variant] = []
    failed: List[dict] = []
    for distribution in distributions:
        for path in paths:
            try:
                variant = Variant(task, distribution, path, overrides, seed, batch, info)
                start = time.perf_counter()
                variant.step()  # a compiled path compiles here
                first = time.perf_counter() - start
                variant.step()
                variant.first_call_s = first
                variants.append(variant)
                log(f"  {task} {distribution}/{path}: ready (first step {first:.2f} s)")
            except Exception as exc:  # a path that cannot run is reported, not fatal
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log(f"  {task} {distribution}/{path}: SKIPPED, {message}")
                failed.append({"task": task, "distribution": distribution, "path": path, "status": "error",
                               "error": message, "median_ms": None})
    totals: Dict[str, List[float]] = {v.name: [] for v in variants}
    stages: Dict[str, Dict[str, List[float]]] = {v.name: {} for v in variants if v.clock is not None}
    deadline = time.perf_counter() + budget_s
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for index in range(rounds):
            order = variants if index % 2 == 0 else variants[::-1]
            for variant in order:
                totals[variant.name].append(variant.step()["total"] * 1e3)
                if variant.clock is not None:
                    for stage, seconds in variant.step(staged=True).items():
                        stages[variant.name].setdefault(stage, []).append(seconds * 1e3)
            if index >= 2 and time.perf_counter() > deadline:
                break
            if gc_was_enabled:
                gc.collect()  # between rounds, outside every timed step
    finally:
        if gc_was_enabled:
            gc.enable()
    rows = []
    for variant in variants:
        values = sorted(totals[variant.name])
        row = {"task": task, "distribution": variant.distribution, "path": variant.path, "status": "ok",
               "median_ms": round(statistics.median(values), 4),
               "p20_ms": round(harness._quantile(values, 0.2), 4), "p80_ms": round(harness._quantile(values, 0.8), 4),
               "rounds": len(values), "first_step_s": round(variant.first_call_s, 3),
               "batch_size": variant.config.batch_size, "samples": variant.config.samples,
               "backbone": variant.config.backbone, "group": variant.config.group,
               "parameters": sum(p.numel() for p in variant.model.parameters())}
        if variant.name in stages:
            row["stages_ms"] = {stage: round(statistics.median(stages[variant.name].get(stage, [0.0])), 4)
                                for stage in STAGES + ("total",)}
        rows.append(row)
    return rows + failed


def label(row: dict) -> str:
    """The task as the tables name it: with its preset where one was given (``nbody@paper``)."""
    return row["task"] + (f"@{row['preset']}" if row.get("preset") else "")


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if not a or not b else f"{b / a:.2f}x"


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """Step medians, the fast path's speedup over the reference and the compiled path's over the
    eager fast path, and the stage breakdown of the eager paths."""
    by_key = {(label(r), r["distribution"], r["path"]): r for r in rows}
    header = ["task", "distribution", "path", "step ms", "vs reference", "vs fast"] + [f"{s} ms" for s in STAGES]
    lines = []
    for r in rows:
        ok = r.get("status") == "ok"
        ms = r["median_ms"] if ok else None
        reference = by_key.get((label(r), r["distribution"], "reference"), {}).get("median_ms")
        fast = by_key.get((label(r), r["distribution"], "fast"), {}).get("median_ms")
        line = [label(r), r["distribution"], r["path"], harness.summary.fmt_ms(ms) if ok else "ERR",
                _ratio(ms, reference) if r["path"] != "reference" else "-",
                _ratio(ms, fast) if r["path"] == "compile" else "-"]
        staged = r.get("stages_ms") or {}
        line += [harness.summary.fmt_ms(staged.get(s)) if staged else "-" for s in STAGES]
        lines.append(line)
    if markdown:
        return harness.summary.markdown(header, lines, textual=3)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    text = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    text.append("  ".join("-" * w for w in widths))
    for line in lines:
        text.append("  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))
    return "\n".join(text)


def ratios(rows: Sequence[dict]) -> List[str]:
    """The headline ratios of each task: learned vs group averaging (uniform) and vs no
    symmetrization on the fast path, and each distribution's fast path against its reference."""
    by_key = {(label(r), r["distribution"], r["path"]): r.get("median_ms") for r in rows if r.get("status") == "ok"}
    out = []
    for task in dict.fromkeys(label(r) for r in rows):
        learned = by_key.get((task, "learned", "fast"))
        for other in ("uniform", "none"):
            value = by_key.get((task, other, "fast"))
            if learned and value:
                out.append(f"{task}: learned step / {other} step (fast path) = {learned / value:.2f}")
        for distribution in DISTRIBUTIONS:
            fast, reference = by_key.get((task, distribution, "fast")), by_key.get((task, distribution, "reference"))
            compiled = by_key.get((task, distribution, "compile"))
            if fast and reference:
                out.append(f"{task}: {distribution} fast path {reference / fast:.2f}x faster than the reference path")
            if fast and compiled:
                out.append(f"{task}: {distribution} under torch.compile {fast / compiled:.2f}x the eager fast path")
    return out


def _split(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma list of tasks (default nbody,pattern; any of " + ", ".join(recipes.TASK_NAMES) + ")")
    parser.add_argument("--distributions", default=",".join(DISTRIBUTIONS), help="comma list of " + ", ".join(DISTRIBUTIONS))
    parser.add_argument("--paths", default=None,
                        help="comma list of " + ", ".join(PATHS) + " (default all; --quick: fast,reference)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of alternating steps, at most (default 30)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of rounds per task; stops after the round that passes it, at least 3 rounds")
    parser.add_argument("--preset", default=None,
                        help="a training preset of lps_fast.train.recipes (paper: the paper's own model sizes, samples "
                             "and distribution network) instead of each task's CPU default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw-malloc", action="store_true", help="leave glibc malloc as it is (see harness.py)")
    parser.add_argument("--quick", action="store_true", help="tiny models, 3 rounds, no result file unless --out")
    parser.add_argument("--out", default=None,
                        help="JSON-lines file to append to (default benchmarks/results/step.jsonl; 'none' to skip)")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    tasks = _split(args.tasks)
    for task in tasks:
        recipes.get_recipe(task)  # a clear error for an unknown task
    distributions = _split(args.distributions)
    unknown = [d for d in distributions if d not in DISTRIBUTIONS]
    paths = _split(args.paths) if args.paths else (["fast", "reference"] if args.quick else list(PATHS))
    unknown += [p for p in paths if p not in PATHS]
    if unknown:
        raise SystemExit(f"unknown distribution or path {', '.join(unknown)}; distributions: "
                         f"{', '.join(DISTRIBUTIONS)}; paths: {', '.join(PATHS)}")
    torch.set_num_threads(args.threads)
    if not args.raw_malloc and not args.quick:
        harness.keep_freed_memory()
    overrides = dict(QUICK_OVERRIDES, device="cpu") if args.quick else dict(device="cpu")
    if args.preset is not None:
        overrides["preset"] = args.preset
    rounds = 3 if args.quick else max(3, args.rounds)
    budget = 0.0 if args.quick else args.budget
    out = harness.results_path(args.out, args.quick, FAMILY)
    env = harness.environment(torch.device("cpu"))
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    if not args.quiet:
        print(harness.format_environment(env, None), flush=True)
    rows: List[dict] = []
    for task in tasks:
        load = harness.load_average()
        rows += harness.stamped(run_task(task, distributions, paths, overrides, rounds, budget, args.seed, log), env,
                                FAMILY, args.quick, load, preset=args.preset)
    harness.append_rows(rows, out)
    print(f"\nstep: medians in ms of one training step (forward, backward, optimizer), {env['threads']} thread(s); "
          f"'vs reference' = time(reference path) / time(this path); load average at the end {harness.load_average()}")
    print(format_table(rows))
    for line in ratios(rows):
        print(line)
    if out is not None and rows:
        print(f"rows appended to {out}")
    return rows


if __name__ == "__main__":
    sys.exit(harness.exit_status(main()))
