"""The training engine: a tiny run of every task writes its logs, checkpoints and metrics, and
evaluating the checkpoint reproduces the recorded test metric; determinism by seed; time
budgets; schedules, metrics and the side-by-side comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lps_fast import allocator
from lps_fast.data import IGNORE_INDEX, DenseBatch
from lps_fast.train import TrainConfig, evaluate_checkpoint, resolve, train
from lps_fast.train import compare as compare_lib
from lps_fast.train import trainer
from lps_fast.train.plot import plot_runs, read_log
from lps_fast.train.recipes import Meter, class_balanced_weights, get_recipe, make_optimizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_DISTRIBUTION = dict(dist_width=16, dist_layers=1)

# Seconds-long runs of every task: tiny models, one epoch, a few batches.
TINY = {
    "nbody": dict(n_train=64, n_val=32, n_test=32, width=16, layers=1, samples=2, eval_samples=2, batch_size=32),
    "exp-classify": dict(limit=64, width=32, layers=1, samples=2, eval_samples=2, batch_size=32),
    "exp-iso": dict(limit=40, width=32, layers=1, eval_samples=2),
    "graph8c": dict(limit=200, width=16, layers=1, eval_samples=2),
    "pattern": dict(n_train=16, n_val=8, n_test=8, width=32, layers=1, heads=2, eval_samples=1, batch_size=8),
    "csl": dict(width=16, layers=1, samples=2, eval_samples=2, max_batches=2),
}


def tiny_config(task, tmp_path=None, **changes) -> TrainConfig:
    values = dict(TINY[task], **TINY_DISTRIBUTION, epochs=1, quiet=True, threads=None)
    if task in ("exp-classify", "exp-iso", "graph8c") and SHARED_DATA.is_dir():
        values["data"] = str(SHARED_DATA)
    values.update(changes)
    return TrainConfig(task=task, out=None if tmp_path is None else str(tmp_path / task), **values)


def needs_data(task):
    if task in ("exp-classify", "exp-iso") and not (SHARED_DATA / "exp.npz").is_file():
        pytest.skip("exp.npz is not in ../shared/data")
    if task == "graph8c" and not (SHARED_DATA / "graph8c.g6").is_file():
        pytest.skip("graph8c.g6 is not in ../shared/data")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Generated data sets go to one cache per test session, not the user's."""
    monkeypatch.setenv("LPS_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "lps_fast_cache"))


@pytest.mark.parametrize("task", list(TINY))
def test_tiny_run_writes_everything_and_eval_reproduces_the_test_metric(task, tmp_path):
    needs_data(task)
    result = train(tiny_config(task, tmp_path))
    out = tmp_path / task
    recipe = get_recipe(task)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == task and metrics["metric"] == recipe.metric
    assert json.loads((out / "config.json").read_text())["group"] == resolve(tiny_config(task)).group
    log = read_log(out)
    assert len(log) == 1
    assert (out / "best.pt").is_file()
    value = metrics["test"][recipe.metric]
    assert math.isfinite(value)
    if recipe.trained:
        assert (out / "last.pt").is_file()
        assert metrics["epochs"] == 1 and metrics["steps"] >= 1
        assert {"train_loss", f"val_{recipe.metric}", "lr", "time"} <= set(log[0])
        assert math.isfinite(log[0]["train_loss"])
    else:
        assert metrics["steps"] == 0 and metrics["test"]["pairs"] > 0
    reproduced = evaluate_checkpoint(out / "best.pt", overrides={"quiet": True})
    assert reproduced["test"][recipe.metric] == pytest.approx(value, rel=1e-6, abs=1e-9)
    assert result.metrics["test"][recipe.metric] == value


def test_same_seed_same_run_other_seed_other_run():
    runs = [train(tiny_config("nbody", seed=seed, epochs=2)) for seed in (3, 3, 4)]
    first, again, other = runs
    assert [h["train_loss"] for h in first.history] == [h["train_loss"] for h in again.history]
    assert first.metrics["test"]["mse"] == again.metrics["test"]["mse"]
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), name
    assert first.metrics["test"]["mse"] != other.metrics["test"]["mse"]


