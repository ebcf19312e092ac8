"""Single graphs and padded dense batches.

Every dataset in :mod:`lps_fast.data` yields :class:`GraphSample` items; :func:`collate_dense`
pads a list of them to the largest graph and returns a :class:`DenseBatch`, the form the
symmetrization ops consume (``(B, n, *F)`` node tensors, ``(B, n, n, *E)`` edge tensors, a
``(B, n)`` mask). It is a plain ``collate_fn`` for :class:`torch.utils.data.DataLoader`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Padding value of integer node-level targets: the default ``ignore_index`` of
``torch.nn.functional.cross_entropy``, so padded nodes drop out of the loss unmasked."""

TARGET_LEVELS = ("graph", "node")


@dataclass
class GraphSample:
    """One graph (or particle system) with dense adjacency.

    Attributes:
        adjacency: ``(n, n)`` bool, symmetric, no self loops.
        node_features: ``(n, *F)``; int64 categories for the graph tasks, float for n-body
            (the charges, ``(n, 1)``).
        target: graph-level ``(*T)`` (e.g. ``()`` class index) or node-level ``(n, *T)``, or
            None for unlabelled tasks; ``target_level`` says which.
        target_level: ``"graph"`` or ``"node"``.
        edge_features: optional ``(n, n, *E)``, zero where there is no edge.
        points: optional ``(n, 3, C)`` 3-vectors per node (n-body: position and velocity).
        index: position of the sample in its dataset.
    """

    adjacency: Tensor
    node_features: Tensor
    target: Optional[Tensor] = None
    target_level: str = "graph"
    edge_features: Optional[Tensor] = None
    points: Optional[Tensor] = None
    index: int = -1

    @property
    def num_nodes(self) -> int:
        return int(self.adjacency.shape[0])

    def edge_index(self) -> Tensor:
        """``(2, E)`` int64, both directions of every undirected edge (source, target)."""
        return self.adjacency.nonzero().t().contiguous()


@dataclass
class DenseBatch:
    """A padded dense batch of ``B`` graphs with at most ``n`` nodes.

    Attributes:
        node_features: ``(B, n, *F)``, zero on padded nodes.
        adjacency: ``(B, n, n)`` float (0/1), zero on rows and columns of padded nodes.
        mask: ``(B, n)`` bool, True for real nodes.
        target: ``(B, *T)`` for graph-level targets; ``(B, n, *T)`` for node-level targets,
            padded with :data:`IGNORE_INDEX` (integer) or 0 (float); None when unlabelled.
        target_level: ``"graph"`` or ``"node"``.
        num_nodes: ``(B,)`` int64 number of real nodes per graph.
        index: ``(B,)`` int64 dataset positions of the graphs.
        edge_features: optional ``(B, n, n, *E)``.
        points: optional ``(B, n, 3, C)`` (n-body: channel 0 position, channel 1 velocity).
    """

    node_features: Tensor
    adjacency: Tensor
    mask: Tensor
    target: Optional[Tensor]
    target_level: str
    num_nodes: Tensor
    index: Tensor
    edge_features: Optional[Tensor] = None
    points: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def max_nodes(self) -> int:
        return int(self.mask.shape[1])

    def _map(self, function) -> "DenseBatch":
        changes = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                changes[field.name] = function(value)
        return dataclasses.replace(self, **changes)

    def to(self, device, non_blocking: bool = False) -> "DenseBatch":
        """Move every tensor to ``device``."""
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "DenseBatch":
        """Page-lock every tensor (called by ``DataLoader(pin_memory=True)``)."""
        return self._map(lambda tensor: tensor.pin_memory())

    def to_inputs(self, num_node_categories: Optional[int] = None,
                  dtype: torch.dtype = torch.float32) -> Dict[str, Tensor]:
        """The inputs dict of :class:`lps_fast.Symmetrize`, as the graph tasks build it.

        * ``nodes (B, n, F)``: one-hot of integer categories when ``num_node_categories`` is
          given (zero on padded nodes), else the features as floats, trailing dims flattened;
        * ``edges (B, n, n, 1 + E)``: the adjacency, then the edge features (if any);
        * ``points (B, n, 3, C)`` when the batch has them; ``mask (B, n)``.
        """
        mask = self.mask
        if num_node_categories:
            nodes = torch.nn.functional.one_hot(self.node_features.long(), num_node_categories).to(dtype)
            nodes = nodes * mask[..., None].to(dtype)
        else:
            nodes = self.node_features.to(dtype).reshape(*mask.shape, -1)
        edges = self.adjacency.to(dtype)[..., None]
        if self.edge_features is not None:
            edges = torch.cat([edges, self.edge_features.to(dtype).reshape(*edges.shape[:3], -1)], dim=-1)
        inputs = {"nodes": nodes, "edges": edges, "mask": mask}
        if self.points is not None:
            inputs["points"] = self.points.to(dtype)
        return inputs


