"""What a first GPU run depends on, checked without a GPU: gradients built on the output's
device, 64-bit addressing in the Triton scatter-means, device guards around every Triton
launch, the CUDA grid-stride index width, the launch fallback of the interpreter, the compile
check's specialization, the benchmark exit status and the dry run of benchmarks/gpu_check.sh."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_with_grads

import lps_fast
from lps_fast import _backend

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED_TRITON = "triton" in _backend.providers and lps_fast.backend_info()["triton"]["interpret"]
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED_TRITON or torch.cuda.is_available(), reason="runs the Triton launchers under TRITON_INTERPRET=1"
)


# ---------------------------------------------------------------------------------------------
# The upstream gradient of the test helpers follows the output's device and dtype


def test_run_with_grads_builds_the_upstream_gradient_on_the_output_device():
    V = torch.empty(4, 3, 3, device="meta", dtype=torch.float16, requires_grad=True)
    out, grads = run_with_grads(lps_fast.reference.gram_schmidt, [V])
    assert out.device.type == "meta"
    assert grads[0].device.type == "meta" and grads[0].dtype == torch.float16
    given = torch.ones(4, 3, 3, dtype=torch.float64)  # a CPU upstream gradient is moved as well
    _, grads = run_with_grads(lps_fast.reference.gram_schmidt, [V], upstream=given)
    assert grads[0].device.type == "meta"


# ---------------------------------------------------------------------------------------------
# 64-bit addressing: a sample stride whose multiples pass 2^31 elements


STRIDE = 2**30 + 8  # fits int32; 2 * STRIDE does not


def _huge_storage(samples: int, dtype=torch.float16):
    """Virtual memory for ``samples`` rows ``STRIDE`` elements apart, placed 2^31 elements into
    the allocation, so that an offset wrapped to int32 still lands inside it (and reads a
    sentinel) instead of faulting. torch.empty touches no page: only written ones are backed."""
    pad = 2**31
    try:
        storage = torch.empty(pad + (samples - 1) * STRIDE + 64, dtype=dtype)
    except RuntimeError as exc:  # a machine that refuses an 8 GB virtual allocation
        pytest.skip(f"cannot reserve the address space: {exc}")
    wrapped = pad + (samples - 1) * STRIDE - 2**32
    storage[wrapped : wrapped + 64] = 100.0
    return storage, pad


@needs_interpreter
def test_scatter_mean_addresses_samples_past_2_31_elements():
    from lps_fast.kernels import permute

    storage, pad = _huge_storage(3)
    values = [1.0, 2.0, 6.0]
    for j, value in enumerate(values):
        storage[pad + j * STRIDE] = value
    y = storage.as_strided((1, 3, 1, 1), (0, STRIDE, 1, 1), pad)  # (B, k, n, F)
    perm = torch.zeros(1, 3, 1, dtype=torch.int64)
    out = permute.unpermute_mean(y, perm, edges=False)
    assert out.item() == pytest.approx(3.0)


@needs_interpreter
@pytest.mark.parametrize("with_perm", [False, True], ids=["identity", "perm"])
def test_frame_unapply_mean_addresses_samples_past_2_31_elements(with_perm):
    from lps_fast.kernels import frame

    storage, pad = _huge_storage(3)
    for j in range(3):
        for m in range(3):
            storage[pad + j * STRIDE + m] = float(j * 3 + m)
    y = storage.as_strided((1, 3, 1, 3, 1), (0, STRIDE, 3, 1, 1), pad)  # (B, k, n, 3, C)
    R = torch.eye(3, dtype=torch.float16).expand(1, 3, 3, 3)
    perm = torch.zeros(1, 3, 1, dtype=torch.int64) if with_perm else None
    out = frame.frame_unapply_mean(y, R, perm, None)
    assert out.flatten().tolist() == [3.0, 4.0, 5.0]  # mean over j of (3 j + m)


def test_triton_sample_loops_never_multiply_the_loop_counter_by_a_stride():
    """The loop counter of ``for j in range(k)`` is int32 in compiled Triton: ``j * stride``
    wraps, so the kernels step pointers instead (the tests above show the effect)."""
    for path in (ROOT / "kernels").glob("*.py"):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            loop = re.match(r"(\s*)for (\w+) in (?:tl\.)?range\(", line)
            if not loop:
                continue
            indent, counter = len(loop.group(1)), loop.group(2)
            for body in lines[number + 1 :]:
                if body.strip() and len(body) - len(body.lstrip()) <= indent:
                    break
                assert not re.search(rf"\b{counter} \* \w*stride", body), f"{path.name}: {body.strip()}"


# ---------------------------------------------------------------------------------------------
# Device guards: every Triton launch runs on the device of its tensors


def test_device_guard_selects_the_tensor_gpu_and_is_a_no_op_on_cpu():
    from lps_fast.kernels import _launch

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    guard = _launch.device_guard(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_launch.device_guard(torch.zeros(1)), contextlib.nullcontext)


def test_every_triton_launch_runs_inside_a_device_guard(monkeypatch):
    from lps_fast.kernels import _launch, compile_check

    state = {"guarded": None}
    launches = []

    @contextlib.contextmanager
    def guard(tensor):
        state["guarded"] = tensor.device
        try:
            yield
        finally:
            state["guarded"] = None

    def wrap(kernel):
        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                    launches.append((kernel.__name__, state["guarded"], devices))

                return run

        return Launch()

    monkeypatch.setattr(_launch, "device_guard", guard)
    monkeypatch.setattr(_launch, "_wrap", wrap)
    compile_check._exercise_ops((torch.float32,))
    kernels = set()
    for path in (ROOT / "kernels").glob("*.py"):
        kernels |= set(re.findall(r"@triton\.jit\ndef (\w+_kernel)\(", path.read_text()))
    assert {name for name, _, _ in launches} == kernels  # every kernel of every family
    for name, guarded, devices in launches:
        assert guarded is not None, f"{name} launched outside a device guard"
        assert devices == {guarded}, (name, guarded, devices)


def test_launchers_go_through_the_guarded_launch():
    for path in (ROOT / "kernels").glob("*.py"):
        if path.name in ("_launch.py", "compile_check.py"):
            continue
        assert "wrap_triton(" not in path.read_text(), f"{path.name} launches without the device guard"


# ---------------------------------------------------------------------------------------------
# Interpreter launches where torch's wrap_triton refuses interpreted kernels


def test_launch_falls_back_to_the_interpreted_kernel_only_when_interpreting(monkeypatch):
    from lps_fast.kernels import _launch

    def refuse(kernel):
        raise RuntimeError("wrap_triton only works on functions annotated with triton.jit")

    monkeypatch.setattr(torch.library, "wrap_triton", refuse)
    kernel = object()
    monkeypatch.setattr(_launch, "INTERPRETING", True)
    assert _launch._wrap(kernel) is kernel
    monkeypatch.setattr(_launch, "INTERPRETING", False)
    with pytest.raises(RuntimeError, match="wrap_triton"):
        _launch._wrap(kernel)


# ---------------------------------------------------------------------------------------------
# compile_check compiles what a real launch compiles


def test_compile_check_specializes_like_triton_launches():
    pytest.importorskip("triton.backends.nvidia.compiler")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    from lps_fast.kernels.compile_check import specialize

    def kernel(x_ptr, n, stride, step, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(x_ptr + offsets * stride, tl.load(x_ptr + offsets * step), mask=offsets < n)

    jitted = JITFunction(kernel)  # compiled form even under TRITON_INTERPRET=1
    backend = make_backend(GPUTarget("cuda", 90, 32))
    x = torch.zeros(64)
    signature, constexprs, attrs, options = specialize(jitted, (x, 37, 1, 32), dict(BLOCK=64, num_warps=2), backend)
    named = {jitted.arg_names[path[0]]: value for path, value in constexprs.items()}
    assert named == {"stride": 1, "BLOCK": 64}  # an integer equal to 1 is a constant of the variant
    hinted = {jitted.arg_names[path[0]] for path, hint in attrs.items() if hint}
    assert hinted == {"x_ptr", "step"}  # 16-byte aligned pointer, multiple of 16
    assert signature["n"] == "i32" and options.num_warps == 2


# ---------------------------------------------------------------------------------------------
# CUDA grid-stride loops: the int32 variant only when every index they form fits


def _grid_plan():
    extension = lps_fast._registry.extensions["cpu"]
    if not extension.loaded:
        pytest.skip("the CPU extension is not built")
    import lps_fast._C as compiled

    if not hasattr(compiled, "grid_plan"):
        pytest.skip("the CPU extension predates grid_plan: rebuild it")
    return compiled.grid_plan


def test_grid_plan_counts_the_stride_past_the_last_index():
    plan = _grid_plan()
    sms, threads = 132, 256
    stride = sms * 32 * threads  # the grid is capped at 32 blocks per SM
    int_max = 2**31 - 1
    assert plan(1000, 1000, threads, sms) == (4, True)
    assert plan(0, 0, threads, sms) == (1, True)
    assert plan(int_max - stride, int_max - stride, threads, sms) == (sms * 32, True)
    # below INT_MAX, but index + stride is not: the old test (count < INT_MAX) chose int32
    total = int_max - stride + 1
    assert plan(total, total, threads, sms) == (sms * 32, False)
    assert plan(2**31 - 2**20, 2**31 - 2**20, threads, sms)[1] is False
    # a small loop over a large tensor: its offsets decide
    assert plan(1000, 2**31, threads, sms) == (4, False)


def test_cuda_launchers_choose_the_index_width_with_grid_plan():
    """Every int32 instantiation of a grid-stride kernel is launched with a plan's grid, under
    that plan's int32 test (the plan is what the test above checks)."""
    for path in (ROOT / "csrc" / "cuda").glob("*.cu"):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if "int32_t" in line and "<<<" in line:
                assert "<<<plan.blocks" in line, f"{path.name}:{number + 1}: {line.strip()}"
                preceding = "\n".join(lines[max(0, number - 6) : number])
                assert "plan.int32" in preceding, f"{path.name}:{number + 1} not under plan.int32"


