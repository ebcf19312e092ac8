"""The paper's settings one preset away, the run diagnostics, the official isomorphism protocol
and the seeded results tooling (runs recorded, report written from the records)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lps_fast
from lps_fast import backbones as BB
from lps_fast import distributions as D
from lps_fast.testing import assert_equivariant
from lps_fast.train import TrainConfig, resolve, train
from lps_fast.train import results as results_lib
from lps_fast.train.recipes import build_model, load_splits

from test_learned import particle_inputs
from test_train import SHARED_DATA, needs_data, private_cache, tiny_config  # noqa: F401 (fixture)


# ---------------------------------------------------------------------------------------------
# Presets


def test_paper_preset_gives_the_official_nbody_setting():
    config = resolve(TrainConfig(task="nbody", preset="paper"))
    assert (config.backbone, config.layers, config.width, config.heads) == ("pair-transformer", 8, 64, 4)
    assert (config.dist_network, config.noise, config.knn, config.dist_dropout) == ("vn-dgcnn", "add", 4, 0.08)
    assert (config.samples, config.eval_samples, config.test_samples, config.test_trials) == (20, 20, 200, 5)
    assert (config.schedule, config.warmup, config.lr, config.epochs, config.select) == ("constant", 0.0, 1e-3, 10000,
                                                                                        "loss")
    assert (config.n_train, config.n_val, config.n_test, config.batch_size) == (3000, 2000, 2000, 100)
    # explicit options still win over the preset
    assert resolve(TrainConfig(task="nbody", preset="paper", samples=4, epochs=3)).samples == 4


def test_paper_preset_for_the_graph_tasks():
    exp = resolve(TrainConfig(task="exp-classify", preset="paper"))
    assert (exp.hidden_sizes, exp.dist_network, exp.epochs, exp.warmup, exp.grad_clip, exp.select) == (
        "2048,4096,2048,10", "gin-bn", 2000, 0.1, 0.1, "loss")
    iso = resolve(TrainConfig(task="exp-iso", preset="paper"))
    assert (iso.iso_seeds, iso.hidden_sizes, iso.eval_samples) == (100, "2048,4096,2048", 10)
    assert resolve(TrainConfig(task="graph8c", preset="paper")).iso_seeds == 100
    with pytest.raises(ValueError, match="--preset must be one of"):
        resolve(TrainConfig(task="nbody", preset="gpu"))
    with pytest.raises(ValueError, match="--hidden-sizes"):
        resolve(TrainConfig(task="exp-classify", hidden_sizes="12,x"))
    with pytest.raises(ValueError, match="--dist-network must be one of"):
        resolve(TrainConfig(task="nbody", dist_network="cnn"))


def test_paper_exp_mlp_has_25m_parameters_and_the_paper_nbody_model_builds():
    config = resolve(TrainConfig(task="exp-classify", preset="paper", data=str(SHARED_DATA), limit=4))
    needs_data("exp-classify")
    model = build_model(config, load_splits(config).info)
    assert 25_000_000 < sum(p.numel() for p in model.backbone.parameters()) < 26_000_000
    nbody = resolve(TrainConfig(task="nbody", preset="paper", n_train=8, n_val=8, n_test=8))
    model = build_model(nbody, load_splits(nbody).info)
    assert isinstance(model.backbone, BB.PairTransformer) and model.residual is not None
    assert model.distribution.network == "vn-dgcnn" and model.n_samples == 20


def test_cli_takes_the_preset_and_the_new_options(tmp_path):
    from lps_fast.cli import main

    out = tmp_path / "run"
    code = main(["train", "nbody", "--preset", "paper", "--epochs", "1", "--n-train", "16", "--n-val", "8",
                 "--n-test", "8", "--samples", "2", "--eval-samples", "2", "--test-samples", "3", "--test-trials", "2",
                 "--layers", "1", "--width", "16", "--heads", "2", "--dist-width", "12", "--quiet", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preset"] == "paper" and metrics["test_samples"] == 3 and metrics["test"]["trials"] == 2
    assert metrics["select"] == "loss" and metrics["dist_network"] == "vn-dgcnn"


# ---------------------------------------------------------------------------------------------
# Diagnostics and model selection


def test_every_epoch_logs_the_concentration_of_the_distribution(tmp_path):
    result = train(tiny_config("nbody", tmp_path, epochs=2))
    log = [json.loads(line) for line in (tmp_path / "nbody" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for record in log:
        assert 0 < record["val_concentration_permutation"] <= 1
        assert 0 < record["val_concentration_rotation"] <= 1
    assert result.metrics["epochs"] == 2


def test_selection_by_validation_loss_keeps_the_lowest_loss_epoch():
    result = train(tiny_config("nbody", epochs=3, select="loss"))
    losses = [record["val_loss"] for record in result.history]
    assert result.metrics["best_epoch"] == 1 + losses.index(min(losses))


def test_pair_transformer_is_symmetrized_exactly():
    torch.manual_seed(0)
    backbone = BB.PairTransformer(5, node_dim=1, edge_dim=2, point_channels=2, d_model=16, heads=2, layers=1)
    model = lps_fast.Symmetrize(backbone, "SnxE3", D.Uniform(), n_samples=3, output="vector",
                                residual=lps_fast.InputResidual("points", (0,))).double()
    assert model.output_kinds == "position"
    assert_equivariant(model.eval(), particle_inputs(masked=True), generator=torch.Generator().manual_seed(0))
    views = {"nodes": torch.randn(2, 4, 1), "edges": torch.randn(2, 4, 4, 2), "points": torch.randn(2, 4, 3, 2),
             "mask": torch.tensor([[True] * 4, [True, True, False, False]])}
    assert backbone(views).shape == (2, 4, 3, 1)
    for output, shape in (("node", (2, 4, 3)), ("edge", (2, 4, 4, 3)), ("invariant", (2, 3))):
        other = BB.PairTransformer(5, node_dim=1, edge_dim=2, point_channels=2, d_model=16, heads=2, layers=1,
                                   out_dim=3, output=output)
        out = other(views)
        assert out.shape == shape
        if output != "invariant":
            assert bool((out[1, 2:] == 0).all())


# ---------------------------------------------------------------------------------------------
# The paper's isomorphism protocol


def test_isomorphism_protocol_unions_over_model_seeds():
    needs_data("exp-iso")
    result = train(tiny_config("exp-iso", iso_seeds=3))
    test = result.metrics["test"]
    assert test["union_seeds"] == 3
    assert test["pairs"] == test["union_pairs_separated"] + test["union_pairs_not_separated"]
    assert test["union_pairs_separated"] >= test["pairs_separated"]
    assert test["union_control_separated"] >= test["control_separated"]


def test_isomorphism_protocol_on_all_pairs_of_graph8c():
    needs_data("graph8c")
    test = train(tiny_config("graph8c", iso_seeds=2, distribution="none", limit=60)).metrics["test"]
    assert test["pairs"] == 60 * 59 // 2 and test["union_seeds"] == 2
    assert test["union_pairs_not_separated"] <= test["pairs_not_separated"]


# ---------------------------------------------------------------------------------------------
# The results tooling


def test_results_suite_runs_are_recorded_and_reported(tmp_path, monkeypatch):
    suite = results_lib.Suite("tiny-nbody", "nbody", "equal_epochs", ("learned", "uniform"),
                              dict(epochs=1, n_train=32, n_val=16, n_test=16, width=16, layers=1, samples=2,
                                   eval_samples=2, batch_size=16, dist_width=12), "a tiny n-body check")
    monkeypatch.setitem(results_lib.SUITES, suite.name, suite)
    root = tmp_path / "runs"
    assert results_lib.run_suites([suite.name], [0, 1], root, jobs=2) == []
    folders = sorted(root.glob("tiny-nbody/*/seed*"))
    assert len(folders) == 4
    for folder in folders:
        record = json.loads((folder / "run.json").read_text())
        assert record["exit_code"] == 0 and "--threads 1" in record["command"] and record["machine"]
        assert record["revision"] is None or len(record["revision"].split("+")[0]) == 40
        assert not list(folder.glob("*.pt"))  # checkpoints are not kept
    summary = results_lib.write_report(root, tmp_path / "report", tmp_path / "RESULTS.md")
    assert {(r["distribution"], r["seed"]) for r in summary["runs"]} == {
        (d, s) for d in ("learned", "uniform") for s in (0, 1)}
    run = summary["runs"][0]
    assert run["comparison"] == "equal_epochs" and run["epochs"] == 1 and run["test_mse"] > 0 and run["machine"]
    learned = next(r for r in summary["aggregates"] if r["distribution"] == "learned")
    assert learned["seeds"] == [0, 1] and learned["test_mse_std"] >= 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## tiny-nbody: a tiny n-body check" in text and "learned (LPS) | 2 |" in text
    assert "Learned vs group averaging" in text
    on_disk = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert on_disk["runs"] == json.loads(json.dumps(summary["runs"]))
    # a second run skips what is done; a subset of the distributions runs alone
    assert results_lib.run_suites([suite.name], [0], root) == []
    assert results_lib.run_suites([suite.name], [2], root, distributions=("uniform",)) == []
    assert sorted(p.parent.name for p in root.glob("tiny-nbody/*/seed2")) == ["uniform"]
    with pytest.raises(ValueError, match="unknown suite"):
        results_lib.run_suites(["nope"], [0], root)


def test_report_statements_compare_means_and_spreads():
    two = dict(seeds=[0, 1])
    rows = [{"task": "nbody", "distribution": "learned", "test_mse_mean": 0.010, "test_mse_std": 0.001, **two},
            {"task": "nbody", "distribution": "uniform", "test_mse_mean": 0.020, "test_mse_std": 0.001, **two},
            {"task": "nbody", "distribution": "none", "test_mse_mean": 0.0105, "test_mse_std": 0.002, **two}]
    lines = results_lib._statements(rows)
    assert any("group averaging: 0.01 vs 0.02 (50% lower): learned is ahead, by more than" in line for line in lines)
    assert any("no symmetrization" in line and "within the spread" in line for line in lines)
    one = [dict(rows[0], seeds=[0]), dict(rows[1], seeds=[0])]
    assert "one seed: no spread" in results_lib._statements(one)[0]


def test_main_job_runs_are_recorded_as_the_main_comparison(tmp_path):
    from lps_fast.train import compare as compare_lib

    compare_lib.compare(tiny_config("nbody"), ["learned", "none"], out=tmp_path / "main")
    root = tmp_path / "records"
    recorded = results_lib.import_main_job(tmp_path / "main", root)
    assert sorted(p.parent.name for p in recorded) == ["learned", "none"]
    runs = results_lib.collect(root)
    assert {r["comparison"] for r in runs} == {"main"} and all(r["command"] == "lps-fast main" for r in runs)
    with pytest.raises(FileNotFoundError, match="run lps-fast main first"):
        results_lib.import_main_job(tmp_path / "nothing", root)
