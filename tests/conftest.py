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
