"""PATTERN-style stochastic block model graphs (Dwivedi et al., "Benchmarking Graph Neural
Networks"): find the nodes of a planted pattern.

Each graph: ``n_communities`` (5) communities with sizes drawn uniformly from
``[community_size_low, community_size_high)`` (5..34, numpy's half-open ``integers`` as in the
original generator), edges with probability ``p_intra`` (0.5) inside a community and
``p_inter`` (0.35) between communities; node features uniform over ``vocabulary`` (3) symbols.
Then a pattern of ``pattern_size`` (20) nodes is added and joined to every other node with
probability ``p_pattern_rest`` (0.5), and the node order is shuffled. The pattern (its internal
edges, drawn once with probability ``p_pattern`` 0.5, and its node features) is the *same* in
every graph of every split, drawn once from the seed: that is what makes it learnable. Labels:
1 for pattern nodes, 0 otherwise. Graphs have 45 to 190 nodes (the released data: 44-188).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from ._cache import CacheDir, cached_arrays
from .dataset import GraphDataset, Splits, TaskInfo, pack_adjacency

GENERATOR_VERSION = 2
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
PATTERN_STREAM = 0
DEFAULT_SIZES = {"train": 10000, "val": 2000, "test": 2000}


@dataclass(frozen=True)
class PatternConfig:
    """Parameters of the PATTERN generator (defaults: Dwivedi et al.)."""

    n_communities: int = 5
    community_size_low: int = 5
    community_size_high: int = 35
    p_intra: float = 0.5
    p_inter: float = 0.35
    pattern_size: int = 20
    p_pattern: float = 0.5
    p_pattern_rest: float = 0.5
    vocabulary: int = 3

    @property
    def max_nodes(self) -> int:
        return self.n_communities * (self.community_size_high - 1) + self.pattern_size


def draw_pattern(seed: int, config: PatternConfig = PatternConfig()) -> Tuple[np.ndarray, np.ndarray]:
    """The planted pattern shared by every graph: ``(adjacency (m, m) bool, features (m,))``."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(PATTERN_STREAM,)))
    m = config.pattern_size
    upper = np.triu(rng.random((m, m)) < config.p_pattern, 1)
    features = rng.integers(config.vocabulary, size=m)
    return upper | upper.T, features


