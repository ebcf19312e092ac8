"""The training and evaluation engine behind ``lps-fast train`` and ``lps-fast eval``.

One run (:func:`train`): AdamW with a warmup + cosine (or linear, or constant) learning rate over
the run's progress, gradient clipping, an evaluation on the validation split after every epoch
(with ``eval_samples`` group samples), the best model by the task's validation metric, and a
final evaluation of that model on the test split. A run is bounded by ``epochs``, by a
wall-clock ``time_budget`` (training plus validation; the schedule then follows the elapsed
time), or both, whichever ends first.

Output folder (``config.out``; nothing is written when it is None)::

    config.json     the resolved configuration (every default filled in)
    log.jsonl       one JSON object per epoch: losses, metrics, learning rate, timings
    best.pt         the best model so far (by the validation metric) with its config
    last.pt         the latest model, optimizer and schedule state
    metrics.json    the final summary: best validation and test metrics, budget used

Randomness: the parameters come from ``seed``; the training noise and the data order from
generators seeded by it, so two CPU runs with the same seed (and thread count) are identical.
Evaluations draw their noise from a generator seeded by ``seed`` alone, so ``lps-fast eval`` on
a checkpoint reproduces the test metric the run recorded.

Under ``torchrun`` (see :mod:`lps_fast.train.distributed`) each process trains on its shard of
every epoch (``DistributedSampler`` with ``set_epoch``), gradients are averaged by DDP, the
metrics of every evaluation are summed over processes, and only rank 0 writes files and
shows progress.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import lps_fast
from lps_fast import allocator
from lps_fast import groups as group_lib

from . import distributed
from .config import TrainConfig, format_duration
from .recipes import (ISOMORPHISM_THRESHOLD, Meter, Recipe, build_model, get_recipe, load_splits, make_inputs,
                      make_optimizer, resolve, task_loss)

CHECKPOINT_FORMAT = 1


@dataclass
class RunResult:
    """What :func:`train` returns: the summary written to ``metrics.json``, the trained model
    (best weights loaded, eval mode) and the output folder."""

    metrics: Dict[str, Any]
    model: nn.Module
    out: Optional[Path]
    history: List[Dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, value) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(_json_ready(value), indent=2) + "\n")
    temporary.replace(path)


def _learning_rate_factor(progress: float, warmup: float, schedule: str) -> float:
    """Multiplier of the base learning rate at ``progress`` in [0, 1] of the run."""
    if warmup > 0 and progress < warmup:
        return progress / warmup
    if schedule == "constant":
        return 1.0
    remaining = (progress - warmup) / max(1.0 - warmup, 1e-12)
    remaining = min(max(remaining, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - remaining
    return 0.5 * (1.0 + math.cos(math.pi * remaining))


def _eval_generator(config: TrainConfig, trial: int, rank: int) -> torch.Generator:
    # Depends on the seed, the trial and the process only: the same for every evaluation of a run
    # and for `lps-fast eval` of its checkpoint.
    return torch.Generator().manual_seed(1_000_003 * (config.seed + 1) + 7919 * trial + rank)


def _progress_enabled(config: TrainConfig, context: distributed.Context) -> bool:
    if config.quiet or not context.is_main:
        return False
    if config.progress is not None:
        return bool(config.progress)
    return sys.stderr.isatty()


def _say(config: TrainConfig, context: distributed.Context, message: str) -> None:
    if context.is_main and not config.quiet:
        try:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
        except ImportError:  # pragma: no cover - tqdm is a dependency of the CLI
            print(message, flush=True)
        sys.stdout.flush()


def _indices(dataset, limit: Optional[int]) -> range:
    count = len(dataset)
    return range(min(count, limit) if limit else count)


def _loader(dataset, indices: Sequence[int], batch_size: int):
    return dataset.loader(batch_size=batch_size, sampler=indices)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def count_parameters(model: nn.Module) -> Dict[str, int]:
    model = _unwrap(model)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    distribution = sum(p.numel() for p in model.distribution.parameters())
    return {"backbone": backbone, "distribution": distribution, "total": backbone + distribution}


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model: nn.Module, recipe: Recipe, info, dataset, config: TrainConfig,
             context: Optional[distributed.Context] = None, trial: int = 0, desc: str = "eval",
             show_progress: bool = False, n_samples: Optional[int] = None,
             diagnostics: bool = False) -> Dict[str, float]:
    """Metrics of ``model`` on ``dataset`` (eval mode, ``n_samples`` samples, default
    ``eval_samples``), summed over processes under DDP. With ``diagnostics`` the concentration of
    the distribution's samples on the first batch is added (``concentration_permutation``,
    ``concentration_rotation``; see :mod:`lps_fast.diagnostics`).

    The global random state is left as it was (data loaders draw from it), so validating or not
    does not change the training that follows."""
    with torch.random.fork_rng(devices=[]):
        return _evaluate(model, recipe, info, dataset, config, context, trial, desc, show_progress, n_samples,
                         diagnostics)


@torch.no_grad()
def _evaluate(model: nn.Module, recipe: Recipe, info, dataset, config: TrainConfig,
             context: Optional[distributed.Context] = None, trial: int = 0, desc: str = "eval",
             show_progress: bool = False, n_samples: Optional[int] = None,
             diagnostics: bool = False) -> Dict[str, float]:
    context = context or distributed.Context()
    model = _unwrap(model)
    concentration: Dict[str, float] = {}
    was_training = model.training
    model.eval()
    meter = Meter(recipe, info.num_classes)
    generator = _eval_generator(config, trial, context.rank)
    indices = list(distributed.shard(len(_indices(dataset, config.limit)), context))
    batch_size = config.eval_batch_size or config.batch_size
    batches = _loader(dataset, indices, batch_size)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc=desc, leave=False, dynamic_ncols=True)
    for batch in batches:
        batch = batch.to(context.device)
        inputs = make_inputs(batch, info)
        noise = model.draw_noise(inputs, n_samples=n_samples, generator=generator)
        output, _ = model(inputs, noise=noise)
        meter.update(output, batch, task_loss(recipe, output, batch, info.num_classes))
        if diagnostics and not concentration:
            sample, _ = model.sample(inputs, noise=noise)
            concentration = lps_fast.diagnostics.concentration(sample, inputs.get("mask"))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    context.all_reduce_sum(meter.sums)
    model.train(was_training)
    result = meter.result()
    if diagnostics:
        # the mean over processes of each one's first batch, so every process reports the same
        names = ("permutation", "rotation")
        values = torch.tensor([concentration.get(name, 0.0) for name in names] + [float(bool(concentration))],
                              dtype=torch.float64)
        context.all_reduce_sum(values)
        if values[-1] > 0:
            result.update({f"concentration_{name}": float(values[i] / values[-1])
                           for i, name in enumerate(names) if name in concentration})
    return result


@torch.no_grad()
def embed(model: nn.Module, info, dataset, indices: Sequence[int], config: TrainConfig, device: torch.device,
          generator: torch.Generator, relabel: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(len(indices), D)`` float64 embeddings of the graphs at ``indices`` (eval mode); with
    ``relabel`` every graph is first relabelled by a random permutation of its nodes."""
    model = _unwrap(model).eval()
    batch_size = config.eval_batch_size or config.batch_size
    outputs = []
    for batch in _loader(dataset, list(indices), batch_size):
        batch = batch.to(device)
        inputs = make_inputs(batch, info)
        if relabel is not None:
            group = group_lib.Sn()
            inputs = group.act_inputs(group.random_element(inputs, generator=relabel), inputs)
        noise = model.draw_noise(inputs, generator=generator)
        output, _ = model(inputs, noise=noise)
        outputs.append(output.double().cpu())
    return torch.cat(outputs)


