"""The ``lps-fast`` command line (also ``python -m lps_fast.cli``).

    lps-fast main                           the README's main job (n-body, ~5 minutes on 2 CPU cores)
    lps-fast train TASK [options]           train (or, for exp-iso and graph8c, test) one model
    lps-fast compare TASK -D learned,none   the same training for several distributions, side by side
    lps-fast eval CHECKPOINT [--split S]    evaluate a saved model again
    lps-fast plot RUN [RUN ...]             learning curves of runs, as a PNG
    lps-fast tasks                          the tasks, their default models and the paper's numbers
    lps-fast bench [FAMILY ...]             the kernel benchmarks (benchmarks/run_all.py)
    lps-fast info                           which kernels are built and which runs each op
    lps-fast demo                           a few-second check: equivariance and op timings

Multi-process training: ``torchrun --nproc_per_node N -m lps_fast.cli train TASK ...``.
Errors in options or data print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

EXIT_USAGE = 2
# commands that train or evaluate models in this process: glibc malloc keeps freed memory there
# (lps_fast.allocator; LPS_FAST_KEEP_FREED_MEMORY=0 leaves glibc's defaults)
TRAINING_COMMANDS = ("main", "train", "compare", "eval", "results")


class CommandError(Exception):
    """A user mistake found after parsing (bad combination, missing file): one line, exit 2."""


def _duration(text: str) -> float:
    from lps_fast.train.config import parse_duration

    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"a duration must be positive, got {text!r}")
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


# ---------------------------------------------------------------------------------------------
# info, demo, tasks


def _info(args: argparse.Namespace) -> int:
    import lps_fast

    if args.json:
        print(json.dumps(lps_fast.backend_info(), indent=2, default=str))
    else:
        print(lps_fast.format_backend_info())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lps_fast import demo

    demo.main()
    return 0


def _tasks_table() -> str:
    from lps_fast.train.recipes import RECIPES

    lines = []
    for recipe in RECIPES.values():
        d = recipe.defaults
        model = f"{d['group']}, {d['backbone']} (width {d['width']}, {d['layers']} layers), k={d['samples']}/{d['eval_samples']}"
        budget = "untrained" if not recipe.trained else f"{d['epochs']} epochs, batch {d['batch_size']}, lr {d['lr']:g}"
        lines.append(f"{recipe.name}\n    {recipe.summary}\n    metric: {recipe.metric} "
                     f"({'higher' if recipe.higher_is_better else 'lower'} is better); default: {model}; {budget}\n"
                     f"    paper: {recipe.paper}")
    return "\n".join(lines)


def _tasks(args: argparse.Namespace) -> int:
    print(_tasks_table())
    return 0


# ---------------------------------------------------------------------------------------------
# train / compare


_TRAIN_EPILOG = """\
Defaults depend on the task (see `lps-fast tasks`): the paper's models scaled to a CPU budget.
Examples:
  lps-fast train nbody --time-budget 2m                 learned Sn x E3 transformer for 2 minutes
  lps-fast train nbody --distribution uniform --samples 20 --epochs 50 --out runs/nbody-ga
  lps-fast train exp-classify --data ../shared/data --epochs 200
  lps-fast train exp-iso                                 untrained: counts the pairs it separates
  torchrun --nproc_per_node 2 -m lps_fast.cli train pattern --epochs 5   two processes (DDP)
  lps-fast train peptides-func --data DIR --preset paper --vit-checkpoint vit_b16_in21k.safetensors