def _stack_padded(tensors: Sequence[Tensor], size: int, dims: int, fill) -> Tensor:
    """Stack tensors whose first ``dims`` dimensions have length ``n_b <= size``, padding with
    ``fill`` to ``(B, size, ..., size, *rest)``."""
    first = tensors[0]
    rest = tuple(first.shape[dims:])
    for tensor in tensors:
        if tuple(tensor.shape[dims:]) != rest or tensor.dtype != first.dtype:
            raise ValueError(
                "collate_dense: samples disagree on a trailing shape or dtype: "
                f"{tuple(first.shape)} {first.dtype} vs {tuple(tensor.shape)} {tensor.dtype}"
            )
    out = torch.full((len(tensors),) + (size,) * dims + rest, fill, dtype=first.dtype)
    for position, tensor in enumerate(tensors):
        n = tensor.shape[0]
        out[(position,) + (slice(0, n),) * dims] = tensor
    return out


def collate_dense(
    samples: Sequence[GraphSample],
    pad_to: Optional[int] = None,
    adjacency_dtype: torch.dtype = torch.float32,
) -> DenseBatch:
    """Pad graphs to a common size and stack them.

    Args:
        samples: graphs from one dataset (same feature shapes, target kind and level).
        pad_to: pad every graph to this many nodes instead of the largest in the batch (a fixed
            ``n`` keeps shapes static for ``torch.compile`` or a patch-based backbone).
        adjacency_dtype: dtype of the returned adjacency.

    Returns:
        :class:`DenseBatch`. Use ``functools.partial(collate_dense, pad_to=...)`` as a
        ``DataLoader`` ``collate_fn`` to change the defaults.
    """
    if len(samples) == 0:
        raise ValueError("collate_dense: got an empty list of samples")
    sizes = [sample.num_nodes for sample in samples]
    n = max(sizes)
    if pad_to is not None:
        if pad_to < n:
            raise ValueError(f"collate_dense: pad_to={pad_to} is smaller than a graph of {n} nodes")
        n = pad_to
    levels = {sample.target_level for sample in samples}
    if len(levels) != 1 or not levels <= set(TARGET_LEVELS):
        raise ValueError(f"collate_dense: mixed or unknown target levels {sorted(levels)}")
    level = levels.pop()

    num_nodes = torch.tensor(sizes, dtype=torch.int64)
    mask = torch.arange(n).unsqueeze(0) < num_nodes.unsqueeze(1)
    adjacency = _stack_padded([sample.adjacency for sample in samples], n, 2, 0).to(adjacency_dtype)
    node_features = _stack_padded([sample.node_features for sample in samples], n, 1, 0)

    def optional(name: str, dims: int, fill) -> Optional[Tensor]:
        values = [getattr(sample, name) for sample in samples]
        present = [value is not None for value in values]
        if not any(present):
            return None
        if not all(present):
            raise ValueError(f"collate_dense: some samples have no {name}")
        if dims == 0:
            return torch.stack(values)
        return _stack_padded(values, n, dims, fill)

    target_fill = 0
    first_target = samples[0].target
    if first_target is not None and not first_target.is_floating_point():
        target_fill = IGNORE_INDEX
    target = optional("target", 1 if level == "node" else 0, target_fill)
    return DenseBatch(
        node_features=node_features,
        adjacency=adjacency,
        mask=mask,
        target=target,
        target_level=level,
        num_nodes=num_nodes,
        index=torch.tensor([sample.index for sample in samples], dtype=torch.int64),
        edge_features=optional("edge_features", 2, 0),
        points=optional("points", 1, 0),
    )