def _close_masks(embeddings: torch.Tensor, threshold: float, chunk: int = 512):
    """For each block of rows, ``(first row, mask)`` of the pairs ``i < j`` whose L1 distance is
    at most ``threshold`` (blocks keep the distance matrix small)."""
    total = embeddings.shape[0]
    for start in range(0, total, chunk):
        rows = embeddings[start:start + chunk]
        later = torch.arange(total)[None, :] > torch.arange(start, start + rows.shape[0])[:, None]
        yield start, (torch.cdist(rows, embeddings, p=1) <= threshold) & later


def _close_pairs(embeddings: torch.Tensor, threshold: float, chunk: int = 512) -> torch.Tensor:
    """``(P, 2)`` indices ``i < j`` of the pairs whose L1 distance is at most ``threshold``."""
    found = [mask.nonzero() + torch.tensor([start, 0])
             for start, mask in _close_masks(embeddings, threshold, chunk)]
    return torch.cat(found) if found else torch.zeros(0, 2, dtype=torch.int64)


def _count_close_pairs(embeddings: torch.Tensor, threshold: float, chunk: int = 512) -> int:
    """How many pairs ``i < j`` have an L1 distance of at most ``threshold``."""
    return sum(int(mask.sum()) for _, mask in _close_masks(embeddings, threshold, chunk))


