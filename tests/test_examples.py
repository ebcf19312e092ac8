"""The scripts in examples/ run as a user runs them (at their --tiny size)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPOSITORY / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_runs_at_tiny_size(script):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True, text=True, cwd=REPOSITORY,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "equivariance error" in result.stdout
    assert "step    3" in result.stdout, result.stdout


def test_there_are_examples():
    assert {"point_cloud_so3", "graph_classifier_sn", "particles_snxe3"} <= {path.stem for path in EXAMPLES}
