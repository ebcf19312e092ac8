"""Side-by-side runs (``lps-fast compare``) and the README's main job (``lps-fast main``).

The main job trains the paper's n-body model, a transformer made equivariant to permutations
and rotations/reflections (about the centroid) by learned probabilistic symmetrization (the
input positions added after the average, noise added to the distribution network's inputs, the
paper's vector-neuron DGCNN), and the same transformer unsymmetrized and with group averaging,
all at once and for the same wall-clock time; then it prints their test MSEs, how concentrated
the learned distribution became, and how fast a training step runs on the compiled kernels
against the pure-PyTorch reference path, for the n-body model and for the paper's PATTERN model
(graphs of up to 188 nodes, where the group ops weigh more). Its measured outcome is in the
README and docs/RESULTS.md (seeded runs of the same models).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from lps_fast import allocator

from .config import TrainConfig, format_duration
from .distributed import world_size_from_env
from .plot import read_log
from .recipes import build_model, get_recipe, load_splits, make_inputs, make_optimizer, resolve, task_loss
from .trainer import train, write_json

# The main job's settings: the task's CPU defaults (the paper's data sizes, batch, learning rate
# and distribution network; 20 samples in evaluation, 4 in training, since 20 would leave a few
# hundred steps in a CPU budget), with a smaller validation split so that validating costs little.
MAIN_JOB = dict(task="nbody", n_train=3000, n_val=500, n_test=2000, eval_samples=20, batch_size=100, lr=1e-3)
# The speed check at graph scale: the paper's PATTERN model (a ViT on the adjacency image of
# graphs of 44-188 nodes, learned S_n), where the group ops are a large share of a step.
GRAPH_SPEED = dict(task="pattern", n_train=16, n_val=8, n_test=8, batch_size=16)
MAIN_JOB_SAMPLES = {"learned": 4, "uniform": 4, "none": 1}
MAIN_JOB_DISTRIBUTIONS = ("learned", "none", "uniform")
MAIN_JOB_LABELS = {
    "learned": "learned Sn x O3 symmetrization (LPS)",
    "none": "no symmetrization",
    "uniform": "group averaging (uniform samples)",
    "frame": "frame averaging",
    "canonical": "canonicalization",
}


def _row(distribution: str, metrics: Dict[str, Any]) -> Dict[str, Any]:
    metric = metrics["metric"]
    return {
        "distribution": distribution,
        "samples": metrics["samples"],
        "eval_samples": metrics["eval_samples"],
        "epochs": metrics.get("epochs"),
        "steps": metrics.get("steps"),
        "train_seconds": metrics.get("train_seconds"),
        "metric": metric,
        "higher_is_better": metrics["higher_is_better"],
        "val": metrics.get("val", {}).get(metric),
        "test": metrics.get("test", {}).get(metric),
        "parameters": metrics.get("parameters", {}).get("total"),
    }


def compare(base: TrainConfig, distributions: Sequence[str], out=None,
            samples_by_distribution: Optional[Dict[str, int]] = None, concurrent: bool = False,
            status_every: float = 20.0) -> List[Dict[str, Any]]:
    """Train ``base`` once per distribution (same seed, options and budget) and return one row
    per run; with ``out``, each run goes to ``out/<distribution>`` beside a ``summary.json`` and
    a ``curves.png`` of all of them.

    ``concurrent``: start every run at once, one process each, and print a status line every
    ``status_every`` seconds. With ``threads=1`` this keeps small models off each other's
    thread pools (spinning OpenMP threads slow a busy machine down many times over) while all
    cores work, and every run gets the same wall-clock budget and CPU share.
    """
    if not distributions:
        raise ValueError("--distributions: give at least one")
    samples_by_distribution = dict(samples_by_distribution or {})
    unknown = sorted(set(samples_by_distribution) - set(distributions))
    if unknown:
        raise ValueError(f"--k names {', '.join(unknown)}, which is not among the compared distributions")
    if concurrent and world_size_from_env() > 1:
        raise ValueError("--concurrent starts its own processes: do not combine it with torchrun")
    scratch = None
    if concurrent and out is None:
        scratch = tempfile.TemporaryDirectory(prefix="lps-fast-compare-")
    folder = Path(out) if out is not None else (Path(scratch.name) if scratch else None)
    configs = []
    for name in distributions:
        config = base.replace(distribution=name, out=None if folder is None else str(folder / name))
        if name in samples_by_distribution:
            config.samples = samples_by_distribution[name]
        configs.append(resolve(config))  # every option error before the first run starts
    try:
        if concurrent:
            metrics = _train_concurrently(configs, status_every)
        else:
            metrics = [train(config).metrics for config in configs]
    finally:
        if scratch is not None:
            scratch.cleanup()
    rows = [_row(config.distribution, result) for config, result in zip(configs, metrics)]
    if out is not None:
        out = Path(out)
        write_json(out / "summary.json", {"task": base.task, "rows": rows})
        try:
            from .plot import plot_runs

            plot_runs([out / config.distribution for config in configs], out / "curves.png",
                      x="time" if base.time_budget else "epoch",
                      title=f"{base.task}: " + ", ".join(config.distribution for config in configs)
                      + (f", {format_duration(base.time_budget)} each" if base.time_budget else ""))
        except Exception as error:  # a missing matplotlib must not lose the results
            print(f"(no curves.png: {error})")
    return rows


def _train_child(config: Dict[str, Any], keep_freed_memory: bool = False) -> None:
    if keep_freed_memory:  # as the parent process does (a spawned child starts with glibc's defaults)
        allocator.keep_freed_memory()
    train(TrainConfig.from_dict(config))


def _latest_record(out: str) -> Optional[Dict[str, Any]]:
    log = Path(out) / "log.jsonl"
    try:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _train_concurrently(configs: Sequence[TrainConfig], status_every: float) -> List[Dict[str, Any]]:
    """Run every config in its own process at once (quiet) and return their ``metrics.json``."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools
    processes = []
    for config in configs:
        child = config.replace(quiet=True)
        process = context.Process(target=_train_child, args=(child.to_dict(), allocator.setting() == allocator.KEPT),
                                  name=config.distribution)
        process.start()
        processes.append(process)
    start = time.perf_counter()
    next_status = status_every
    try:
        while any(process.is_alive() for process in processes):
            multiprocessing.connection.wait([process.sentinel for process in processes], timeout=1.0)
            elapsed = time.perf_counter() - start
            if status_every and elapsed >= next_status and any(process.is_alive() for process in processes):
                print(_status_line(configs, elapsed), flush=True)
                next_status += status_every
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        raise
    failed = [process.name for process in processes if process.exitcode != 0]
    if failed:
        raise RuntimeError(f"training failed for {', '.join(failed)} (rerun one alone with `lps-fast train` to see why)")
    return [json.loads((Path(config.out) / "metrics.json").read_text()) for config in configs]


