"""Backbones to symmetrize: plain networks that know nothing of the group.

Each takes the dict of views that :class:`lps_fast.Symmetrize` passes (``nodes (N, n, *F)``,
``edges (N, n, n, *F)``, ``points (N, n, 3, C)``, ``mask (N, n)``, with ``N = B * k``) and
returns ``(N, out_dim)`` for ``output="invariant"``, ``(N, n, out_dim)`` for ``"node"``,
``(N, n, n, out_dim)`` for ``"edge"`` and ``(N, n, 3, out_dim)`` for ``"vector"``. Padded nodes
(mask False) are zeroed on the way in; a graph gives the same output alone or padded in a batch.

* :class:`MLP`: an MLP on the flattened (permuted) node features and adjacency, padded to
  ``max_nodes`` (the graph-separation models of the paper).
* :class:`GINID`: a GIN whose nodes carry their position as a one-hot identifier (GIN-ID);
  with ``identifiers=False`` (or :class:`GIN`) it is a plain, 1-WL-bounded GIN.
* :class:`Transformer`: a transformer encoder whose tokens are the nodes (particles), with a
  learned embedding of each token's position.
* :class:`PairTransformer`: a transformer encoder whose ``n x n`` tokens are the node pairs
  (node inputs on the diagonal tokens, edge features on every token), with a learned embedding
  of each token's position; node and vector outputs come from the diagonal tokens (the paper's
  n-body backbone).
* :class:`ViT`: a timm Vision Transformer reading the permuted ``n x n x C`` adjacency image
  (node features on the diagonal, padded to the ViT grid), optionally initialised from a local
  checkpoint file, with a projection of the patch tokens back to an ``n x n`` output (use the
  ``diagonal`` output kind of ``Symmetrize`` for node-level outputs) or a pooled output.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .nn import DenseGIN, make_mlp

_OUTPUTS = ("invariant", "node", "edge", "vector")


def _check_output(output: str, allowed: Sequence[str], owner: str) -> str:
    if output not in allowed:
        raise ValueError(f"{owner} output must be one of {tuple(allowed)}, got {output!r}")
    return output


def _mask(views: Dict[str, torch.Tensor]) -> torch.Tensor:
    return views["mask"]


def _pad_nodes(x: torch.Tensor, max_nodes: int, dims: Sequence[int]) -> torch.Tensor:
    """Zero-pad the node dims ``dims`` of ``x`` up to ``max_nodes``."""
    for dim in dims:
        n = x.shape[dim]
        if n > max_nodes:
            raise ValueError(f"graph has {n} nodes, more than max_nodes={max_nodes}")
        if n < max_nodes:
            shape = list(x.shape)
            shape[dim] = max_nodes - n
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    return x


def _masked_nodes(views, mask, node_dim: int, point_channels: int) -> Optional[torch.Tensor]:
    """The node features (``node_dim`` of them) and points (``point_channels``) a backbone was
    built for, flattened to ``(N, n, F)`` and zero on padded nodes."""
    parts = []
    n_graphs, n = mask.shape
    for key, size in (("nodes", node_dim), ("points", 3 * point_channels)):
        if size == 0:
            continue
        if views.get(key) is None:
            raise ValueError(f"the backbone was built for {key!r} inputs, which are missing")
        value = views[key].reshape(n_graphs, n, math.prod(views[key].shape[2:]))  # no -1: batches may be empty
        if value.shape[-1] != size:
            raise ValueError(f"the backbone expects {size} features per node in {key!r}, got {value.shape[-1]}")
        parts.append(value)
    if not parts:
        return None
    return torch.cat(parts, dim=-1) * mask[..., None].to(parts[0].dtype)


def _masked_edges(views, mask, edge_dim: int) -> Optional[torch.Tensor]:
    """Edges with one channel dim ``(N, n, n, C)``, zero on pairs touching a padded node."""
    if edge_dim == 0:
        return None
    edges = views.get("edges")
    if edges is None:
        raise ValueError("the backbone was built for 'edges' inputs, which are missing")
    n_graphs, n = mask.shape
    edges = edges.reshape(n_graphs, n, n, math.prod(edges.shape[3:]))
    if edges.shape[-1] != edge_dim:
        raise ValueError(f"the backbone expects {edge_dim} edge channels, got {edges.shape[-1]}")
    pairs = (mask[:, :, None] & mask[:, None, :])[..., None]
    return edges * pairs.to(edges.dtype)


class MLP(nn.Module):
    """An MLP on ``[flatten(nodes), flatten(points), flatten(adjacency), mask]`` padded to ``max_nodes``.

    Args:
        max_nodes: the largest graph (inputs are zero-padded to it).
        node_dim, edge_dim, point_channels: input sizes (per node, per edge, 3-vectors per node).
        hidden: hidden widths; ``activation``: ``nn.ReLU`` by default (the paper's EXP model).
        out_dim: output features; ``output``: ``invariant``, ``node``, ``edge`` or ``vector``.
    """

    def __init__(self, max_nodes: int, node_dim: int = 0, edge_dim: int = 0, point_channels: int = 0,
                 hidden: Sequence[int] = (256, 256), out_dim: int = 1, output: str = "invariant",
                 activation=nn.ReLU):
        super().__init__()
        self.max_nodes, self.out_dim = max_nodes, out_dim
        self.output = _check_output(output, _OUTPUTS, "MLP")
        self.node_dim, self.point_channels, self.edge_dim = node_dim, point_channels, edge_dim
        self.node_inputs = node_dim + 3 * point_channels
        in_dim = max_nodes * (self.node_inputs + 1) + max_nodes * max_nodes * edge_dim
        per_node = {"invariant": 1, "node": max_nodes, "edge": max_nodes * max_nodes, "vector": max_nodes * 3}[output]
        self.net = make_mlp(in_dim, list(hidden), per_node * out_dim, activation=activation)

    def forward(self, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        mask = _mask(views)
        n_graphs, n = mask.shape
        dtype = self.net[0].weight.dtype
        parts = [_pad_nodes(mask.to(dtype), self.max_nodes, (1,))]
        nodes = _masked_nodes(views, mask, self.node_dim, self.point_channels)
        if self.node_inputs:
            parts.append(_pad_nodes(nodes, self.max_nodes, (1,)).flatten(1))
        edges = _masked_edges(views, mask, self.edge_dim)
        if self.edge_dim:
            parts.append(_pad_nodes(edges, self.max_nodes, (1, 2)).flatten(1))
        y = self.net(torch.cat(parts, dim=1))
        m = self.max_nodes
        real = mask.to(y.dtype)
        if self.output == "invariant":
            return y
        if self.output == "node":
            return y.reshape(n_graphs, m, self.out_dim)[:, :n] * real[..., None]
        if self.output == "edge":
            pairs = real[:, :, None] * real[:, None, :]
            return y.reshape(n_graphs, m, m, self.out_dim)[:, :n, :n] * pairs[..., None]
        return y.reshape(n_graphs, m, 3, self.out_dim)[:, :n] * real[..., None, None]


class GINID(nn.Module):
    """GIN with node identifiers: each node's input includes the one-hot of its position.

    Args:
        max_nodes: size of the identifier one-hot (the largest graph).
        node_dim, edge_dim, point_channels: input sizes.
        hidden, layers: GIN width and depth (paper: 64, 3).
        out_dim; output: ``invariant`` (sum pooling over real nodes, then an MLP) or ``node``.
        identifiers: False gives a plain GIN, bounded by 1-WL.
    """

    def __init__(self, max_nodes: int, node_dim: int = 0, edge_dim: int = 1, point_channels: int = 0,
                 hidden: int = 64, layers: int = 3, out_dim: int = 1, output: str = "invariant",
                 identifiers: bool = True):
        super().__init__()
        self.max_nodes, self.identifiers = max_nodes, identifiers
        self.output = _check_output(output, ("invariant", "node"), "GINID")
        self.node_dim, self.point_channels, self.edge_dim = node_dim, point_channels, edge_dim
        self.node_inputs = node_dim + 3 * point_channels
        in_dim = self.node_inputs + (max_nodes if identifiers else 0)
        self.gin = DenseGIN(in_dim, edge_dim, hidden, layers, hidden)
        self.head = make_mlp(hidden, [hidden], out_dim)

    def forward(self, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        mask = _mask(views)
        n_graphs, n = mask.shape
        dtype = self.head[0].weight.dtype
        parts = []
        nodes = _masked_nodes(views, mask, self.node_dim, self.point_channels)
        if self.node_inputs:
            parts.append(nodes)
        if self.identifiers:
            if n > self.max_nodes:
                raise ValueError(f"graph has {n} nodes, more than max_nodes={self.max_nodes}")
            ids = torch.eye(n, self.max_nodes, dtype=dtype, device=mask.device).expand(n_graphs, n, self.max_nodes)
            parts.append(ids * mask[..., None].to(dtype))
        x = torch.cat(parts, dim=-1) if parts else None
        h = self.gin(x, _masked_edges(views, mask, self.edge_dim), mask, leading=(n_graphs, n))
        if self.output == "invariant":
            return self.head(h.sum(dim=1))
        return self.head(h) * mask[..., None].to(dtype)


class GIN(GINID):
    """A plain GIN (no identifiers): permutation-equivariant on its own, bounded by 1-WL."""

    def __init__(self, max_nodes: int, **kwargs):
        kwargs.setdefault("identifiers", False)
        super().__init__(max_nodes, **kwargs)


def _pre_norm_encoder(d_model: int, heads: int, layers: int, dim_feedforward: Optional[int],
                      dropout: float) -> nn.TransformerEncoder:
    """Pre-norm encoder layers with GELU and a final layer norm (batch first)."""
    layer = nn.TransformerEncoderLayer(
        d_model, heads, dim_feedforward or d_model, dropout, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)


def _bounded_mask(views: Dict[str, torch.Tensor], max_nodes: int):
    """``(mask, graphs, n)`` of the views, refusing graphs larger than the backbone was built for."""
    mask = _mask(views)
    n_graphs, n = mask.shape
    if n > max_nodes:
        raise ValueError(f"graph has {n} nodes, more than max_nodes={max_nodes}")
    return mask, n_graphs, n


class Transformer(nn.Module):
    """A transformer encoder over nodes (particles) as tokens, with learned position embeddings.

    Token ``i`` reads ``[nodes_i, points_i (flattened), edges_i,: (the row of the edge tensor,
    padded to max_nodes)]``. Pre-norm encoder layers with GELU; padded tokens are masked out of
    attention.

    Args:
        max_nodes: number of position embeddings (and the padded edge-row length).
        node_dim, edge_dim, point_channels: input sizes.
        d_model, heads, layers, dim_feedforward, dropout: encoder sizes (paper n-body: 64, 4, 8,
            64, 0).
        out_dim; output: ``node``, ``vector`` (``(n, 3, out_dim)``) or ``invariant`` (mean over
            real tokens).
    """

    def __init__(self, max_nodes: int, node_dim: int = 0, edge_dim: int = 0, point_channels: int = 0,
                 d_model: int = 64, heads: int = 4, layers: int = 4, dim_feedforward: Optional[int] = None,
                 dropout: float = 0.0, out_dim: int = 1, output: str = "node"):
        super().__init__()
        self.max_nodes, self.out_dim = max_nodes, out_dim
        self.output = _check_output(output, ("node", "vector", "invariant"), "Transformer")
        self.node_dim, self.point_channels, self.edge_dim = node_dim, point_channels, edge_dim
        self.node_inputs = node_dim + 3 * point_channels
        token_dim = self.node_inputs + max_nodes * edge_dim + 1
        self.embed = nn.Linear(token_dim, d_model)
        self.positions = nn.Parameter(torch.randn(max_nodes, d_model) * 0.02)
        self.encoder = _pre_norm_encoder(d_model, heads, layers, dim_feedforward, dropout)
        per_token = out_dim * (3 if output == "vector" else 1)
        self.head = make_mlp(d_model, [d_model], per_token)

    def forward(self, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        mask, n_graphs, n = _bounded_mask(views, self.max_nodes)
        dtype = self.embed.weight.dtype
        parts = [mask[..., None].to(dtype)]
        nodes = _masked_nodes(views, mask, self.node_dim, self.point_channels)
        if self.node_inputs:
            parts.append(nodes)
        edges = _masked_edges(views, mask, self.edge_dim)
        if self.edge_dim:
            parts.append(_pad_nodes(edges, self.max_nodes, (2,)).flatten(2))
        tokens = self.embed(torch.cat(parts, dim=-1)) + self.positions[:n]
        hidden = self.encoder(tokens, src_key_padding_mask=~mask)
        if self.output == "invariant":
            weights = mask[..., None].to(dtype)
            return self.head((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))
        y = self.head(hidden) * mask[..., None].to(dtype)
        return y.reshape(n_graphs, n, 3, self.out_dim) if self.output == "vector" else y


class PairTransformer(nn.Module):
    """A transformer encoder over the ``n x n`` node pairs as tokens (the paper's n-body backbone).

    Token ``(i, j)`` reads the edge features ``edges[i, j]`` and, on the diagonal ``i == j``,
    node ``i``'s inputs ``[nodes_i, points_i (flattened)]`` (zeros elsewhere), plus a learned
    embedding of its position in the grid. Pre-norm encoder layers with GELU and a final layer
    norm; pairs that touch a padded node are masked out of attention and of the output. The
    head (``ReLU, Linear, ReLU, Linear``) maps each token to its output.

    Args:
        max_nodes: the largest graph (``max_nodes^2`` position embeddings).
        node_dim, edge_dim, point_channels: input sizes.
        d_model, heads, layers, dim_feedforward, dropout: encoder sizes (paper n-body: 64, 4, 8,
            64, 0).
        out_dim; output: ``vector`` (``(n, 3, out_dim)`` from the diagonal tokens), ``node``
            (``(n, out_dim)``, diagonal), ``edge`` (``(n, n, out_dim)``, every token) or
            ``invariant`` (the mean over real tokens).
    """

    def __init__(self, max_nodes: int, node_dim: int = 0, edge_dim: int = 0, point_channels: int = 0,
                 d_model: int = 64, heads: int = 4, layers: int = 8, dim_feedforward: Optional[int] = None,
                 dropout: float = 0.0, out_dim: int = 1, output: str = "vector"):
        super().__init__()
        self.max_nodes, self.out_dim = max_nodes, out_dim
        self.output = _check_output(output, ("node", "edge", "vector", "invariant"), "PairTransformer")
        self.node_dim, self.point_channels, self.edge_dim = node_dim, point_channels, edge_dim
        self.node_inputs = node_dim + 3 * point_channels
        self.embed = nn.Linear(self.node_inputs + edge_dim + 1, d_model)
        self.positions = nn.Parameter(torch.randn(max_nodes, max_nodes, d_model))
        self.encoder = _pre_norm_encoder(d_model, heads, layers, dim_feedforward, dropout)
        per_token = out_dim * (3 if output == "vector" else 1)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_model, d_model), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(d_model, per_token))

    def forward(self, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        mask, n_graphs, n = _bounded_mask(views, self.max_nodes)
        dtype = self.embed.weight.dtype
        pairs = mask[:, :, None] & mask[:, None, :]  # [N, n, n]
        parts = [pairs[..., None].to(dtype)]
        if self.node_inputs:
            nodes = _masked_nodes(views, mask, self.node_dim, self.point_channels)  # [N, n, F]
            parts.append(torch.diag_embed(nodes.transpose(1, 2)).permute(0, 2, 3, 1))  # on the diagonal
        if self.edge_dim:
            parts.append(_masked_edges(views, mask, self.edge_dim))
        tokens = self.embed(torch.cat(parts, dim=-1)) + self.positions[:n, :n]
        hidden = self.encoder(tokens.reshape(n_graphs, n * n, -1), src_key_padding_mask=~pairs.reshape(n_graphs, n * n))
        hidden = hidden.reshape(n_graphs, n, n, -1)
        if self.output == "invariant":
            weights = pairs[..., None].to(dtype)
            pooled = (hidden * weights).sum((1, 2)) / weights.sum((1, 2)).clamp_min(1.0)
            return self.head(pooled)
        if self.output == "edge":
            return self.head(hidden) * pairs[..., None].to(dtype)
        y = self.head(torch.diagonal(hidden, dim1=1, dim2=2).transpose(1, 2)) * mask[..., None].to(dtype)
        return y.reshape(n_graphs, n, 3, self.out_dim) if self.output == "vector" else y


def _image_to_patches(image: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """``(N, H, W, C)`` -> ``(N, H / ph, W / pw, ph, pw, C)``: each patch's pixels in (row,
    column, channel) order."""
    batch, height, width, channels = image.shape
    return image.reshape(batch, height // ph, ph, width // pw, pw, channels).permute(0, 1, 3, 2, 4, 5)


def _patches_to_image(patches: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_image_to_patches`: ``(N, rows, cols, ph, pw, C)`` -> ``(N, rows ph,
    cols pw, C)``."""
    batch, rows, cols, ph, pw, channels = patches.shape
    return patches.permute(0, 1, 3, 2, 4, 5).reshape(batch, rows * ph, cols * pw, channels)


class _PatchProjectionFunction(torch.autograd.Function):
    """A convolution whose kernel equals its stride (no padding, no dilation, no groups): each
    output token is the linear map of one patch. Forward by ``conv2d``; backward by two matmuls
    over the patches, which on CPU run several times faster than the convolution's own backward
    (``grad_input`` of a strided convolution there is a slow scatter: 107 ms of a 125 ms forward
    and backward at PATTERN's image, 32 x 5 x 192 x 192 into 96 channels, against 44 ms)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layout=None):
        ctx.save_for_backward(x, weight)
        ctx.with_bias = bias is not None
        ctx.layout = layout
        return torch.nn.functional.conv2d(x, weight, bias, stride=tuple(weight.shape[-2:]))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        batch, channels, height, width = x.shape
        out_channels, _, ph, pw = weight.shape
        rows, cols = height // ph, width // pw
        # one row per token: [N * rows * cols, out_channels]
        grad_tokens = grad.permute(0, 2, 3, 1).reshape(batch * rows * cols, out_channels)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0] and ctx.layout is not None:
            grad_x = _graph_image_grad(grad_tokens.reshape(batch, rows, cols, out_channels), weight, x.shape,
                                       ctx.layout)
        elif ctx.needs_input_grad[0]:
            # the patch pixels in (row, column, channel) order, the channels-last layout
            flat_weight = weight.permute(0, 2, 3, 1).reshape(out_channels, ph * pw * channels)
            grad_patches = torch.mm(grad_tokens, flat_weight).reshape(batch, rows, cols, ph, pw, channels)
            grad_x = _patches_to_image(grad_patches).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            patches = _image_to_patches(x.permute(0, 2, 3, 1), ph, pw).reshape(batch * rows * cols, ph * pw * channels)
            grad_weight = torch.mm(grad_tokens.t(), patches).reshape(out_channels, ph, pw, channels).permute(0, 3, 1, 2)
        if ctx.with_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_tokens.sum(0)
        return grad_x, grad_weight, grad_bias, None


def _graph_image_grad(grad_tokens: torch.Tensor, weight: torch.Tensor, shape: torch.Size,
                      layout: Tuple[int, int, int]) -> torch.Tensor:
    """The image gradient of a patch projection where only part of the image carries one: with
    ``layout = (n, dense, diagonal)``, channels ``[0, dense)`` over the top-left ``n x n`` pixels
    and channels ``[dense, dense + diagonal)`` on the diagonal pixels ``(i, i)``, ``i < n``; zero
    elsewhere (the graph image of :class:`ViT`: edge channels, node features on the diagonal,
    and a mask channel and padding that are constants). ``grad_tokens (N, rows, cols, D)``.

    The dense gradient is one ``(tokens, D) x (D, ph pw C)`` product; this one multiplies only
    the tokens of the patches that cover the graph by the dense channels' weights, and gathers
    the diagonal's (at PATTERN's image 2 ms instead of 17 ms)."""
    batch, channels, height, width = shape
    out_channels, _, ph, pw = weight.shape
    n, dense, diagonal = layout
    grad_x = grad_tokens.new_zeros(batch, height, width, channels)  # channels-last, as the image
    if dense:
        rows, cols = -(-n // ph), -(-n // pw)  # the patches that cover the graph
        tokens = grad_tokens[:, :rows, :cols].reshape(batch * rows * cols, out_channels)
        flat_weight = weight[:, :dense].permute(0, 2, 3, 1).reshape(out_channels, ph * pw * dense)
        patches = torch.mm(tokens, flat_weight).reshape(batch, rows, cols, ph, pw, dense)
        grad_x[:, :n, :n, :dense] = _patches_to_image(patches)[:, :n, :n]
    if diagonal:
        index = torch.arange(n, device=grad_tokens.device)
        tokens = grad_tokens[:, index // ph, index // pw]  # [N, n, D]: each diagonal pixel's token
        pixel_weight = weight[:, dense:dense + diagonal, index % ph, index % pw]  # [D, diagonal, n]
        grad_x[:, index, index, dense:dense + diagonal] = torch.einsum("bnd,dcn->bnc", tokens, pixel_weight)
    return grad_x.permute(0, 3, 1, 2)


class _GraphImage(torch.autograd.Function):
    """The ViT's graph image ``(N, C, size, size)``, channels-last in memory: channels ``[0, E)``
    the edges ``(N, n, n, E)``, then the node features ``(N, n, F)`` on the diagonal, then 1 on
    the pairs of real nodes; zero elsewhere. Written into one zeroed buffer (concatenating the
    channels and then padding copied the image three times: 11 ms at PATTERN's size, 32 x 192 x
    192 x 5, against 3 ms); the backward reads the edge block and the diagonal as views."""

    @staticmethod
    def forward(ctx, edges, nodes, mask, size, dtype):
        n_graphs, n = mask.shape
        edge_dim = 0 if edges is None else edges.shape[-1]
        node_dim = 0 if nodes is None else nodes.shape[-1]
        ctx.layout = (n, edge_dim, node_dim)
        image = torch.zeros(n_graphs, size, size, edge_dim + node_dim + 1, dtype=dtype, device=mask.device)
        if edge_dim:
            image[:, :n, :n, :edge_dim] = edges
        if node_dim:
            index = torch.arange(n, device=mask.device)
            image[:, index, index, edge_dim:edge_dim + node_dim] = nodes.to(dtype)
        image[:, :n, :n, -1] = (mask[:, :, None] & mask[:, None, :]).to(dtype)
        return image.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        n, edge_dim, node_dim = ctx.layout
        grad = grad.permute(0, 2, 3, 1)  # [N, size, size, C]
        grad_edges = grad[:, :n, :n, :edge_dim] if edge_dim and ctx.needs_input_grad[0] else None
        grad_nodes = None
        if node_dim and ctx.needs_input_grad[1]:
            grad_nodes = torch.diagonal(grad[:, :n, :n, edge_dim:edge_dim + node_dim], dim1=1, dim2=2).transpose(1, 2)
        return grad_edges, grad_nodes, None, None, None


class PatchProjection(nn.Conv2d):
    """A ViT's patch projection (``Conv2d`` with kernel = stride) whose CPU backward runs as
    matmuls over the patches (:class:`_PatchProjectionFunction`); the same parameters, state
    dict and forward values as the convolution it replaces. Other devices, autocast, other
    dtypes and images that are not whole patches run the plain convolution.

    ``gradient_layout`` (None, or ``(n, dense, diagonal)``, see :func:`_graph_image_grad`) is set
    by the module that builds the image, for one forward call, when it knows that only those
    pixels of the image depend on a tensor that wants a gradient; the image gradient is then
    computed there alone (zero elsewhere)."""

    gradient_layout: Optional[Tuple[int, int, int]] = None

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> nn.Conv2d:
        """A projection that shares ``conv``'s parameters, or ``conv`` itself where the patch form
        does not apply (overlapping, padded, dilated or grouped)."""
        if (tuple(conv.kernel_size) != tuple(conv.stride) or any(conv.padding) or conv.groups != 1
                or any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros"):
            return conv
        projection = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         bias=conv.bias is not None, device="meta")
        projection.weight, projection.bias = conv.weight, conv.bias
        return projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch_form = (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
                      and x.dtype == self.weight.dtype and not torch.is_autocast_enabled("cpu")
                      and x.shape[-2] % self.kernel_size[0] == 0 and x.shape[-1] % self.kernel_size[1] == 0)
        if not patch_form:
            return super().forward(x)
        return _PatchProjectionFunction.apply(x, self.weight, self.bias, self.gradient_layout)


class ViT(nn.Module):
    """A timm Vision Transformer on the permuted adjacency image.

    The image has ``edge_dim + node_dim + 1`` channels: the edge tensor, the node features on
    the diagonal, and a channel marking real node pairs; it is zero-padded to ``img_size``.
    The patch embedding is built for that many channels (pretrained 3-channel weights are
    adapted by timm).

    Args:
        max_nodes: the largest graph.
        node_dim, edge_dim: input sizes.
        out_dim; output: ``edge`` (a linear map of each patch token to its ``patch x patch``
            pixels, cropped to ``n x n``) or ``invariant`` (the pooled token).
        model_name: a timm ViT name (e.g. ``vit_tiny_patch16_224``, ``vit_base_patch16_224``).
        checkpoint: path of a local weights file for ``model_name`` (no download happens).
        img_size: image side (default: ``max_nodes`` rounded up to the patch size).
        **timm_kwargs: passed to ``timm.create_model`` (``patch_size``, ``depth``,
            ``embed_dim``, ``num_heads``, ``drop_rate``, ...).
    """

    def __init__(self, max_nodes: int, node_dim: int = 0, edge_dim: int = 1, out_dim: int = 1,
                 output: str = "edge", model_name: str = "vit_tiny_patch16_224", checkpoint: Optional[str] = None,
                 img_size: Optional[int] = None, **timm_kwargs):
        super().__init__()
        try:
            import timm
        except ImportError as exc:  # pragma: no cover - timm is an optional dependency
            raise ImportError("the ViT backbone needs timm: pip install 'lps_fast[vit]'") from exc
        self.max_nodes, self.node_dim, self.edge_dim, self.out_dim = max_nodes, node_dim, edge_dim, out_dim
        self.output = _check_output(output, ("edge", "invariant"), "ViT")
        self.in_chans = edge_dim + node_dim + 1
        patch = timm_kwargs.get("patch_size")
        if patch is None:
            patch = timm.create_model(model_name, pretrained=False, num_classes=0).patch_embed.patch_size[0]
        self.patch = int(patch)
        self.img_size = int(img_size or self.patch * math.ceil(max_nodes / self.patch))
        if self.img_size < max_nodes:
            raise ValueError(f"img_size={self.img_size} is smaller than max_nodes={max_nodes}")
        create_kwargs = dict(timm_kwargs, in_chans=self.in_chans, num_classes=0, img_size=self.img_size)
        if checkpoint is not None:
            create_kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
        self.vit = timm.create_model(model_name, pretrained=checkpoint is not None, **create_kwargs)
        self.vit.patch_embed.proj = PatchProjection.replacing(self.vit.patch_embed.proj)
        width = self.vit.num_features
        self.head = (nn.Linear(width, self.patch * self.patch * out_dim) if output == "edge"
                     else nn.Linear(width, out_dim))

    def image(self, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``(N, C, img, img)`` input image of a dict of views (channels-last in memory):
        the edge channels, the node features on the diagonal and a channel marking real node
        pairs, zero-padded to ``img_size``."""
        mask = _mask(views)
        n = mask.shape[1]
        if n > self.img_size:
            raise ValueError(f"graph has {n} nodes, more than max_nodes={self.img_size}")
        edges = _masked_edges(views, mask, self.edge_dim) if self.edge_dim else None
        nodes = _masked_nodes(views, mask, self.node_dim, 0) if self.node_dim else None
        return _GraphImage.apply(edges, nodes, mask, self.img_size, self.head.weight.dtype)

    def forward(self, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        mask = _mask(views)
        n_graphs, n = mask.shape
        projection = self.vit.patch_embed.proj
        restricted = isinstance(projection, PatchProjection)
        if restricted:
            # only the edge channels over the graph and the node channels' diagonal depend on
            # the inputs; the mask channel and the padding are constants
            projection.gradient_layout = (n, self.edge_dim, self.node_dim)
        try:
            features = self.vit.forward_features(self.image(views))  # [N, prefix + grid^2, D]
        finally:
            if restricted:
                projection.gradient_layout = None
        if self.output == "invariant":
            return self.head(self.vit.forward_head(features, pre_logits=True))
        grid = self.img_size // self.patch
        tokens = features[:, self.vit.num_prefix_tokens:]
        image = _patches_to_image(self.head(tokens).reshape(n_graphs, grid, grid, self.patch, self.patch, self.out_dim))
        pairs = (mask[:, :, None] & mask[:, None, :])[..., None]
        return image[:, :n, :n] * pairs.to(image.dtype)


__all__ = ["PairTransformer", "MLP", "GINID", "GIN", "Transformer", "ViT", "ViTPS", "PatchProjection"]


def __getattr__(name: str):
    # ViTPS lives in its own module, which imports the helpers above
    if name == "ViTPS":
        from .vit_ps import ViTPS

        return ViTPS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
