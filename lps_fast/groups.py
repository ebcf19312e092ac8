"""Symmetry groups: how each acts on inputs, outputs and noise, through the public ops.

A group here is one of

* ``Sn()``   permutations of the nodes (graphs, sets, particles);
* ``O3()``, ``SO3()``  rotations (and reflections) of 3-vector features about the origin;
* ``E3()``, ``SE3()``  the same plus translations of the position channels;
* products of a permutation group and a Euclidean group: ``Sn() * O3()``, ``Sn() * SO3()``,
  ``Sn() * E3()``, ``Sn() * SE3()`` (particles in space), also written ``Product(Sn(), O3())``
  or ``parse("SnxO3")``.

Inputs are a dict of batched tensors (:class:`Inputs`), one entry per type:

============  ===================  ==================================================
key           shape                how ``g = (permutation, rotation, translation)`` acts
============  ===================  ==================================================
``nodes``     ``(B, n, *F)``       nodes permuted
``edges``     ``(B, n, n, *F)``    both node dims permuted
``points``    ``(B, n, 3, C)``     nodes permuted, every channel rotated; the channels
                                   in ``position_channels`` are also translated
``globals``   ``(B, *F)``          invariant
``mask``      ``(B, n)`` bool      True = real node; padded nodes stay padded
============  ===================  ==================================================

Output kinds (what the symmetrized model returns): ``invariant (B, *F)``, ``node (B, n, *F)``,
``edge (B, n, n, *F)``, ``diagonal`` (the backbone emits ``(n, n, *F)``, the model returns the
diagonal ``(B, n, *F)``), ``vector (B, n, 3, C)`` (rotated) and ``position (B, n, 3, C)``
(rotated and translated).

Conventions are those of docs/SPEC.md, "Conventions". A set of ``k`` samples per input
(:class:`GroupSample`) holds ``perm (B, k, n)`` (``perm[b, j, r]`` is the node placed at
position ``r``), the optional straight-through ``soft (B, k, n, n)``, ``rotation (B, k, 3, 3)``
(columns are frame axes) and, for translation groups, the ``center (B, 3)`` of the input
positions. The symmetrized model runs the backbone on ``g_j^-1 . x`` and averages
``g_j . y_j``; both directions use ``lps_fast.<op>``, so they run on the fastest kernel built.

A single group element used to *check* equivariance (:class:`GroupElement`) has ``perm
(B, 1, n)``, ``rotation (B, 1, 3, 3)`` and ``translation (B, 3)``; :meth:`Group.act` applies it
as ``g . x`` (``x'[perm[i]] = x[i]``, ``v' = R v + t``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from . import _checks, ops

INPUT_KEYS = ("nodes", "edges", "points", "globals", "mask")
OUTPUT_KINDS = ("invariant", "node", "edge", "diagonal", "vector", "position")
# Kinds of the noise tensors a distribution draws; every one has the sample dim k at dim 1.
NOISE_KINDS = ("sample_node", "sample_point", "sample_frame", "sample_invariant")


# ---------------------------------------------------------------------------------------------
# Inputs


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


@dataclass
class Inputs:
    """A validated batch of inputs (see the module docstring for the keys and shapes)."""

    nodes: Optional[torch.Tensor] = None
    edges: Optional[torch.Tensor] = None
    points: Optional[torch.Tensor] = None
    globals: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None

    @classmethod
    def from_dict(cls, inputs, dtype: Optional[torch.dtype] = None) -> "Inputs":
        """Validate a dict of tensors; integer and bool features become ``dtype`` floats."""
        if isinstance(inputs, Inputs):
            return inputs
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a dict with keys among {INPUT_KEYS}, got {type(inputs).__name__}")
        unknown = sorted(set(inputs) - set(INPUT_KEYS))
        if unknown:
            raise ValueError(f"unknown input keys {unknown}; expected keys among {INPUT_KEYS}")
        values = {}
        for key in INPUT_KEYS:
            value = inputs.get(key)
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"inputs[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
            values[key] = value
        floating = [v for k, v in values.items() if k != "mask" and v is not None and v.is_floating_point()]
        float_dtype = floating[0].dtype if floating else (dtype or torch.get_default_dtype())
        for key in ("nodes", "edges", "points", "globals"):
            value = values[key]
            if value is not None and not value.is_floating_point():
                values[key] = value.to(float_dtype)
        batch = cls(**values)
        batch._validate()
        return batch

    def _validate(self) -> None:
        present = {k: getattr(self, k) for k in INPUT_KEYS if getattr(self, k) is not None}
        if not any(k in present for k in ("nodes", "edges", "points")):
            raise ValueError("inputs need at least one of 'nodes', 'edges', 'points'")
        if self.nodes is not None and self.nodes.dim() < 2:
            raise ValueError(f"inputs['nodes'] must have shape (B, n, *F), got {_shape(self.nodes)}")
        if self.edges is not None and (self.edges.dim() < 3 or self.edges.shape[1] != self.edges.shape[2]):
            raise ValueError(f"inputs['edges'] must have shape (B, n, n, *F), got {_shape(self.edges)}")
        if self.points is not None and (self.points.dim() != 4 or self.points.shape[2] != 3):
            raise ValueError(f"inputs['points'] must have shape (B, n, 3, C), got {_shape(self.points)}")
        batch, n = self.batch, self.n
        for key, value in present.items():
            if value.shape[0] != batch:
                raise ValueError(f"inputs[{key!r}] has batch size {value.shape[0]}, expected {batch}")
            if key != "globals" and value.shape[1] != n:
                raise ValueError(f"inputs[{key!r}] has {value.shape[1]} nodes, expected {n}")
            if value.device != self.device:
                raise ValueError(f"inputs[{key!r}] is on {value.device}, expected {self.device}")
        if self.mask is not None:
            if self.mask.dtype != torch.bool or self.mask.shape != (batch, n):
                raise ValueError(
                    f"inputs['mask'] must be a bool tensor of shape (B, n) = ({batch}, {n}), "
                    f"got {self.mask.dtype} {_shape(self.mask)}"
                )
        dtypes = {v.dtype for k, v in present.items() if k != "mask"}
        if len(dtypes) > 1:
            raise TypeError(f"input features must share one floating dtype, got {sorted(map(str, dtypes))}")

    def _first(self) -> torch.Tensor:
        return next(t for t in (self.nodes, self.edges, self.points) if t is not None)

    @property
    def batch(self) -> int:
        return self._first().shape[0]

    @property
    def n(self) -> int:
        return self._first().shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._first().dtype

    @property
    def device(self) -> torch.device:
        return self._first().device

    def real_mask(self) -> torch.Tensor:
        """``(B, n)`` bool, all True when no mask was given."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.batch, self.n, dtype=torch.bool, device=self.device)

    def node_features(self, include_points: bool = True) -> Optional[torch.Tensor]:
        """Per-node features flattened to ``(B, n, F)``: nodes, then points (when asked)."""
        parts = []
        if self.nodes is not None:
            parts.append(self.nodes.reshape(self.batch, self.n, math.prod(self.nodes.shape[2:])))
        if include_points and self.points is not None:
            parts.append(self.points.reshape(self.batch, self.n, math.prod(self.points.shape[2:])))
        return torch.cat(parts, dim=-1) if parts else None

    def edge_features(self) -> Optional[torch.Tensor]:
        """Edges with their feature dims flattened to one channel dim: ``(B, n, n, C)``."""
        if self.edges is None:
            return None
        # explicit sizes: an empty batch cannot infer a -1
        return self.edges.reshape(self.batch, self.n, self.n, math.prod(self.edges.shape[3:]))

    def to_dict(self) -> Dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in INPUT_KEYS if getattr(self, k) is not None}


