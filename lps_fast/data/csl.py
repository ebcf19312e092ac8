"""CSL, circular skip-link graphs (Murphy et al., "Relational Pooling for Graph
Representations", ICML 2019): a cycle of 41 nodes plus a skip link from every node ``i`` to
``i + R (mod 41)``, for ``R`` in ``CSL_SKIPS``; the class is the position of ``R`` in that
list. All graphs are 4-regular, so 1-WL cannot tell the classes apart. Each class holds 15
random relabelings (node permutations) of its graph.

Splits: stratified ``n_folds``-fold cross-validation as in Dwivedi et al.'s benchmark: per
class, the graphs are shuffled by the seed and dealt into folds; fold ``fold`` is the test
set, fold ``fold + 1`` the validation set and the rest the training set (90 / 30 / 30 graphs
with 5 folds).
"""

from __future__ import annotations

import numpy as np

from ._cache import CacheDir, cached_arrays
from .dataset import GraphDataset, Splits, TaskInfo, pack_adjacency

GENERATOR_VERSION = 1
CSL_NODES = 41
CSL_SKIPS = (2, 3, 4, 5, 6, 9, 11, 12, 13, 16)
CSL_PER_CLASS = 15


def circular_skip_link(n: int, skip: int) -> np.ndarray:
    """``(n, n)`` bool adjacency of the cycle ``C_n`` plus edges ``i -- i + skip (mod n)``."""
    adjacency = np.zeros((n, n), dtype=bool)
    nodes = np.arange(n)
    for step in (1, skip):
        adjacency[nodes, (nodes + step) % n] = True
        adjacency[(nodes + step) % n, nodes] = True
    return adjacency


def generate_csl(seed: int = 0, n: int = CSL_NODES, skips=CSL_SKIPS, per_class: int = CSL_PER_CLASS) -> dict:
    """Arrays of every CSL graph in :class:`GraphDataset` storage, class after class.

    ``node_data_cycle_position`` keeps, for every node, its position on the cycle before
    relabeling (relabeled node ``r`` is original node ``cycle_position[r]``)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    bits, positions, labels = [], [], []
    for label, skip in enumerate(skips):
        base = circular_skip_link(n, skip)
        for _ in range(per_class):
            order = rng.permutation(n)
            bits.append(pack_adjacency(base[np.ix_(order, order)]))
            positions.append(order)
            labels.append(label)
    count = len(labels)
    return {
        "num_nodes": np.full(count, n, dtype=np.int64),
        "adjacency_bits": np.concatenate(bits),
        "node_features": np.zeros(count * n, dtype=np.int8),
        "target": np.array(labels, dtype=np.int64),
        "node_data_cycle_position": np.concatenate(positions).astype(np.int64),
    }


def csl_info(n: int = CSL_NODES, num_classes: int = len(CSL_SKIPS)) -> TaskInfo:
    return TaskInfo(
        name="csl",
        kind="graph_classification",
        metric="accuracy",
        num_classes=num_classes,
        num_node_categories=1,
        max_nodes=n,
        description=f"CSL: {n}-cycles with one skip length per class, 4-regular",
    )


def csl_fold_indices(labels: np.ndarray, fold: int, n_folds: int, seed: int) -> dict:
    """Stratified fold assignment: ``{"train", "val", "test"}`` index arrays."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in [0, {n_folds}), got {fold}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    fold_of = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold_of[members] = np.arange(len(members)) % n_folds
    val_fold = (fold + 1) % n_folds
    return {
        "train": np.flatnonzero((fold_of != fold) & (fold_of != val_fold)),
        "val": np.flatnonzero(fold_of == val_fold),
        "test": np.flatnonzero(fold_of == fold),
    }


def load_csl(fold: int = 0, n_folds: int = 5, seed: int = 0, cache_dir: CacheDir = None) -> Splits:
    """CSL with a stratified cross-validation split.

    Args:
        fold: which fold is the test set (validation is the next one).
        n_folds: folds (5 in the benchmark; 15 graphs per class must split into them).
        seed: seeds the relabelings and the fold assignment.
        cache_dir: cache directory; None = default; False disables caching.

    Returns:
        :class:`Splits` of :class:`GraphDataset`: node features all 0 (one category), graph
        target = class index, ``node_data["cycle_position"]``; ``meta["skips"]`` the skip
        length of each class.
    """
    params = {"seed": seed, "n": CSL_NODES, "skips": list(CSL_SKIPS), "per_class": CSL_PER_CLASS}
    arrays = cached_arrays("csl", GENERATOR_VERSION, params, lambda: generate_csl(seed), cache_dir)
    info = csl_info()
    everything = GraphDataset.from_arrays(arrays, info)
    parts = csl_fold_indices(everything.target, fold, n_folds, seed)
    return Splits(
        everything.subset(parts["train"]),
        everything.subset(parts["val"]),
        everything.subset(parts["test"]),
        info,
        meta={"skips": CSL_SKIPS, "fold": fold, "n_folds": n_folds},
    )