def test_time_budget_stops_the_run_and_reports_a_partial_epoch():
    config = tiny_config("nbody", epochs=None, time_budget=1.5, n_train=256, batch_size=8)
    result = train(config)
    assert result.metrics["epochs"] >= 1
    assert result.metrics["train_seconds"] < 1.5 + 2.0  # the last validation may overrun a little
    assert result.history[-1]["partial"] or result.metrics["train_seconds"] >= 1.0
    assert resolve(config).epochs is None  # a budget alone runs as many epochs as fit


def test_progress_bars_and_epoch_lines(capsys):
    train(tiny_config("nbody", quiet=False, progress=True, epochs=2))
    captured = capsys.readouterr()
    assert "epoch    2" in captured.out and "test mse" in captured.out
    assert "epoch 1" in captured.err and "loss=" in captured.err  # tqdm's bar with the running loss


def test_evaluation_does_not_disturb_training_noise():
    """Validation draws from its own generator: evaluating every epoch or not changes nothing."""
    a = train(tiny_config("nbody", epochs=2, eval_every=1))
    b = train(tiny_config("nbody", epochs=2, eval_every=2))
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_schedule(schedule):
    factor = lambda p: trainer._learning_rate_factor(p, 0.1, schedule)  # noqa: E731
    assert factor(0.0) == 0.0 and factor(0.05) == pytest.approx(0.5) and factor(0.1) == pytest.approx(1.0)
    assert factor(1.0) == pytest.approx(1.0 if schedule == "constant" else 0.0, abs=1e-12)
    assert factor(0.5) <= 1.0


