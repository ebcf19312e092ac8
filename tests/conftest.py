import os

# Triton kernels run on CPU tensors through the interpreter when no GPU is present; the switch
# must be set before triton (imported by lps_fast) decorates the kernels.
try:
    import torch

    _has_gpu = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lps_fast  # noqa: E402


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def restore_backend():
    previous = lps_fast._backend.state.forced
    yield
    lps_fast._backend.state.forced = previous


@pytest.fixture
def poison_uninitialized():
    """Every torch.empty (ours in C++ included) comes back NaN-filled, so an output element a
    kernel forgot to write cannot pass a comparison."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = previous_fill
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def compiled_cpu_backends():
    """Fast providers whose kernels run on CPU tensors in this test session."""
    provider = lps_fast._backend.providers.get("cpp")
    return ["cpp"] if provider is not None and provider.ops else []


@pytest.fixture(params=compiled_cpu_backends() or [pytest.param("cpp", marks=pytest.mark.skip("no CPU kernels"))])
def cpu_backend(request):
    return request.param
