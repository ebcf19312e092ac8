"""Checking equivariance exactly: ``model(g . x, noise=g . eps) == g . model(x, noise=eps)``.

A symmetrized model is equivariant in distribution; with its random draws fixed and moved by
the same group element as the input, it is equivariant exactly (up to rounding), which is what
:func:`assert_equivariant` checks.
"""

from __future__ import annotations

import copy
from typing import Dict, Mapping, Optional, Union

import torch

from .groups import Group, GroupElement, Inputs
from .symmetrize import Symmetrize

# (atol, rtol) per dtype when none are given.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-8, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (5e-3, 5e-3),
}


def _cast_inputs(inputs: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in inputs.items():
        if value is None:
            continue
        out[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return out


def _as_dict(value, kinds) -> Dict[str, torch.Tensor]:
    if isinstance(kinds, str):
        return {"output": value}
    return {name: value[name] for name in kinds}


def assert_equivariant(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    group: Optional[Group] = None,
    *,
    output: Union[str, Mapping[str, str], None] = None,
    noise: Optional[Dict[str, torch.Tensor]] = None,
    element: Optional[GroupElement] = None,
    dtype: Optional[torch.dtype] = torch.float64,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    check_aux: bool = True,
) -> Dict[str, float]:
    """Check ``model(g . x, noise=g . eps) == g . model(x, noise=eps)`` for a random ``g``.

    Args:
        model: a :class:`lps_fast.Symmetrize` (or any module mapping an inputs dict to outputs;
            then ``group`` and ``output`` are required and no noise is passed).
        inputs: the inputs dict (``nodes``, ``edges``, ``points``, ``globals``, ``mask``).
        group: the group to check (default ``model.group``).
        output: output kind(s) (default ``model.output_kinds``: ``model.output``, or ``position`` for a
            vector output with a residual of positions).
        noise: the random draws ``eps`` (default: drawn with ``generator``).
        element: the group element ``g`` (default: a random one, with ``generator``).
        dtype: run a copy of the model and the inputs in this dtype (float64 by default, so
            rounding does not hide a bug); None keeps the model as it is.
        atol, rtol: tolerances (default by dtype: float64 1e-8/1e-7, float32 1e-5/1e-5).
        check_aux: also require the auxiliary losses to be invariant.

    Returns ``{name: largest absolute deviation}`` per output (and ``aux/<name>``); raises an
    ``AssertionError`` naming every output whose deviation exceeds ``atol + rtol * |expected|``.
    The model keeps its mode (train or eval); its own dropout must be off for an exact check.
    """
    is_symmetrized = isinstance(model, Symmetrize)
    group = group if group is not None else getattr(model, "group", None)
    kinds = output if output is not None else getattr(model, "output_kinds", getattr(model, "output", None))
    if group is None or kinds is None:
        raise ValueError("assert_equivariant needs group and output for a model that is not lps_fast.Symmetrize")
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    inputs = _cast_inputs(dict(inputs), dtype)
    run_dtype = Inputs.from_dict(inputs).dtype
    default_atol, default_rtol = DEFAULT_TOLERANCES.get(run_dtype, (1e-5, 1e-5))
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol

    if element is None:
        element = group.random_element(inputs, generator=generator)
    mask = inputs.get("mask")
    moved_inputs = group.act_inputs(element, inputs)

    with torch.no_grad():
        if is_symmetrized:
            if noise is None:
                noise = model.draw_noise(inputs, generator=generator)
            noise = _cast_inputs(noise, dtype)
            k = next(iter(noise.values())).shape[1] if noise else None
            specs = model.noise_spec(inputs, n_samples=k)
            moved_noise = {name: group.act(element, value, specs[name].kind) for name, value in noise.items()}
            out, aux = model(inputs, noise=noise)
            moved_out, moved_aux = model(moved_inputs, noise=moved_noise)
        else:
            out, moved_out = model(inputs), model(moved_inputs)
            out = out[0] if isinstance(out, tuple) else out
            moved_out = moved_out[0] if isinstance(moved_out, tuple) else moved_out
            aux, moved_aux = {}, {}

    report: Dict[str, float] = {}
    failures = []
    kind_of = {"output": kinds} if isinstance(kinds, str) else dict(kinds)
    actual, reference = _as_dict(moved_out, kinds), _as_dict(out, kinds)
    pairs = []
    for name, kind in kind_of.items():
        pairs.append((name, actual[name], group.act(element, reference[name], kind, mask=mask)))
    if check_aux:
        for name in aux:
            pairs.append((f"aux/{name}", moved_aux[name], aux[name]))
    for name, got, expected in pairs:
        if got.shape != expected.shape:
            failures.append(f"{name}: shape {tuple(got.shape)} != expected {tuple(expected.shape)}")
            report[name] = float("inf")
            continue
        diff = (got.double() - expected.double()).abs()
        deviation = float(diff.max()) if diff.numel() else 0.0
        report[name] = deviation
        bound = atol + rtol * expected.double().abs()
        # NaN compares false with everything: count non-finite values on either side as failures.
        not_finite = ~(torch.isfinite(got) & torch.isfinite(expected))
        out_of_tolerance = (diff > bound) & ~not_finite
        if bool(not_finite.any()):
            failures.append(f"{name}: {int(not_finite.sum())} of {diff.numel()} elements are NaN or Inf "
                            "(in the output or in the transformed expectation): equivariance cannot hold")
        elif bool(out_of_tolerance.any()):
            failures.append(f"{name}: largest deviation {deviation:.3g} (atol={atol:g}, rtol={rtol:g}, "
                            f"{int(out_of_tolerance.sum())} of {diff.numel()} elements out of tolerance)")
    if failures:
        summary = ", ".join(f"{name}={value:.3g}" for name, value in report.items())
        raise AssertionError(f"not equivariant to {group!r}: " + "; ".join(failures) + f" [deviations: {summary}]")
    return report


__all__ = ["assert_equivariant", "DEFAULT_TOLERANCES"]