def test_optimizer_is_fused_adamw_with_the_loops_update():
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    fused_params = [torch.randn(s, requires_grad=True) for s in shapes]
    loop_params = [p.detach().clone().requires_grad_() for p in fused_params]
    fused = make_optimizer(fused_params, lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(loop_params, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"]
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for params, optimizer in ((fused_params, fused), (loop_params, loop)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(fused_params, loop_params):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # parameters without a fused kernel get the loop
    for other in (torch.empty(3, device="meta"), torch.empty(3, dtype=torch.complex64)):
        assert not make_optimizer([other.requires_grad_()], lr=1e-3).defaults["fused"]


def test_weighted_accuracy_is_the_mean_of_class_recalls():
    recipe = get_recipe("pattern")
    meter = Meter(recipe, 2)
    # 1 graph, 5 real nodes + 1 pad: targets 0 0 0 1 1 (pad), predictions 0 0 1 1 0
    target = torch.tensor([[0, 0, 0, 1, 1, IGNORE_INDEX]])
    guess = torch.tensor([0, 0, 1, 1, 0, 1])
    logits = torch.nn.functional.one_hot(guess, 2).float()[None]
    batch = DenseBatch(node_features=torch.zeros(1, 6, dtype=torch.long), adjacency=torch.zeros(1, 6, 6),
                       mask=target != IGNORE_INDEX, target=target, target_level="node",
                       num_nodes=torch.tensor([5]), index=torch.tensor([0]))
    meter.update(logits, batch, torch.tensor(0.5))
    result = meter.result()
    assert result["weighted_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result["accuracy"] == pytest.approx(3 / 5)
    weights = class_balanced_weights(target, 2)
    assert weights.tolist() == pytest.approx([2 / 5, 3 / 5])


def test_close_pairs_are_counted_like_brute_force():
    embeddings = torch.tensor([[0.0, 0.0], [0.0, 0.0004], [1.0, 1.0], [1.0, 1.0], [0.0, 0.002]], dtype=torch.float64)
    brute = sum(int((embeddings[i] - embeddings[j]).abs().sum() <= 1e-3)
                for i in range(5) for j in range(i + 1, 5))
    assert trainer._count_close_pairs(embeddings, 1e-3, chunk=2) == brute == 2


def test_isomorphism_control_is_zero_for_an_exactly_invariant_model():
    """A plain GIN (no symmetrization) is invariant: it separates no graph from a relabelled copy."""
    needs_data("graph8c")
    result = train(tiny_config("graph8c", distribution="none", backbone="gin", limit=100))
    test = result.metrics["test"]
    assert test["control_separated"] == 0
    assert test["pairs_not_separated"] > 0  # and, 1-WL-bounded, it misses some non-isomorphic pairs


@pytest.mark.parametrize("change, message", [
    (dict(group="SnxO3", task="pattern"), "does not fit task pattern"),
    (dict(backbone="vit", task="nbody"), "does not fit task nbody"),
    (dict(distribution="bogus"), "--distribution"),
    (dict(warmup=1.5), "--warmup"),
    (dict(samples=0), "--samples"),
])
def test_resolve_rejects_bad_combinations(change, message):
    task = change.pop("task", "nbody")
    with pytest.raises(ValueError, match=message):
        resolve(TrainConfig(task=task, **change))


def test_compare_and_plot(tmp_path):
    base = tiny_config("nbody", epochs=2)
    rows = compare_lib.compare(base, ["learned", "none"], out=tmp_path / "cmp", samples_by_distribution={"learned": 2})
    assert [row["distribution"] for row in rows] == ["learned", "none"]
    assert rows[1]["samples"] == 1 or rows[1]["distribution"] == "none"
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert len(summary["rows"]) == 2
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 1000
    table = compare_lib.format_table(rows)
    assert "learned" in table and "test mse" in table
    png = plot_runs([tmp_path / "cmp" / "learned"], tmp_path / "one.png", x="time")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_concurrent_compare_runs_each_distribution_in_its_own_process(tmp_path, capsys):
    base = tiny_config("nbody", epochs=None, time_budget=2.0, threads=1)
    rows = compare_lib.compare(base, ["learned", "uniform"], out=tmp_path / "par", concurrent=True, status_every=1.0)
    assert [row["distribution"] for row in rows] == ["learned", "uniform"]
    for row in rows:
        assert row["steps"] >= 1 and math.isfinite(row["test"])
        metrics = json.loads((tmp_path / "par" / row["distribution"] / "metrics.json").read_text())
        assert metrics["malloc"] == allocator.setting()  # each child keeps freed memory as this process does


def test_main_job_reports_the_three_models_and_the_speed(tmp_path, monkeypatch, capsys):
    calls = {}

    def fake_compare(base, distributions, out, samples_by_distribution, concurrent, status_every):
        calls.update(base=base, distributions=distributions, samples=samples_by_distribution, concurrent=concurrent)
        tests = {"learned": 0.01, "none": 0.03, "uniform": 0.02}
        return [dict(distribution=name, samples=samples_by_distribution[name], eval_samples=20, epochs=3, steps=90,
                     train_seconds=base.time_budget, metric="mse", higher_is_better=False, val=tests[name],
                     test=tests[name], parameters=1) for name in distributions]

    monkeypatch.setattr(compare_lib, "compare", fake_compare)
    monkeypatch.setattr(compare_lib, "speed_comparison",
                        lambda config, repeats, splits=None: {"fast_s": 0.01, "reference_s": 0.02, "speedup": 2.0})
    monkeypatch.setattr(compare_lib, "MAIN_JOB", dict(compare_lib.MAIN_JOB, n_train=40, n_val=20, n_test=20))
    summary = compare_lib.main_job(budget=60.0, out=tmp_path / "main")
    out = capsys.readouterr().out
    assert calls["distributions"] == ("learned", "none", "uniform") and calls["concurrent"]
    assert calls["base"].task == "nbody" and calls["base"].eval_samples == 20 and calls["base"].threads == 1
    assert 0 < calls["base"].time_budget < 60
    assert "beats both baselines" in out and "2.00x faster" in out
    assert summary["learned_beats_both"]
    assert json.loads((tmp_path / "main" / "summary.json").read_text())["rows"][0]["distribution"] == "learned"


def test_speed_comparison_times_both_paths():
    speed = compare_lib.speed_comparison(tiny_config("nbody"), repeats=1)
    assert speed["fast_s"] > 0 and speed["reference_s"] > 0
    assert speed["speedup"] == pytest.approx(speed["reference_s"] / speed["fast_s"])
