"""Small equivariant layers shared by the distributions and the backbones.

* :class:`DenseGIN`: a graph isomorphism network on dense ``(B, n, n, C)`` edge tensors, with an
  optional virtual node; permutation-equivariant, padded nodes masked out of every sum.
* :class:`VNLinear`, :class:`VNLeakyReLU`, :class:`VectorNeuronNet`: vector neurons (Deng et
  al., 2021) on ``(..., C, 3)`` features: O(3)-equivariant, permutation-equivariant over nodes.

Normalisation is per node (LayerNorm), never across the batch, so a graph gives the same
output alone or padded inside a batch.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn


def make_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation=nn.ReLU, norm: bool = False) -> nn.Sequential:
    """``Linear -> [LayerNorm] -> activation`` for each hidden width, then a last Linear."""
    layers = []
    width = in_dim
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if norm:
            layers.append(nn.LayerNorm(h))
        layers.append(activation())
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def _mask_features(h: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero padded nodes of ``h (B, *S, n, d)`` with a mask ``(B, n)`` or ``(B, *S, n)``."""
    if mask is None:
        return h
    while mask.dim() < h.dim() - 1:
        mask = mask.unsqueeze(1)
    return h * mask[..., None].to(h.dtype)


class DenseGIN(nn.Module):
    """GIN layers ``h_i <- MLP((1 + eps) h_i + sum_j sum_c E_ijc W_c h_j [+ v])`` on dense edges.

    Args:
        in_dim: node input features (0: a constant feature is used).
        edge_dim: edge channels ``C`` (0: no message passing, a DeepSets-like network).
        hidden: hidden width; ``layers``: number of GIN layers; ``out_dim``: per-node output.
        virtual_node: add a virtual node connected to every real node (its state is summed
            from the real nodes and broadcast back at every layer).

    Shapes: ``x (B, *S, n, in_dim)``, ``edges (B, n, n, C)`` shared by the sample dims ``*S``,
    ``mask (B, n)`` bool; output ``(B, *S, n, out_dim)`` with padded nodes set to 0.
    """

    def __init__(
        self,
        in_dim: int,
        edge_dim: int,
        hidden: int = 64,
        layers: int = 3,
        out_dim: int = 1,
        virtual_node: bool = False,
    ):
        super().__init__()
        self.in_dim, self.edge_dim, self.hidden = in_dim, edge_dim, hidden
        self.embed = nn.Linear(max(in_dim, 1), hidden)
        self.eps = nn.Parameter(torch.zeros(layers))
        self.messages = nn.ModuleList(
            [nn.Linear(edge_dim * hidden, hidden, bias=False) for _ in range(layers)] if edge_dim > 0 else []
        )
        self.mlps = nn.ModuleList([make_mlp(hidden, [hidden], hidden, norm=True) for _ in range(layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(layers)])
        self.virtual_node = nn.Parameter(torch.zeros(hidden)) if virtual_node else None
        self.virtual_mlps = (
            nn.ModuleList([make_mlp(hidden, [hidden], hidden, norm=True) for _ in range(layers)]) if virtual_node else None
        )
        self.head = nn.Linear(hidden, out_dim)

    def node_states(self, x: Optional[torch.Tensor], edges: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                    leading: Tuple[int, ...] = ()) -> torch.Tensor:
        """Hidden node states ``(B, *S, n, hidden)``; ``leading`` gives ``(B, *S, n)`` when ``x`` is None."""
        if x is None or self.in_dim == 0:
            dtype = self.embed.weight.dtype if x is None else x.dtype
            shape = leading if x is None else x.shape[:-1]
            device = self.embed.weight.device if x is None else x.device
            x = torch.ones(*shape, 1, dtype=dtype, device=device)
        h = _mask_features(self.embed(x), mask)
        virtual = None
        if self.virtual_node is not None:
            virtual = self.virtual_node.expand(*h.shape[:-2], self.hidden)
        for layer, mlp in enumerate(self.mlps):
            update = (1 + self.eps[layer]) * h
            if self.edge_dim > 0:
                # [B, n, n, C] x [B, *S, n, d] -> [B, *S, n, C, d]: per-channel neighbour sums
                aggregated = torch.einsum("bijc,b...jd->b...icd", edges, h)
                update = update + self.messages[layer](aggregated.flatten(-2))
            if virtual is not None:
                update = update + virtual[..., None, :]
            h = _mask_features(torch.relu(self.norms[layer](mlp(update))), mask)
            if virtual is not None:
                virtual = self.virtual_mlps[layer](virtual + h.sum(dim=-2))
        return h

    def forward(self, x: Optional[torch.Tensor], edges: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                leading: Tuple[int, ...] = ()) -> torch.Tensor:
        return _mask_features(self.head(self.node_states(x, edges, mask, leading)), mask)


# ---------------------------------------------------------------------------------------------
# Vector neurons


class VNLinear(nn.Module):
    """Channel mixing of 3-vectors: ``(..., C_in, 3) -> (..., C_out, 3)``, no bias (equivariance)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        bound = 1.0 / max(in_channels, 1) ** 0.5
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels).uniform_(-bound, bound))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.weight, v)


class VNLeakyReLU(nn.Module):
    """Vector-neuron leaky ReLU: remove ``(1 - slope)`` of the component of ``v`` along a learned
    direction ``d = U v`` when ``<v, d> < 0``. ``(..., C, 3) -> (..., C, 3)``."""

    def __init__(self, channels: int, negative_slope: float = 0.2, eps: float = 1e-6):
        super().__init__()
        self.direction = VNLinear(channels, channels)
        self.negative_slope, self.eps = negative_slope, eps

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        d = self.direction(v)
        dot = (v * d).sum(dim=-1, keepdim=True)
        norm_sq = (d * d).sum(dim=-1, keepdim=True)
        correction = torch.where(dot < 0, dot / (norm_sq + self.eps), torch.zeros_like(dot))
        return v - (1 - self.negative_slope) * correction * d


def _masked_node_mean(v: torch.Tensor, mask: Optional[torch.Tensor], node_dim: int) -> torch.Tensor:
    """Mean over real nodes; ``mask`` broadcasts against ``v`` up to the node dim."""
    if mask is None:
        return v.mean(dim=node_dim)
    m = mask.to(v.dtype)
    for _ in range(v.dim() - 1 - (node_dim % v.dim())):
        m = m[..., None]
    return (v * m).sum(dim=node_dim) / m.sum(dim=node_dim).clamp_min(1.0)


class VectorNeuronNet(nn.Module):
    """An Sn x O(3)-equivariant network on point clouds with vector neurons.

    Each layer mixes every node's 3-vectors with the mean over real nodes (a PointNet-style
    global context), applies a VN nonlinearity, turns the vectors into O(3)-invariant scalars
    (``<v_c, (W v)_c>``), updates per-node scalars from them and gates the vectors with the
    scalars. Outputs: three equivariant vectors per input (from the node mean), and optionally
    one invariant score per node.

    Shapes: ``vectors (B, *S, n, C, 3)``, ``scalars (B, *S, n, F)`` or None, ``mask (B, 1.., n)``
    broadcastable to ``(B, *S, n)``; returns ``frame (B, *S, 3, 3)`` whose *rows* are the three
    vectors, and ``scores (B, *S, n)`` or None.
    """

    def __init__(self, vector_channels: int, scalar_dim: int = 0, hidden: int = 64, layers: int = 3,
                 scores: bool = True, negative_slope: float = 0.2):
        super().__init__()
        channels = max(hidden // 3, 1)
        self.scalar_dim = scalar_dim
        self.vector_layers = nn.ModuleList()
        self.nonlinearities = nn.ModuleList()
        self.invariant_maps = nn.ModuleList()
        self.scalar_layers = nn.ModuleList()
        self.gates = nn.ModuleList()
        width_v, width_s = vector_channels, scalar_dim
        for _ in range(layers):
            self.vector_layers.append(VNLinear(2 * width_v, channels))
            self.nonlinearities.append(VNLeakyReLU(channels, negative_slope))
            self.invariant_maps.append(VNLinear(channels, channels))
            self.scalar_layers.append(nn.Linear(width_s + channels, hidden))
            self.gates.append(nn.Linear(hidden, channels))
            width_v, width_s = channels, hidden
        self.frame_head = VNLinear(channels, 3)
        self.score_head = make_mlp(hidden + 2 * channels, [hidden], 1) if scores else None

    def forward(self, vectors: torch.Tensor, scalars: Optional[torch.Tensor], mask: Optional[torch.Tensor]):
        v = vectors
        node_mask = mask
        s = scalars if self.scalar_dim > 0 else None
        invariants = None
        for vector_layer, nonlinearity, invariant_map, scalar_layer, gate in zip(
            self.vector_layers, self.nonlinearities, self.invariant_maps, self.scalar_layers, self.gates
        ):
            context = _masked_node_mean(v, node_mask, node_dim=-3)[..., None, :, :].expand_as(v)
            v = nonlinearity(vector_layer(torch.cat([v, context], dim=-2)))
            invariants = (v * invariant_map(v)).sum(dim=-1)  # [..., n, channels], O(3)-invariant
            s = torch.relu(scalar_layer(invariants if s is None else torch.cat([s, invariants], dim=-1)))
            v = v * torch.sigmoid(gate(s))[..., None]
            if node_mask is not None:
                m = node_mask.to(v.dtype)
                v = v * m[..., None, None]
                s = s * m[..., None]
                invariants = invariants * m[..., None]
        frame = self.frame_head(_masked_node_mean(v, node_mask, node_dim=-3))  # [..., 3, 3], rows = vectors
        scores = None
        if self.score_head is not None:
            pooled = _masked_node_mean(invariants, node_mask, node_dim=-2)[..., None, :].expand_as(invariants)
            scores = self.score_head(torch.cat([s, invariants, pooled], dim=-1))[..., 0]
        return frame, scores


__all__ = ["make_mlp", "DenseGIN", "VNLinear", "VNLeakyReLU", "VectorNeuronNet"]
