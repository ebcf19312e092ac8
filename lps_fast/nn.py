"""Small equivariant layers shared by the distributions and the backbones.

* :class:`DenseGIN`: a graph isomorphism network on dense ``(B, n, n, C)`` edge tensors, with an
  optional virtual node; permutation-equivariant, padded nodes masked out of every sum.
* :class:`VNLinear`, :class:`VNLeakyReLU`, :class:`VectorNeuronNet`: vector neurons (Deng et
  al., 2021) on ``(..., C, 3)`` features: O(3)-equivariant, permutation-equivariant over nodes.
* :class:`BatchNormGIN` and :class:`VNDGCNN`: the distribution networks of the paper's
  experiments (a GIN with batch norm and a virtual graph node; a vector-neuron DGCNN with kNN
  edge convolutions and vector batch norm, on channel-last ``(..., 3, C)`` vectors).

``DenseGIN`` and ``VectorNeuronNet`` normalise per node (LayerNorm), never across the batch, so
a graph gives the same output alone or padded inside a batch. ``BatchNormGIN`` and ``VNDGCNN``
use batch statistics in training mode (over the real nodes of the batch only; padding never
enters them) and running statistics in eval mode, as the paper's networks do; both stay exactly
equivariant in either mode, since the statistics are sums over nodes of invariant quantities.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import _backend


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


# ---------------------------------------------------------------------------------------------
# Batch-norm networks of the paper's distributions


def _broadcast_mask(mask: Optional[torch.Tensor], shape: torch.Size) -> Optional[torch.Tensor]:
    """``mask`` (leading dims of ``shape``, missing trailing dims broadcast) as a float tensor of
    ``shape[:-1] + (1,)``."""
    if mask is None:
        return None
    while mask.dim() < len(shape) - 1:
        mask = mask.unsqueeze(-1)
    return mask.expand(*shape[:-1]).unsqueeze(-1)


class MaskedBatchNorm(nn.Module):
    """Batch norm of the last dim over the entries a mask selects (padded nodes stay out of the
    statistics). ``x (..., C)``; ``mask`` bool, broadcastable to ``x.shape[:-1]`` from the left.

    Training mode normalises with the batch mean and (biased) variance and updates running
    estimates with ``momentum``; eval mode uses the running estimates, like ``nn.BatchNorm1d``.
    Entries outside the mask are returned transformed but carry no meaning.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.training:
            selected = _broadcast_mask(mask, x.shape)
            if selected is None:
                flat = x.reshape(-1, x.shape[-1])
                count = flat.new_tensor(float(flat.shape[0]))
                mean = flat.mean(0)
                var = (flat - mean).pow(2).mean(0)
            else:
                weights = selected.to(x.dtype)
                count = weights.sum()
                denominator = count.clamp_min(1.0)
                mean = (x * weights).reshape(-1, x.shape[-1]).sum(0) / denominator
                var = ((x - mean).pow(2) * weights).reshape(-1, x.shape[-1]).sum(0) / denominator
            self.update_running(mean, var, count)
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias

    @torch.no_grad()
    def update_running(self, mean: torch.Tensor, var: torch.Tensor, count) -> None:
        """Move the running estimates towards a batch's ``mean`` and biased ``var`` over ``count`` entries."""
        unbiased = var * (count / (count - 1).clamp_min(1.0))
        self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)


