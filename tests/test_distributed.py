"""Multi-process training: two CPU processes under torchrun (gloo) train a tiny n-body model for
one epoch; both must end with identical parameters and the same (all-reduced) metrics, and only
rank 0 may write the run's files. Then a run bounded by a time budget, which the processes must
end on the same step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

WORKER = textwrap.dedent("""
    import os, sys, torch
    from lps_fast.train import TrainConfig, train

    folder = sys.argv[1]
    result = train(TrainConfig(
        task="nbody", n_train=60, n_val=30, n_test=30, width=16, layers=1, samples=2, eval_samples=2,
        dist_width=16, dist_layers=1, epochs=1, batch_size=15, device="cpu", quiet=True,
        out=os.path.join(folder, "run")))
    # a wall-clock budget: the processes must agree on when it ends (or they would hang)
    timed = train(TrainConfig(
        task="nbody", n_train=240, n_val=30, n_test=30, width=16, layers=1, samples=2, eval_samples=2,
        dist_width=16, dist_layers=1, time_budget=1.5, batch_size=4, device="cpu", quiet=True))
    torch.save({"state": result.model.state_dict(), "metrics": result.metrics, "history": result.history,
                "timed_steps": timed.metrics["steps"], "timed_state": timed.model.state_dict()},
               os.path.join(folder, "rank{}.pt".format(os.environ["RANK"])))
""")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_two_gloo_processes_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, LPS_FAST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    first, second = ranks
    for name, value in first["state"].items():
        assert torch.equal(value, second["state"][name]), f"{name} differs between ranks"
    assert first["metrics"]["world_size"] == 2
    assert first["metrics"]["test"] == second["metrics"]["test"]
    assert first["metrics"]["val"] == second["metrics"]["val"]
    assert first["history"][0]["train_loss"] == second["history"][0]["train_loss"]
    # 60 systems, 2 processes, batches of 15: 2 steps each, every system seen once per epoch
    assert first["metrics"]["steps"] == 2
    assert first["metrics"]["test"]["graphs"] == 30 and first["metrics"]["val"]["graphs"] == 30
    assert first["timed_steps"] == second["timed_steps"] >= 1
    for name, value in first["timed_state"].items():
        assert torch.equal(value, second["timed_state"][name]), f"{name} differs after a timed run"
    # only rank 0 writes the run's files
    written = sorted(path.name for path in (tmp_path / "run").iterdir())
    assert written == ["best.pt", "config.json", "last.pt", "log.jsonl", "metrics.json"]
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 1