# ---------------------------------------------------------------------------------------------
# Benchmarks report a red gate in their exit status


def test_benchmark_exit_status_follows_the_gate():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import harness
    finally:
        sys.path.pop(0)
    ok = {"status": "ok", "provider": "cpp", "case": "c", "scale": "s", "mode": "fwd"}
    assert harness.exit_status([ok]) == 0
    assert harness.exit_status([ok, dict(ok, status="mismatch", error="differs")]) == 1
    assert harness.exit_status([dict(ok, status="error", error="raised")]) == 1
    for path in (ROOT / "benchmarks").glob("bench_*.py"):
        assert "sys.exit(harness.exit_status(main()))" in path.read_text(), path.name


# ---------------------------------------------------------------------------------------------
# benchmarks/gpu_check.py and gpu_check.sh without a GPU


def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_gpu_check_lists_every_op_dtype_and_shape(capsys):
    gpu_check = _gpu_check()
    assert gpu_check.main(["correctness", "--device", "cpu", "--providers", "reference", "--list"]) == 0
    names = [line for line in capsys.readouterr().out.splitlines() if line.startswith("CHECK")]
    text = "\n".join(names)
    for op in lps_fast._ops.OP_NAMES:
        assert f"reference {op} " in text, op
    for needle in ("fp32", "bf16", "fp16", "fp64", "2x189", "2x257", "2x1x", "mask(real=[0, 1, 1])", "(nc)",
                   "grad-stride0", "1x9x1500", "1x9x3x300", "n=1000", "n=4096", "diagonal"):
        assert needle in text, needle
    assert gpu_check.main(["compile", "--device", "cpu", "--providers", "reference", "--list"]) == 0
    assert capsys.readouterr().out.count("torch.compile(fullgraph=True)") == 4