class _BatchNormMLP(nn.Module):
    """``Linear -> MaskedBatchNorm -> ReLU -> Linear`` (the two-layer MLP inside a GIN layer)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.first, self.norm, self.second = nn.Linear(in_dim, hidden), MaskedBatchNorm(hidden), nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.second(torch.relu(self.norm(self.first(x), mask)))


class BatchNormGIN(nn.Module):
    """The paper's graph distribution network: GIN layers with batch norm and a virtual node.

    Layer ``l``: ``h_i <- ReLU(BN(MLP((1 + eps_l) h_i + sum_j A_ij h_j + h_v)))`` with a learnable
    ``eps_l`` (initialised in [0, 1)). The virtual node ``v`` is an extra graph node, linked to
    every real node in both directions and to itself, whose input is a learned vector; it runs
    through the same layers (``h_v <- ... (1 + eps_l) h_v + h_v + sum_i h_i``). The first layer
    reads the raw node input (no embedding). With ``edge_dim > 1`` the neighbour sums of each edge
    channel are mixed by a linear map; with one channel it is the plain adjacency sum.

    Shapes: ``x (B, *S, n, in_dim)``, ``edges (B, n, n, C)`` shared by the sample dims ``*S``,
    ``mask (B, n)``; output ``(B, *S, n, out_dim)`` for the real nodes (padded nodes are 0).
    """

    def __init__(self, in_dim: int, edge_dim: int, hidden: int = 64, layers: int = 3, out_dim: int = 1,
                 virtual_node: bool = True):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.in_dim, self.edge_dim, self.hidden = max(int(in_dim), 1), int(edge_dim), int(hidden)
        widths = [self.in_dim] + [self.hidden] * layers
        self.eps = nn.Parameter(torch.rand(layers))
        self.edge_mixes = nn.ModuleList(
            [nn.Linear(self.edge_dim * widths[i], widths[i], bias=False) for i in range(layers)]
            if self.edge_dim > 1 else []
        )
        self.mlps = nn.ModuleList([_BatchNormMLP(widths[i], self.hidden, self.hidden) for i in range(layers)])
        self.norms = nn.ModuleList([MaskedBatchNorm(self.hidden) for _ in range(layers)])
        self.virtual_node = nn.Parameter(torch.randn(self.in_dim)) if virtual_node else None
        self.head = nn.Linear(self.hidden, out_dim)

    def _neighbour_sum(self, layer: int, edges: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.edge_dim == 1:
            return torch.matmul(edges[..., 0].reshape(edges.shape[0], *([1] * (h.dim() - 3)), *edges.shape[1:3]), h)
        per_channel = torch.einsum("bijc,b...jd->b...icd", edges, h)
        return self.edge_mixes[layer](per_channel.flatten(-2))

    def forward(self, x: Optional[torch.Tensor], edges: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                leading: Tuple[int, ...] = ()) -> torch.Tensor:
        if x is None:
            x = torch.ones(*leading, 1, dtype=self.head.weight.dtype, device=self.head.weight.device)
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"BatchNormGIN expects {self.in_dim} input features per node, got {x.shape[-1]}")
        node_mask = None if mask is None else mask.reshape(mask.shape[0], *([1] * (x.dim() - 3)), mask.shape[-1])
        h = _mask_features(x, node_mask)
        virtual = None
        if self.virtual_node is not None:
            virtual = self.virtual_node.to(x.dtype).expand(*x.shape[:-2], self.in_dim)
        for layer in range(len(self.mlps)):
            scale = 1 + self.eps[layer]
            update = scale * h
            if edges is not None and self.edge_dim > 0:
                update = update + self._neighbour_sum(layer, edges, h)
            if virtual is not None:
                update = update + virtual[..., None, :]
                virtual_update = (scale + 1) * virtual + h.sum(dim=-2)
                # One batch-norm population: the real nodes and the virtual node of every graph.
                stacked = torch.cat([update, virtual_update[..., None, :]], dim=-2)
                stacked_mask = None
                if node_mask is not None:
                    ones = torch.ones_like(node_mask[..., :1]).expand(*node_mask.shape[:-1], 1)
                    stacked_mask = torch.cat([node_mask, ones], dim=-1)
                out = torch.relu(self.norms[layer](self.mlps[layer](stacked, stacked_mask), stacked_mask))
                h, virtual = _mask_features(out[..., :-1, :], node_mask), out[..., -1, :]
            else:
                out = torch.relu(self.norms[layer](self.mlps[layer](update, node_mask), node_mask))
                h = _mask_features(out, node_mask)
        return _mask_features(self.head(h), node_mask)


_VN_EPS = 1e-6


# The layers below keep 3-vectors channel-last, ``(..., 3, C)`` (the layout of ``points``), so
# that every channel mixing is one plain matrix product over the last dim.


def _safe_length(v: torch.Tensor) -> torch.Tensor:
    """``|v|`` over the xyz dim of ``(..., 3, C)``, with a zero gradient at ``v = 0`` (padded
    nodes' vectors are zero, and sqrt's gradient there would be NaN)."""
    squared = (v * v).sum(dim=-2)  # norm() over a middle dim is slow
    nonzero = squared > 0
    return torch.where(nonzero, squared, torch.ones_like(squared)).sqrt() * nonzero


_fused_vn_kernels: Optional[dict] = None


def _vn_kernels() -> dict:
    """The network's compiled kernels, looked up once: ``cpp`` (vn_layer on CPU), ``triton``
    (vn_layer_triton, registered by lps_fast.kernels) and ``score_head`` (vn_score_head on
    CPU); None where a kernel is not registered."""
    global _fused_vn_kernels
    if _fused_vn_kernels is None:
        namespace = torch.ops.lps_fast

        def on_cpu(name):
            registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"lps_fast::{name}", "CPU")
            return getattr(namespace, name) if registered else None

        _fused_vn_kernels = {"cpp": on_cpu("vn_layer"), "triton": getattr(namespace, "vn_layer_triton", None),
                             "score_head": on_cpu("vn_score_head"), "network": on_cpu("vn_dgcnn"),
                             "matmul": on_cpu("vn_matmul"), "knn": on_cpu("vn_knn")}
    return _fused_vn_kernels


def _fused_vn_op(t: torch.Tensor):
    """The fused ``vn_layer`` kernel that serves ``t``, or None (the composed layers run).

    CPU: the compiled kernel (unless a backend other than ``cpp`` is forced; with ``triton``
    forced under ``TRITON_INTERPRET=1``, the Triton kernel). CUDA: the Triton kernel, unless a
    backend other than ``triton`` is forced. The reference backend always runs the composed
    layers, which are what the kernels are tested against."""
    if t.dtype not in (torch.float32, torch.float64):
        return None
    kernels = _vn_kernels()
    forced, device = _backend.state.forced, t.device.type
    if device == "cpu" and forced in (None, "cpp"):
        return kernels["cpp"]
    if forced in ((None, "triton") if device == "cuda" else ("triton",)) and _backend._serves("triton", device):
        return kernels["triton"]
    return None


def _stacked_maps(v: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``v (..., K) @ stacked (K, M)``: the fused layers' linear maps side by side. On CPU the
    compiled ``vn_matmul`` (the kernel the whole-network op runs too, so both paths give the same
    maps bit for bit, and pick the same kNN neighbours among ties); elsewhere ``torch.matmul``."""
    matmul = _vn_kernels()["matmul"] if v.device.type == "cpu" else None
    return torch.matmul(v, stacked) if matmul is None else matmul(v, stacked)