@torch.no_grad()
def evaluate_isomorphism(model: nn.Module, info, dataset, config: TrainConfig,
                         device: torch.device = torch.device("cpu")) -> Dict[str, float]:
    """The graph-separation test of an (untrained) model.

    ``pairs_separated``: pairs of non-isomorphic graphs (EXP's 600 pairs, or every pair of
    GRAPH8c) whose embeddings differ by more than 1e-3 in L1, each graph embedded with its own
    noise (the paper's protocol). ``control_separated``: the same test between every graph and
    a random relabelling of itself, which an invariant model should *not* separate; a
    stochastic model does when its Monte Carlo noise exceeds the threshold, so read the two
    together. ``pairs_above_noise``: pairs farther apart than ``noise_floor_l1``, the 99th
    percentile of the control distances: separation that the sampling noise cannot explain.
    """
    indices = _indices(dataset, config.limit)
    count = len(indices)
    embeddings = embed(model, info, dataset, indices, config, device, _eval_generator(config, 0, 0))
    relabelled = embed(model, info, dataset, indices, config, device, _eval_generator(config, 1, 0),
                       relabel=torch.Generator().manual_seed(config.seed + 17))
    control = (embeddings - relabelled).abs().sum(-1)
    noise_floor = max(float(torch.quantile(control, 0.99)), ISOMORPHISM_THRESHOLD) if count else ISOMORPHISM_THRESHOLD
    if dataset.pairs is not None:
        pairs = torch.as_tensor(dataset.pairs)
        pairs = pairs[(pairs < count).all(dim=1)]
        distance = (embeddings[pairs[:, 0]] - embeddings[pairs[:, 1]]).abs().sum(-1)
        total_pairs = int(pairs.shape[0])
        separated = int((distance > ISOMORPHISM_THRESHOLD).sum())
        above_noise = int((distance > noise_floor).sum())
    else:
        total_pairs = count * (count - 1) // 2
        separated = total_pairs - _count_close_pairs(embeddings, ISOMORPHISM_THRESHOLD)
        above_noise = total_pairs - _count_close_pairs(embeddings, noise_floor)
    metrics = {
        "graphs": count,
        "pairs": total_pairs,
        "pairs_separated": separated,
        "pairs_not_separated": total_pairs - separated,
        "fraction_separated": separated / max(total_pairs, 1),
        "control_pairs": count,
        "control_separated": int((control > ISOMORPHISM_THRESHOLD).sum()),
        "control_median_l1": float(control.median()) if count else 0.0,
        "threshold": ISOMORPHISM_THRESHOLD,
        "noise_floor_l1": noise_floor,
        "pairs_above_noise": above_noise,
    }
    if (config.iso_seeds or 1) > 1:
        metrics.update(_separated_by_any_seed(info, dataset, config, device, embeddings, relabelled))
    return metrics


