"""Side-by-side runs (``lps-fast compare``) and the README's main job (``lps-fast main``).

The main job trains the paper's n-body model, a transformer made equivariant to permutations
and rotations/reflections (about the centroid) by learned probabilistic symmetrization, and the
same transformer unsymmetrized and with group averaging, each for the same share of a
wall-clock budget; then it prints their test MSEs and how fast a training step runs on the
compiled kernels against the pure-PyTorch reference path.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .config import TrainConfig, format_duration
from .recipes import build_model, get_recipe, load_splits, make_inputs, resolve, task_loss
from .trainer import train, write_json

# The main job's settings, chosen so that on 2 CPU cores the learned model beats both baselines
# within its share of five minutes (measurements in the module's tests and the report).
MAIN_JOB = dict(task="nbody", n_train=3000, n_val=500, n_test=2000, eval_samples=20, batch_size=100, lr=1e-3)
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
            samples_by_distribution: Optional[Dict[str, int]] = None) -> List[Dict[str, Any]]:
    """Train ``base`` once per distribution (same seed, options and budget) and return one row
    per run; with ``out``, each run goes to ``out/<distribution>`` beside a ``summary.json`` and
    a ``curves.png`` of all of them."""
    if not distributions:
        raise ValueError("--distributions: give at least one")
    samples_by_distribution = dict(samples_by_distribution or {})
    unknown = sorted(set(samples_by_distribution) - set(distributions))
    if unknown:
        raise ValueError(f"--k names {', '.join(unknown)}, which is not among the compared distributions")
    configs = []
    for name in distributions:
        config = base.replace(distribution=name, out=None if out is None else str(Path(out) / name))
        if name in samples_by_distribution:
            config.samples = samples_by_distribution[name]
        configs.append(resolve(config))  # every option error before the first run starts
    rows = []
    for config in configs:
        result = train(config)
        rows.append(_row(config.distribution, result.metrics))
    if out is not None:
        out = Path(out)
        write_json(out / "summary.json", {"task": base.task, "rows": rows})
        try:
            from .plot import plot_runs

            plot_runs([out / config.distribution for config in configs], out / "curves.png",
                      title=f"{base.task}: " + ", ".join(config.distribution for config in configs))
        except Exception as error:  # a missing matplotlib must not lose the results
            print(f"(no curves.png: {error})")
    return rows


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
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
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


# ---------------------------------------------------------------------------------------------
# The main job


def _providers() -> str:
    import lps_fast

    rows = lps_fast.backend_info()["ops"]
    return ", ".join(sorted({row["cpu"] for row in rows.values()}))


def main_job(budget: float = 300.0, out="runs/main", threads: Optional[int] = None, seed: int = 0,
             quick: bool = False, device: str = "auto") -> Dict[str, Any]:
    """The README's main job; see the module docstring. Returns what it writes to
    ``out/summary.json``."""
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(MAIN_JOB, seed=seed, device=device, threads=threads)
    if quick:
        budget = min(budget, 45.0)
        settings.update(n_train=300, n_val=100, n_test=200, eval_samples=4)
    base = TrainConfig(**settings)
    print(f"lps-fast main job: charged 5-body system, predict every particle's position 1000 integration steps "
          f"ahead.\nModel: a transformer; learned Sn x O3 symmetrization (the paper's n-body model) against the "
          f"same transformer unsymmetrized and with group averaging, each trained for the same share of a "
          f"{format_duration(budget)} budget on {torch.get_num_threads()} CPU threads.", flush=True)

    data_start = time.perf_counter()
    splits = load_splits(resolve(base))
    print(f"data: {len(splits.train)} train / {len(splits.val)} validation / {len(splits.test)} test systems "
          f"({format_duration(time.perf_counter() - data_start)}, cached for the next run)", flush=True)

    speed_start = time.perf_counter()
    learned = base.replace(distribution="learned", samples=MAIN_JOB_SAMPLES["learned"])
    speed = speed_comparison(learned, repeats=3 if quick else 5, splits=splits)
    print(f"speed: one training step of the learned model (batch {base.batch_size}, k={learned.samples}) "
          f"{speed['fast_s'] * 1e3:.1f} ms on the fast kernels ({_providers()}), {speed['reference_s'] * 1e3:.1f} ms "
          f"on the reference path ({format_duration(time.perf_counter() - speed_start)})", flush=True)

    # What remains goes to the three models in equal shares, less a reserve for their final tests.
    test_reserve = 6.0 if not quick else 2.0
    remaining = budget - (time.perf_counter() - start) - len(MAIN_JOB_DISTRIBUTIONS) * test_reserve
    share = max(remaining / len(MAIN_JOB_DISTRIBUTIONS), 5.0)
    print(f"training: {format_duration(share)} per model\n", flush=True)
    rows = compare(base.replace(time_budget=share), MAIN_JOB_DISTRIBUTIONS, out=out,
                   samples_by_distribution=MAIN_JOB_SAMPLES)

    by_name = {row["distribution"]: row for row in rows}
    learned_mse = by_name["learned"]["test"]
    print("\n" + "=" * 78)
    print(f"n-body test MSE after {format_duration(share)} of training each (lower is better; the paper reaches "
          f"0.00417 with 10,000 epochs on a GPU):")
    for name in MAIN_JOB_DISTRIBUTIONS:
        row = by_name[name]
        ratio = "" if name == "learned" else f"   ({row['test'] / learned_mse:.2f}x the learned model's)"
        print(f"  {MAIN_JOB_LABELS[name]:<40} {row['test']:.5f}   [{row['steps']} steps, k={row['samples']}]{ratio}")
    beaten = [name for name in ("none", "uniform") if by_name[name]["test"] > learned_mse]
    verdict = ("the learned symmetrization beats both baselines" if len(beaten) == 2 else
               "the learned symmetrization does NOT beat " +
               " and ".join(MAIN_JOB_LABELS[n] for n in ("none", "uniform") if n not in beaten) +
               " within this budget (a slower or busier machine gives it fewer steps; try --budget 10m)")
    print(f"=> {verdict}.")
    print(f"fast path vs reference path, one training step of the learned model: {speed['fast_s'] * 1e3:.1f} ms vs "
          f"{speed['reference_s'] * 1e3:.1f} ms ({speed['speedup']:.2f}x)")
    total = time.perf_counter() - start
    print(f"total {format_duration(total)}; logs, checkpoints and curves.png in {out}/")
    summary = {"budget_seconds": budget, "share_seconds": share, "total_seconds": total, "rows": rows,
               "speed": speed, "learned_beats_both": len(beaten) == 2, "threads": torch.get_num_threads()}
    write_json(out / "summary.json", summary)
    return summary


__all__ = ["compare", "format_table", "time_training_step", "speed_comparison", "main_job", "MAIN_JOB"]