def _status_line(configs: Sequence[TrainConfig], elapsed: float) -> str:
    metric = get_recipe(configs[0].task).metric
    parts = []
    for config in configs:
        record = _latest_record(config.out)
        if record is None:
            parts.append(f"{config.distribution}: starting")
        else:
            value = record.get(f"val_{metric}")
            parts.append(f"{config.distribution}: epoch {record['epoch']}, val {metric} "
                         f"{'-' if value is None else f'{value:.4g}'}")
    return f"  {format_duration(elapsed):>7} | " + " | ".join(parts)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    if not rows:
        return ""
    metric = rows[0]["metric"]
    header = f"{'distribution':<14} {'k train/eval':>12} {'epochs':>7} {'steps':>7} {'time':>8} " \
             f"{'val ' + metric:>14} {'test ' + metric:>14}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['distribution']:<14} {str(row['samples']) + '/' + str(row['eval_samples']):>12} "
                     f"{row['epochs']:>7} {row['steps']:>7} {format_duration(row['train_seconds']):>8} "
                     f"{_number(row['val']):>14} {_number(row['test']):>14}")
    return "\n".join(lines)


def _number(value) -> str:
    return "-" if value is None else f"{value:.5g}"


# ---------------------------------------------------------------------------------------------
# Speed of the fast path against the reference path