@torch.no_grad()
def _separated_by_any_seed(info, dataset, config: TrainConfig, device: torch.device,
                           first: torch.Tensor, first_relabelled: torch.Tensor) -> Dict[str, Any]:
    """The paper's protocol: untrained models of seeds ``0 .. iso_seeds - 1`` (the run's own model
    is seed ``config.seed``, passed in as ``first``), each embedding every graph with fresh noise;
    a pair counts as separated when any model separates it. The same union over seeds of the
    control (each graph against a relabelled copy of itself) shows how much of it the Monte Carlo
    noise alone explains."""
    indices = _indices(dataset, config.limit)
    threshold = ISOMORPHISM_THRESHOLD
    pairs = None if dataset.pairs is None else torch.as_tensor(dataset.pairs)
    if pairs is not None:
        pairs = pairs[(pairs < len(indices)).all(dim=1)]
    else:
        pairs = _close_pairs(first, threshold)  # only pairs no model has separated yet need checking
    open_pairs = torch.ones(pairs.shape[0], dtype=torch.bool)
    control_open = torch.ones(len(indices), dtype=torch.bool)
    total_pairs = len(indices) * (len(indices) - 1) // 2 if dataset.pairs is None else pairs.shape[0]
    seeds = [config.seed] + [s for s in range(config.iso_seeds) if s != config.seed][:config.iso_seeds - 1]
    for position, seed in enumerate(seeds):
        if position == 0:
            embeddings, relabelled = first, first_relabelled
        else:
            torch.manual_seed(seed)
            model = build_model(config.replace(seed=seed), info).to(device)
            run = config.replace(seed=seed)
            embeddings = embed(model, info, dataset, indices, run, device, _eval_generator(run, 0, 0))
            relabelled = embed(model, info, dataset, indices, run, device, _eval_generator(run, 1, 0),
                               relabel=torch.Generator().manual_seed(seed + 17))
        if bool(open_pairs.any()):
            distance = (embeddings[pairs[:, 0]] - embeddings[pairs[:, 1]]).abs().sum(-1)
            open_pairs &= distance <= threshold
        control_open &= (embeddings - relabelled).abs().sum(-1) <= threshold
    not_separated = int(open_pairs.sum())
    return {"union_seeds": len(seeds), "union_pairs_separated": total_pairs - not_separated,
            "union_pairs_not_separated": not_separated,
            "union_control_separated": int((~control_open).sum()), "union_control_pairs": len(indices)}


def _test_metrics(model, recipe, info, dataset, config, context, show_progress) -> Dict[str, Any]:
    """Test metrics with ``test_samples`` samples; with ``test_trials > 1`` the mean over trials
    plus ``<metric>_std``."""
    trials = [evaluate(model, recipe, info, dataset, config, context, trial=trial, desc="test",
                       show_progress=show_progress, n_samples=config.test_samples or config.eval_samples)
              for trial in range(config.test_trials or 1)]
    if len(trials) == 1:
        return trials[0]
    summary = {key: sum(t[key] for t in trials) / len(trials) for key in trials[0]}
    values = torch.tensor([t[recipe.metric] for t in trials], dtype=torch.float64)
    summary[f"{recipe.metric}_std"] = float(values.std(unbiased=False))
    summary["trials"] = len(trials)
    return summary


