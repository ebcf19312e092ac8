"""``Symmetrize``: wrap any backbone so it becomes equivariant by probabilistic symmetrization.

    phi(x) = (1/k) sum_j g_j . f(g_j^-1 . x),   g_j ~ p(g | x)

Example (graph classification with a learned S_n distribution around a plain MLP)::

    import lps_fast
    from lps_fast import backbones, distributions, groups

    model = lps_fast.Symmetrize(
        backbone=backbones.MLP(max_nodes=64, node_dim=2, edge_dim=1, hidden=(256, 256), out_dim=1),
        group=groups.Sn(),
        distribution=distributions.Learned(node_dim=2, edge_dim=1),
        n_samples=10,
        output="invariant",
    )
    out, aux = model({"nodes": x, "edges": adjacency, "mask": mask})  # out: (B, 1)
    loss = criterion(out, y) + sum(aux.values())                      # aux: {"entropy": ...}

The backbone is called once per forward pass on all ``B * k`` transformed inputs, as a dict with
the keys of the inputs (``nodes (B*k, n, *F)``, ``edges (B*k, n, n, *F)``, ``points
(B*k, n, 3, C)``, ``globals (B*k, *F)``) plus ``mask (B*k, n)``; it returns a tensor whose
leading dim is ``B*k`` (or a dict of them when ``output`` is a dict).

A model that predicts a change of its input (n-body: the positions a while later as the input
positions plus a displacement) passes that part as ``residual``: it is added *after* the
average, ``phi(x) = r(x) + (1/k) sum_j g_j . f(g_j^-1 . x)``, so it never passes through the
sampled group elements. Added inside the backbone instead, the input would be transformed by
``g^-1`` and back by ``g``, and the straight-through estimator would send the distribution a
gradient even from a backbone that outputs zero. ``r`` must itself be equivariant (the identity
map of an input is, e.g. :class:`InputResidual`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _backend
from .distributions import Distribution, Identity
from .groups import OUTPUT_KINDS, Group, GroupSample, Inputs, parse, zero_padding

Output = Union[torch.Tensor, Dict[str, torch.Tensor]]
Residual = Callable[[Dict[str, torch.Tensor]], Output]


class InputResidual(nn.Module):
    """The residual ``r(x)`` that returns an input entry unchanged: ``inputs[key][..., channels]``.

    ``InputResidual("points", channels=(0,))`` gives the positions ``(B, n, 3, 1)`` of a model whose
    ``points`` hold ``[position, velocity]``; with ``squeeze=True`` a single channel is returned
    as ``(B, n, 3)``. Equivariant by construction, so the symmetrized model stays equivariant.
    """

    def __init__(self, key: str = "points", channels: Optional[Sequence[int]] = None, squeeze: bool = False):
        super().__init__()
        self.key, self.squeeze = key, bool(squeeze)
        self.channels = None if channels is None else tuple(int(c) for c in channels)
        if self.squeeze and (self.channels is None or len(self.channels) != 1):
            raise ValueError("squeeze=True needs exactly one channel")

    def extra_repr(self) -> str:
        return f"key={self.key!r}, channels={self.channels}, squeeze={self.squeeze}"

    def kind(self, group: Group) -> Optional[str]:
        """How ``group`` acts on the returned value (an output kind), or None when no single kind
        describes it (points channels that mix translated and untranslated ones)."""
        if self.key == "nodes":
            return "node"
        if self.key == "edges":
            return "edge"
        if self.key == "globals":
            return "invariant"
        if self.key != "points":
            return None
        if not group.translation:
            return "vector"
        channels = set(self.channels) if self.channels is not None else None
        positions = set(group.position_channels)
        if channels is not None and channels <= positions:
            return "position"
        if channels is not None and not channels & positions:
            return "vector"
        return None

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if inputs.get(self.key) is None:
            raise ValueError(f"InputResidual reads inputs[{self.key!r}], which the inputs do not have")
        value = inputs[self.key]
        if self.channels is None:
            return value
        if max(self.channels) >= value.shape[-1]:
            raise ValueError(f"InputResidual channels {self.channels} out of range for inputs[{self.key!r}] "
                             f"with {value.shape[-1]} channels")
        out = value[..., list(self.channels)]
        return out[..., 0] if self.squeeze else out


class Symmetrize(nn.Module):
    """Make ``backbone`` equivariant to ``group`` by averaging over samples of ``distribution``.

    Args:
        backbone: any ``nn.Module`` taking the dict of views described in the module docstring.
        group: a :mod:`lps_fast.groups` group (or its name, e.g. ``"SnxO3"``).
        distribution: a :mod:`lps_fast.distributions` distribution (None: no symmetrization).
        n_samples: samples per input in training mode (``k``).
        eval_n_samples: samples per input in eval mode (default ``n_samples``).
        output: the output kind, or a dict ``{name: kind}`` when the backbone returns a dict;
            kinds: ``invariant``, ``node``, ``edge``, ``diagonal``, ``vector``, ``position``.
        backend: ``"fast"`` (the fastest kernels built) or ``"reference"`` (the pure-PyTorch
            specification), or a provider name accepted by ``lps_fast.use_backend``.
        residual: an equivariant function of the inputs dict added to the averaged output (a
            dict of them for dict outputs, with a subset of the output names), e.g.
            :class:`InputResidual`; see the module docstring.
        check_finite: check the inputs, the noise, the backbone's outputs and the result for
            NaN and Inf on every forward pass, and raise a ``ValueError`` naming the first
            offending tensor (off by default: each check reads values, a device synchronisation,
            and is a graph break under ``torch.compile``).

    ``forward(inputs, noise=None, generator=None)`` returns ``(output, aux_losses)``. ``noise``
    (a dict, see :meth:`draw_noise`) fixes every random draw, so that
    ``model(g . x, noise=g . eps) == g . model(x, noise=eps)`` holds exactly; ``generator``
    draws the noise from a seeded ``torch.Generator`` instead, so an evaluation repeats exactly.

    Floating inputs are cast to the dtype of the model's parameters (see docs/SPEC.md, "Dtypes");
    integer and bool features become that dtype too.
    """

    def __init__(
        self,
        backbone: nn.Module,
        group: Union[Group, str],
        distribution: Optional[Distribution] = None,
        n_samples: int = 10,
        eval_n_samples: Optional[int] = None,
        output: Union[str, Mapping[str, str]] = "invariant",
        backend: str = "fast",
        residual: Optional[Residual] = None,
        check_finite: bool = False,
    ):
        super().__init__()
        self.group = parse(group) if isinstance(group, str) else group
        if not isinstance(self.group, Group):
            raise TypeError(f"group must be a lps_fast.groups.Group or its name, got {type(group).__name__}")
        distribution = Identity() if distribution is None else distribution
        if not isinstance(distribution, Distribution):
            raise TypeError(f"distribution must be a lps_fast.distributions.Distribution, got {type(distribution).__name__}")
        if getattr(distribution, "_owner_bound", False):
            raise ValueError(f"this {type(distribution).__name__} already belongs to another Symmetrize (its networks "
                             f"would be shared by both models, each training them): create one per model")
        self.backbone = backbone
        self.distribution = distribution.bind(self.group)
        self.distribution._owner_bound = True
        if n_samples < 1 or (eval_n_samples is not None and eval_n_samples < 1):
            raise ValueError("n_samples and eval_n_samples must be >= 1")
        self.n_samples = int(n_samples)
        self.eval_n_samples = int(eval_n_samples if eval_n_samples is not None else n_samples)
        kinds = [output] if isinstance(output, str) else list(output.values())
        for kind in kinds:
            if kind not in OUTPUT_KINDS:
                raise ValueError(f"output kind must be one of {OUTPUT_KINDS}, got {kind!r}")
        self.output = output if isinstance(output, str) else dict(output)
        if backend != "fast" and backend not in _backend.PROVIDERS:
            raise ValueError(f"backend must be 'fast' or one of {_backend.PROVIDERS}, got {backend!r}")
        self.backend = backend
        if residual is not None and not callable(residual):
            raise TypeError(f"residual must be a callable of the inputs dict, got {type(residual).__name__}")
        self.residual = residual
        self.check_finite = bool(check_finite)

    @property
    def output_kinds(self) -> Union[str, Dict[str, str]]:
        """The kind of what :meth:`forward` returns: ``output``, except that a vector output plus a
        residual of positions (:class:`InputResidual` of position channels) is a position."""
        kind_of = getattr(self.residual, "kind", None)
        residual_kind = kind_of(self.group) if callable(kind_of) else None
        if isinstance(self.output, str) and residual_kind == "position" and self.output == "vector":
            return "position"
        return self.output

    def extra_repr(self) -> str:
        return (f"group={self.group!r}, n_samples={self.n_samples}, eval_n_samples={self.eval_n_samples}, "
                f"output={self.output!r}, backend={self.backend!r}")

    # -- samples and noise -------------------------------------------------------------------

    def num_samples(self, n_samples: Optional[int] = None) -> int:
        """``k`` for the current mode (training: ``n_samples``, eval: ``eval_n_samples``)."""
        requested = n_samples if n_samples is not None else (self.n_samples if self.training else self.eval_n_samples)
        return self.distribution.num_samples(requested)

    def _parameter_dtype(self) -> Optional[torch.dtype]:
        for tensor in self.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return None

    def _dtype(self) -> torch.dtype:
        return self._parameter_dtype() or torch.get_default_dtype()

    def _inputs(self, inputs) -> Inputs:
        batch = Inputs.from_dict(inputs, dtype=self._dtype())
        dtype = self._parameter_dtype()
        if dtype is not None and batch.dtype != dtype:
            # The model's parameters fix the dtype: float32 data into a float64 model (or the
            # reverse) would otherwise fail deep inside a matmul. Under autocast the parameters
            # keep their dtype, so the inputs stay as they are.
            batch = Inputs.from_dict({key: value.to(dtype) if value.is_floating_point() else value
                                      for key, value in batch.to_dict().items()})
        self.group.check_inputs(batch)
        return batch

    def noise_spec(self, inputs, n_samples: Optional[int] = None):
        """``{name: NoiseSpec}``: the shape, law and group kind of every random draw."""
        batch = self._inputs(inputs)
        return self.distribution.noise_spec(batch, self.num_samples(n_samples))

    def draw_noise(self, inputs, n_samples: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Draw every random tensor a forward pass needs (``{name: (B, k, ...)}``)."""
        batch = self._inputs(inputs)
        return self.distribution.draw_noise(batch, self.num_samples(n_samples), generator)

    def _backend_context(self):
        if self.backend == "fast":
            return contextlib.nullcontext()
        return _backend.use_backend(self.backend)

    def sample(self, inputs, noise: Optional[Dict[str, torch.Tensor]] = None,
               n_samples: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tuple[GroupSample, Dict[str, torch.Tensor]]:
        """The group samples (and auxiliary losses) a forward pass would use."""
        batch = self._inputs(inputs)
        k = self._resolve_k(batch, noise, n_samples)
        if noise is None:
            noise = self.distribution.draw_noise(batch, k, generator)
        with self._backend_context():
            return self.distribution(batch, noise, k)

    def _resolve_k(self, batch: Inputs, noise, n_samples) -> int:
        if noise:
            sizes = {int(value.shape[1]) for value in noise.values()}
            if len(sizes) != 1:
                raise ValueError(f"all noise tensors must share the sample dim k (dim 1), got {sorted(sizes)}")
            k = self.distribution.num_samples(sizes.pop())
            self.distribution.check_noise(batch, noise, k)
            return k
        return self.num_samples(n_samples)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, inputs, noise: Optional[Dict[str, torch.Tensor]] = None,
                n_samples: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[Output, Dict[str, torch.Tensor]]:
        """Symmetrized output and auxiliary losses.

        Args:
            inputs: dict with ``nodes``, ``edges``, ``points``, ``globals``, ``mask`` (see
                :mod:`lps_fast.groups`).
            noise: every random draw (from :meth:`draw_noise`); drawn here when None.
            n_samples: override ``k`` for this call.
            generator: the ``torch.Generator`` the noise is drawn from when ``noise`` is None
                (default: the global one). Seeding it makes a forward pass repeat exactly::

                    out, _ = model(inputs, generator=torch.Generator().manual_seed(0))
        """
        batch = self._inputs(inputs)
        k = self._resolve_k(batch, noise, n_samples)
        if noise is None:
            noise = self.distribution.draw_noise(batch, k, generator)
        if self.check_finite:
            for key, value in batch.to_dict().items():
                _require_finite(value, f"inputs[{key!r}]")
            for key, value in noise.items():
                _require_finite(value, f"noise[{key!r}]")
        with self._backend_context():
            sample, aux = self.distribution(batch, noise, k)
            views = self.group.transform_inputs(sample, batch)
            flat = {name: view.reshape(batch.batch * k, *view.shape[2:]) for name, view in views.items()}
            result = self.backbone(flat)
            if isinstance(self.output, str):
                output = self._unflatten_and_average(result, self.output, sample, batch, k, "output")
            else:
                if not isinstance(result, Mapping):
                    raise TypeError(f"output declares {sorted(self.output)}: the backbone must return a dict")
                missing = sorted(set(self.output) - set(result))
                if missing:
                    raise ValueError(f"the backbone returned no {missing}")
                output = {name: self._unflatten_and_average(result[name], kind, sample, batch, k, name)
                          for name, kind in self.output.items()}
        if self.residual is not None:
            output = self._add_residual(output, batch)
        return output, aux

    def _add_residual(self, output: Output, batch: Inputs) -> Output:
        value = self.residual(batch.to_dict())
        if isinstance(output, torch.Tensor):
            return output + self._checked_residual(value, output, self.output, batch, "output")
        if not isinstance(value, Mapping):
            raise TypeError(f"output is a dict {sorted(output)}: the residual must return a dict of some of its names")
        unknown = sorted(set(value) - set(output))
        if unknown:
            raise ValueError(f"the residual returned {unknown}, which are not outputs ({sorted(output)})")
        out = dict(output)
        for name, extra in value.items():
            out[name] = output[name] + self._checked_residual(extra, output[name], self.output[name], batch, name)
        return out

    @staticmethod
    def _checked_residual(value, output: torch.Tensor, kind: str, batch: Inputs, name: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(output.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"residual for {name} must have the shape of the symmetrized {name} "
                             f"{tuple(output.shape)}, got {shape}")
        node_dims = {"node": (1,), "diagonal": (1,), "vector": (1,), "position": (1,), "edge": (1, 2)}.get(kind)
        if node_dims is not None:
            value = zero_padding(value, batch.mask, node_dims)  # padded nodes stay exactly 0
        return value.to(output.dtype)

    def _unflatten_and_average(self, y: torch.Tensor, kind: str, sample: GroupSample, batch: Inputs,
                               k: int, name: str) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != batch.batch * k:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"backbone {name} must have leading dim B*k = {batch.batch * k}, got {shape}")
        _check_output_shape(y, kind, batch.n, name)
        if self.check_finite:
            _require_finite(y, f"backbone {name}")
        y = y.reshape(batch.batch, k, *y.shape[1:])
        out = self.group.transform_output(sample, y, kind, batch.mask)
        if self.check_finite:
            _require_finite(out, f"symmetrized {name}")
        return out


# Node dims each output kind needs after the leading B*k, and the shape to name in an error.
_NODE_DIMS = {"node": (1, "(B*k, n, *F)"), "edge": (2, "(B*k, n, n, *F)"), "diagonal": (2, "(B*k, n, n, *F)"),
              "vector": (1, "(B*k, n, 3[, C])"), "position": (1, "(B*k, n, 3[, C])")}


def _check_output_shape(y: torch.Tensor, kind: str, n: int, name: str) -> None:
    """A clear error for a backbone output whose shape does not fit its declared kind."""
    shape = tuple(y.shape)
    if kind == "invariant":
        # (B*k, n, F) is a per-node output: averaging it as invariant would silently keep the
        # node order of each sample (not invariant). A per-sample tensor has no node dim.
        if y.dim() >= 3 and n > 1 and y.shape[1] == n:
            raise ValueError(
                f"backbone {name} has shape {shape}, a per-node output (B*k, n = {n}, ...), but its kind is "
                "'invariant', which needs (B*k, *F) with no node dim: pool over the nodes in the backbone, "
                "or declare the output 'node'"
            )
        return
    dims, expected = _NODE_DIMS[kind]
    if y.dim() < 1 + dims or any(size != n for size in shape[1:1 + dims]):
        raise ValueError(f"backbone {name} of kind {kind!r} must have shape {expected} with n = {n}, got {shape}")


def _require_finite(value: torch.Tensor, name: str) -> None:
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = ~torch.isfinite(value)
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} holds {int(bad.sum())} NaN or Inf value(s) of {value.numel()}; "
                         f"first at index {first}: {float(value.detach()[first])}")


__all__ = ["Symmetrize", "InputResidual"]
