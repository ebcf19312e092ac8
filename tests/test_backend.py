"""backend_info() tells the truth, the switches work, and a broken binary degrades cleanly."""

import os
import subprocess
import sys

import pytest
import torch

import lps_fast
from lps_fast import _backend, _ops, _registry


def test_backend_info_reports_every_op_and_part():
    info = lps_fast.backend_info()
    assert set(info["ops"]) == set(_ops.OP_NAMES)
    for key in ("cpu_extension", "cuda_extension", "triton"):
        assert key in info
    assert info["torch"] == torch.__version__
    text = lps_fast.format_backend_info(info)
    for op in _ops.OP_NAMES:
        assert op in text


def test_backend_info_matches_dispatch():
    info = lps_fast.backend_info()
    for op, row in info["ops"].items():
        assert row["cpu"] == _backend.resolve(op, torch.device("cpu")).name
        assert row["cuda"] == _backend.resolve(op, torch.device("cuda")).name
        # the chosen provider really has the op, and the compiled kernels are preferred on CPU
        assert op in _backend.providers[row["cpu"]].ops
        cpp = _backend.providers.get("cpp")
        if cpp is not None and op in cpp.ops:
            assert row["cpu"] == "cpp"


def test_compiled_ops_are_the_registered_kernels():
    info = lps_fast.backend_info()
    cpu_loaded = info["cpu_extension"]["loaded"]
    for op in _backend.providers.get("cpp", _backend.Provider("cpp", ())).ops:
        assert cpu_loaded
        for member in _ops.FAMILIES[op]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(_ops.qualified(member), "CPU")


def test_cuda_extension_built_when_nvcc_present():
    """CI has nvcc and a CUDA build of torch: the CUDA sources must compile and load there."""
    import shutil

    if torch.version.cuda is None or shutil.which("nvcc") is None or os.environ.get("LPS_FAST_CPU_ONLY"):
        pytest.skip("no CUDA toolchain in this environment")
    info = lps_fast.backend_info()["cuda_extension"]
    assert info["loaded"], info["error"]
    assert info["cuda_runtime"] > 0
    cuda = _backend.providers["cuda"]
    for op in cuda.ops:
        for member in _ops.FAMILIES[op]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(_ops.qualified(member), "CUDA")


def test_use_backend_switches_and_restores():
    before = lps_fast.backend_info()["ops"]
    with lps_fast.use_backend("reference"):
        forced = lps_fast.backend_info()
        assert forced["forced_backend"] == "reference"
        assert all(row == {"cpu": "reference", "cuda": "reference"} for row in forced["ops"].values())
    assert lps_fast.backend_info()["ops"] == before


def test_forcing_applies_only_to_served_devices():
    if "cuda" not in _backend.providers:
        pytest.skip("no CUDA extension")
    with lps_fast.use_backend("cuda"):
        # CPU tensors keep their default provider
        for op in _ops.OP_NAMES:
            assert _backend.resolve(op, torch.device("cpu")).name == _registry.backend_info()["ops"][op]["cpu"]


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        lps_fast.set_backend("fastest")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)


def test_broken_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['lps_fast._C'] = None\n"  # makes `import lps_fast._C` fail like a broken binary
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import lps_fast\n"
        "msgs = [str(w.message) for w in caught if 'lps_fast._C ' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "import torch\n"
        "info = lps_fast.backend_info()\n"
        "assert not info['cpu_extension']['loaded']\n"
        "assert all(row['cpu'] == 'reference' for row in info['ops'].values()), info['ops']\n"
        "x = torch.randn(2, 4, 3); p = torch.stack([torch.randperm(4) for _ in range(6)]).view(2, 3, 4)\n"
        "assert lps_fast.permute_nodes(x, p).shape == (2, 3, 4, 3)\n"
        "print('ok')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_env_backend_is_read_at_import():
    code = "import lps_fast; print(lps_fast.backend_info()['forced_backend'])"
    result = _run_python(code, LPS_FAST_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("reference")
    result = _run_python(code, LPS_FAST_BACKEND="bogus")
    assert result.returncode == 0, result.stderr
    assert "LPS_FAST_BACKEND ignored" in result.stderr
