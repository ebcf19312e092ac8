"""The ``lps-fast`` command line: help texts, clear errors with exit status 2, a tiny training
run whose checkpoint ``lps-fast eval`` reproduces, plotting and the benchmark launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lps_fast import cli

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_DATA = REPOSITORY.parent / "shared" / "data"
COMMANDS = ["main", "train", "compare", "eval", "plot", "tasks", "bench", "info", "demo"]
TINY_NBODY = ["--n-train", "48", "--n-val", "16", "--n-test", "16", "--width", "16", "--layers", "1",
              "--samples", "2", "--eval-samples", "2", "--dist-width", "16", "--dist-layers", "1",
              "--batch-size", "16", "--epochs", "1"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LPS_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "lps_fast_cache"))


def run_cli(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``lps-fast argv`` run in this process."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exit:  # argparse: --help and usage errors
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help_of_every_command(capsys, command):
    status, out, _ = run_cli(capsys, *([command] if command else []), "--help")
    assert status == 0
    assert out.startswith("usage: lps-fast")
    assert len(out) > 200


def test_train_help_explains_tasks_budgets_and_outputs(capsys):
    _, out, _ = run_cli(capsys, "train", "--help")
    for text in ("nbody", "exp-classify", "--time-budget", "--distribution", "learned", "uniform", "torchrun",
                 "metrics.json", "--data"):
        assert text in out, text


def test_module_entry_point_and_console_script():
    result = subprocess.run([sys.executable, "-m", "lps_fast.cli", "tasks"], capture_output=True, text=True,
                            cwd=REPOSITORY, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "graph8c" in result.stdout and "0.00417" in result.stdout
    script = Path(sys.executable).parent / "lps-fast"
    if not script.exists():
        pytest.skip("the lps-fast console script is not installed in this environment")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: lps-fast" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "nosuchtask"], "invalid choice"),
    (["train", "nbody", "--group", "foo"], "unknown group"),
    (["train", "pattern", "--group", "SnxO3"], "does not fit task pattern"),
    (["train", "nbody", "--backbone", "vit"], "does not fit task nbody"),
    (["train", "nbody", "--epochs", "-1"], "must be >= 0"),
    (["train", "nbody", "--samples", "zero"], "whole number"),
    (["train", "nbody", "--time-budget", "5 parsecs"], "invalid duration"),
    (["train", "nbody", "--data", "somewhere"], "--data only applies"),
    (["train", "nbody", "--no-such-option"], "unrecognized arguments"),
    (["train", "exp-iso", "--data", "/nonexistent/folder"], "exp.npz not found"),
    (["train", "graph8c", "--data", "/nonexistent/graph8c.g6"], "graph8c.g6 not found"),
    (["eval", "/nonexistent/best.pt"], "not found"),
    (["compare", "nbody", "-D", "learned", "--k", "uniform=4"], "not among the compared"),
    (["bench", "nosuchfamily"], "unknown benchmark family"),
    (["main", "--budget", "soon"], "invalid duration"),
    (["train", "nbody", "--time-budget", "-5s"], "argument --time-budget: a duration must be positive"),
    (["compare", "nbody", "--time-budget", "-1m"], "argument --time-budget: a duration must be positive"),
])
def test_bad_options_and_data_exit_2_with_a_readable_message(capsys, argv, message):
    status, out, err = run_cli(capsys, *argv)
    assert status == 2
    assert message in err
    assert "Traceback" not in err + out


def test_eval_rejects_a_file_that_is_not_a_checkpoint(capsys, tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_text("not a checkpoint")
    status, _, err = run_cli(capsys, "eval", str(bogus))
    assert status == 2 and "not a lps-fast checkpoint" in err


def test_eval_of_a_config_file_says_so_in_one_line(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"task": "nbody"}))
    status, _, err = run_cli(capsys, "eval", str(config))
    assert status == 2
    assert err.count("\n") == 1 and "JSON file" in err and "best.pt" in err
    assert "weights_only" not in err


def test_plot_of_a_metric_no_run_logged_names_the_logged_ones(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"epoch": e, "step": 10 * e, "time": 1.0 * e, "train_loss": 1.0 / e, "val_loss": 1.0, "val_mse": 0.5}
               for e in (1, 2)]
    (run / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    status, _, err = run_cli(capsys, "plot", str(run), "--metric", "accuracy", "--out", str(tmp_path / "c.png"))
    assert status == 2
    assert "no run logs a validation 'accuracy'" in err and "loss, mse" in err
    assert not (tmp_path / "c.png").exists()
    status, _, _ = run_cli(capsys, "plot", str(run), "--metric", "mse", "--out", str(tmp_path / "c.png"))
    assert status == 0 and (tmp_path / "c.png").is_file()


def test_epoch_line_numbers_share_one_format():
    from lps_fast.train.recipes import get_recipe
    from lps_fast.train.trainer import _epoch_line, _format_value

    assert [_format_value(v) for v in (0.1, 0.12345, 2.0, 12.5, 1.5e-5, 2e4)] == \
        ["0.1000", "0.1235", "2.000", "12.50", "1.500e-05", "2.000e+04"]
    # NumPy and 0-dim tensor values print like floats, not as their repr
    assert _format_value(np.float32(0.25)) == _format_value(torch.tensor(0.25)) == "0.2500"
    assert _format_value(3) == "3" and _format_value(None) == "-"
    line = _epoch_line({"epoch": 3, "train_loss": 0.5, "train_mse": np.float64(0.1), "val_mse": 0.0312345,
                        "best_val_mse": 0.03, "lr": 1e-3, "time": 12.0}, get_recipe("nbody"))
    assert "loss 0.5000 | train mse 0.1000 | val mse 0.03123 | best 0.03000" in line


def test_train_then_eval_reproduces_the_test_metric_then_plot(capsys, tmp_path):
    out = tmp_path / "run"
    status, stdout, err = run_cli(capsys, "train", "nbody", *TINY_NBODY, "--out", str(out), "--quiet")
    assert status == 0, err
    assert "test mse" in stdout
    recorded = json.loads((out / "metrics.json").read_text())["test"]["mse"]
    status, stdout, err = run_cli(capsys, "eval", str(out / "best.pt"), "--json", "--quiet")
    assert status == 0, err
    assert json.loads(stdout)["test"]["mse"] == pytest.approx(recorded, rel=1e-6)
    status, stdout, _ = run_cli(capsys, "eval", str(out / "best.pt"), "--split", "val", "--quiet")
    assert status == 0 and stdout.startswith("nbody (val, k=2): ")
    status, stdout, _ = run_cli(capsys, "plot", str(out), "--out", str(tmp_path / "curves.png"))
    assert status == 0 and (tmp_path / "curves.png").is_file()
    status, _, err = run_cli(capsys, "plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png"))
    assert status == 2 and "no training log" in err


def test_train_prints_per_epoch_lines_unless_quiet(capsys, tmp_path):
    status, stdout, _ = run_cli(capsys, "train", "nbody", *TINY_NBODY, "--epochs", "2", "--out", str(tmp_path / "a"))
    assert status == 0
    assert stdout.count("epoch ") >= 2 and "results in" in stdout


def test_json_output_of_train(capsys, tmp_path):
    status, stdout, _ = run_cli(capsys, "train", "nbody", *TINY_NBODY, "--out", str(tmp_path / "b"), "--quiet",
                                "--json")
    assert status == 0
    assert json.loads(stdout[stdout.index("{"):])["metric"] == "mse"


def test_bench_passes_families_and_options_to_run_all(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command: calls.append(command) or 0)
    status, _, _ = run_cli(capsys, "bench", "permute", "sinkhorn", "--quick", "--scales", "pattern")
    assert status == 0
    command = calls[0]
    assert command[1].endswith(os.path.join("benchmarks", "run_all.py"))
    assert command[command.index("--families") + 1] == "permute,sinkhorn"
    assert "--quick" in command and command[-2:] == ["--scales", "pattern"]


def test_tasks_lists_every_task_with_its_paper_figure(capsys):
    status, out, _ = run_cli(capsys, "tasks")
    assert status == 0
    for task in ("nbody", "exp-classify", "exp-iso", "graph8c", "pattern", "csl"):
        assert f"\n{task}\n" in f"\n{out}"
    assert "100%" in out and "0.00417" in out