Each run writes config.json, log.jsonl, best.pt, last.pt and metrics.json to --out.
"""


def _add_training_options(parser: argparse.ArgumentParser, with_distribution: bool = True) -> None:
    from lps_fast.train.config import (BACKENDS, DEVICES, DIST_NETWORKS, DISTRIBUTIONS, NOISE_MODES, PRESETS,
                                       SCHEDULES, SELECTIONS)

    parser.add_argument("--preset", choices=PRESETS,
                        help="paper: the settings of the paper's own code for this task (backbone, distribution "
                             "network, samples, schedule, epochs, test protocol; e.g. ViT-B/16, k=1/10, lr 1e-5, "
                             "batch 128 for peptides-func; sized for a GPU); options given explicitly still win")
    sym = parser.add_argument_group("symmetrization")
    sym.add_argument("--group", help="symmetry group: Sn for graphs; SnxE3 (default), SnxO3, SnxSO3, SnxSE3, E3, O3, "
                                     "SE3, SO3 or Sn for n-body")
    if with_distribution:
        sym.add_argument("--distribution", choices=DISTRIBUTIONS, default="learned",
                         help="where group samples come from: learned (probabilistic symmetrization, default), "
                              "uniform (group averaging), frame (frame averaging), canonical (one learned "
                              "sample), none (the plain backbone)")
    sym.add_argument("--samples", type=_positive_int, help="group samples per input in training (k)")
    sym.add_argument("--eval-samples", type=_positive_int, help="group samples per input in evaluation")
    sym.add_argument("--test-samples", type=_positive_int,
                     help="group samples per input on the test split (default: --eval-samples; paper n-body: 200)")

    model = parser.add_argument_group("backbone")
    model.add_argument("--backbone", choices=("mlp", "gin-id", "gin", "transformer", "pair-transformer", "vit",
                                              "vit-ps"),
                       help="the network to symmetrize (nbody: transformer over particles, pair-transformer over "
                            "the n x n particle pairs as in the paper, or mlp; vit-ps: the paper's ViT with new "
                            "patch projections, for pattern and the peptides tasks)")
    model.add_argument("--width", type=_positive_int, help="hidden width (MLP layers, GIN, transformer d_model, ViT "
                                                           "embedding)")
    model.add_argument("--layers", type=_positive_int, help="hidden layers / blocks")
    model.add_argument("--hidden-sizes", metavar="W1,W2,...",
                       help="MLP hidden widths, e.g. 2048,4096,2048,10 (the paper's EXP MLP); overrides --width x "
                            "--layers")
    model.add_argument("--heads", type=_positive_int, help="attention heads (transformer, ViT)")
    model.add_argument("--patch-size", type=_positive_int, help="ViT patch size in adjacency pixels")
    model.add_argument("--vit-model", help="timm ViT architecture (default vit_tiny_patch16_224, resized)")
    model.add_argument("--vit-checkpoint", help="local file of pretrained weights for --vit-model (no download); "
                                                "then the architecture is the pretrained one")
    vit_ps = parser.add_argument_group("ViT-PS (--backbone vit-ps)")
    vit_ps.add_argument("--vit-grid", type=_positive_int,
                        help="tokens per image side (default: the pretrained grid, 14 for ViT-B/16); the patch size "
                             "defaults to ceil(max nodes / grid) and the image is padded to grid x patch")
    vit_ps.add_argument("--pad-mode", choices=("zero", "reflect", "replicate", "circular"),
                        help="padding of the graph image up to grid x patch pixels")
    vit_ps.add_argument("--centering", action=argparse.BooleanOptionalAction, default=None,
                        help="pad on both sides of the image (default: after it only)")
    vit_ps.add_argument("--patch-dropout", type=_non_negative_float,
                        help="fraction of patch tokens dropped in training (graph-level tasks)")
    vit_ps.add_argument("--random-patch-dropout", action=argparse.BooleanOptionalAction, default=None,
                        help="draw the dropped fraction from [0, --patch-dropout) at every step")

    dist = parser.add_argument_group("learned distribution")
    dist.add_argument("--dist-network", choices=DIST_NETWORKS,
                      help="the equivariant network of p(g|x): gin or gin-bn (the paper's, batch norm) for Sn; "
                           "vn or vn-dgcnn (the paper's vector-neuron DGCNN) with rotations")
    dist.add_argument("--noise", choices=NOISE_MODES,
                      help="how the noise enters the network: add (to its inputs, the paper's) or concat")
    dist.add_argument("--knn", type=_positive_int, help="neighbours of the vn-dgcnn edge convolutions (4)")
    dist.add_argument("--dist-dropout", type=_non_negative_float, help="vector dropout of vn-dgcnn (0.08)")
    dist.add_argument("--dist-width", type=_positive_int, help="width of the equivariant network of p(g|x) (64)")
    dist.add_argument("--dist-layers", type=_positive_int, help="its layers (3)")
    dist.add_argument("--tau", type=_non_negative_float, help="Sinkhorn temperature (0.01 graphs, 0.1 with rotations)")
    dist.add_argument("--entropy-weight", type=_non_negative_float, help="weight of the permutation entropy loss (0.1)")
    dist.add_argument("--noise-scale", type=_non_negative_float, help="scale of the input noise (1)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=_non_negative_int, help="training epochs (with --time-budget alone: unlimited)")
    opt.add_argument("--time-budget", type=_duration, metavar="DURATION",
                     help="stop training after this wall-clock time, validation included: 90s, 5m, 1.5h "
                          "(a bare number means minutes); the learning-rate schedule follows the time")
    opt.add_argument("--max-batches", type=_positive_int, help="at most this many batches per epoch (quick checks)")
    opt.add_argument("--batch-size", type=_positive_int, help="graphs per batch (per process under torchrun)")
    opt.add_argument("--eval-batch-size", type=_positive_int, help="graphs per evaluation batch (default: --batch-size)")
    opt.add_argument("--lr", type=_non_negative_float, help="peak learning rate of AdamW")
    opt.add_argument("--weight-decay", type=_non_negative_float, help="AdamW weight decay")
    opt.add_argument("--schedule", choices=SCHEDULES,
                     help="learning rate after warmup: constant (the paper's), cosine or linear to 0 (task default)")
    opt.add_argument("--warmup", type=_non_negative_float, help="linear warmup, as a fraction of the run (0.05)")
    opt.add_argument("--grad-clip", type=_non_negative_float, help="clip the gradient norm to this (0: off)")
    opt.add_argument("--eval-every", type=_positive_int, default=1, help="validate every N epochs (default 1)")
    opt.add_argument("--test-trials", type=_positive_int,
                     help="average the test metric over N draws of the noise (reports the std too; paper n-body 5)")
    opt.add_argument("--select", choices=SELECTIONS,
                     help="keep the checkpoint with the best validation metric, or the lowest validation loss "
                          "(the paper's choice; task default)")
    opt.add_argument("--iso-seeds", type=_positive_int,
                     help="exp-iso, graph8c: also count pairs separated by any of N untrained models (seeds "
                          "0..N-1), the paper's protocol with N = 100")

    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="PATH", help="exp.npz / graph8c.g6, or a folder holding them (exp-iso, "
                                                     "exp-classify, graph8c); for peptides-func/-struct the folder "
                                                     "of the LRGB CSV and split files; default: $LPS_FAST_DATA, "
                                                     "./data, ../shared/data")
    data.add_argument("--n-train", type=_positive_int, help="generated training systems/graphs (nbody, pattern)")
    data.add_argument("--n-val", type=_positive_int, help="generated validation size (nbody, pattern)")
    data.add_argument("--n-test", type=_positive_int, help="generated test size (nbody, pattern)")
    data.add_argument("--limit", type=_positive_int, help="use only the first N graphs of every split (quick checks)")
    data.add_argument("--fold", type=_non_negative_int, default=0, help="CSL cross-validation fold (0-4)")
    data.add_argument("--data-seed", type=_non_negative_int, default=0, help="seed of the generated data sets")

    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the model, noise and data order")
    run.add_argument("--device", choices=DEVICES, default="auto", help="cpu, cuda or auto (default: cuda if present)")
    run.add_argument("--backend", choices=BACKENDS, default="fast",
                     help="group ops on the compiled kernels (fast) or the pure-PyTorch reference")
    run.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    run.add_argument("--out", metavar="DIR", help="output folder (default runs/<task>-<distribution>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines; the result only")
    run.add_argument("--json", action="store_true", help="print the final metrics as JSON")


_CONFIG_KEYS = ("preset", "group", "distribution", "samples", "eval_samples", "test_samples", "backbone", "width",
                "layers", "hidden_sizes", "heads", "patch_size", "vit_model", "vit_checkpoint", "dist_network",
                "noise", "knn", "dist_dropout", "dist_width", "dist_layers", "tau", "entropy_weight",
                "noise_scale", "select", "iso_seeds", "epochs", "time_budget", "max_batches", "batch_size",
                "eval_batch_size", "lr", "weight_decay", "schedule", "warmup", "grad_clip", "eval_every",
                "test_trials", "data", "n_train", "n_val", "n_test", "limit", "fold", "data_seed", "seed", "device",
                "backend", "threads", "out", "quiet", "vit_grid", "pad_mode", "centering", "patch_dropout",
                "random_patch_dropout")


def _config_from_args(args: argparse.Namespace):
    from lps_fast.train import TrainConfig

    values = {key: getattr(args, key) for key in _CONFIG_KEYS if hasattr(args, key)}
    return TrainConfig(task=args.task, **values)


def _is_main_process() -> bool:
    """Rank 0 under torchrun (or a single process): the one that prints."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _default_out(task: str, name: str) -> str:
    import time

    return str(Path("runs") / f"{task}-{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _train(args: argparse.Namespace) -> int:
    from lps_fast.train import resolve, train

    config = _config_from_args(args)
    resolve(config)  # option errors before any data is loaded
    if config.out is None:
        config.out = _default_out(config.task, config.distribution)
    result = train(config)
    if not _is_main_process():
        return 0
    if getattr(args, "json", False):
        print(json.dumps(result.metrics, indent=2, default=str))
    elif not config.quiet:
        print(f"results in {config.out}/ (metrics.json, log.jsonl, best.pt)")
    else:
        from lps_fast.train.trainer import format_summary

        print(format_summary(result.metrics))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from lps_fast.train import compare as compare_lib

    config = _config_from_args(args)
    distributions = [name.strip() for name in args.distributions.split(",") if name.strip()]
    out = config.out or _default_out(config.task, "compare")
    config.out = None
    rows = compare_lib.compare(config, distributions, out=out, samples_by_distribution=_parse_samples(args.k),
                               concurrent=args.concurrent)
    print(compare_lib.format_table(rows))
    print(f"results in {out}/ (one folder per distribution, summary.json, curves.png)")
    return 0


def _parse_samples(text: Optional[str]) -> Dict[str, int]:
    if not text:
        return {}
    samples = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if not value:
            raise CommandError(f"--k expects NAME=K pairs like learned=4,uniform=20, got {item!r}")
        try:
            samples[name.strip()] = int(value)
        except ValueError:
            raise CommandError(f"--k: {value!r} is not a whole number") from None
    return samples


# ---------------------------------------------------------------------------------------------
# main job


def _main_job(args: argparse.Namespace) -> int:
    from lps_fast.train import compare as compare_lib

    compare_lib.main_job(budget=args.budget, out=args.out, threads=args.threads, seed=args.seed,
                         quick=args.quick, device=args.device)
    return 0


# ---------------------------------------------------------------------------------------------
# eval / plot / bench


def _eval(args: argparse.Namespace) -> int:
    from lps_fast.train import evaluate_checkpoint

    _check_checkpoint_file(args.checkpoint)
    overrides = {"device": args.device, "data": args.data, "eval_samples": args.eval_samples,
                 "eval_batch_size": args.batch_size, "backend": args.backend, "test_trials": args.trials,
                 "limit": args.limit, "quiet": args.quiet}
    result = evaluate_checkpoint(args.checkpoint, split=args.split, overrides=overrides)
    if not _is_main_process():
        return 0
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    metrics = result[args.split]
    shown = ", ".join(f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}"
                      for key, value in metrics.items())
    print(f"{result['task']} ({args.split}, k={result['eval_samples']}): {shown}")
    return 0


