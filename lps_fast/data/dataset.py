"""Dataset containers: task metadata, train/val/test splits, compact graph storage."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .batch import TARGET_LEVELS, DenseBatch, GraphSample, collate_dense

TASK_KINDS = ("graph_classification", "node_classification", "regression", "isomorphism")


@dataclass(frozen=True)
class TaskInfo:
    """What a trainer needs to know to build a model and a loss for a dataset.

    Attributes:
        name: task name (``"exp-classify"``, ``"nbody"``, ...).
        kind: one of ``graph_classification``, ``node_classification``, ``regression``,
            ``isomorphism`` (untrained models; no target to fit).
        metric: the paper's metric for the task.
        num_classes: classes of a classification target, else None.
        num_node_categories: node features are int64 categories in ``[0, num_node_categories)``
            of shape ``(n,)``; None when they are float vectors.
        node_feature_dim: width of float node features ``(n, node_feature_dim)``, else None.
        edge_feature_dim: width of ``edge_features`` ``(n, n, edge_feature_dim)``, or None.
        point_channels: ``C`` of ``points`` ``(n, 3, C)``, or None.
        max_nodes: the largest graph the task can produce.
        description: one line for logs and ``--help``.
    """

    name: str
    kind: str
    metric: str
    num_classes: Optional[int] = None
    num_node_categories: Optional[int] = None
    node_feature_dim: Optional[int] = None
    edge_feature_dim: Optional[int] = None
    point_channels: Optional[int] = None
    max_nodes: int = 0
    description: str = ""

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"TaskInfo.kind must be one of {TASK_KINDS}, got {self.kind!r}")


class DenseDataset(torch.utils.data.Dataset):
    """Base class: a map-style dataset of :class:`GraphSample` with batching helpers."""

    info: TaskInfo

    def __getitem__(self, index: int) -> GraphSample:  # pragma: no cover - abstract
        raise NotImplementedError

    def batch(self, indices: Sequence[int], pad_to: Optional[int] = None) -> DenseBatch:
        """The samples at ``indices`` as one padded :class:`DenseBatch`."""
        return collate_dense([self[int(index)] for index in indices], pad_to=pad_to)

    def loader(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: Optional[int] = None,
        pad_to: Optional[int] = None,
        drop_last: bool = False,
        sampler: Optional[torch.utils.data.Sampler] = None,
        **kwargs,
    ) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` over this dataset yielding :class:`DenseBatch`.

        Args:
            batch_size: graphs per batch.
            shuffle: reshuffle every epoch (not with ``sampler``).
            seed: seeds the shuffling generator, for reproducible epochs.
            pad_to: fixed padded size (see :func:`collate_dense`).
            drop_last: drop the last incomplete batch.
            sampler: a sampler of sample indices, e.g. ``DistributedSampler`` under DDP.
            **kwargs: passed to ``DataLoader`` (``num_workers``, ``pin_memory``, ...).
        """
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        if sampler is not None and shuffle:
            raise ValueError("loader: pass either shuffle=True or a sampler, not both")
        if type(self).batch is DenseDataset.batch:
            return torch.utils.data.DataLoader(
                self,
                batch_size=batch_size,
                shuffle=shuffle,
                sampler=sampler,
                drop_last=drop_last,
                generator=generator,
                collate_fn=functools.partial(collate_dense, pad_to=pad_to),
                **kwargs,
            )
        # the dataset builds whole batches at once: hand it lists of indices
        if sampler is None:
            if shuffle:
                sampler = torch.utils.data.RandomSampler(self, generator=generator)
            else:
                sampler = torch.utils.data.SequentialSampler(self)
        return torch.utils.data.DataLoader(
            _BatchedView(self, pad_to),
            sampler=torch.utils.data.BatchSampler(sampler, batch_size, drop_last),
            batch_size=None,
            collate_fn=_pass_through,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name!r}, {len(self)} graphs)"


def _pass_through(batch: DenseBatch) -> DenseBatch:
    return batch


class _BatchedView(torch.utils.data.Dataset):
    """Indexes a dataset with a list of indices and returns ``dataset.batch(indices)``."""

    def __init__(self, dataset: DenseDataset, pad_to: Optional[int]):
        self.dataset = dataset
        self.pad_to = pad_to

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: List[int]) -> DenseBatch:
        return self.dataset.batch(indices, pad_to=self.pad_to)


