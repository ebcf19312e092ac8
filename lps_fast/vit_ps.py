"""ViT-PS: a (pretrained) timm Vision Transformer reading a graph as an ``n x n x C`` image.

The paper's real-world model. Each view of a graph becomes an image whose pixel ``(i, j)``
holds the edge features of the pair (adjacency included) and whose diagonal pixel ``(i, i)``
also holds the features of node ``i``. A *new* ``Conv2d`` patch projection (kernel = stride =
``patch_size``) turns the image, padded from ``max_nodes`` to ``grid_size * patch_size``, into
the ``grid_size x grid_size`` tokens of the pretrained transformer, whose position embedding
is resampled to that grid when the checkpoint is loaded. The tokens come back through a
``ConvTranspose2d`` to an ``n x n`` image: its diagonal is the node output, the whole image the
edge output; graph-level outputs use the transformer's pooled token.

The node channels are zero off the diagonal, so their share of the patch projection is computed
from the node features directly (a gather of the kernel at each diagonal pixel's offset, then a
scatter-add into its token) instead of from a dense ``n x n x C_node`` image: the same numbers
(tests compare both) at a fraction of the memory, which matters for molecules with 174 one-hot
atom channels at ``n = 444``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import _check_output, _masked_edges, _masked_nodes, _pad_nodes

PAD_MODES = ("zero", "reflect", "replicate", "circular")


def _padding(total: int, centering: bool) -> Tuple[int, int]:
    """``(before, after)`` pixels that pad one side of the image by ``total``."""
    before = total // 2 if centering else 0
    return before, total - before


def _source_pixels(size: int, before: int, after: int, mode: str) -> torch.Tensor:
    """For each row of the padded image, the row of the unpadded one it copies (-1: zero).

    Every padding mode of ``F.pad`` acts on rows and columns separately, so padding the row
    indices themselves gives the map of the whole image."""
    rows = torch.arange(size, dtype=torch.float64)
    if mode == "zero":
        return torch.cat([torch.full((before,), -1.0), rows, torch.full((after,), -1.0)]).long()
    return F.pad(rows[None, None], (before, after), mode=mode)[0, 0].round().long()


class _PatchDropout(nn.Module):
    """Keeps a random subset of the patch tokens in training (the prefix tokens always).

    ``rate`` is the fraction dropped; with ``random_rate`` it is drawn uniformly from
    ``[0, rate)`` for every forward pass. Identity in eval mode."""

    def __init__(self, rate: float, random_rate: bool, prefix: int):
        super().__init__()
        self.rate, self.random_rate, self.prefix = float(rate), bool(random_rate), int(prefix)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return tokens
        rate = float(torch.rand(())) * self.rate if self.random_rate else self.rate
        prefix, patches = tokens[:, :self.prefix], tokens[:, self.prefix:]
        keep = max(1, int(round(patches.shape[1] * (1.0 - rate))))
        order = torch.rand(patches.shape[:2], device=tokens.device).argsort(dim=1)[:, :keep]
        kept = patches.gather(1, order[..., None].expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, kept], dim=1)


class ViTPS(nn.Module):
    """A timm ViT on the graph image, with new patch projections in and out (the paper's ViT-PS).

    Args:
        max_nodes: the largest graph; images are ``max_nodes x max_nodes`` before padding.
        node_dim, edge_dim: node features (placed on the diagonal) and edge channels (the
            adjacency and any edge features).
        out_dim: output channels.
        output: ``node`` (``(N, n, out_dim)``, the diagonal of the output image), ``edge``
            (``(N, n, n, out_dim)``) or ``invariant`` (``(N, out_dim)`` from the pooled token).
        model_name: a timm ViT (the paper: ``vit_base_patch16_224``, ImageNet-21k weights).
        checkpoint: a local weights file for ``model_name`` (a ``torch.save``-d state dict or
            ``.safetensors``, as timm reads them); nothing is downloaded. None: random init.
        grid_size: tokens per side (default: the pretrained grid, 14 for a 224-pixel ViT-B/16);
            the position embedding is resampled to it.
        patch_size: pixels per token side of the new projection (default
            ``ceil(max_nodes / grid_size)``); the image is padded to ``grid_size * patch_size``.
        pad_mode: ``zero``, ``reflect``, ``replicate`` or ``circular`` padding of the image.
        centering: pad on both sides (True) or after the graph only (False).
        patch_dropout: fraction of patch tokens dropped in training (graph-level outputs only).
        random_patch_dropout: draw the dropped fraction from ``[0, patch_dropout)`` each step.
        **timm_kwargs: passed to ``timm.create_model`` (``embed_dim``, ``depth``,
            ``num_heads``, ``drop_rate``, ...; a checkpoint must match them).
    """

    def __init__(self, max_nodes: int, node_dim: int = 0, edge_dim: int = 1, out_dim: int = 1, output: str = "node",
                 model_name: str = "vit_base_patch16_224", checkpoint: Optional[str] = None,
                 grid_size: Optional[int] = None, patch_size: Optional[int] = None, pad_mode: str = "zero",
                 centering: bool = False, patch_dropout: float = 0.0, random_patch_dropout: bool = False,
                 **timm_kwargs):
        super().__init__()
        try:
            import timm
        except ImportError as exc:  # pragma: no cover - timm is an optional dependency
            raise ImportError("the ViTPS backbone needs timm: pip install 'lps_fast[vit]'") from exc
        self.output = _check_output(output, ("node", "edge", "invariant"), "ViTPS")
        if max_nodes < 1:
            raise ValueError(f"ViTPS: max_nodes must be >= 1, got {max_nodes}")
        if node_dim < 0 or edge_dim < 0 or node_dim + edge_dim == 0:
            raise ValueError(f"ViTPS: node_dim and edge_dim must be >= 0 and not both 0, got {node_dim}, {edge_dim}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"ViTPS: pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(f"ViTPS: patch_dropout must be in [0, 1), got {patch_dropout}")
        if patch_dropout and output != "invariant":
            raise ValueError("ViTPS: patch_dropout needs output='invariant' (node and edge outputs need every token)")
        self.max_nodes, self.node_dim, self.edge_dim, self.out_dim = max_nodes, node_dim, edge_dim, out_dim
        self.pad_mode, self.centering = pad_mode, centering

        reference = timm.create_model(model_name, pretrained=False, num_classes=0, **timm_kwargs)
        native_patch = reference.patch_embed.patch_size[0]
        native_grid = reference.patch_embed.grid_size[0]
        del reference
        self.grid = int(grid_size or native_grid)
        self.patch = int(patch_size or math.ceil(max_nodes / self.grid))
        if self.grid < 1 or self.patch < 1:
            raise ValueError(f"ViTPS: grid_size and patch_size must be >= 1, got {self.grid}, {self.patch}")
        self.img_size = self.grid * self.patch
        if self.img_size < max_nodes:
            raise ValueError(f"ViTPS: grid_size * patch_size = {self.grid} * {self.patch} = {self.img_size} is "
                             f"smaller than max_nodes={max_nodes}")
        self.pad = _padding(self.img_size - max_nodes, centering)
        if pad_mode == "reflect" and max(self.pad) >= max_nodes:
            raise ValueError(f"ViTPS: reflect padding of {max(self.pad)} pixels needs max_nodes > {max(self.pad)}")

        create = dict(timm_kwargs, num_classes=0, img_size=self.grid * native_patch)
        if checkpoint is not None:
            if not Path(checkpoint).is_file():
                raise FileNotFoundError(f"ViTPS: checkpoint file {checkpoint} not found (give the path of a local "
                                        f"{model_name} weights file, .pth/.bin or .safetensors)")
            create["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
        self.vit = timm.create_model(model_name, pretrained=checkpoint is not None, **create)
        width = self.vit.embed_dim
        # the pretrained RGB patch embedding is replaced by the graph projection below
        self.vit.patch_embed = nn.Identity()
        self.vit.patch_drop = _PatchDropout(patch_dropout, random_patch_dropout, self.vit.num_prefix_tokens)
        self.proj = nn.Conv2d(edge_dim + node_dim, width, kernel_size=self.patch, stride=self.patch)
        if output == "invariant":
            self.head = nn.Linear(self.vit.num_features, out_dim)
        else:
            self.head = nn.ConvTranspose2d(width, out_dim, kernel_size=self.patch, stride=self.patch)
        self._diagonal_plan()

    def _diagonal_plan(self) -> None:
        """Where each node's diagonal pixel (and its copies in the padding) falls: its token and
        its offset inside the patch."""
        before, after = self.pad
        source = _source_pixels(self.max_nodes, before, after, self.pad_mode)
        rows, cols = torch.nonzero((source[:, None] == source[None, :]) & (source[:, None] >= 0), as_tuple=True)
        self.register_buffer("_diag_node", source[rows], persistent=False)
        self.register_buffer("_diag_token", (rows // self.patch) * self.grid + cols // self.patch, persistent=False)
        self.register_buffer("_diag_row", rows % self.patch, persistent=False)
        self.register_buffer("_diag_col", cols % self.patch, persistent=False)

    def _pad_image(self, image: torch.Tensor) -> torch.Tensor:
        before, after = self.pad
        if before == after == 0:
            return image
        pads = (before, after, before, after)
        if self.pad_mode == "zero":
            return F.pad(image, pads)
        return F.pad(image, pads, mode=self.pad_mode)

    def _parts(self, views: Dict[str, torch.Tensor]):
        mask = views["mask"]
        n = mask.shape[1]
        if n > self.max_nodes:
            raise ValueError(f"ViTPS: graph has {n} nodes, more than max_nodes={self.max_nodes}")
        edges = _masked_edges(views, mask, self.edge_dim)
        nodes = _masked_nodes(views, mask, self.node_dim, 0)
        if edges is not None:
            edges = _pad_nodes(edges, self.max_nodes, (1, 2)).permute(0, 3, 1, 2)
        if nodes is not None:
            nodes = _pad_nodes(nodes, self.max_nodes, (1,))
        return mask, edges, nodes

    def image(self, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The padded ``(N, edge_dim + node_dim, img, img)`` image of a dict of views (for
        inspection: :meth:`forward` never builds the node channels densely)."""
        _, edges, nodes = self._parts(views)
        channels = []
        if edges is not None:
            channels.append(edges)
        if nodes is not None:
            channels.append(torch.diag_embed(nodes.transpose(1, 2)))
        return self._pad_image(torch.cat(channels, dim=1))

    def tokens(self, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N, grid^2, width)``: the patch projection of :meth:`image`."""
        mask, edges, nodes = self._parts(views)
        weight = self.proj.weight
        if edges is not None:
            tokens = F.conv2d(self._pad_image(edges), weight[:, :self.edge_dim], self.proj.bias, stride=self.patch)
            tokens = tokens.flatten(2).transpose(1, 2)
        else:
            tokens = self.proj.bias.expand(mask.shape[0], self.grid * self.grid, -1)
        if nodes is not None:
            # one small matmul per diagonal pixel, batched over pixels; contiguous operands keep
            # the CPU batched GEMM (and its backward) on its fast path
            kernel = weight[:, self.edge_dim:, self._diag_row, self._diag_col].permute(2, 1, 0).contiguous()
            pixels = nodes[:, self._diag_node].to(kernel.dtype).transpose(0, 1).contiguous()  # [M, N, C_node]
            share = torch.bmm(pixels, kernel).transpose(0, 1)  # [N, M, D]
            tokens = tokens.index_add(1, self._diag_token, share)
        return tokens

    def forward(self, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        mask = views["mask"]
        n_graphs, n = mask.shape
        features = self.vit.forward_features(self.tokens(views))  # [N, prefix + grid^2, D]
        if self.output == "invariant":
            return self.head(self.vit.forward_head(features, pre_logits=True))
        grid = features[:, self.vit.num_prefix_tokens:].transpose(1, 2)
        grid = grid.reshape(n_graphs, -1, self.grid, self.grid)
        before = self.pad[0]
        image = self.head(grid)[:, :, before:before + n, before:before + n].permute(0, 2, 3, 1)
        real = mask.to(image.dtype)
        if self.output == "node":
            return torch.diagonal(image, dim1=1, dim2=2).transpose(1, 2) * real[..., None]
        return image * (real[:, :, None] * real[:, None, :])[..., None]


__all__ = ["ViTPS", "PAD_MODES"]
