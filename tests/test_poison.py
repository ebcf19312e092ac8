"""The NaN-poison fixture really poisons allocations made inside our C++ kernels."""

import pytest
import torch

import lps_fast


@pytest.mark.usefixtures("poison_uninitialized")
def test_uninitialized_memory_is_poisoned():
    assert torch.isnan(torch.empty(16)).all()
    assert lps_fast.backend_info()["cpu_extension"]["loaded"]
    # a kernel output that is fully written is NaN-free even though its buffer started as NaN
    x = torch.randn(2, 5, 3)
    perm = torch.argsort(torch.rand(2, 4, 5), dim=-1)
    assert torch.isfinite(torch.ops.lps_fast.permute_nodes(x, perm)).all()
