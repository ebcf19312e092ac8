"""Shared test helpers: random inputs, tolerances and a comparison that explains itself."""

from __future__ import annotations

from typing import Optional

import torch

# Per-dtype (atol, rtol) for reductions; gathers are compared exactly.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def tolerance(dtype: torch.dtype):
    return TOLERANCES[dtype]


def random_perm(batch: int, k: int, n: int, generator: Optional[torch.Generator] = None, device="cpu"):
    """(B, k, n) int64, every row a uniformly random permutation."""
    keys = torch.rand(batch, k, n, generator=generator)
    return torch.argsort(keys, dim=-1).to(device)


def random_soft(batch: int, k: int, n: int, dtype=torch.float32, device="cpu"):
    """A positive (B, k, n, n) matrix standing in for a Sinkhorn output."""
    return torch.rand(batch, k, n, n, dtype=dtype, device=device).softmax(dim=-1)


def assert_close(actual, expected, *, dtype=None, exact=False, atol=None, rtol=None, name="output"):
    """torch.testing.assert_close with per-dtype defaults and a report of where values differ."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if exact:
        atol, rtol = 0.0, 0.0
    elif atol is None or rtol is None:
        d_atol, d_rtol = tolerance(dtype or expected.dtype)
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
    a = actual.detach().to(torch.float64) if actual.is_floating_point() else actual.detach()
    e = expected.detach().to(torch.float64) if expected.is_floating_point() else expected.detach()
    if a.is_floating_point():
        bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    else:
        bad = a != e
    if bool(bad.any()):
        count = int(bad.sum())
        first = [tuple(int(i) for i in idx) for idx in bad.nonzero()[:5]]
        diff = (a - e).abs() if a.is_floating_point() else (a != e).to(torch.int64)
        worst = diff.nan_to_num(float("inf")).max()
        samples = ", ".join(f"{idx}: {a[idx].item()} vs {e[idx].item()}" for idx in first)
        raise AssertionError(
            f"{name}: {count} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"largest difference {float(worst):.3g}; first at {samples}"
        )


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A NaN-filled (or extreme-valued) tensor: output memory nobody wrote cannot pass."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, torch.iinfo(t.dtype).min if t.dtype != torch.bool else True)


def ids(**params) -> str:
    return "-".join(f"{k}{v}" for k, v in params.items())


def clone_inputs(inputs):
    """Fresh leaves: floating tensors that required grad keep requiring it."""
    cloned = []
    for value in inputs:
        if isinstance(value, torch.Tensor):
            leaf = value.detach().clone()
            if value.requires_grad:
                leaf.requires_grad_(True)
            cloned.append(leaf)
        else:
            cloned.append(value)
    return cloned


def run_with_grads(fn, inputs, upstream=None, seed=1234):
    """Run ``fn(*inputs)`` and backpropagate one shared upstream gradient; returns
    (outputs, {input index: grad}). ``upstream`` defaults to a seeded random tensor; either way
    it is moved to the output's device and dtype."""
    import lps_fast  # noqa: F401

    inputs = clone_inputs(inputs)
    out = fn(*inputs)
    first = out[0] if isinstance(out, tuple) else out
    grads = {}
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        if upstream is None:
            generator = torch.Generator().manual_seed(seed)
            upstream = torch.randn(first.shape, generator=generator, dtype=torch.float64)
        # drawn on the CPU for reproducibility, then moved to where backward needs it
        upstream = upstream.to(device=first.device, dtype=first.dtype)
        first.backward(upstream)
        grads = {i: t.grad for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad}
    return out, grads


def compare_backends(op_name, inputs, backend, *, exact_forward=False, dtype=None, atol=None, rtol=None,
                     grad_atol=None, grad_rtol=None):
    """Run ``lps_fast.<op_name>`` on ``backend`` and on the reference; compare the outputs and
    the gradients of every input that requires grad (one shared upstream gradient)."""
    import lps_fast

    fn = getattr(lps_fast, op_name)
    with lps_fast.use_backend(backend):
        fast_out, fast_grads = run_with_grads(fn, inputs)
    with lps_fast.use_backend("reference"):
        ref_out, ref_grads = run_with_grads(fn, inputs)
    fast_list = fast_out if isinstance(fast_out, tuple) else (fast_out,)
    ref_list = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    for index, (a, e) in enumerate(zip(fast_list, ref_list)):
        assert a.dtype == e.dtype, f"{op_name} output {index}: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, exact=exact_forward or not e.is_floating_point(), dtype=dtype, atol=atol, rtol=rtol,
                     name=f"{op_name} output {index}")
    assert fast_grads.keys() == ref_grads.keys()
    for index in ref_grads:
        assert_close(fast_grads[index], ref_grads[index], dtype=dtype, atol=grad_atol, rtol=grad_rtol,
                     name=f"{op_name} grad of input {index}")
    return fast_out, fast_grads