def _results(args: argparse.Namespace) -> int:
    from lps_fast.train import results

    return results.main(args)


def _plot(args: argparse.Namespace) -> int:
    from lps_fast.train.plot import plot_runs

    path = plot_runs(args.runs, args.out, metric=args.metric, x=args.x, title=args.title)
    print(f"wrote {path}")
    return 0


def _benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def _bench(args: argparse.Namespace, extra: Sequence[str]) -> int:
    folder = _benchmarks_dir()
    script = folder / "run_all.py"
    if not script.is_file():
        raise CommandError(f"the benchmarks are not here ({script} is missing): they ship with the source "
                           "repository, not the installed package")
    known = sorted(path.stem[len("bench_"):] for path in folder.glob("bench_*.py"))
    unknown = [family for family in args.families if family not in known]
    if unknown:
        raise CommandError(f"unknown benchmark family {', '.join(unknown)}; choose from {', '.join(known)}")
    command = [sys.executable, str(script)]
    if args.families:
        command += ["--families", ",".join(args.families)]
    if args.quick:
        command.append("--quick")
    if args.device:
        command += ["--device", args.device]
    command += list(extra)
    return subprocess.call(command)


# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    from lps_fast.train.recipes import TASK_NAMES

    parser = argparse.ArgumentParser(
        prog="lps-fast",
        description="Make any PyTorch model equivariant by probabilistic symmetrization (Kim et al., NeurIPS "
                    "2023), with fast kernels for the group operations: train and evaluate the paper's "
                    "tasks, run the benchmarks, inspect the build.",
        epilog="Run `lps-fast COMMAND --help` for the options of a command. Start with `lps-fast main`.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    main = commands.add_parser(
        "main", help="the README's main job: n-body with learned symmetrization vs two baselines (~5 min)",
        description="Train the n-body model of the paper (a transformer made Sn x O(3)-equivariant, acting "
                    "about the centroid, by learned probabilistic symmetrization) on generated charged-particle "
                    "data, and the same transformer unsymmetrized and with group averaging (uniform samples), "
                    "all at once and for the same time; then print the test MSEs side by side and the speed "
                    "of the fast kernels against the reference path.")
    main.add_argument("--budget", type=_duration, default=300.0, metavar="DURATION",
                      help="total wall-clock budget, data generation and timings included (default 5m)")
    main.add_argument("--out", default="runs/main", metavar="DIR", help="output folder (default: %(default)s)")
    main.add_argument("--threads", type=_positive_int, default=1,
                      help="CPU threads per model (default 1: the three models train at once, one process each)")
    main.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the models and noise")
    main.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default auto)")
    main.add_argument("--quick", action="store_true", help="a 40-second smoke run on small data (not meaningful)")
    main.set_defaults(run=_main_job)

    train = commands.add_parser(
        "train", help="train one model on a task (exp-iso, graph8c: test an untrained one)",
        usage="%(prog)s TASK [options]",
        description="Train a symmetrized model on one of the paper's tasks, with a progress bar, a per-epoch\n"
                    "log, checkpoints of the best and the last model, and a final test evaluation.",
        epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("task", choices=TASK_NAMES, metavar="TASK", help="one of: " + ", ".join(TASK_NAMES))
    _add_training_options(train)
    train.set_defaults(run=_train)

    compare = commands.add_parser(
        "compare", help="train one task with several distributions under the same budget, side by side",
        description="Train the same task and backbone once per distribution (same seed, same options, same "
                    "--time-budget or --epochs each) and print a table of their test metrics.",
        usage="%(prog)s TASK [-D learned,none,uniform] [options]",
        epilog="Example: lps-fast compare pattern --distributions learned,uniform --time-budget 10m")
    compare.add_argument("task", choices=TASK_NAMES, metavar="TASK", help="one of: " + ", ".join(TASK_NAMES))
    compare.add_argument("-D", "--distributions", default="learned,none,uniform",
                         help="comma-separated distributions to compare (default: %(default)s)")
    compare.add_argument("--k", metavar="NAME=K,...",
                         help="training samples per distribution, e.g. learned=4,uniform=20 (default --samples)")
    compare.add_argument("--concurrent", action="store_true",
                         help="train all of them at once, one process each (pair with --threads 1 for small models)")
    _add_training_options(compare, with_distribution=False)
    compare.set_defaults(run=_compare)

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint (best.pt / last.pt) on a split",
        description="Rebuild the model saved in a checkpoint and evaluate it. With the run's defaults (and as "
                    "many processes as the run had) the test split reproduces the test metric recorded in "
                    "metrics.json: the evaluation noise is drawn from the run's seed.")
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="a best.pt or last.pt written by lps-fast train")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test", help="default: test")
    evaluate.add_argument("--eval-samples", type=_positive_int, help="group samples per input (default: the run's)")
    evaluate.add_argument("--batch-size", type=_positive_int, help="graphs per batch (default: the run's)")
    evaluate.add_argument("--trials", type=_positive_int, help="average over N draws of the noise")
    evaluate.add_argument("--data", metavar="PATH", help="where the provided data files are (exp-*, graph8c)")
    evaluate.add_argument("--limit", type=_positive_int, help="only the first N graphs of the split")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's")
    evaluate.add_argument("--backend", choices=("fast", "reference"), help="default: the run's")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.set_defaults(run=_eval)

    plot = commands.add_parser("plot", help="plot learning curves of runs to a PNG",
                               description="Draw training loss and validation metric of one or more runs.")
    from lps_fast.train.plot import add_arguments

    add_arguments(plot)
    plot.set_defaults(run=_plot)

    results = commands.add_parser(
        "results", help="seeded reproduction runs and the report written from them",
        description="Run the reproduction suites (several seeds, one torch thread per run, records under "
                    "docs/results/runs) and write docs/results/summary.json and docs/RESULTS.md from the records.")
    from lps_fast.train.results import add_arguments as add_results_arguments

    add_results_arguments(results)
    results.set_defaults(run=_results)

    tasks = commands.add_parser(
        "tasks", help="list the tasks, their default models and the paper's results",
        description="List the tasks `lps-fast train` knows: what each one asks, its metric, the default "
                    "model (group, backbone, samples in training/evaluation) and budget, and the paper's result.")
    tasks.set_defaults(run=_tasks)

    bench = commands.add_parser(
        "bench", help="run the kernel benchmarks (benchmarks/run_all.py)",
        description="Time every op family on every provider (reference, compiled C++/CUDA, Triton). Options "
                    "not listed here are passed to benchmarks/run_all.py (e.g. --scales, --modes, --results).")
    bench.add_argument("families", nargs="*", metavar="FAMILY", help="op families (default all): permute, frame, "
                                                                     "sinkhorn, gram_schmidt; step: one training "
                                                                     "step of each task's model; vn: the learned "
                                                                     "distribution's vector-neuron network; "
                                                                     "vn_matmul: that network's matrix products")
    bench.add_argument("--quick", action="store_true", help="a fast smoke run of every benchmark")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="device to time on (default cpu)")
    bench.set_defaults(run=_bench)

    info = commands.add_parser(
        "info", help="show which kernels are built and which runs each op",
        description="Show which compiled kernels (C++, CUDA, Triton) were built and loaded, and which "
                    "implementation runs each group op on CPU and on CUDA tensors.")
    info.add_argument("--json", action="store_true", help="print the full backend_info() as JSON")
    info.set_defaults(run=_info)

    demo = commands.add_parser(
        "demo", help="symmetrize a small MLP, check equivariance and time it (seconds)",
        description="A few-second check of the install: make a plain MLP permutation-equivariant by averaging "
                    "over random node orderings, print its equivariance error beside the raw MLP's, and time a "
                    "training step on the fast kernels against the reference path.")
    demo.set_defaults(run=_demo)
    return parser