def _vector_map(linear: nn.Linear, v: torch.Tensor) -> torch.Tensor:
    """``linear`` over the channels of vectors ``v (..., C)``: without a bias, where the fused kernels
    serve, by their matrix product (the whole-network op's, so that both paths agree bit for bit)."""
    return _stacked_maps(v, linear.weight.t()) if linear.bias is None and fused_vn_available(v) else linear(v)


def fused_vn_available(t: torch.Tensor) -> bool:
    """Whether :func:`vn_layer` runs a fused kernel on ``t`` (float32/64; see ``_fused_vn_op``);
    elsewhere the VN layers run their composed PyTorch formulation, the reference the kernels
    are tested against."""
    return _fused_vn_op(t) is not None


def vn_layer(p: torch.Tensor, d: torch.Tensor, norm: "MaskedBatchNorm", mask: Optional[torch.Tensor],
             negative_slope: float, p_centre: Optional[torch.Tensor] = None, d_centre: Optional[torch.Tensor] = None,
             neighbours: Optional[torch.Tensor] = None, pool: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Vector batch norm and VN leaky ReLU in one kernel (``lps_fast::vn_layer``, or
    ``vn_layer_triton`` on GPUs), and with ``neighbours``/``pool`` the max-pool of a kNN edge
    convolution, on linear maps computed by the caller. ``p (N, n, 3, C)``, ``d (N, n, 3, D)`` (D = 1 or C), ``mask (N, n)`` bool.

    Entry ``(b, i)`` (or ``(b, i, k)`` with ``neighbours (N, n, K)``) holds
    ``p[b, j] + p_centre[b, i]`` and ``d[b, j] + d_centre[b, i]`` with ``j = neighbours[b, i, k]``
    (``j = i`` without neighbours). ``norm`` supplies the affine parameters and running
    statistics (updated here in training mode, over the real nodes' entries). With pooling,
    each node keeps per channel the entry of largest projection on ``pool @ out`` and padded
    nodes are 0: the same values as :class:`VNLinearLeakyReLU` on ``[v_j - v_i, v_i]`` followed by
    :class:`VNMaxPool`.
    """
    training = norm.training
    op = _fused_vn_op(p)
    if op is None:
        raise RuntimeError(f"no fused vn_layer kernel serves {p.dtype} tensors on {p.device} under the current "
                           "backend; the VN layers run their composed form there (see fused_vn_available)")
    out, _, stats = op(
        p, d, p_centre, d_centre, neighbours, pool, mask, norm.weight.to(p.dtype), norm.bias.to(p.dtype),
        None if training else norm.running_mean.to(p.dtype), None if training else norm.running_var.to(p.dtype),
        norm.eps, negative_slope)
    if training:
        nodes = p.shape[0] * p.shape[1] if mask is None else mask.sum()
        count = torch.as_tensor(nodes * (1 if neighbours is None else neighbours.shape[2]), dtype=p.dtype)
        norm.update_running(stats[0], stats[1], count)
    return out


class VNBatchNorm(nn.Module):
    """Vector batch norm: each 3-vector keeps its direction and its norm is batch-normalised.
    ``v (..., 3, C)``; ``mask`` selects the entries of the statistics (broadcast from the left)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = MaskedBatchNorm(channels)

    def forward(self, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        length = _safe_length(v) + _VN_EPS  # [..., C]
        return v * (self.norm(length, mask) / length).unsqueeze(-2)


class VNLinearLeakyReLU(nn.Module):
    """``linear -> VNBatchNorm -> VN leaky ReLU`` on ``(..., 3, C)``; the nonlinearity's directions
    are a linear map of the layer *input* (one shared direction with ``shared_direction``): the
    component of a vector along its direction is scaled by ``negative_slope`` where they point
    apart."""

    def __init__(self, in_channels: int, out_channels: int, shared_direction: bool = False, negative_slope: float = 0.2):
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=False)
        self.norm = VNBatchNorm(out_channels)
        self.direction = nn.Linear(in_channels, 1 if shared_direction else out_channels, bias=False)
        self.negative_slope = negative_slope

    def forward(self, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if fused_vn_available(v) and v.dim() >= 3:
            leading = v.shape[:-2]
            rows = v.reshape(-1, 1, *v.shape[-2:])
            flat_mask = None if mask is None else _broadcast_mask(mask, v.shape[:-1])[..., 0].reshape(-1, 1).bool()
            # weights as one contiguous (in, out) matrix: see VNDGCNN._edge_conv
            both = _stacked_maps(rows, torch.cat([self.linear.weight.t(), self.direction.weight.t()], dim=1))
            p, d = both.split([self.linear.out_features, self.direction.out_features], dim=-1)
            out = vn_layer(p, d, self.norm.norm, flat_mask, self.negative_slope)
            return out.reshape(*leading, *out.shape[-2:])
        p = self.norm(self.linear(v), mask)
        d = self.direction(v)
        dot = (p * d).sum(-2, keepdim=True)
        scale = torch.where(dot < 0, dot / ((d * d).sum(-2, keepdim=True) + _VN_EPS), torch.zeros_like(dot))
        return p - (1 - self.negative_slope) * scale * d


class VNMaxPool(nn.Module):
    """Per channel, the vector of largest projection on a learned direction, over dim ``dim`` of
    ``v (..., 3, C)`` (a node or neighbour dim left of the xyz dim). ``valid`` (bool, the shape of
    ``v`` up to that dim) excludes entries."""

    def __init__(self, channels: int):
        super().__init__()
        self.direction = nn.Linear(channels, channels, bias=False)

    def forward(self, v: torch.Tensor, dim: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        dim = dim % v.dim()
        score = (v * _vector_map(self.direction, v)).sum(-2)  # [..., C] without the xyz dim
        if valid is not None:
            while valid.dim() < score.dim():
                valid = valid.unsqueeze(-1)
            score = score.masked_fill(~valid, float("-inf"))
        # argmax along a trailing dim is much faster than along a middle one
        index = score.movedim(dim, -1).contiguous().argmax(-1).unsqueeze(dim)  # [..., 1 at dim, ..., C]
        index = index.unsqueeze(-2).expand(*v.shape[:dim], 1, *v.shape[dim + 1:])
        return torch.gather(v, dim, index).squeeze(dim)


def knn_neighbours(v: torch.Tensor, k: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Indices ``(N, n, k)`` of the ``k`` nearest nodes of each node (itself included) by the
    distance of the flattened features ``v (N, n, ...)``; padded nodes are never neighbours and
    slots beyond the real nodes repeat the node itself (harmless under max pooling)."""
    kernel = _vn_kernels()["knn"] if v.device.type == "cpu" and fused_vn_available(v) else None
    if kernel is not None:  # the whole-network op's kernel, so that both paths pick the same neighbours
        return kernel(v.detach(), k, mask)
    flat = v.detach().flatten(2)
    squared = (flat * flat).sum(-1)
    distance = squared[:, :, None] + squared[:, None, :] - 2 * torch.matmul(flat, flat.transpose(1, 2))
    n = v.shape[1]
    k = min(k, n)
    if mask is not None:
        distance = distance.masked_fill(~mask[:, None, :], float("inf"))
    # The node itself first, whatever rounding says about its distance.
    eye = torch.eye(n, dtype=torch.bool, device=v.device)
    distance = distance.masked_fill(eye, float("-inf"))
    # a stable sort orders equal distances by node index, as the whole-network kernel does (topk
    # leaves their order unspecified)
    nearest, index = (t[..., :k] for t in torch.sort(distance, dim=-1, stable=True))
    if mask is not None:
        itself = torch.arange(n, device=v.device)[None, :, None].expand_as(index)
        index = torch.where(torch.isinf(nearest) & (nearest > 0), itself, index)
    return index


def edge_features(v: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """``[v_j - v_i, v_i]`` (channels) for each node ``i`` and neighbour ``j``: ``v (N, n, 3, C)``
    -> ``(N, n, k, 3, 2C)``."""
    batch, n, k = neighbours.shape
    flat = v.reshape(batch, n, -1)
    rows = torch.arange(batch, device=v.device)[:, None, None]
    gathered = flat[rows, neighbours].reshape(batch, n, k, *v.shape[2:])
    centre = v[:, :, None].expand_as(gathered)
    return torch.cat([gathered - centre, centre], dim=-1)


def _vector_dropout(v: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout of whole 3-vectors of ``(..., 3, C)`` (dropping coordinates would break equivariance)."""
    if not training or p <= 0:
        return v
    return v * _dropout_keep((*v.shape[:-2], 1, v.shape[-1]), p, v)


def _dropout_keep(shape, p: float, like: torch.Tensor) -> torch.Tensor:
    """The multiplier of a vector dropout: ``1 / (1 - p)`` where kept, 0 where dropped."""
    # uniform draws compared in place: half the time of bernoulli_ on CPU
    return torch.rand(*shape, dtype=like.dtype, device=like.device).lt_(1 - p).mul_(1 / (1 - p))


def _mask_vectors(v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return v if mask is None else v * mask[..., None, None].to(v.dtype)


def _fused_score_head_op(t: torch.Tensor):
    """The compiled ``vn_score_head`` kernel where it serves ``t`` (CPU, float32/64, the default or
    ``cpp`` backend), else None: the composed formulation runs, as on other devices and under
    the reference backend."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or \
            _backend.state.forced not in (None, "cpp"):
        return None
    return _vn_kernels()["score_head"]


def _whole_network_op(t: torch.Tensor):
    """The compiled whole-network ``vn_dgcnn`` kernel where it serves ``t`` (as the score head's:
    CPU, float32/64, the default or ``cpp`` backend, and not while torch.compile traces), else None."""
    if _fused_score_head_op(t) is None or torch.compiler.is_compiling():
        return None
    return _vn_kernels()["network"]


class _WholeNetwork(torch.autograd.Function):
    """:class:`VNDGCNN` as one autograd node: ``vn_dgcnn`` forward, ``vn_dgcnn_backward`` for every
    parameter gradient (the network's input is noise plus data: no gradient flows to it)."""

    @staticmethod
    def forward(ctx, net: "VNDGCNN", settings, points, mask, keeps, *params):
        slope, eps, momentum = settings
        frame, scores, saved = _vn_kernels()["network"](
            points, mask, list(params), net._running_buffers(), keeps, net.neighbours, slope, eps, momentum,
            net.training, net.with_scores)
        ctx.settings = (net.neighbours, slope, eps, net.training, net.with_scores)
        ctx.device_type = points.device.type
        ctx.count = len(params)
        ctx.save_for_backward(points, mask, *keeps, *params, *saved)
        ctx.mark_non_differentiable(*([] if net.with_scores else [scores]))
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None (see backward)
        return frame, scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_frame, grad_scores):
        with torch.autocast(ctx.device_type, enabled=False):  # as the forward ran (see VNDGCNN.forward)
            return _WholeNetwork._backward(ctx, grad_frame, grad_scores)

    @staticmethod
    def _backward(ctx, grad_frame, grad_scores):
        points, mask, keep1, keep2, *rest = ctx.saved_tensors
        params, saved = rest[:ctx.count], rest[ctx.count:]
        neighbours, slope, eps, training, scores = ctx.settings
        # parameters that only an unused output reaches get None, as layer by layer
        unreached = set()
        if grad_frame is None:
            grad_frame = points.new_zeros((points.shape[0], 3, 3))
            unreached |= {11}  # frame_head
        if grad_scores is None:
            grad_scores = points.new_zeros(points.shape[:2] if scores else (0,))
            unreached |= {5, 6, 7, 8} | set(range(12, len(params)))  # conv2 and the score branch
        grads = torch.ops.lps_fast.vn_dgcnn_backward(grad_frame, grad_scores, points, mask, params, [keep1, keep2],
                                                     saved, neighbours, slope, eps, training, scores)
        return (None, None, None, None, None, *(None if i in unreached or (g.numel() == 0 and p.numel()) else g
                                          for i, (g, p) in enumerate(zip(grads, params))))


def vn_score_head_composed(x: torch.Tensor, frame: torch.Tensor, pair: torch.Tensor, mask: Optional[torch.Tensor],
                           weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The invariant per-node scores of :class:`VNDGCNN` in PyTorch ops (the reference of the
    ``vn_score_head`` kernel): a linear head on the coordinates of ``x (N, n, 3, W)`` in each
    node's ``frame (N, n, 3, 3)`` (columns the frame vectors) max-pooled over the real nodes
    (0 for a graph without any), and on the coordinates of ``pair (N, n, 3, V)`` at the node.
    ``weight`` (3W + 3V) holds the head's weights in (channel, frame vector) order, pooled part
    first; padded nodes score 0."""
    # coordinates held as [N, n, 3, W] (frame vector e, channel c): a broadcast product summed
    # over xyz with the channels innermost runs forward and backward 1.7x faster than a batched
    # 3 x 3 matmul per node, [N, n, W, 3].
    coords = (frame.transpose(-1, -2).unsqueeze(-1) * x.unsqueeze(-3)).sum(-2)
    pooled = coords.flatten(-2)
    if mask is not None:
        pooled = pooled.masked_fill(~mask[..., None], float("-inf"))
    # max over nodes: amax (values only) is several times faster than max with indices; exact
    # ties share the gradient, a subgradient as good as the first maximum's
    pooled = pooled.amax(dim=1)  # [N, 3 * W], index e * W + c
    if mask is not None:
        pooled = torch.where(mask.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))
    width = 3 * x.shape[-1]
    head_pooled = weight[:width].reshape(x.shape[-1], 3).t().reshape(-1)
    # the pair part is linear in the coordinates: applied to pair first (one matmul, no per-node
    # products)
    head_pair = weight[width:].reshape(pair.shape[-1], 3)
    pair_term = (torch.matmul(pair, head_pair) * frame).sum(dim=(-1, -2))  # [N, n]
    scores = pair_term + torch.matmul(pooled, head_pooled)[:, None] + bias.reshape(())
    if mask is not None:
        scores = scores * mask.to(scores.dtype)
    return scores


class VNDGCNN(nn.Module):
    """The paper's n-body distribution network: a vector-neuron DGCNN over 3-vector channels.

    Two kNN edge convolutions (neighbours recomputed from the features of each layer; each a
    ``VNLinearLeakyReLU`` on ``[v_j - v_i, v_i]`` with vector batch norm, max-pooled over the
    neighbours), a third per-node layer on both, concatenated with its mean over nodes. Outputs:

    * ``frame (N, 3, 3)``, *columns* the three equivariant vectors: a max-pool over nodes of the
      first layer's features, mapped to 3 vectors;
    * ``scores (N, n)`` (with ``scores=True``), invariant per node: the features projected on a
      learned equivariant per-node frame, with a max-pool over nodes for global context.

    Shapes: ``points (N, n, 3, C)`` (the layout of ``inputs['points']``), ``mask (N, n)`` bool or
    None. ``hidden`` is split in 3-vector channels of ``hidden // 3``.

    On CPU (float32/64, the default backend) a call whose input needs no gradient (the learned
    distribution's: noise plus data) runs the whole network as one compiled op each way
    (``lps_fast::vn_dgcnn``, ``vn_dgcnn_backward``: one autograd node); otherwise, and under
    ``torch.compile``, under ``torch.func`` transforms and while any layer has a hook, it runs layer
    by layer on the fused ``vn_layer`` kernel, or on the composed layers under the reference
    backend. All three give the same values (to rounding; equal kNN distances are ordered by node
    index on every path).
    """

    def __init__(self, vector_channels: int, hidden: int = 64, neighbours: int = 4, dropout: float = 0.08,
                 scores: bool = True, negative_slope: float = 0.2):
        super().__init__()
        if vector_channels < 1:
            raise ValueError(f"VNDGCNN needs at least one 3-vector channel, got {vector_channels}")
        channels = max(hidden // 3, 4)
        self.neighbours, self.dropout = int(neighbours), float(dropout)
        slope = dict(negative_slope=negative_slope)
        self.conv1 = VNLinearLeakyReLU(2 * vector_channels, channels, **slope)
        self.conv2 = VNLinearLeakyReLU(2 * channels, channels, **slope)
        self.pool1, self.pool2 = VNMaxPool(channels), VNMaxPool(channels)
        self.frame_pool = VNMaxPool(channels)
        self.frame_head = nn.Linear(channels, 3, bias=False)
        self.with_scores = scores
        if scores:
            self.conv3 = VNLinearLeakyReLU(2 * channels, channels, shared_direction=True, **slope)
            width = 2 * channels
            self.std1 = VNLinearLeakyReLU(width, width // 2, **slope)
            self.std2 = VNLinearLeakyReLU(width // 2, width // 4, **slope)
            self.std_frame = nn.Linear(width // 4, 3, bias=False)
            self.score_head = nn.Linear(3 * width + 3 * 2 * channels, 1)

    def _whole_network_params(self) -> list:
        """The parameters in the order of the ``vn_dgcnn`` kernel (csrc/vn_dgcnn.cpp)."""
        def conv(layer):
            return [layer.linear.weight, layer.direction.weight, layer.norm.norm.weight, layer.norm.norm.bias]

        params = conv(self.conv1) + [self.pool1.direction.weight] + conv(self.conv2) + [self.pool2.direction.weight]
        params += [self.frame_pool.direction.weight, self.frame_head.weight]
        if self.with_scores:
            params += conv(self.conv3) + conv(self.std1) + conv(self.std2)
            params += [self.std_frame.weight, self.score_head.weight, self.score_head.bias]
        return params

    def _vn_layers(self) -> list:
        """The network's VNLinearLeakyReLU layers, in the kernel's order of batch norms."""
        return [self.conv1, self.conv2] + ([self.conv3, self.std1, self.std2] if self.with_scores else [])

    def _running_buffers(self) -> list:
        return [t for layer in self._vn_layers() for t in (layer.norm.norm.running_mean, layer.norm.norm.running_var)]

    def _whole_network_serves(self, points: torch.Tensor, mask: Optional[torch.Tensor]):
        """The ``(slope, batch-norm eps, momentum)`` the whole-network kernel runs this call with,
        or None where it does not serve it. It serves when its kernel serves ``points``, no gradient
        is asked of the input, every parameter has the input's dtype, and the layers share the one
        slope, eps and momentum that the kernel takes."""
        if _whole_network_op(points) is None or points.requires_grad or points.dim() != 4 or points.numel() == 0:
            return None
        if torch._C._are_functorch_transforms_active():  # vmap and friends: the layers compose
            return None
        if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in self.modules() if m is not self):  # hooks on the layers must see them run
            return None
        if mask is not None and mask.dtype != torch.bool:
            return None
        if any(p.dtype != points.dtype or p.device != points.device for p in self._whole_network_params()):
            return None
        settings = {(layer.negative_slope, layer.norm.norm.eps, layer.norm.norm.momentum) for layer in self._vn_layers()}
        if len(settings) != 1:
            return None
        slope, eps, momentum = settings.pop()
        return None if momentum is None else (slope, eps, momentum)

    def _edge_conv(self, v, mask, conv, pool):
        neighbours = knn_neighbours(v, self.neighbours, mask)
        if fused_vn_available(v):
            # linear([v_j - v_i, v_i]) = W1 v_j + (W2 - W1) v_i: one matmul over the nodes, not the edges
            channels, out_channels = v.shape[-1], conv.linear.out_features
            w, wd = conv.linear.weight, conv.direction.weight
            # The four maps as one contiguous (in, out) matrix. A transposed view would make
            # autograd form the weight gradient as grad^T @ v, (out, rows) x (rows, in), which BLAS
            # runs up to 6x slower than v^T @ grad at these shapes (in = 2: 0.6 against 0.1 ms).
            stacked = torch.cat([w[:, :channels].t(), (w[:, channels:] - w[:, :channels]).t(),
                                 wd[:, :channels].t(), (wd[:, channels:] - wd[:, :channels]).t()], dim=1)
            p, p_centre, d, d_centre = _stacked_maps(v, stacked).split(
                [out_channels, out_channels, wd.shape[0], wd.shape[0]], dim=-1)
            return vn_layer(p, d, conv.norm.norm, mask, conv.negative_slope, p_centre, d_centre, neighbours,
                            pool.direction.weight)
        features = edge_features(v, neighbours)  # [N, n, k, 3, 2C]
        valid = None if mask is None else mask[:, :, None].expand(neighbours.shape)
        return _mask_vectors(pool(conv(features, valid), dim=2, valid=valid), mask)

    def forward(self, points: torch.Tensor, mask: Optional[torch.Tensor] = None):
        device = points.device.type
        if torch.is_autocast_enabled(device) and fused_vn_available(points):
            # The fused kernels compute in their input's dtype, and under autocast the linear maps
            # around them (the heads, the kNN distances inside the whole-network op) would hand
            # them bfloat16 or float16 values: the network runs in the input's dtype instead.
            with torch.autocast(device, enabled=False):
                return self.forward(points, mask)
        settings = self._whole_network_serves(points, mask)
        if settings:
            keeps = [_dropout_keep(points.shape[:2] + (1, self.conv1.linear.out_features), self.dropout, points)
                     if self.training and self.dropout > 0 else points.new_empty((0,)) for _ in range(2)]
            frame, scores = _WholeNetwork.apply(self, settings, points, mask, keeps, *self._whole_network_params())
            return frame, scores if self.with_scores else None
        x1 = self._edge_conv(points, mask, self.conv1, self.pool1)  # [N, n, 3, C]
        x2 = self._edge_conv(_vector_dropout(x1, self.dropout, self.training), mask, self.conv2, self.pool2)
        x2 = _vector_dropout(x2, self.dropout, self.training)
        frame = _vector_map(self.frame_head, self.frame_pool(x1, dim=1, valid=mask))  # [N, 3, 3]: columns are vectors
        if not self.with_scores:
            return frame, None
        x12 = torch.cat([x1, x2], dim=-1)
        x = self.conv3(x12, mask)
        context = _masked_node_mean(x, mask, node_dim=1)[:, None].expand_as(x)
        x = torch.cat([x, context], dim=-1)  # [N, n, 3, 2C]
        local = _vector_map(self.std_frame, self.std2(self.std1(x, mask), mask))  # [N, n, 3, 3]: a frame per node
        weight, bias = self.score_head.weight[0], self.score_head.bias
        fused = _fused_score_head_op(x)
        if fused is not None:
            scores = fused(x, local, x12, mask, weight, bias)
        else:
            scores = vn_score_head_composed(x, local, x12, mask, weight, bias)
        return frame, scores


__all__ = ["make_mlp", "vn_layer", "fused_vn_available", "DenseGIN", "VNLinear", "VNLeakyReLU", "VectorNeuronNet", "MaskedBatchNorm", "BatchNormGIN",
           "VNBatchNorm", "VNLinearLeakyReLU", "VNMaxPool", "VNDGCNN", "vn_score_head_composed", "knn_neighbours"]
