"""Interop with PyTorch Geometric ``Data`` / ``Batch`` objects (optional dependency).

``torch_geometric`` is imported only when one of these functions runs; without it they raise
an ``ImportError`` that says how to install it, and the rest of :mod:`lps_fast.data` is
unaffected.

Mapping: ``adjacency`` <-> ``edge_index`` (both directions of each edge), ``node_features`` <->
``x``, ``edge_features`` <-> ``edge_attr`` (one row per directed edge), ``points`` ``(n, 3, C)``
<-> ``points`` (and ``pos`` = channel 0, what PyG models read), ``target`` <-> ``y`` (graph
level as ``(1, *T)`` so that PyG batches it to ``(B, *T)``), and ``target_level`` is kept as a
plain attribute.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch

from .batch import DenseBatch, GraphSample, collate_dense


def pyg_available() -> bool:
    """Whether ``torch_geometric`` can be imported."""
    try:
        import torch_geometric.data  # noqa: F401
    except ImportError:
        return False
    return True


def _require_pyg():
    try:
        import torch_geometric.data as pyg_data
    except ImportError as error:
        raise ImportError(
            "lps_fast.data.pyg needs PyTorch Geometric, which is not installed: "
            "`pip install torch_geometric` (the rest of lps_fast.data works without it)"
        ) from error
    return pyg_data


def to_pyg(sample: GraphSample):
    """A :class:`GraphSample` as a ``torch_geometric.data.Data``."""
    pyg_data = _require_pyg()
    edge_index = sample.edge_index()
    attributes = {
        "x": sample.node_features,
        "edge_index": edge_index,
        "num_nodes": sample.num_nodes,
        "target_level": sample.target_level,
    }
    if sample.edge_features is not None:
        attributes["edge_attr"] = sample.edge_features[edge_index[0], edge_index[1]]
    if sample.points is not None:
        attributes["points"] = sample.points
        attributes["pos"] = sample.points[:, :, 0]
    if sample.target is not None:
        attributes["y"] = sample.target.unsqueeze(0) if sample.target_level == "graph" else sample.target
    return pyg_data.Data(**attributes)


def _attribute(data, name: str):
    try:
        return getattr(data, name)
    except (AttributeError, KeyError):
        return None


def from_pyg(data, target_level: str = "auto", index: int = -1) -> GraphSample:
    """A ``torch_geometric.data.Data`` as a :class:`GraphSample`.

    Args:
        data: the graph; ``edge_index`` is made symmetric, self loops are dropped.
        target_level: ``"graph"``, ``"node"``, or ``"auto"``: the ``target_level`` attribute
            when present, else ``"node"`` when ``y`` has one row per node (and more than one
            node), else ``"graph"``.
        index: stored as ``sample.index``.
    """
    n = int(data.num_nodes)
    edge_index = data.edge_index.long()
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    adjacency[edge_index[0], edge_index[1]] = True
    adjacency |= adjacency.t().clone()
    adjacency.fill_diagonal_(False)

    features = _attribute(data, "x")
    if features is None:
        features = torch.zeros(n, dtype=torch.int64)

    edge_features = None
    edge_attr = _attribute(data, "edge_attr")
    if edge_attr is not None:
        edge_features = torch.zeros((n, n) + tuple(edge_attr.shape[1:]), dtype=edge_attr.dtype)
        edge_features[edge_index[0], edge_index[1]] = edge_attr
        edge_features[edge_index[1], edge_index[0]] = edge_attr
        edge_features[torch.arange(n), torch.arange(n)] = 0

    points = _attribute(data, "points")
    if points is None and _attribute(data, "pos") is not None:
        points = data.pos.unsqueeze(-1)

    target = _attribute(data, "y")
    if target_level == "auto":
        target_level = _attribute(data, "target_level")
        if target_level is None:
            per_node = target is not None and target.dim() > 0 and target.shape[0] == n and n > 1
            target_level = "node" if per_node else "graph"
    if target is not None and target_level == "graph" and target.dim() > 0 and target.shape[0] == 1:
        target = target[0]
    return GraphSample(
        adjacency=adjacency,
        node_features=features,
        target=target,
        target_level=target_level,
        edge_features=edge_features,
        points=points,
        index=index,
    )


def to_pyg_batch(samples: Iterable[GraphSample]):
    """Samples (or a whole dataset) as one ``torch_geometric.data.Batch``."""
    pyg_data = _require_pyg()
    return pyg_data.Batch.from_data_list([to_pyg(sample) for sample in samples])


def dense_batch_from_pyg(
    batch, target_level: str = "auto", pad_to: Optional[int] = None
) -> DenseBatch:
    """A PyG ``Batch`` (or a list of ``Data``) as a padded :class:`DenseBatch`."""
    _require_pyg()
    graphs: List = batch.to_data_list() if hasattr(batch, "to_data_list") else list(batch)
    samples = [from_pyg(data, target_level, index=position) for position, data in enumerate(graphs)]
    return collate_dense(samples, pad_to=pad_to)


def inputs_from_pyg(batch, num_node_categories: Optional[int] = None, pad_to: Optional[int] = None,
                    dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """A PyG ``Batch`` (or a list of ``Data``) as the inputs dict of :class:`lps_fast.Symmetrize`:
    padded to its largest graph (or ``pad_to``), then :meth:`DenseBatch.to_inputs`."""
    return dense_batch_from_pyg(batch, pad_to=pad_to).to_inputs(num_node_categories, dtype)


def dataset_to_pyg(dataset) -> List:
    """Every sample of a dataset as a list of ``Data`` (e.g. for a PyG ``DataLoader``)."""
    return [to_pyg(dataset[index]) for index in range(len(dataset))]