@dataclass
class Splits:
    """Train / validation / test datasets of one task. Isomorphism tasks have only ``test``."""

    train: Optional[DenseDataset]
    val: Optional[DenseDataset]
    test: Optional[DenseDataset]
    info: TaskInfo
    meta: Dict[str, object] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Optional[DenseDataset]:
        if name not in ("train", "val", "test"):
            raise KeyError(f"split must be 'train', 'val' or 'test', got {name!r}")
        return getattr(self, name)

    def items(self) -> Iterator[Tuple[str, DenseDataset]]:
        """The splits that exist, as ``(name, dataset)``."""
        for name in ("train", "val", "test"):
            dataset = getattr(self, name)
            if dataset is not None:
                yield name, dataset


@functools.lru_cache(maxsize=512)
def _upper_triangle(n: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


def _packed_length(n: int) -> int:
    return (n * (n - 1) // 2 + 7) // 8


def pack_adjacency(adjacency: np.ndarray) -> np.ndarray:
    """Pack the strict upper triangle of an ``(n, n)`` 0/1 matrix into bytes (row-major, i < j)."""
    rows, cols = _upper_triangle(adjacency.shape[0])
    return np.packbits(adjacency[rows, cols].astype(bool))


def unpack_adjacency(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_adjacency`: ``(n, n)`` symmetric bool with an empty diagonal."""
    flat_upper = _flat_upper_triangle(n)
    adjacency = np.zeros(n * n, dtype=bool)
    adjacency[flat_upper] = np.unpackbits(packed, count=len(flat_upper)).view(bool)
    adjacency = adjacency.reshape(n, n)
    return adjacency | adjacency.T


@functools.lru_cache(maxsize=512)
def _flat_upper_triangle(n: int) -> np.ndarray:
    rows, cols = _upper_triangle(n)
    return rows * n + cols


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


class GraphDataset(DenseDataset):
    """Undirected simple graphs stored compactly: per graph, the packed upper triangle of its
    adjacency (``n(n-1)/16`` bytes) and node arrays concatenated graph after graph.

    Args:
        num_nodes: ``(G,)`` nodes per graph.
        adjacency_bits: concatenated :func:`pack_adjacency` bytes of every graph.
        node_features: ``(sum n, *F)`` concatenated node features.
        info: the task's :class:`TaskInfo`.
        target: ``(G, *T)`` graph-level or ``(sum n, *T)`` node-level targets, or None.
        target_level: ``"graph"`` or ``"node"``.
        node_data: extra ``(sum n, ...)`` arrays (e.g. SBM communities), read with
            :meth:`node_array`.
        pairs: ``(P, 2)`` indices of graphs to compare (EXP-iso); None means all pairs.
    """

    def __init__(
        self,
        num_nodes: np.ndarray,
        adjacency_bits: np.ndarray,
        node_features: np.ndarray,
        info: TaskInfo,
        target: Optional[np.ndarray] = None,
        target_level: str = "graph",
        node_data: Optional[Mapping[str, np.ndarray]] = None,
        pairs: Optional[np.ndarray] = None,
    ):
        self.num_nodes = np.asarray(num_nodes, dtype=np.int64)
        self.adjacency_bits = np.asarray(adjacency_bits, dtype=np.uint8)
        self.node_features = np.asarray(node_features)
        self.info = info
        self.target = None if target is None else np.asarray(target)
        if target_level not in TARGET_LEVELS:
            raise ValueError(f"target_level must be one of {TARGET_LEVELS}, got {target_level!r}")
        self.target_level = target_level
        self.node_data = {key: np.asarray(value) for key, value in (node_data or {}).items()}
        self.pairs = None if pairs is None else np.asarray(pairs, dtype=np.int64)
        self._node_offsets = _offsets(self.num_nodes)
        self._bit_offsets = _offsets(np.array([_packed_length(n) for n in self.num_nodes], np.int64))
        total_nodes = int(self._node_offsets[-1])
        if len(self.adjacency_bits) != self._bit_offsets[-1]:
            raise ValueError("GraphDataset: adjacency_bits does not match num_nodes")
        if len(self.node_features) != total_nodes:
            raise ValueError("GraphDataset: node_features does not have sum(num_nodes) rows")
        expected_targets = len(self.num_nodes) if target_level == "graph" else total_nodes
        if self.target is not None and len(self.target) != expected_targets:
            raise ValueError(f"GraphDataset: {target_level}-level target needs {expected_targets} rows")
        for key, value in self.node_data.items():
            if len(value) != total_nodes:
                raise ValueError(f"GraphDataset: node_data[{key!r}] does not have sum(num_nodes) rows")

    @classmethod
    def from_adjacency(
        cls,
        adjacencies: Sequence[np.ndarray],
        node_features: Sequence[np.ndarray],
        info: TaskInfo,
        target: Optional[np.ndarray] = None,
        target_level: str = "graph",
        node_data: Optional[Mapping[str, Sequence[np.ndarray]]] = None,
        pairs: Optional[np.ndarray] = None,
    ) -> "GraphDataset":
        """Build from per-graph ``(n, n)`` adjacency matrices and ``(n, *F)`` node features.
        A node-level ``target`` is a sequence of ``(n, *T)`` arrays."""
        num_nodes = np.array([len(adjacency) for adjacency in adjacencies], dtype=np.int64)
        bits = [pack_adjacency(np.asarray(adjacency)) for adjacency in adjacencies]
        if target is not None and target_level == "node":
            target = np.concatenate(list(target))
        return cls(
            num_nodes,
            np.concatenate(bits) if bits else np.zeros(0, np.uint8),
            np.concatenate(list(node_features)),
            info,
            target=target,
            target_level=target_level,
            node_data={key: np.concatenate(list(value)) for key, value in (node_data or {}).items()},
            pairs=pairs,
        )

    def arrays(self) -> Dict[str, np.ndarray]:
        """Every stored array, for caching; inverse of :meth:`from_arrays`."""
        arrays = {
            "num_nodes": self.num_nodes,
            "adjacency_bits": self.adjacency_bits,
            "node_features": self.node_features,
        }
        if self.target is not None:
            arrays["target"] = self.target
        if self.pairs is not None:
            arrays["pairs"] = self.pairs
        for key, value in self.node_data.items():
            arrays["node_data_" + key] = value
        return arrays

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], info: TaskInfo, target_level: str = "graph"
    ) -> "GraphDataset":
        node_data = {
            key[len("node_data_"):]: value
            for key, value in arrays.items()
            if key.startswith("node_data_")
        }
        return cls(
            arrays["num_nodes"],
            arrays["adjacency_bits"],
            arrays["node_features"],
            info,
            target=arrays.get("target"),
            target_level=target_level,
            node_data=node_data,
            pairs=arrays.get("pairs"),
        )

    def __len__(self) -> int:
        return len(self.num_nodes)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"graph index {index} out of range for {len(self)} graphs")
        return index

    def adjacency(self, index: int) -> np.ndarray:
        """``(n, n)`` bool adjacency of graph ``index``."""
        index = self._check_index(index)
        packed = self.adjacency_bits[self._bit_offsets[index]:self._bit_offsets[index + 1]]
        return unpack_adjacency(packed, int(self.num_nodes[index]))

    def node_array(self, name: str, index: int) -> np.ndarray:
        """Rows of ``node_features`` (``name="node_features"``) or of ``node_data[name]``
        belonging to graph ``index``."""
        index = self._check_index(index)
        source = self.node_features if name == "node_features" else self.node_data[name]
        return source[self._node_offsets[index]:self._node_offsets[index + 1]]

    def __getitem__(self, index: int) -> GraphSample:
        index = self._check_index(index)
        target = None
        if self.target is not None:
            if self.target_level == "graph":
                target = torch.as_tensor(self.target[index])
            else:
                target = torch.as_tensor(self.target[self._node_offsets[index]:self._node_offsets[index + 1]])
            if not target.is_floating_point():
                target = target.long()
        features = torch.as_tensor(self.node_array("node_features", index))
        if not features.is_floating_point():
            features = features.long()
        return GraphSample(
            adjacency=torch.from_numpy(self.adjacency(index)),
            node_features=features,
            target=target,
            target_level=self.target_level,
            index=index,
        )

    def subset(self, indices: Sequence[int], info: Optional[TaskInfo] = None) -> "GraphDataset":
        """A new dataset holding the graphs at ``indices`` in that order (``pairs`` dropped)."""
        indices = np.asarray(indices, dtype=np.int64)

        def gather(offsets: np.ndarray, array: np.ndarray) -> np.ndarray:
            if len(indices) == 0:
                return array[:0]
            return np.concatenate([array[offsets[i]:offsets[i + 1]] for i in indices])

        target = None
        if self.target is not None:
            target = self.target[indices] if self.target_level == "graph" else gather(self._node_offsets, self.target)
        return GraphDataset(
            self.num_nodes[indices],
            gather(self._bit_offsets, self.adjacency_bits),
            gather(self._node_offsets, self.node_features),
            info or self.info,
            target=target,
            target_level=self.target_level,
            node_data={key: gather(self._node_offsets, value) for key, value in self.node_data.items()},
        )

    def graphs(self) -> List[np.ndarray]:
        """Every adjacency matrix, as a list of ``(n, n)`` bool arrays."""
        return [self.adjacency(index) for index in range(len(self))]