def _selection_value(recipe: Recipe, config: TrainConfig, metrics: Dict[str, float]) -> Tuple[float, bool]:
    """``(value, higher_is_better)`` that picks the best checkpoint: the task metric, or the
    validation loss (the paper's choice for n-body and EXP)."""
    if config.select == "loss":
        return metrics["loss"], False
    return metrics[recipe.metric], recipe.higher_is_better


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, model: nn.Module, config: TrainConfig, **extra) -> None:
    state = {"format": CHECKPOINT_FORMAT, "lps_fast_version": lps_fast.__version__, "config": config.to_dict(),
             "model": _unwrap(model).state_dict(), **extra}
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def load_checkpoint(path) -> Dict[str, Any]:
    """A checkpoint written by :func:`train` (raises ``ValueError`` for anything else)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a lps-fast checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{path} is not a lps-fast checkpoint (no config and model inside)")
    return state


# ---------------------------------------------------------------------------------------------
# Training


def _prepare(config: TrainConfig, context: distributed.Context):
    """Resolve the config, load the data (rank 0 first: it fills the cache) and build the model."""
    config = resolve(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    recipe = get_recipe(config.task)
    failure = None
    if context.is_main:
        try:
            splits = load_splits(config)
        except Exception as error:  # reach the barrier anyway, so the other processes do not wait forever
            failure = error
    context.barrier()
    if failure is not None:
        raise failure
    if not context.is_main:
        splits = load_splits(config)
    torch.manual_seed(config.seed)
    model = build_model(config, splits.info).to(context.device)
    return config, recipe, splits, model


def _open_output(config: TrainConfig, context: distributed.Context) -> Optional[Path]:
    if config.out is None or not context.is_main:
        return None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("log.jsonl", "metrics.json", "best.pt", "last.pt"):
        if (out / stale).exists():
            (out / stale).unlink()
    write_json(out / "config.json", config.to_dict())
    return out


def train(config: TrainConfig, context: Optional[distributed.Context] = None) -> RunResult:
    """Run one training (or, for the isomorphism tasks, one evaluation of an untrained model).

    Args:
        config: the run; ``None`` fields take the task's defaults.
        context: the process group (default: from the environment, see
            :func:`lps_fast.train.distributed.setup`; under ``torchrun`` the group stays joined
            for the next run, and :func:`lps_fast.train.distributed.shutdown` leaves it).
    """
    return _train(config, context or distributed.setup(config.device))


def _has_unused_parameters(model: nn.Module, recipe: Recipe, info, dataset) -> bool:
    """Whether a training step leaves some parameter without a gradient (e.g. the last virtual
    node update of a GIN), which DDP must be told about. One probe step on two graphs, with its
    own noise, so the run's random streams are untouched; the gradients are dropped."""
    batch = dataset.batch([0, min(1, len(dataset) - 1)]).to(next(model.parameters()).device)
    inputs = make_inputs(batch, info)
    model.train()
    noise = model.draw_noise(inputs, generator=torch.Generator().manual_seed(0))
    output, aux = model(inputs, noise=noise)
    loss = task_loss(recipe, output, batch, info.num_classes) + sum(aux.values())
    loss.backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    return unused