def sbm_graph(
    rng: np.random.Generator,
    pattern: np.ndarray,
    pattern_features: np.ndarray,
    config: PatternConfig = PatternConfig(),
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One graph: ``(adjacency (n, n) bool, features (n,), community (n,))`` where community
    ``n_communities`` marks the pattern."""
    sizes = rng.integers(config.community_size_low, config.community_size_high, size=config.n_communities)
    community = np.repeat(np.arange(config.n_communities), sizes)
    m = len(pattern)
    base = len(community)
    community = np.concatenate([community, np.full(m, config.n_communities)])
    n = base + m
    probability = np.where(community[:, None] == community[None, :], config.p_intra, config.p_inter)
    probability[base:, :] = config.p_pattern_rest
    probability[:, base:] = config.p_pattern_rest
    upper = np.triu(rng.random((n, n)) < probability, 1)
    adjacency = upper | upper.T
    adjacency[base:, base:] = pattern
    features = np.concatenate([rng.integers(config.vocabulary, size=base), pattern_features])
    order = rng.permutation(n)
    return adjacency[np.ix_(order, order)], features[order], community[order]


def generate_pattern_split(count: int, seed: int, stream: int, config: PatternConfig = PatternConfig()) -> Dict[str, np.ndarray]:
    """Arrays of one split in :class:`GraphDataset` storage (``node_data_community`` included).

    Graph ``i`` draws from the split's single stream right after graphs ``0..i-1``, so a smaller
    ``count`` gives a prefix of a larger one."""
    pattern, pattern_features = draw_pattern(seed, config)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))
    num_nodes, bits, features, communities = [], [], [], []
    for _ in range(count):
        adjacency, node_features, community = sbm_graph(rng, pattern, pattern_features, config)
        num_nodes.append(len(adjacency))
        bits.append(pack_adjacency(adjacency))
        features.append(node_features)
        communities.append(community)
    community = np.concatenate(communities) if count else np.zeros(0, np.int64)
    return {
        "num_nodes": np.array(num_nodes, dtype=np.int64),
        "adjacency_bits": np.concatenate(bits) if count else np.zeros(0, np.uint8),
        # small integer dtypes keep the cache compact; samples are returned as int64
        "node_features": (np.concatenate(features) if count else np.zeros(0)).astype(np.int8),
        "target": (community == config.n_communities).astype(np.int8),
        "node_data_community": community.astype(np.int8),
        "pattern": pattern,
        "pattern_features": pattern_features.astype(np.int64),
    }


def pattern_info(config: PatternConfig = PatternConfig()) -> TaskInfo:
    return TaskInfo(
        name="pattern",
        kind="node_classification",
        metric="weighted accuracy",
        num_classes=2,
        num_node_categories=config.vocabulary,
        max_nodes=config.max_nodes,
        description="PATTERN: SBM graphs with a planted 20-node pattern, label 1 = pattern node",
    )


def load_pattern(
    n_train: int = DEFAULT_SIZES["train"],
    n_val: int = DEFAULT_SIZES["val"],
    n_test: int = DEFAULT_SIZES["test"],
    seed: int = 0,
    cache_dir: CacheDir = None,
    config: PatternConfig = PatternConfig(),
) -> Splits:
    """The PATTERN task, generated (or loaded from the cache).

    Args:
        n_train, n_val, n_test: graphs per split (10000 / 2000 / 2000 in the benchmark; smaller
            for CPU budgets, each a prefix of the full split).
        seed: dataset seed (also fixes the shared pattern).
        cache_dir: cache directory; None = default; False disables caching.
        config: generator parameters.

    Returns:
        :class:`Splits` of :class:`GraphDataset` with node-level int64 targets, int64 node
        features in ``[0, vocabulary)``, ``node_data["community"]`` (``n_communities`` marks the
        pattern) and ``meta["pattern"]``, ``meta["pattern_features"]``.
    """
    info = pattern_info(config)
    datasets = {}
    pattern = pattern_features = None
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        params = dict(vars(config), split=split, count=count, seed=seed)
        arrays = cached_arrays(
            "pattern",
            GENERATOR_VERSION,
            params,
            lambda count=count, split=split: generate_pattern_split(count, seed, SPLIT_CODES[split], config),
            cache_dir,
        )
        arrays = dict(arrays)
        pattern, pattern_features = arrays.pop("pattern"), arrays.pop("pattern_features")
        datasets[split] = GraphDataset.from_arrays(arrays, info, target_level="node")
    return Splits(
        datasets["train"], datasets["val"], datasets["test"], info,
        meta={"config": config, "pattern": pattern, "pattern_features": pattern_features},
    )


@dataclass
class SBMStatistics:
    """Empirical edge densities of PATTERN graphs (edges present / node pairs).

    Attributes:
        intra: pairs inside one community (expected ``p_intra``).
        inter: pairs in two different communities (expected ``p_inter``).
        pattern_rest: pattern node with a community node (expected ``p_pattern_rest``).
        pattern_internal: inside the pattern (the shared pattern's own density, one draw of
            ``p_pattern``).
        min_nodes, max_nodes, mean_nodes: graph sizes.
        pattern_fraction: fraction of nodes labelled 1.
    """

    intra: float
    inter: float
    pattern_rest: float
    pattern_internal: float
    min_nodes: int
    max_nodes: int
    mean_nodes: float
    pattern_fraction: float

    def __str__(self) -> str:
        return (
            f"edge density intra {self.intra:.4f}, inter {self.inter:.4f}, pattern-rest "
            f"{self.pattern_rest:.4f}, pattern {self.pattern_internal:.4f}; nodes "
            f"{self.min_nodes}-{self.max_nodes} (mean {self.mean_nodes:.1f}); pattern nodes "
            f"{self.pattern_fraction:.1%}"
        )


def sbm_statistics(dataset: GraphDataset, n_communities: int = PatternConfig.n_communities) -> SBMStatistics:
    """Measure the community structure of a PATTERN dataset (the generator's self-check)."""
    edges = np.zeros(4)
    pairs = np.zeros(4)
    for index in range(len(dataset)):
        adjacency = dataset.adjacency(index)
        community = dataset.node_array("community", index)
        rows, cols = np.triu_indices(len(community), 1)
        present = adjacency[rows, cols]
        first, second = community[rows], community[cols]
        in_pattern = (first == n_communities).astype(int) + (second == n_communities)
        kind = np.where(
            in_pattern == 2, 3, np.where(in_pattern == 1, 2, np.where(first == second, 0, 1))
        )
        edges += np.bincount(kind, weights=present, minlength=4)
        pairs += np.bincount(kind, minlength=4)
    density = edges / np.maximum(pairs, 1)
    labels = dataset.target
    return SBMStatistics(
        intra=float(density[0]),
        inter=float(density[1]),
        pattern_rest=float(density[2]),
        pattern_internal=float(density[3]),
        min_nodes=int(dataset.num_nodes.min()),
        max_nodes=int(dataset.num_nodes.max()),
        mean_nodes=float(dataset.num_nodes.mean()),
        pattern_fraction=float(labels.mean()),
    )
