"""Distributions over group elements ``p(g | x)``: where the ``k`` samples of a symmetrization come from.

==============  ==========================================================================
``Learned``     probabilistic symmetrization (LPS): an equivariant network plus i.i.d. noise.
                S_n: a GIN with a virtual node over node features and noise gives one score
                per node, then ``sinkhorn_sort`` (hard permutation forward, straight-through
                soft matrix backward) and the weighted ``permutation_entropy`` as an auxiliary
                loss. O(3)/SO(3)/E(3)/SE(3): a vector-neuron network over (centered) points and
                noise vectors gives three equivariant vectors, then ``gram_schmidt``.
                S_n x O(3): one vector-neuron network gives both.
``Uniform``     group averaging with Haar samples.
``Frame``       frame averaging: S_n orders nodes by a permutation-invariant signature (a
                Weisfeiler-Lehman colour hash), ties sampled; O(3) uses the PCA axes of the
                (centered) points with every sign choice (8 frames, 4 for SO(3)); S_n x O(3)
                orders nodes by their first coordinate in each PCA frame.
``Canonical``   one deterministic learned sample (``Learned`` without noise, k = 1).
``Identity``    no symmetrization: the backbone sees the input as it is (a baseline).
==============  ==========================================================================

Every random draw is a named tensor of the ``noise`` dict (:meth:`Distribution.noise_spec`
says its shape and how the group acts on it), so a caller can supply it and check
``model(g . x, noise=g . eps) == g . model(x, noise=eps)`` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from . import ops
from .groups import Group, GroupSample, Inputs, _channel_center, masked_mean_nodes, zero_padding
from .nn import VNDGCNN, BatchNormGIN, DenseGIN, VectorNeuronNet


@dataclass(frozen=True)
class NoiseSpec:
    """One noise tensor: ``shape`` (sample dim ``k`` at dim 1), the group ``kind`` acting on it
    (``sample_node``, ``sample_point``, ``sample_frame``, ``sample_invariant``), and its law:
    ``uniform`` on ``[0, scale)`` or ``normal`` with std ``scale``."""

    shape: Tuple[int, ...]
    kind: str
    law: str
    scale: float = 1.0

    def draw(self, dtype: torch.dtype, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.law not in ("uniform", "normal"):
            raise ValueError(f"unknown noise law {self.law!r}")
        sampler = torch.rand if self.law == "uniform" else torch.randn
        if generator is None:
            # No generator argument at all: torch.compile traces this call with symbolic sizes,
            # an explicit generator=None it cannot.
            return sampler(self.shape, dtype=dtype, device=device) * self.scale
        draw_device = generator.device if generator.device.type != torch.device(device).type else device
        value = sampler(self.shape, generator=generator, dtype=dtype, device=draw_device)
        return (value * self.scale).to(device)


class Distribution(nn.Module):
    """Base class. A distribution is bound to a group by :class:`lps_fast.Symmetrize` (which
    builds its networks), then maps ``(inputs, noise, k)`` to a :class:`GroupSample` and a dict
    of auxiliary losses."""

    name = "distribution"

    def __init__(self):
        super().__init__()
        self.group: Optional[Group] = None

    def bind(self, group: Group) -> "Distribution":
        if self.group is not None and self.group != group:
            raise ValueError(f"{type(self).__name__} is already bound to {self.group!r}, not {group!r}")
        self.group = group
        return self

    def check_noise(self, inputs: Inputs, noise: Dict[str, torch.Tensor], k: int) -> None:
        """Refuse noise entries this distribution does not draw (a misspelt key would otherwise be
        ignored and the real draw silently made)."""
        expected = sorted(self.noise_spec(inputs, k))
        unknown = sorted(set(noise) - set(expected))
        if unknown:
            raise ValueError(f"{type(self).__name__} draws no noise {unknown}; its noise entries: {expected or 'none'}")

    def _require_group(self) -> Group:
        if self.group is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a group; wrap it in lps_fast.Symmetrize")
        return self.group

    def num_samples(self, requested: int) -> int:
        """The number of samples this distribution produces when ``requested`` are asked for."""
        return int(requested)

    def noise_spec(self, inputs: Inputs, k: int) -> Dict[str, NoiseSpec]:
        return {}

    def draw_noise(self, inputs, k: int, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        inputs = Inputs.from_dict(inputs)
        return {
            name: spec.draw(inputs.dtype, inputs.device, generator)
            for name, spec in self.noise_spec(inputs, self.num_samples(k)).items()
        }

    def forward(self, inputs: Inputs, noise: Dict[str, torch.Tensor], k: int) -> Tuple[GroupSample, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _noise(self, noise: Dict[str, torch.Tensor], name: str, spec: NoiseSpec) -> torch.Tensor:
        if name not in noise:
            raise ValueError(f"{type(self).__name__} needs noise[{name!r}] of shape {spec.shape}")
        value = noise[name]
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(f"noise[{name!r}] must have shape {spec.shape}, got {tuple(value.shape)}")
        return value


class Identity(Distribution):
    """No symmetrization: one sample, the identity element (the unsymmetrized baseline)."""

    name = "identity"

    def num_samples(self, requested: int) -> int:
        return 1

    def forward(self, inputs, noise, k):
        return GroupSample(k=1), {}


class Uniform(Distribution):
    """Group averaging: i.i.d. Haar samples (uniform permutations of the real nodes, Haar
    rotations from Gram-Schmidt of Gaussian matrices); translations are removed by centering."""

    name = "uniform"

    def noise_spec(self, inputs: Inputs, k: int) -> Dict[str, NoiseSpec]:
        group = self._require_group()
        specs = {}
        if group.permutation:
            specs["order"] = NoiseSpec((inputs.batch, k, inputs.n), "sample_node", "uniform")
        if group.rotation is not None:
            specs["rotation"] = NoiseSpec((inputs.batch, k, 3, 3), "sample_frame", "normal")
        return specs

    def forward(self, inputs, noise, k):
        group = self._require_group()
        specs = self.noise_spec(inputs, k)
        sample = GroupSample(k=k, center=group.center(inputs))
        if group.permutation:
            sample.perm = group.sample_permutations(self._noise(noise, "order", specs["order"]), inputs.mask)
        if group.rotation is not None:
            sample.rotation = group.sample_rotations(self._noise(noise, "rotation", specs["rotation"]))
        return sample, {}


# ---------------------------------------------------------------------------------------------
# Frames

_PRIME = 2_147_483_647  # 2^31 - 1: products of two residues fit in int64


def _residue(values: torch.Tensor, resolution: float) -> torch.Tensor:
    """Quantize floats to integers (exactly, so equal inputs hash equally) modulo the prime."""
    return torch.remainder(torch.round(values.to(torch.float64) / resolution).to(torch.int64), _PRIME)


def _mix(a: torch.Tensor, b: torch.Tensor, multiplier: int = 1_000_003) -> torch.Tensor:
    return torch.remainder(a * multiplier + b, _PRIME)


def wl_colors(inputs: Inputs, iterations: int = 5, resolution: float = 1e-6) -> torch.Tensor:
    """Weisfeiler-Lehman colour refinement as an exact integer hash: ``(B, n)`` int64, -1 for
    padded nodes. Permutation-equivariant bit for bit (sums of residues do not depend on order)."""
    batch, n, device = inputs.batch, inputs.n, inputs.device
    mask = inputs.real_mask()
    colors = torch.ones(batch, n, dtype=torch.int64, device=device)
    features = inputs.node_features()
    if features is not None:
        for column in _residue(features, resolution).unbind(-1):
            colors = _mix(colors, column)
    edges = inputs.edge_features()
    if edges is not None:
        weights = torch.zeros(batch, n, n, dtype=torch.int64, device=device)
        for channel in _residue(edges, resolution).unbind(-1):
            weights = _mix(weights, channel)
        weights = weights * (mask[:, :, None] & mask[:, None, :])
        for _ in range(iterations):
            hashed = torch.remainder(torch.remainder(colors * colors, _PRIME) * 48_271 + colors * 69_621 + 12_345, _PRIME)
            hashed = hashed * mask
            outgoing = torch.remainder(torch.remainder(weights * hashed[:, None, :], _PRIME).sum(-1), _PRIME)
            incoming = torch.remainder(torch.remainder(weights * hashed[:, :, None], _PRIME).sum(-2), _PRIME)
            colors = _mix(_mix(colors, outgoing), incoming)
    return colors.masked_fill(~mask, -1)


_SIGNS = torch.tensor([[a, b, c] for a in (1.0, -1.0) for b in (1.0, -1.0) for c in (1.0, -1.0)])


def pca_frames(points: torch.Tensor, mask: Optional[torch.Tensor], proper: bool) -> torch.Tensor:
    """Frames from the principal axes of ``points (B, n, 3, C)`` (already centered where needed):
    ``(B, 8, 3, 3)`` for every sign choice, or ``(B, 4, 3, 3)`` with det +1 when ``proper``.
    Columns are the axes, by decreasing variance."""
    x = zero_padding(points, mask, (1,))
    second_moment = torch.einsum("bnac,bnec->bae", x, x)
    _, axes = torch.linalg.eigh(second_moment)
    axes = axes.flip(-1)  # [B, 3, 3]: largest variance first
    signs = _SIGNS.to(dtype=points.dtype, device=points.device)
    if proper:
        signs = signs[signs.prod(dim=-1) > 0]
        # With det(axes) = -1 flip the first axis, so every sign choice with product +1 is proper.
        axes = torch.cat([axes[..., :1] * torch.linalg.det(axes)[:, None, None], axes[..., 1:]], dim=-1)
    return axes[:, None] * signs[None, :, None, :]


class Frame(Distribution):
    """Frame averaging (Puny et al., 2022); see the module docstring for the frames.

    For rotation groups the number of samples is the frame size (8 for O(3), 4 for SO(3)),
    whatever is requested. For S_n alone, ``k`` orderings are drawn uniformly from the frame
    (orderings that sort the signature, ties broken by noise).

    Args:
        wl_iterations: colour refinement rounds for the S_n signature.
        resolution: features are compared after rounding to this resolution.
    """

    name = "frame"

    def __init__(self, wl_iterations: int = 5, resolution: float = 1e-6):
        super().__init__()
        self.wl_iterations, self.resolution = wl_iterations, resolution

    def num_samples(self, requested: int) -> int:
        group = self._require_group()
        if group.rotation is not None:
            return 4 if group.proper else 8
        return int(requested)

    def noise_spec(self, inputs, k):
        group = self._require_group()
        if group.permutation and group.rotation is None:
            return {"ties": NoiseSpec((inputs.batch, k, inputs.n), "sample_node", "uniform")}
        return {}

    def forward(self, inputs, noise, k):
        group = self._require_group()
        mask = inputs.mask
        if group.rotation is None:
            ties = self._noise(noise, "ties", self.noise_spec(inputs, k)["ties"])
            colors = wl_colors(inputs, self.wl_iterations, self.resolution)  # [B, n]
            if mask is not None:
                ties = ties.masked_fill(~mask[:, None, :], float("-inf"))
            # Lexicographic (colour, tie noise), descending: sort by noise, then stably by colour.
            by_noise = torch.sort(ties, dim=-1, descending=True, stable=True).indices
            colors_by_noise = torch.gather(colors[:, None, :].expand_as(by_noise), 2, by_noise)
            by_color = torch.sort(colors_by_noise, dim=-1, descending=True, stable=True).indices
            return GroupSample(k=ties.shape[1], perm=torch.gather(by_noise, 2, by_color)), {}
        center = group.center(inputs)
        points = inputs.points
        if center is not None:
            points = points - _channel_center(center, points.shape[-1], group.position_channels)[:, None]
        rotation = pca_frames(points, mask, group.proper)  # [B, m, 3, 3]
        sample = GroupSample(k=rotation.shape[1], rotation=rotation, center=center)
        if group.permutation:
            reference = points[..., group.position_channels[0] if group.translation else 0]  # [B, n, 3]
            coordinates = torch.einsum("bjam,bna->bjnm", rotation, reference)
            sample.perm = group.sample_permutations(coordinates[..., 0].detach(), mask)
        return sample, {}


# ---------------------------------------------------------------------------------------------
# Learned


class Learned(Distribution):
    """Probabilistic symmetrization: an equivariant network of the input and noise gives ``p(g | x)``.

    The noise makes the network's output a random variable: with ``noise="add"`` (the paper's
    way, the default) it is added to the network's input, so that the network cannot ignore it
    and every sample is a different group element; with ``noise="concat"`` it is concatenated as
    extra input channels instead.

    Networks (``network``):

    * S_n: ``"gin"`` (default) a GIN with layer norm and a virtual node (:class:`DenseGIN`);
      ``"gin-bn"`` the paper's GIN with batch norm, learnable eps and a virtual graph node
      (:class:`BatchNormGIN`). Input per node: the node features, the 3-vectors flattened, and
      (``degree=True``) the weighted degree of each edge channel; noise ~ U[0, noise_scale).
    * rotation groups: ``"vn"`` (default) a vector-neuron network that also reads the node and
      edge features as invariant scalars (:class:`VectorNeuronNet`); ``"vn-dgcnn"`` the paper's
      vector-neuron DGCNN over the 3-vectors alone (:class:`VNDGCNN`: kNN edge convolutions,
      vector batch norm, dropout). The 3-vectors are centred first for translation groups;
      noise ~ N(0, noise_scale^2) on every channel.

    Args:
        node_dim: features per node in ``inputs['nodes']`` (trailing dims flattened).
        edge_dim: channels of ``inputs['edges']`` (1 for a plain ``(B, n, n)`` adjacency).
        point_channels: ``C`` of ``inputs['points'] (B, n, 3, C)``.
        hidden, layers: width and depth of the network (paper: 64, 3; ``vn-dgcnn`` has a fixed
            depth).
        network: see above (default ``"gin"`` or ``"vn"`` by group).
        noise: ``"add"`` or ``"concat"``.
        noise_scale: the noise's scale (paper: 1).
        noise_dim: with ``noise="concat"``, noise channels per node (S_n; default: the network's
            input width, at least 1) or noise 3-vector channels (rotation groups; default
            ``point_channels``).
        degree: S_n networks also read each node's (masked) edge-weight sums (paper: True).
        neighbours, dropout: kNN size and vector dropout of ``vn-dgcnn`` (paper: 4, 0.08).
        tau: Sinkhorn temperature (paper: 0.01 for graphs, 0.1 for S_n x O(3)); default by group.
        sinkhorn_iters: Sinkhorn iterations (paper: 20).
        entropy_weight: weight of the permutation entropy in the auxiliary losses (paper: 0.1).
        tie_break: scores get U[0, tie_break) noise so tied nodes are ordered at random (1e-6).
        frame_jitter: the three vectors get N(0, frame_jitter^2) noise before Gram-Schmidt so a
            degenerate set does not collapse (1e-6).
    """

    name = "learned"
    PERMUTATION_NETWORKS = ("gin", "gin-bn")
    ROTATION_NETWORKS = ("vn", "vn-dgcnn")
    NOISE_MODES = ("add", "concat")

    def __init__(
        self,
        node_dim: int = 0,
        edge_dim: int = 0,
        point_channels: int = 0,
        hidden: int = 64,
        layers: int = 3,
        network: Optional[str] = None,
        noise: str = "add",
        noise_scale: float = 1.0,
        noise_dim: Optional[int] = None,
        degree: bool = True,
        neighbours: int = 4,
        dropout: float = 0.08,
        tau: Optional[float] = None,
        sinkhorn_iters: int = 20,
        entropy_weight: float = 0.1,
        tie_break: float = 1e-6,
        frame_jitter: float = 1e-6,
    ):
        super().__init__()
        if noise not in self.NOISE_MODES:
            raise ValueError(f"noise must be one of {self.NOISE_MODES}, got {noise!r}")
        if noise_dim is not None and noise != "concat":
            raise ValueError("noise_dim applies to noise='concat' only (added noise has the input's width)")
        known = self.PERMUTATION_NETWORKS + self.ROTATION_NETWORKS
        if network is not None and network not in known:
            raise ValueError(f"network must be one of {known}, got {network!r}")
        self.node_dim, self.edge_dim, self.point_channels = int(node_dim), int(edge_dim), int(point_channels)
        self.hidden, self.layers = hidden, layers
        self.network_arg, self.noise_mode = network, noise
        self.noise_scale, self.noise_dim_arg = float(noise_scale), noise_dim
        self.degree, self.neighbours, self.dropout = bool(degree), int(neighbours), float(dropout)
        self.tau_arg, self.sinkhorn_iters, self.entropy_weight = tau, int(sinkhorn_iters), float(entropy_weight)
        self.tie_break, self.frame_jitter = float(tie_break), float(frame_jitter)
        self.network = ""
        self.input_dim = 0
        self.noise_dim = 0
        self.tau = 0.0
        self.gin: Optional[nn.Module] = None
        self.vector_net: Optional[nn.Module] = None

    def bind(self, group: Group) -> "Learned":
        if self.group is not None:
            return super().bind(group)
        super().bind(group)
        if group.rotation is None:
            self.network = self.network_arg or "gin"
            if self.network not in self.PERMUTATION_NETWORKS:
                raise ValueError(f"Learned over {group!r} takes network in {self.PERMUTATION_NETWORKS}, got {self.network!r}")
            degree_dims = self.edge_dim if self.degree else 0
            # Without any node input the network reads a constant 1 (to which added noise goes).
            width = self._set_widths(max(self.node_dim + 3 * self.point_channels + degree_dims, 1))
            if self.network == "gin-bn":
                self.gin = BatchNormGIN(width, self.edge_dim, self.hidden, self.layers, 1, virtual_node=True)
            else:
                self.gin = DenseGIN(width, self.edge_dim, self.hidden, self.layers, 1, virtual_node=True)
        else:
            if self.point_channels < 1:
                raise ValueError(f"Learned over {group!r} needs point_channels >= 1 (the 3-vector inputs)")
            self.network = self.network_arg or "vn"
            if self.network not in self.ROTATION_NETWORKS:
                raise ValueError(f"Learned over {group!r} takes network in {self.ROTATION_NETWORKS}, got {self.network!r}")
            channels = self._set_widths(self.point_channels)
            if self.network == "vn-dgcnn":
                self.vector_net = VNDGCNN(channels, self.hidden, self.neighbours, self.dropout, scores=group.permutation)
            else:
                self.vector_net = VectorNeuronNet(channels, self.node_dim + self.edge_dim, self.hidden, self.layers,
                                                  scores=group.permutation)
        self.tau = float(self.tau_arg) if self.tau_arg is not None else (0.1 if group.rotation is not None else 0.01)
        return self

    def _set_widths(self, input_dim: int) -> int:
        """Record the network's clean input width and the noise width; return the input width
        the network reads (the clean width, plus the noise channels when concatenated)."""
        self.input_dim = input_dim
        concat = self.noise_mode == "concat"
        self.noise_dim = int(self.noise_dim_arg) if concat and self.noise_dim_arg is not None else input_dim
        return input_dim + (self.noise_dim if concat else 0)

    def extra_repr(self) -> str:
        return (f"network={self.network!r}, noise={self.noise_mode!r}, noise_scale={self.noise_scale}, "
                f"noise_dim={self.noise_dim}, tau={self.tau}, sinkhorn_iters={self.sinkhorn_iters}, "
                f"entropy_weight={self.entropy_weight}")

    def noise_spec(self, inputs, k):
        group = self._require_group()
        batch, n = inputs.batch, inputs.n
        specs = {}
        if self.noise_dim > 0 and self.noise_scale > 0:
            if group.rotation is None:
                specs["nodes"] = NoiseSpec((batch, k, n, self.noise_dim), "sample_node", "uniform", self.noise_scale)
            else:
                specs["points"] = NoiseSpec((batch, k, n, 3, self.noise_dim), "sample_point", "normal", self.noise_scale)
        if group.permutation and self.tie_break > 0:
            specs["tie_break"] = NoiseSpec((batch, k, n), "sample_node", "uniform", self.tie_break)
        if group.rotation is not None and self.frame_jitter > 0:
            specs["frame_jitter"] = NoiseSpec((batch, k, 3, 3), "sample_frame", "normal", self.frame_jitter)
        return specs

    def _check_dims(self, inputs: Inputs) -> None:
        got = {
            "node_dim": 0 if inputs.nodes is None else math.prod(inputs.nodes.shape[2:]),
            "edge_dim": 0 if inputs.edges is None else math.prod(inputs.edges.shape[3:]),
            "point_channels": 0 if inputs.points is None else inputs.points.shape[-1],
        }
        for name, value in got.items():
            if value != getattr(self, name):
                raise ValueError(f"Learned was built with {name}={getattr(self, name)} but the inputs have {value}")

    def _with_noise(self, clean: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """The network input of every sample: ``clean (B, k, ...)`` plus the noise, or with the
        noise as extra last-dim channels (zeros when none is drawn, e.g. a zero noise scale)."""
        if self.noise_mode == "add":
            return clean if noise is None else clean + noise
        if noise is None:
            noise = clean.new_zeros(*clean.shape[:-1], self.noise_dim)
        return torch.cat([clean, noise], dim=-1)

    def forward(self, inputs, noise, k):
        group = self._require_group()
        self._check_dims(inputs)
        specs = self.noise_spec(inputs, k)
        batch, n, mask = inputs.batch, inputs.n, inputs.mask
        edges = inputs.edge_features()
        if edges is not None and mask is not None:
            edges = zero_padding(edges, mask, (1, 2))
        sample = GroupSample(k=k)
        aux: Dict[str, torch.Tensor] = {}
        if group.rotation is None:
            features = self._node_input(inputs, edges)  # [B, n, input_dim]
            clean = features[:, None].expand(batch, k, n, self.input_dim)
            node_noise = self._noise(noise, "nodes", specs["nodes"]) if "nodes" in specs else None
            x = zero_padding(self._with_noise(clean, node_noise), mask, (2,))
            scores = self.gin(x, edges, mask, leading=(batch, k, n))[..., 0]  # [B, k, n]
        else:
            sample.center = group.center(inputs)
            points = inputs.points
            if sample.center is not None:
                points = points - _channel_center(sample.center, points.shape[-1], group.position_channels)[:, None]
                points = zero_padding(points, mask, (1,))
            clean = points[:, None].expand(batch, k, *points.shape[1:])  # [B, k, n, 3, C]
            point_noise = self._noise(noise, "points", specs["points"]) if "points" in specs else None
            if point_noise is not None and mask is not None:
                point_noise = zero_padding(point_noise, mask, (2,))
            vectors = self._with_noise(clean, point_noise)  # [B, k, n, 3, C']
            if self.network == "vn-dgcnn":
                sample_mask = None if mask is None else mask[:, None].expand(batch, k, n).reshape(batch * k, n)
                frame_vectors, scores = self.vector_net(vectors.reshape(batch * k, *vectors.shape[2:]), sample_mask)
                frame_vectors = frame_vectors.reshape(batch, k, 3, 3)
                scores = None if scores is None else scores.reshape(batch, k, n)
            else:
                scalars = self._scalar_features(inputs, edges)
                if scalars is not None:
                    scalars = scalars[:, None].expand(batch, k, n, scalars.shape[-1])
                rows, scores = self.vector_net(vectors.transpose(-1, -2), scalars, None if mask is None else mask[:, None])
                frame_vectors = rows.transpose(-1, -2)
            # frame_vectors: [B, k, 3, 3], columns are the three vectors
            if "frame_jitter" in specs:
                frame_vectors = frame_vectors + self._noise(noise, "frame_jitter", specs["frame_jitter"])
            sample.rotation = ops.gram_schmidt(frame_vectors, proper=group.proper)
        if group.permutation:
            if "tie_break" in specs:
                scores = scores + self._noise(noise, "tie_break", specs["tie_break"])
            sample.soft, sample.perm = ops.sinkhorn_sort(scores, self.tau, self.sinkhorn_iters, mask)
            if self.entropy_weight > 0:
                aux["entropy"] = self.entropy_weight * ops.permutation_entropy(sample.soft, mask)
        return sample, aux

    def _node_input(self, inputs: Inputs, edges: Optional[torch.Tensor]) -> torch.Tensor:
        """``(B, n, input_dim)``: node features, flattened 3-vectors and weighted degrees (or 1)."""
        parts = []
        features = inputs.node_features()
        if features is not None:
            parts.append(features)
        if self.degree and edges is not None:
            parts.append(edges.sum(dim=2))  # padded rows and columns are zero already
        if not parts:
            return torch.ones(inputs.batch, inputs.n, 1, dtype=inputs.dtype, device=inputs.device)
        return zero_padding(torch.cat(parts, dim=-1), inputs.mask, (1,))

    def _scalar_features(self, inputs: Inputs, edges: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """O(3)-invariant per-node features: node features and the mean of each edge channel."""
        parts = []
        if inputs.nodes is not None:
            parts.append(inputs.nodes.reshape(inputs.batch, inputs.n, math.prod(inputs.nodes.shape[2:])))
        if edges is not None:
            parts.append(masked_mean_nodes(edges, inputs.mask, node_dim=2))
        return torch.cat(parts, dim=-1) if parts else None


class Canonical(Learned):
    """Canonicalization: the ``Learned`` network without noise, one deterministic sample.

    Takes the arguments of :class:`Learned` except the noise ones. Nodes the network cannot
    tell apart (ties) are ordered by index, so exact equivariance needs inputs without ties.
    """

    name = "canonical"

    def __init__(self, **kwargs):
        for key in ("noise", "noise_scale", "noise_dim", "tie_break", "frame_jitter"):
            if key in kwargs:
                raise TypeError(f"Canonical takes no {key!r}: it draws no noise")
        super().__init__(noise="add", noise_scale=0.0, tie_break=0.0, frame_jitter=0.0, **kwargs)

    def num_samples(self, requested: int) -> int:
        return 1


_BY_NAME = {"learned": Learned, "uniform": Uniform, "frame": Frame, "canonical": Canonical,
            "identity": Identity, "none": Identity}


def create(name: str, **kwargs) -> Distribution:
    """A distribution by name: ``learned``, ``uniform``, ``frame``, ``canonical``, ``none``."""
    try:
        cls = _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(f"unknown distribution {name!r}; choose from {sorted(_BY_NAME)}") from None
    return cls(**kwargs)


__all__ = ["NoiseSpec", "Distribution", "Learned", "Uniform", "Frame", "Canonical", "Identity", "create",
           "wl_colors", "pca_frames"]
