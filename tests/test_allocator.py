"""lps_fast.allocator: the lps-fast commands' processes keep freed memory (glibc), so a buffer
freed and allocated again does not fault in fresh pages; LPS_FAST_KEEP_FREED_MEMORY=0 opts out.
Each case runs in a fresh interpreter: the setting is per process and cannot be undone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lps_fast import allocator
from test_cli import TINY_NBODY

# glibc's own malloc serves the process (not jemalloc or tcmalloc preloaded in its place)
GLIBC = (sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
         and "malloc" not in os.environ.get("LD_PRELOAD", ""))

# Faults of allocating, filling and freeing a 64 MB tensor, call after call: with glibc's
# defaults the block is mmapped and unmapped each time (about 16384 pages faulted in again);
# kept, the later calls reuse the pages of the first ones (the first two may still grow the heap).
FAULTS = textwrap.dedent("""
    import json, resource, sys
    from lps_fast import allocator
    setting = allocator.keep_freed_memory() if sys.argv[1] == "keep" else allocator.setting()
    import torch
    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(16 * 1024 * 1024).fill_(1.0)
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"setting": setting, "faults": [faults() for _ in range(8)]}))
""")


def _run(*args: str, env_value=None) -> dict:
    env = dict(os.environ)
    env.pop(allocator.ENVIRONMENT_VARIABLE, None)
    if env_value is not None:
        env[allocator.ENVIRONMENT_VARIABLE] = env_value
    result = subprocess.run([sys.executable, "-c", FAULTS, *args], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_kept_memory_stops_the_page_faults_of_a_reallocated_buffer():
    kept = _run("keep")
    default = _run("leave")
    assert kept["setting"] == allocator.KEPT
    assert default["setting"] == allocator.DEFAULT
    # glibc's defaults: every call faults its pages in again (16384 of 4 KB; fewer, still many,
    # where transparent huge pages back the block); kept: the later calls fault none, or nearly
    assert min(default["faults"]) >= 16
    assert max(kept["faults"][4:]) * 10 < min(default["faults"])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_the_environment_variable_opts_out():
    declined = _run("keep", env_value="0")
    assert declined["setting"] == allocator.DECLINED
    assert min(declined["faults"]) >= 16
    assert _run("keep", env_value="1")["setting"] == allocator.KEPT


def test_the_training_commands_keep_freed_memory_and_record_it(tmp_path):
    """``lps-fast train`` in a process of its own: metrics.json records the setting."""
    code = "import sys; from lps_fast import cli; sys.exit(cli.main(sys.argv[1:]))"
    env = dict(os.environ, LPS_FAST_CACHE=str(tmp_path / "cache"))
    env.pop(allocator.ENVIRONMENT_VARIABLE, None)
    for value, expected in ((None, allocator.KEPT if GLIBC else allocator.UNAVAILABLE), ("0", allocator.DECLINED)):
        if value is not None:
            env[allocator.ENVIRONMENT_VARIABLE] = value
        out = tmp_path / f"run-{value}"
        result = subprocess.run([sys.executable, "-c", code, "train", "nbody", *TINY_NBODY, "--epochs", "1",
                                 "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads((out / "metrics.json").read_text())["malloc"] == expected
