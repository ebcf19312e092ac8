"""EXP (Abboud et al., "The Surprising Power of Graph Neural Networks with Random Node
Initialization", IJCAI 2021): 1,200 graphs encoding SAT formulas, in 600 pairs (graphs ``2i``
and ``2i+1``) that 1-WL cannot tell apart, one satisfiable (label 1) and one not.

File format (``exp.npz``): ``num_nodes`` (1200,), ``num_edges`` (1200,) (directed count, each
undirected edge stored both ways), ``x`` (sum of num_nodes,) node feature in {0, 1}, ``edge_index``
(2, sum of num_edges) with node ids local to each graph, ``y`` (1200,) label; all concatenated
graph after graph.

- EXP-iso: all 1,200 graphs and the 600 pairs; an untrained model separates a pair when its
  two embeddings differ by more than 1e-3 in L1.
- EXP-classify: predict satisfiability; validation graphs 0-199, test 200-399, train 400-1199.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np

from ._paths import find_data_file
from .dataset import GraphDataset, Splits, TaskInfo

EXP_FILENAME = "exp.npz"
EXP_SPLITS = {"val": (0, 200), "test": (200, 400), "train": (400, 1200)}

PathLike = Union[str, os.PathLike, None]


def _info(name: str, kind: str, metric: str, max_nodes: int) -> TaskInfo:
    return TaskInfo(
        name=name,
        kind=kind,
        metric=metric,
        num_classes=2,
        num_node_categories=2,
        max_nodes=max_nodes,
        description="EXP: 1-WL-indistinguishable pairs of SAT graphs, label 1 = satisfiable",
    )


def read_exp(path: PathLike = None) -> GraphDataset:
    """All 1,200 EXP graphs in file order, with ``pairs`` ``(600, 2)`` = ``[[0, 1], [2, 3], ...]``.

    Args:
        path: ``exp.npz`` or a directory holding it; None searches the default places
            (see :func:`lps_fast.data.find_data_file`).

    Returns:
        :class:`GraphDataset`: node features int64 ``(n,)`` in {0, 1}, graph target = label.
    """
    file = find_data_file(EXP_FILENAME, path)
    with np.load(file, allow_pickle=False) as stored:
        num_nodes = stored["num_nodes"].astype(np.int64)
        num_edges = stored["num_edges"].astype(np.int64)
        features = stored["x"].astype(np.int64)
        edge_index = stored["edge_index"].astype(np.int64)
        labels = stored["y"].astype(np.int64)
    if edge_index.shape != (2, num_edges.sum()) or len(features) != num_nodes.sum():
        raise ValueError(f"{file}: array sizes do not match num_nodes / num_edges")
    adjacencies = []
    edge_start = 0
    for n, m in zip(num_nodes, num_edges):
        source, target = edge_index[:, edge_start:edge_start + m]
        edge_start += m
        adjacency = np.zeros((n, n), dtype=bool)
        adjacency[source, target] = True
        adjacency |= adjacency.T
        np.fill_diagonal(adjacency, False)
        adjacencies.append(adjacency)
    node_offsets = np.concatenate([[0], np.cumsum(num_nodes)])
    pair_count = len(num_nodes) // 2
    return GraphDataset.from_adjacency(
        adjacencies,
        [features[node_offsets[i]:node_offsets[i + 1]] for i in range(len(num_nodes))],
        _info("exp-iso", "isomorphism", "pairs separated (L1 > 1e-3)", int(num_nodes.max())),
        target=labels,
        pairs=np.arange(2 * pair_count).reshape(pair_count, 2),
    )


def load_exp_iso(path: PathLike = None) -> Splits:
    """EXP-iso: ``Splits`` with only ``test`` = all 1,200 graphs (``test.pairs`` holds the 600
    pairs to separate)."""
    dataset = read_exp(path)
    return Splits(train=None, val=None, test=dataset, info=dataset.info)


def load_exp_classify(path: PathLike = None) -> Splits:
    """EXP-classify: satisfiability, 2 classes; val = graphs 0-199, test = 200-399,
    train = 400-1199 (the paper's split)."""
    everything = read_exp(path)
    info = _info("exp-classify", "graph_classification", "accuracy", everything.info.max_nodes)
    parts = {
        name: everything.subset(np.arange(start, stop), info=info)
        for name, (start, stop) in EXP_SPLITS.items()
    }
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"], info=info)