def test_gpu_check_runs_its_checks_on_cpu(capsys):
    gpu_check = _gpu_check()
    if "cpp" not in _backend.providers:
        pytest.skip("no compiled CPU kernels")
    status = gpu_check.main(["correctness", "--device", "cpu", "--providers", "cpp", "--small", "--only", " fp32 2x"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count("\nPASS ") >= 20 and "FAIL" not in out
    if INTERPRETED_TRITON:  # one interpreted check: the same runner drives the Triton kernels
        status = gpu_check.main(["correctness", "--device", "cpu", "--providers", "triton", "--small", "--only",
                                 "triton unpermute_mean fp32 2x3x5"])
        out = capsys.readouterr().out
        assert status == 0 and out.count("\nPASS ") == 1, out


def test_gpu_check_reports_a_failing_check(capsys, monkeypatch):
    gpu_check = _gpu_check()
    if "cpp" not in _backend.providers:
        pytest.skip("no compiled CPU kernels")
    original = gpu_check.run_op

    def off_by_a_little(op, provider, *args, **kwargs):
        outs, grads = original(op, provider, *args, **kwargs)
        if provider == "cpp":
            outs = [o * 1.001 if o.is_floating_point() else o for o in outs]
        return outs, grads

    monkeypatch.setattr(gpu_check, "run_op", off_by_a_little)
    status = gpu_check.main(["correctness", "--device", "cpu", "--providers", "cpp", "--small", "--only", "unpermute_mean fp32 2x3x5"])
    out = capsys.readouterr().out
    assert status == 1 and "FAIL cpp unpermute_mean" in out and "relative error" in out


def test_gpu_check_sh_dry_run_ends_with_a_verdict(tmp_path):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True).returncode == 2
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(script), "--dry-run", "--out", str(tmp_path), "--stages", "preflight,build,sanitizer,summary"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert lines[-1].startswith("GPU CHECK DRY RUN PASS"), lines[-5:]
    preflight = (tmp_path / "preflight.log").read_text()
    assert "torch:" in preflight and ("SKIP gpu" in preflight or "PASS gpu" in preflight)