_NEGATIVE_VALUE = re.compile(r"^-[0-9.]")


def _attach_negative_values(argv: Sequence[str]) -> List[str]:
    """``--opt -5s`` -> ``--opt=-5s``: argparse takes a token starting with '-' that is not a
    plain number for an option and reports "expected one argument"; attached, the value reaches
    the option's own check, which says what is wrong with it."""
    out: List[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_VALUE.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _check_checkpoint_file(path: str) -> None:
    """One line for a file that is not a checkpoint, before torch.load's long unpickling text."""
    file = Path(path)
    if not file.is_file():
        return  # load_checkpoint says "not found"
    with open(file, "rb") as handle:
        head = handle.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch.save zip archive, or a legacy pickle
        return
    what = "a JSON file: a run's config or metrics?" if head.lstrip()[:1] in (b"{", b"[") else "not a torch file"
    raise CommandError(f"{path} is not a lps-fast checkpoint ({what}); pass a run's best.pt or last.pt")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in TRAINING_COMMANDS:
        from lps_fast import allocator

        allocator.keep_freed_memory()  # this process's own: steps stop faulting in fresh pages
    try:
        if args.command == "bench":
            return _bench(args, extra)
        return args.run(args)
    except (CommandError, ValueError, FileNotFoundError, ImportError) as error:
        print(f"lps-fast {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lps-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.command in ("train", "compare", "eval", "main"):
            from lps_fast.train.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
