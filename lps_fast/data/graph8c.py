"""GRAPH8c: all 11,117 connected non-isomorphic simple graphs on 8 nodes. Untrained models
embed every graph; a pair counts as not separated when the L1 distance of the two embeddings
is at most 1e-3, over all ``11117 * 11116 / 2`` pairs."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import List, Optional, Union

import numpy as np

from ._paths import SOURCES, find_data_file
from .dataset import GraphDataset, Splits, TaskInfo
from .graph6 import parse_graph6, read_graph6

GRAPH8C_FILENAME = "graph8c.g6"
GRAPH8C_COUNT = 11117
GENG_NAMES = ("geng", "nauty-geng")  # Debian and Ubuntu install nauty's tools with a prefix

PathLike = Union[str, os.PathLike, None]


def find_geng() -> Optional[str]:
    """Path of nauty's ``geng`` on ``PATH`` (also tried as ``nauty-geng``), or None."""
    for name in GENG_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def generate_connected_graphs(n: int, geng: Optional[str] = None) -> List[np.ndarray]:
    """All connected graphs on ``n`` nodes up to isomorphism, from ``geng -c n``.

    Raises:
        FileNotFoundError: when ``geng`` is not installed.
    """
    geng = geng or find_geng()
    if geng is None:
        raise FileNotFoundError(
            "nauty's geng was not found on PATH (also tried nauty-geng). Install nauty "
            "(`apt install nauty`, `brew install nauty`, or https://pallini.di.uniroma1.it), "
            "or read the graph6 file instead. " + SOURCES[GRAPH8C_FILENAME]
        )
    result = subprocess.run(
        [geng, "-c", "-q", str(n)], check=True, capture_output=True, timeout=600
    )
    return parse_graph6(result.stdout)


def _dataset(adjacencies: List[np.ndarray]) -> GraphDataset:
    info = TaskInfo(
        name="graph8c",
        kind="isomorphism",
        metric="pairs not separated (L1 <= 1e-3)",
        num_node_categories=1,
        max_nodes=max((len(adjacency) for adjacency in adjacencies), default=0),
        description="GRAPH8c: every connected graph on 8 nodes, pairwise non-isomorphic",
    )
    features = [np.zeros(len(adjacency), dtype=np.int64) for adjacency in adjacencies]
    return GraphDataset.from_adjacency(adjacencies, features, info)


def load_graph8c(path: PathLike = None, source: str = "auto") -> Splits:
    """GRAPH8c as ``Splits`` with only ``test`` (all graphs; ``pairs`` None = every pair).

    Args:
        path: ``graph8c.g6`` or a directory holding it; None searches the default places.
        source: ``"file"`` reads the graph6 file, ``"geng"`` runs ``geng -c 8``, ``"auto"``
            reads the file when found and falls back to ``geng`` when installed.

    Node features are all 0 (one category); there is no target.
    """
    if source not in ("auto", "file", "geng"):
        raise ValueError(f"load_graph8c: source must be 'auto', 'file' or 'geng', got {source!r}")
    if source == "geng":
        adjacencies = generate_connected_graphs(8)
    else:
        try:
            adjacencies = read_graph6(find_data_file(GRAPH8C_FILENAME, path))
        except FileNotFoundError as missing:
            if source == "file" or find_geng() is None:
                raise FileNotFoundError(
                    f"{missing} nauty's geng is not installed either, so the graphs cannot be "
                    "generated here."
                ) from None
            adjacencies = generate_connected_graphs(8)
    dataset = _dataset(adjacencies)
    return Splits(train=None, val=None, test=dataset, info=dataset.info)