def _train(config: TrainConfig, context: distributed.Context) -> RunResult:
    config, recipe, splits, model = _prepare(config, context)
    info = splits.info
    out = _open_output(config, context)
    bars = _progress_enabled(config, context)
    parameters = count_parameters(model)
    header = (f"{recipe.name}: {config.distribution} {config.group} symmetrization of a {config.backbone} "
              f"({parameters['backbone']:,} + {parameters['distribution']:,} parameters), "
              f"k={config.samples}/{config.eval_samples}, device {context.device}"
              + (f", {context.world_size} processes" if context.distributed else ""))
    _say(config, context, header)

    summary: Dict[str, Any] = {
        "task": recipe.name, "metric": recipe.metric, "higher_is_better": recipe.higher_is_better,
        "distribution": config.distribution, "group": config.group, "backbone": config.backbone,
        "samples": config.samples, "eval_samples": config.eval_samples, "parameters": parameters,
        "device": str(context.device), "world_size": context.world_size, "backend": config.backend,
        "seed": config.seed, "paper": recipe.paper, "preset": config.preset, "select": config.select,
        "test_samples": config.test_samples or config.eval_samples, "test_trials": config.test_trials or 1,
        "dist_network": config.dist_network if config.distribution in ("learned", "canonical") else None,
        "malloc": allocator.setting(),
    }

    if not recipe.trained:
        start = time.perf_counter()
        metrics = evaluate_isomorphism(model, info, splits.test, config, context.device)
        summary.update(test=metrics, epochs=0, steps=0, train_seconds=0.0,
                       eval_seconds=time.perf_counter() - start)
        if out is not None:
            save_checkpoint(out / "best.pt", model, config, epoch=0, step=0, test=metrics)
            with open(out / "log.jsonl", "w") as log:
                log.write(json.dumps(_json_ready({"epoch": 0, "step": 0, "time": summary["eval_seconds"],
                                                  **{f"test_{k}": v for k, v in metrics.items()}})) + "\n")
            write_json(out / "metrics.json", summary)
        _say(config, context, format_summary(summary))
        return RunResult(summary, model.eval(), out)

    # -- optimisation set-up ---------------------------------------------------------------------
    raw_model = model
    if context.distributed:
        model = nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[context.device.index] if context.device.type == "cuda" else None,
            find_unused_parameters=_has_unused_parameters(raw_model, recipe, info, splits.train))
    optimizer = make_optimizer(raw_model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_indices = _indices(splits.train, config.limit)
    sampler = torch.utils.data.DistributedSampler(
        train_indices, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed)
    loader = _loader(splits.train, sampler, config.batch_size)
    steps_per_epoch = len(loader) if not config.max_batches else min(len(loader), config.max_batches)
    total_steps = None if config.epochs is None else config.epochs * steps_per_epoch
    noise_generator = torch.Generator().manual_seed(config.seed * 1000 + context.rank + 1)

    history: List[Dict[str, Any]] = []
    best_value: Optional[float] = None
    best_epoch = 0
    best_state = copy.deepcopy(raw_model.state_dict())
    best_val: Dict[str, float] = {}
    step = 0
    epoch = 0
    start = time.perf_counter()
    last_eval_seconds = 0.0
    stop = False
    log_file = open(out / "log.jsonl", "w") if out is not None else None

    def progress_now() -> float:
        fractions = [0.0]
        if total_steps:
            fractions.append(step / total_steps)
        if config.time_budget:
            # stop early enough to validate the last (partial) epoch within the budget
            fractions.append((time.perf_counter() - start + last_eval_seconds) / config.time_budget)
        return context.all_reduce_max(max(fractions)) if config.time_budget else max(fractions)

    try:
        while not stop and (config.epochs is None or epoch < config.epochs):
            epoch += 1
            sampler.set_epoch(epoch)
            raw_model.train()
            meter = Meter(recipe, info.num_classes)
            aux_sum, aux_count = 0.0, 0
            bar = None
            if bars:
                from tqdm import tqdm

                bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
            epoch_start = time.perf_counter()
            lr = config.lr
            for batch_index, batch in enumerate(loader):
                if batch_index >= steps_per_epoch:
                    break
                progress = progress_now()
                if progress >= 1.0:
                    stop = True
                    break
                # the rate of the step about to run: warmup never starts at exactly zero
                if total_steps:
                    progress = max(progress, (step + 1) / total_steps)
                lr = config.lr * _learning_rate_factor(progress, config.warmup, config.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = batch.to(context.device)
                inputs = make_inputs(batch, info)
                noise = raw_model.draw_noise(inputs, generator=noise_generator)
                output, aux = model(inputs, noise=noise)
                loss = task_loss(recipe, output, batch, info.num_classes)
                aux_total = sum(aux.values()) if aux else None
                objective = loss if aux_total is None else loss + aux_total
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                if config.grad_clip:
                    nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
                optimizer.step()
                step += 1
                meter.update(output, batch, loss)
                if aux_total is not None:
                    aux_sum += float(aux_total.detach())
                    aux_count += 1
                if bar is not None:
                    running = meter.result()
                    bar.set_postfix({"loss": f"{running['loss']:.4g}",
                                     recipe.metric: f"{running.get(recipe.metric, float('nan')):.4g}"})
                    bar.update(1)
            if bar is not None:
                bar.close()
            trained_batches = torch.tensor([float(meter.sums[1] > 0)], dtype=torch.float64)
            context.all_reduce_sum(trained_batches)
            if trained_batches.item() == 0:  # the budget ran out before this epoch's first step
                epoch -= 1
                break
            context.all_reduce_sum(meter.sums)
            context.broadcast_buffers(raw_model)  # batch-norm statistics: rank 0's, as DDP uses them
            train_metrics = meter.result()
            record: Dict[str, Any] = {"epoch": epoch, "step": step, "lr": lr, "partial": stop,
                                      "train_loss": train_metrics["loss"],
                                      f"train_{recipe.metric}": train_metrics.get(recipe.metric)}
            if aux_count:
                record["train_aux"] = aux_sum / aux_count
            eval_start = time.perf_counter()
            validate = splits.val is not None and (epoch % config.eval_every == 0 or stop
                                                   or (config.epochs is not None and epoch == config.epochs))
            if validate:
                val_metrics = evaluate(raw_model, recipe, info, splits.val, config, context, desc="validation",
                                       show_progress=bars, diagnostics=True)
                last_eval_seconds = time.perf_counter() - eval_start
                record.update({f"val_{key}": value for key, value in val_metrics.items() if key != "graphs"})
                value, higher = _selection_value(recipe, config, val_metrics)
                if best_value is None or (value > best_value if higher else value < best_value):
                    best_value, best_epoch, best_val = value, epoch, val_metrics
                    best_state = copy.deepcopy(raw_model.state_dict())
                    if out is not None:
                        save_checkpoint(out / "best.pt", raw_model, config, epoch=epoch, step=step, val=val_metrics)
            elif splits.val is None:
                best_epoch, best_state = epoch, copy.deepcopy(raw_model.state_dict())
            record[f"best_val_{recipe.metric}"] = best_val.get(recipe.metric)
            record["epoch_seconds"] = time.perf_counter() - epoch_start
            record["time"] = time.perf_counter() - start
            history.append(record)
            if out is not None:
                log_file.write(json.dumps(_json_ready(record)) + "\n")
                log_file.flush()
                save_checkpoint(out / "last.pt", raw_model, config, epoch=epoch, step=step,
                                optimizer=optimizer.state_dict())
                if splits.val is None:
                    save_checkpoint(out / "best.pt", raw_model, config, epoch=epoch, step=step)
            _say(config, context, _epoch_line(record, recipe))
    finally:
        if log_file is not None:
            log_file.close()

    train_seconds = time.perf_counter() - start
    raw_model.load_state_dict(best_state)
    test_start = time.perf_counter()
    test_metrics = _test_metrics(raw_model, recipe, info, splits.test, config, context, bars) if splits.test else {}
    summary.update(
        epochs=epoch, steps=step, train_seconds=train_seconds, test_seconds=time.perf_counter() - test_start,
        time_budget=config.time_budget, best_epoch=best_epoch, val=best_val, test=test_metrics,
        train=history[-1] if history else {},
    )
    if out is not None:
        write_json(out / "metrics.json", summary)
    _say(config, context, format_summary(summary))
    return RunResult(summary, raw_model.eval(), out, history)


def _format_value(value) -> str:
    """Four significant digits for every real number (Python, NumPy or 0-dim tensor), fixed
    notation between 1e-3 and 1e4 and scientific outside, so the columns of epoch lines read alike."""
    import numbers

    if value is None:
        return "-"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        # "#" keeps trailing zeros: 0.1000 beside 0.1235, not 0.1
        return f"{value:#.4g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _epoch_line(record: Dict[str, Any], recipe: Recipe) -> str:
    metric = recipe.metric
    parts = [f"epoch {record['epoch']:>4}" + (" (partial)" if record.get("partial") else ""),
             f"loss {_format_value(record['train_loss'])}",
             f"train {metric} {_format_value(record.get(f'train_{metric}'))}"]
    if f"val_{metric}" in record:
        parts.append(f"val {metric} {_format_value(record[f'val_{metric}'])}")
    parts.append(f"best {_format_value(record.get(f'best_val_{metric}'))}")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{format_duration(record['time'])}")
    return " | ".join(parts)


def format_summary(summary: Dict[str, Any]) -> str:
    """Two or three human lines about a finished run."""
    metric = summary["metric"]
    test = summary.get("test", {})
    if summary.get("steps", 0) == 0 and "pairs" in test:
        return (f"{summary['task']}: {test['pairs_separated']:,} of {test['pairs']:,} non-isomorphic pairs separated "
                f"(L1 > {test['threshold']:g}; {test['pairs_not_separated']:,} not)\n"
                f"  control: {test['control_separated']:,} of {test['control_pairs']:,} graphs also 'separated' from a "
                f"relabelled copy of themselves (sampling noise, median L1 {test['control_median_l1']:.2e})\n"
                f"  beyond that noise (L1 > {test['noise_floor_l1']:.3g}, the control's 99th percentile): "
                f"{test['pairs_above_noise']:,} of {test['pairs']:,} pairs separated"
                + (f"\n  by any of {test['union_seeds']} model seeds (the paper's protocol): "
                   f"{test['union_pairs_separated']:,} of {test['pairs']:,} pairs separated "
                   f"({test['union_pairs_not_separated']:,} not); control: {test['union_control_separated']:,} of "
                   f"{test['union_control_pairs']:,} graphs 'separated' from themselves" if "union_seeds" in test else ""))
    val = summary.get("val", {})
    std = test.get(f"{metric}_std")
    lines = [f"{summary['task']}: test {metric} {_format_value(test.get(metric))}"
             + (f" +- {std:.2g}" if std is not None else "")
             + (f", best val {metric} {_format_value(val.get(metric))} at epoch {summary.get('best_epoch')}"
                if val else "")
             + f" ({summary['epochs']} epochs, {summary['steps']} steps, {format_duration(summary['train_seconds'])})"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Evaluating a checkpoint


def evaluate_checkpoint(path, split: str = "test", overrides: Optional[Dict[str, Any]] = None,
                        context: Optional[distributed.Context] = None) -> Dict[str, Any]:
    """Rebuild the model of a checkpoint and evaluate it on ``split`` with the run's evaluation
    noise, so the test split reproduces the recorded test metric.

    Args:
        path: a ``best.pt`` / ``last.pt`` written by :func:`train`.
        split: ``train``, ``val`` or ``test``.
        overrides: config fields to change (``device``, ``data``, ``eval_samples``,
            ``eval_batch_size``, ``backend``, ``test_trials``, ``limit``, ``quiet``, ``progress``).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"--split must be train, val or test, got {split!r}")
    state = load_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(config, key, value)
    context = context or distributed.setup(config.device)
    config = resolve(config)
    recipe = get_recipe(config.task)
    splits = load_splits(config)
    dataset = splits[split]
    if dataset is None:
        raise ValueError(f"task {recipe.name} has no {split} split (it has: "
                         f"{', '.join(name for name, _ in splits.items())})")
    torch.manual_seed(config.seed)
    model = build_model(config, splits.info)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"{path}: the weights do not fit the model of its config ({error})") from None
    model = model.to(context.device)
    if recipe.trained:
        metrics = _test_metrics(model, recipe, splits.info, dataset, config, context,
                                _progress_enabled(config, context))
    else:
        metrics = evaluate_isomorphism(model, splits.info, dataset, config, context.device)
    return {"task": recipe.name, "split": split, "metric": recipe.metric, "checkpoint": str(path),
            "epoch": state.get("epoch"), "eval_samples": config.eval_samples, split: metrics}


__all__ = ["train", "evaluate", "evaluate_isomorphism", "evaluate_checkpoint", "RunResult", "save_checkpoint",
           "load_checkpoint", "format_summary", "count_parameters", "embed"]