def masked_mean_nodes(values: torch.Tensor, mask: Optional[torch.Tensor], node_dim: int = 1) -> torch.Tensor:
    """Mean over the node dim of ``values`` over real nodes only (mask ``(B, n)``)."""
    if mask is None:
        return values.mean(dim=node_dim)
    shape = [1] * values.dim()
    shape[0], shape[node_dim] = mask.shape
    weights = mask.reshape(shape).to(values.dtype)
    count = weights.sum(dim=node_dim).clamp_min(1.0)
    return (values * weights).sum(dim=node_dim) / count


def _checked_once(method):
    """Run a group transform with the per-op checks off (``lps_fast.validation(False)``): its
    permutations and rotations come from the distribution, and ``Symmetrize`` checked the inputs
    once (``check_inputs``). Ops whose kernel checks its own arguments still refuse bad shapes.
    Under ``torch.compile`` the checks are traced away anyway and the method runs as it is."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        if _checks._is_compiling():
            return method(*args, **kwargs)
        with _checks.validation(False):
            return method(*args, **kwargs)

    return run


# ---------------------------------------------------------------------------------------------
# Group samples and elements


@dataclass
class GroupSample:
    """``k`` group elements per input, as the symmetrization uses them (docs/SPEC.md, "Conventions").

    ``perm (B, k, n)`` int64 and ``soft (B, k, n, n)`` for the permutation part; ``rotation
    (B, k, 3, 3)`` for the Euclidean part; ``center (B, 3)`` for translation groups. Absent
    parts are None (the identity).
    """

    k: int
    perm: Optional[torch.Tensor] = None
    soft: Optional[torch.Tensor] = None
    rotation: Optional[torch.Tensor] = None
    center: Optional[torch.Tensor] = None


@dataclass
class GroupElement:
    """One group element per input, for checking equivariance: ``g . x``.

    ``perm (B, 1, n)``: node ``i`` gets label ``perm[b, 0, i]`` (``x'[perm[i]] = x[i]``);
    ``rotation (B, 1, 3, 3)``: ``v' = R v``; ``translation (B, 3)`` added to positions.
    """

    perm: Optional[torch.Tensor] = None
    rotation: Optional[torch.Tensor] = None
    translation: Optional[torch.Tensor] = None


def _channel_center(center: torch.Tensor, channels: int, position_channels: Optional[Sequence[int]]) -> torch.Tensor:
    """``(B, 3)`` center -> ``(B, 3, C)``: the center on position channels, 0 elsewhere."""
    batch = center.shape[0]
    if position_channels is None:
        return center[:, :, None].expand(batch, 3, channels).contiguous()
    out = center.new_zeros(batch, 3, channels)
    for c in position_channels:
        if c < channels:
            out[:, :, c] = center
    return out


def _promoted(*tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """The tensors in their common (widest) floating dtype. Under autocast a backbone or the
    frame network may return bfloat16 while the frame or the data stay float32; the frame ops
    take one dtype, so the narrower side is widened rather than the frame rounded."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _node_mask_like(mask: Optional[torch.Tensor], value: torch.Tensor, node_dims: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """Broadcast a ``(B, n)`` mask (or ``(B, k, n)``, per sample) over ``value`` whose node dims
    are ``node_dims``."""
    if mask is None:
        return None
    shape = [1] * value.dim()
    shape[: mask.dim() - 1] = mask.shape[:-1]
    out = None
    for dim in node_dims:
        s = list(shape)
        s[dim] = mask.shape[-1]
        m = mask.reshape(s)
        out = m if out is None else out & m
    return out


def zero_padding(value: torch.Tensor, mask: Optional[torch.Tensor], node_dims: Tuple[int, ...]) -> torch.Tensor:
    """Set entries of padded nodes (any of ``node_dims``) to exactly 0."""
    m = _node_mask_like(mask, value, node_dims)
    if m is None:
        return value
    return torch.where(m, value, torch.zeros((), dtype=value.dtype, device=value.device))


# ---------------------------------------------------------------------------------------------
# Groups


class Group:
    """Base class: a permutation part, a Euclidean part, or both (see the module docstring)."""

    permutation: bool = False
    rotation: Optional[str] = None  # "O3" or "SO3"
    translation: bool = False
    position_channels: Tuple[int, ...] = ()
    name: str = "trivial"

    # -- structure ---------------------------------------------------------------------------

    def __mul__(self, other: "Group") -> "Group":
        return Product(self, other)

    def __repr__(self) -> str:
        if self.translation and self.position_channels != (0,):
            return f"{self.name}(position_channels={self.position_channels})"
        return self.name

    def __eq__(self, other) -> bool:
        return isinstance(other, Group) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self):
        return (self.permutation, self.rotation, self.translation, self.position_channels)

    @property
    def proper(self) -> bool:
        """Rotations only (det +1)."""
        return self.rotation == "SO3"

    def check_inputs(self, inputs: Inputs) -> None:
        if self.rotation is not None and inputs.points is None:
            raise ValueError(f"group {self!r} acts on 3-vectors: inputs need 'points' of shape (B, n, 3, C)")
        if self.translation and inputs.points is not None:
            channels = inputs.points.shape[-1]
            bad = [c for c in self.position_channels if c >= channels]
            if bad:
                raise ValueError(
                    f"group {self!r}: position_channels {bad} out of range for points with {channels} channels"
                )

    def center(self, inputs: Inputs) -> Optional[torch.Tensor]:
        """``(B, 3)``: mean over real nodes of the first position channel (translation groups)."""
        if not self.translation:
            return None
        positions = inputs.points[..., self.position_channels[0]]  # [B, n, 3]
        return masked_mean_nodes(positions, inputs.mask, node_dim=1)

    # -- Haar samples ------------------------------------------------------------------------

    def sample_permutations(self, keys: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``(B, k, n)`` keys -> perm sorting them in descending order; padded nodes last, in index order.

        With i.i.d. continuous keys this is a Haar (uniform) sample over the orderings of the real nodes.
        """
        if mask is not None:
            keys = keys.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.sort(keys, dim=-1, descending=True, stable=True).indices

    def sample_rotations(self, gaussian: torch.Tensor) -> torch.Tensor:
        """``(..., 3, 3)`` standard normal -> Haar sample of O(3) (SO(3) for proper groups)."""
        return ops.gram_schmidt(gaussian, proper=self.proper)

    def random_element(
        self,
        inputs,
        generator: Optional[torch.Generator] = None,
        translation_scale: float = 2.0,
    ) -> GroupElement:
        """A random element per input (Haar on the compact parts): for checking equivariance.

        The permutation moves real nodes among the slots of real nodes only, so the mask is
        unchanged.
        """
        inputs = Inputs.from_dict(inputs)
        batch, n, dtype, device = inputs.batch, inputs.n, inputs.dtype, inputs.device
        perm = rotation = translation = None
        if self.permutation:
            mask = inputs.real_mask()
            keys = torch.rand(batch, n, generator=generator, dtype=torch.float64).to(device)
            shuffled = torch.sort(keys.masked_fill(~mask, float("inf")), dim=-1, stable=True).indices
            slots = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
            # Real slots (in index order) receive the real nodes in random order; padded slots keep theirs.
            perm = torch.empty_like(slots).scatter_(1, slots, shuffled)[:, None, :]
        if self.rotation is not None:
            gaussian = torch.randn(batch, 1, 3, 3, generator=generator, dtype=torch.float64)
            rotation = self.sample_rotations(gaussian.to(device=device)).to(dtype)
        if self.translation:
            translation = translation_scale * torch.randn(batch, 3, generator=generator, dtype=torch.float64)
            translation = translation.to(device=device, dtype=dtype)
        return GroupElement(perm=perm, rotation=rotation, translation=translation)

    # -- g^-1 on the inputs, g on the outputs (k samples) --------------------------------------

    @_checked_once
    def transform_inputs(self, sample: GroupSample, inputs: Inputs) -> Dict[str, torch.Tensor]:
        """``g_j^-1 . x`` for every sample: a dict of ``(B, k, ...)`` views plus ``mask (B, k, n)``."""
        k, perm, soft, rotation = sample.k, sample.perm, sample.soft, sample.rotation
        batch, n = inputs.batch, inputs.n
        views: Dict[str, torch.Tensor] = {}
        if inputs.nodes is not None:
            views["nodes"] = (
                ops.permute_nodes(inputs.nodes, perm, soft)
                if perm is not None
                else inputs.nodes[:, None].expand(batch, k, *inputs.nodes.shape[1:])
            )
        if inputs.edges is not None:
            views["edges"] = (
                ops.permute_edges(inputs.edges, perm, soft)
                if perm is not None
                else inputs.edges[:, None].expand(batch, k, *inputs.edges.shape[1:])
            )
        if inputs.points is not None:
            points = inputs.points
            if rotation is not None:
                center = None
                if sample.center is not None:
                    center = _channel_center(sample.center, points.shape[-1], self.position_channels)
                points, rotation, center = _promoted(points, rotation, center)
                views["points"] = ops.frame_apply(points, rotation, perm, center, soft)
                if center is not None and inputs.mask is not None:
                    # Centering moved padded nodes off zero; put them back so they carry nothing.
                    view_mask = self._permuted_mask(inputs.mask, perm, k)
                    views["points"] = zero_padding_views(views["points"], view_mask, node_dims=(2,))
            elif perm is not None:
                views["points"] = ops.permute_nodes(points, perm, soft)
            else:
                views["points"] = points[:, None].expand(batch, k, *points.shape[1:])
        if inputs.globals is not None:
            views["globals"] = inputs.globals[:, None].expand(batch, k, *inputs.globals.shape[1:])
        views["mask"] = self._permuted_mask(inputs.real_mask(), perm, k)
        return views

    @staticmethod
    def _permuted_mask(mask: torch.Tensor, perm: Optional[torch.Tensor], k: int) -> torch.Tensor:
        if perm is None:
            return mask[:, None, :].expand(mask.shape[0], k, mask.shape[1])
        return torch.gather(mask[:, None, :].expand(perm.shape), 2, perm)

    @_checked_once
    def transform_output(
        self, sample: GroupSample, y: torch.Tensor, kind: str, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``mean_j g_j . y_j``: ``y (B, k, ...)`` from the backbone -> the symmetrized output.

        Entries of padded nodes are exactly 0 in node, edge, vector and position outputs.
        """
        perm, soft, rotation = sample.perm, sample.soft, sample.rotation
        if kind == "invariant":
            return y.mean(dim=1)
        if kind == "node":
            out = ops.unpermute_mean(y, perm, soft) if perm is not None else y.mean(dim=1)
            return zero_padding(out, mask, (1,))
        if kind == "edge":
            out = ops.unpermute_edges_mean(y, perm, soft) if perm is not None else y.mean(dim=1)
            return zero_padding(out, mask, (1, 2))
        if kind == "diagonal":
            if perm is not None:
                out = ops.unpermute_edges_mean(y, perm, soft, diagonal=True)
            else:
                out = torch.diagonal(y, dim1=2, dim2=3).movedim(-1, 2).mean(dim=1)
            return zero_padding(out, mask, (1,))
        if kind in ("vector", "position"):
            squeeze = y.dim() == 4  # (B, k, n, 3): one channel
            if squeeze:
                y = y[..., None]
            if y.dim() != 5 or y.shape[3] != 3:
                raise ValueError(f"a {kind} output must have shape (B*k, n, 3[, C]) per sample, got {_shape(y)}")
            if rotation is not None:
                center = None
                if kind == "position" and sample.center is not None:
                    center = _channel_center(sample.center, y.shape[-1], None)
                y, rotation, center = _promoted(y, rotation, center)
                out = ops.frame_unapply_mean(y, rotation, perm, center, soft)
            elif perm is not None:
                out = ops.unpermute_mean(y, perm, soft)
            else:
                out = y.mean(dim=1)
            out = zero_padding(out, mask, (1,))
            return out[..., 0] if squeeze else out
        raise ValueError(f"output kind must be one of {OUTPUT_KINDS}, got {kind!r}")

    # -- g on inputs, outputs and noise (one element) -------------------------------------------

    def act(self, g: GroupElement, value: torch.Tensor, kind: str, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``g . value`` for a value of ``kind``: an output kind, an input kind (``'nodes'``,
        ``'edges'``, ``'points'``, ``'globals'``, ``'mask'``) or a noise kind (``sample_*``)."""
        perm, rotation = g.perm, g.rotation
        if kind in ("invariant", "globals", "sample_invariant"):
            return value
        if kind == "mask":
            return value if perm is None else torch.gather(value, 1, torch.argsort(perm[:, 0], dim=-1))
        if kind in ("node", "diagonal", "nodes"):
            return value if perm is None else ops.unpermute_mean(value[:, None], perm)
        if kind in ("edge", "edges"):
            return value if perm is None else ops.unpermute_edges_mean(value[:, None], perm)
        if kind in ("vector", "position", "points"):
            squeeze = value.dim() == 3
            if squeeze:
                value = value[..., None]
            translation = None
            if g.translation is not None and kind != "vector":
                channels = None if kind == "position" else self.position_channels
                translation = _channel_center(g.translation, value.shape[-1], channels)
            if rotation is not None:
                out = ops.frame_unapply_mean(value[:, None], rotation, perm, translation)
            else:
                out = value if perm is None else ops.unpermute_mean(value[:, None], perm)
                if translation is not None:
                    out = out + translation[:, None]
            if translation is not None and mask is not None:
                # Padded nodes hold zeros, not positions: they do not move.
                out = zero_padding(out, self.act(g, mask, "mask"), (1,))
            return out[..., 0] if squeeze else out
        if kind == "sample_node":  # (B, k, n, *F): each sample's node dim
            if perm is None:
                return value
            moved = value.movedim(1, 2)  # [B, n, k, *F]
            return ops.unpermute_mean(moved[:, None], perm).movedim(2, 1)
        if kind == "sample_point":  # (B, k, n, 3, C): rotate and permute, never translate
            batch, k, n, _, channels = value.shape
            flat = value.permute(0, 2, 3, 1, 4).reshape(batch, n, 3, k * channels)
            if rotation is not None:
                flat = ops.frame_unapply_mean(flat[:, None], rotation, perm)
            elif perm is not None:
                flat = ops.unpermute_mean(flat[:, None], perm)
            return flat.reshape(batch, n, 3, k, channels).permute(0, 3, 1, 2, 4)
        if kind == "sample_frame":  # (B, k, 3, 3): columns are 3-vectors
            if rotation is None:
                return value
            return torch.einsum("bam,bjmc->bjac", rotation[:, 0], value)
        raise ValueError(f"unknown kind {kind!r}")

    def act_inputs(self, g: GroupElement, inputs) -> Dict[str, torch.Tensor]:
        """``g . x`` for every entry of an inputs dict."""
        batch = Inputs.from_dict(inputs)
        out = {}
        for key, value in batch.to_dict().items():
            out[key] = self.act(g, value, key, mask=batch.mask)
        return out


def zero_padding_views(value: torch.Tensor, view_mask: torch.Tensor, node_dims: Tuple[int, ...]) -> torch.Tensor:
    """:func:`zero_padding` for ``(B, k, ...)`` views with a per-sample mask ``(B, k, n)``."""
    m = _node_mask_like(view_mask, value, node_dims)
    return torch.where(m, value, torch.zeros((), dtype=value.dtype, device=value.device))


class Sn(Group):
    """The symmetric group on the (real) nodes."""

    permutation = True
    name = "Sn"


class O3(Group):
    """Rotations and reflections of every 3-vector channel about the origin."""

    rotation = "O3"
    name = "O3"


class SO3(Group):
    """Rotations (det +1) of every 3-vector channel about the origin."""

    rotation = "SO3"
    name = "SO3"


class E3(Group):
    """O(3) plus translations of the position channels (``position_channels`` of ``points``).

    The symmetrization centers the positions at their mean over real nodes (the first position
    channel) before rotating, and adds the center back to ``position`` outputs.
    """

    rotation = "O3"
    translation = True
    name = "E3"

    def __init__(self, position_channels: Iterable[int] = (0,)):
        self.position_channels = tuple(int(c) for c in position_channels)
        if not self.position_channels:
            raise ValueError("a translation group needs at least one position channel")


class SE3(E3):
    """SO(3) plus translations of the position channels."""

    rotation = "SO3"
    name = "SE3"


class Product(Group):
    """``Sn x G`` for a Euclidean group ``G`` (O3, SO3, E3, SE3): particles in space."""

    def __init__(self, *factors: Group):
        flat = []
        for factor in factors:
            flat.extend(factor.factors if isinstance(factor, Product) else [factor])
        permutations = [f for f in flat if f.permutation]
        euclidean = [f for f in flat if f.rotation is not None]
        if len(permutations) != 1 or len(euclidean) != 1 or len(flat) != 2:
            raise ValueError(
                "a product must combine one permutation group with one Euclidean group "
                f"(e.g. Sn() * O3()), got {[f.name for f in flat]}"
            )
        self.factors = (permutations[0], euclidean[0])
        self.permutation = True
        self.rotation = euclidean[0].rotation
        self.translation = euclidean[0].translation
        self.position_channels = euclidean[0].position_channels
        self.name = f"Sn x {euclidean[0].name}"


_NAMES = {"sn": Sn, "o3": O3, "so3": SO3, "e3": E3, "se3": SE3}


def parse(name: str) -> Group:
    """A group from its name: ``'Sn'``, ``'O3'``, ``'SO3'``, ``'E3'``, ``'SE3'``, ``'SnxO3'``,
    ``'Sn x SE3'``, ``'Sn*E3'``, ... (case-insensitive)."""
    text = name.replace(" ", "").lower()
    parts = [p for p in text.replace("*", "x").split("x") if p] if text not in _NAMES else [text]
    # "snxo3" splits into "sn", "o3"; "sn" alone stays.
    try:
        groups = [_NAMES[p]() for p in parts]
    except KeyError:
        raise ValueError(f"unknown group {name!r}; use Sn, O3, SO3, E3, SE3 or a product like SnxO3") from None
    if not groups:
        raise ValueError(f"unknown group {name!r}")
    return groups[0] if len(groups) == 1 else Product(*groups)


__all__ = [
    "Group",
    "Sn",
    "O3",
    "SO3",
    "E3",
    "SE3",
    "Product",
    "parse",
    "Inputs",
    "GroupSample",
    "GroupElement",
    "OUTPUT_KINDS",
]