def time_training_step(config: TrainConfig, backend: str, repeats: int = 5, batch_size: Optional[int] = None,
                       splits=None) -> float:
    """Median seconds of one training step (forward, backward, AdamW) of the config's model on
    one batch, with the group ops on ``backend`` (``fast`` or ``reference``)."""
    config = resolve(config.replace(backend=backend))
    recipe = get_recipe(config.task)
    splits = splits or load_splits(config)
    torch.manual_seed(config.seed)
    model = build_model(config, splits.info).train()
    optimizer = make_optimizer(model.parameters(), lr=1e-4)
    size = min(batch_size or config.batch_size, len(splits.train))
    batch = splits.train.batch(list(range(size)))
    inputs = make_inputs(batch, splits.info)
    generator = torch.Generator().manual_seed(0)
    noises = [model.draw_noise(inputs, generator=generator) for _ in range(repeats + 1)]

    def step(noise):
        output, aux = model(inputs, noise=noise)
        loss = task_loss(recipe, output, batch, splits.info.num_classes) + sum(aux.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(noises[0])  # warm-up: allocations, first-call dispatch
    times = []
    for noise in noises[1:]:
        start = time.perf_counter()
        step(noise)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed_comparison(config: TrainConfig, repeats: int = 5, batch_size: Optional[int] = None,
                     splits=None) -> Dict[str, float]:
    """Training-step time of one model on the fast kernels and on the reference path; the two
    are interleaved so that a load change on the machine hits both alike."""
    fast, reference = [], []
    for _ in range(2):
        fast.append(time_training_step(config, "fast", repeats, batch_size, splits))
        reference.append(time_training_step(config, "reference", repeats, batch_size, splits))
    fast_s, reference_s = min(fast), min(reference)
    return {"fast_s": fast_s, "reference_s": reference_s, "speedup": reference_s / fast_s}


def _speed_line(speed: Dict[str, float]) -> str:
    return (f"{speed['fast_s'] * 1e3:.1f} ms vs {speed['reference_s'] * 1e3:.1f} ms "
            f"({speed['speedup']:.2f}x {'faster' if speed['speedup'] >= 1 else 'slower'})")


# ---------------------------------------------------------------------------------------------
# The main job


def _providers() -> str:
    import lps_fast

    rows = lps_fast.backend_info()["ops"]
    return ", ".join(sorted({row["cpu"] for row in rows.values()}))


def _last_concentration(run: Path) -> Dict[str, float]:
    """The last validation concentration a run logged (``{"permutation": ..., "rotation": ...}``)."""
    if not (run / "log.jsonl").is_file():
        return {}
    last: Dict[str, float] = {}
    for record in read_log(run):
        for name in ("permutation", "rotation"):
            if record.get(f"val_concentration_{name}") is not None:
                last[name] = float(record[f"val_concentration_{name}"])
    return last


def main_job(budget: float = 300.0, out="runs/main", threads: int = 1, seed: int = 0, quick: bool = False,
             device: str = "auto", status_every: float = 30.0) -> Dict[str, Any]:
    """The README's main job; see the module docstring. Returns what it writes to
    ``out/summary.json``.

    The three models train at the same time, one process each with ``threads`` CPU threads
    (default 1: these models are too small to gain from more, and on a busy machine spinning
    thread pools lose many times over), for the same wall-clock share of ``budget``.
    """
    start = time.perf_counter()
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(MAIN_JOB, seed=seed, device=device, threads=threads)
    if quick:
        budget = min(budget, 40.0)
        settings.update(n_train=300, n_val=100, n_test=200, eval_samples=4)
    base = TrainConfig(**settings)
    print(f"lps-fast main job: a charged 5-body system; predict every particle's position 1000 integration "
          f"steps ahead.\nA transformer made equivariant by learned Sn x O3 symmetrization (the paper's n-body "
          f"model) against the same transformer unsymmetrized and with group averaging, all trained for the "
          f"same time within a {format_duration(budget)} budget.", flush=True)

    data_start = time.perf_counter()
    splits = load_splits(resolve(base))
    print(f"data: {len(splits.train)} train / {len(splits.val)} validation / {len(splits.test)} test systems "
          f"({format_duration(time.perf_counter() - data_start)}; cached for the next run)", flush=True)

    speed_start = time.perf_counter()
    learned = base.replace(distribution="learned", samples=MAIN_JOB_SAMPLES["learned"])
    speed = speed_comparison(learned, repeats=3, splits=splits)
    graph = TrainConfig(**GRAPH_SPEED, seed=seed, device=device, threads=threads)
    graph_speed = speed_comparison(graph, repeats=2)
    print(f"speed of one training step on {threads} thread{'s' if threads > 1 else ''}, fast kernels "
          f"({_providers()}) vs the reference path ({format_duration(time.perf_counter() - speed_start)} to measure):\n"
          f"  n-body model (5 particles, batch {base.batch_size}, k={learned.samples}): {_speed_line(speed)}\n"
          f"  PATTERN model (ViT on graphs of 44-188 nodes, batch {graph.batch_size}): {_speed_line(graph_speed)}",
          flush=True)

    # The rest of the budget, less the start-up of the training processes and their final tests.
    reserve = 8.0 if quick else 22.0
    share = max(budget - (time.perf_counter() - start) - reserve, 5.0)
    print(f"training the {len(MAIN_JOB_DISTRIBUTIONS)} models at once for {format_duration(share)} each "
          f"(one process and {threads} CPU thread{'s' if threads > 1 else ''} per model):", flush=True)
    rows = compare(base.replace(time_budget=share), MAIN_JOB_DISTRIBUTIONS, out=out,
                   samples_by_distribution=MAIN_JOB_SAMPLES, concurrent=True, status_every=status_every)

    by_name = {row["distribution"]: row for row in rows}
    learned_mse = by_name["learned"]["test"]
    print("\n" + "=" * 78)
    print(f"n-body test MSE after {format_duration(share)} of training each (lower is better; the paper reaches "
          f"0.00417 after 10,000 epochs on a GPU):")
    for name in MAIN_JOB_DISTRIBUTIONS:
        row = by_name[name]
        ratio = "" if name == "learned" else f"   ({row['test'] / learned_mse:.2f}x the learned model's)"
        print(f"  {MAIN_JOB_LABELS[name]:<40} {row['test']:.5f}   [{row['steps']:>5} steps, k={row['samples']}]{ratio}")
    beaten = [name for name in ("none", "uniform") if by_name[name]["test"] > learned_mse]
    ahead = [MAIN_JOB_LABELS[n] for n in ("none", "uniform") if n not in beaten]
    steps = {name: by_name[name]["steps"] or 0 for name in MAIN_JOB_DISTRIBUTIONS}
    if len(beaten) == 2:
        verdict = "the learned symmetrization beats both baselines at equal wall-clock budget."
    else:
        verdict = (f"at this budget {' and '.join(ahead)} {'is' if len(ahead) == 1 else 'are'} ahead of the learned "
                   f"symmetrization" + (f", which beats {MAIN_JOB_LABELS[beaten[0]]}" if beaten else "")
                   + f"; the learned model took {steps['learned']} steps in the time group averaging took "
                     f"{steps['uniform']} (see docs/RESULTS.md for equal-epoch runs over seeds).")
    concentration = _last_concentration(out / "learned")
    if concentration:
        verdict += (" Concentration of the learned samples at the end (1 = one deterministic sample; group "
                    "averaging's level in brackets): " + ", ".join(
                        f"{name} {value:.2f} ({_last_concentration(out / 'uniform').get(name, float('nan')):.2f})"
                        for name, value in concentration.items()) + ".")
    print(f"=> {verdict}")
    print(f"fast path vs reference path, one training step: n-body model {_speed_line(speed)}; "
          f"PATTERN model {_speed_line(graph_speed)}")
    total = time.perf_counter() - start
    print(f"total {format_duration(total)}; logs, checkpoints and curves.png in {out}/")
    summary = {"budget_seconds": budget, "share_seconds": share, "total_seconds": total, "rows": rows,
               "speed": {"nbody": speed, "pattern": graph_speed}, "learned_beats_both": len(beaten) == 2,
               "threads_per_model": threads, "concentration": {name: _last_concentration(out / name)
                                                               for name in MAIN_JOB_DISTRIBUTIONS}}
    write_json(out / "summary.json", summary)
    return summary


__all__ = ["compare", "format_table", "time_training_step", "speed_comparison", "main_job", "MAIN_JOB"]
