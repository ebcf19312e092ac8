"""Peptides-func and Peptides-struct (Dwivedi et al., "Long Range Graph Benchmark", 2022).

15,535 peptides as molecular graphs (up to 444 atoms) read from the published LRGB files:

* ``peptides-func``: ``peptide_multi_class_dataset.csv.gz`` (columns ``smiles`` and
  ``labels``, a list of 10 binary function labels) and
  ``splits_random_stratified_peptide.pickle``; metric: average precision over the 10 labels.
* ``peptides-struct``: ``peptide_structure_dataset.csv.gz`` (``smiles`` and 11 target
  columns, :data:`STRUCT_TARGETS`) and ``splits_random_stratified_peptide_structure.pickle``;
  the targets are standardised per column over the whole file (mean 0, sample standard
  deviation 1), as LRGB does; metric: mean absolute error.

The split pickle is a dict of index arrays under ``train``, ``val`` and ``test``; it is read
with an unpickler that accepts numpy arrays and plain containers only. Atoms and bonds carry
the OGB features of :mod:`lps_fast.data.molecules`; the SMILES are parsed once and cached
(keyed by the CSV's contents). Samples hold ``node_features (n, 9)`` and ``edge_features
(n, n, 3)`` vocabulary indices, the bond ones shifted by one so that 0 means "no bond";
:func:`molecule_inputs` turns a batch into one-hot model inputs.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ._cache import CacheDir, cached_arrays
from ._paths import candidate_directories
from .batch import DenseBatch, GraphSample
from .dataset import DenseDataset, Splits, TaskInfo
from .molecules import ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS, smiles_to_graphs

PARSER_VERSION = 1

STRUCT_TARGETS = ("Inertia_mass_a", "Inertia_mass_b", "Inertia_mass_c", "Inertia_valence_a", "Inertia_valence_b",
                  "Inertia_valence_c", "length_a", "length_b", "length_c", "Spherocity", "Plane_best_fit")


@dataclass(frozen=True)
class PeptideFiles:
    """The published files of one task, where they are published, and the folder LRGB's
    loaders keep them in."""

    csv: str
    split: str
    folder: str
    targets: int
    csv_url: str
    split_url: str


PEPTIDE_TASKS: Dict[str, PeptideFiles] = {
    "peptides-func": PeptideFiles(
        "peptide_multi_class_dataset.csv.gz", "splits_random_stratified_peptide.pickle", "peptides_functional", 10,
        "https://www.dropbox.com/s/ol2v01usvaxbsr8/peptide_multi_class_dataset.csv.gz?dl=1",
        "https://www.dropbox.com/s/j4zcnx2eipuo0xz/splits_random_stratified_peptide.pickle?dl=1"),
    "peptides-struct": PeptideFiles(
        "peptide_structure_dataset.csv.gz", "splits_random_stratified_peptide_structure.pickle", "peptides_structural",
        11, "https://www.dropbox.com/s/464u3303eu2u4zp/peptide_structure_dataset.csv.gz?dl=1",
        "https://www.dropbox.com/s/9dfifzft1hqgow6/splits_random_stratified_peptide_structure.pickle?dl=1"),
}


def _locations(directory: Path, folder: str) -> List[Path]:
    return [directory, directory / "raw", directory / folder, directory / folder / "raw"]


def find_peptide_files(task: str, data: Union[str, os.PathLike, None] = None) -> Dict[str, Path]:
    """The CSV and split files of ``task``, in ``data`` (a directory) or the default places.

    Both files may sit in the directory itself, in its ``raw/`` subfolder, or in LRGB's layout
    (``<dir>/peptides_functional/raw/<csv>`` and ``<dir>/peptides_functional/<split>``).

    Raises:
        FileNotFoundError: naming each missing file, where it was looked for and where to put it.
    """
    files = PEPTIDE_TASKS[task]
    if data is not None:
        directory = Path(data).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"--data {directory}: not a directory; {task} needs a directory holding "
                                    f"{files.csv} and {files.split}")
        roots = [directory]
    else:
        roots = candidate_directories()
    found, missing = {}, []
    for key in ("csv", "split"):
        name = getattr(files, key)
        places = [location / name for root in roots for location in _locations(root, files.folder)]
        hit = next((place for place in places if place.is_file()), None)
        if hit is None:
            missing.append(name)
            looked = places
        else:
            found[key] = hit
    if missing:
        example = roots[0]
        raise FileNotFoundError(
            f"{task}: missing {' and '.join(missing)} (looked in {', '.join(sorted({str(p.parent) for p in looked}))}). "
            f"Put {files.csv} and {files.split} side by side in one directory, e.g. {example}/{files.csv} and "
            f"{example}/{files.split}, and pass --data {example}. They are the Long Range Graph Benchmark's files "
            f"(https://github.com/vijaydwivedi75/lrgb), published at {files.csv_url} and {files.split_url}; "
            f"LRGB's own loaders keep them as <root>/{files.folder}/raw/{files.csv} and "
            f"<root>/{files.folder}/{files.split}, which --data <root> also finds.")
    return found


class _SplitUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, lists, dicts and tuples only: a split file runs no other code."""

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" or (module == "builtins" and name in ("list", "dict", "tuple", "range")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a split file")


def read_split_file(path: Union[str, os.PathLike], count: int) -> Dict[str, np.ndarray]:
    """``{"train", "val", "test"}`` index arrays of a split pickle, checked against ``count`` graphs."""
    try:
        with open(path, "rb") as handle:
            raw = _SplitUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as error:
        raise ValueError(f"{path}: not a split file of index arrays ({error})") from None
    if not isinstance(raw, dict) or not {"train", "val", "test"} <= set(raw):
        raise ValueError(f"{path}: expected a dict with keys train, val and test")
    splits = {}
    for name in ("train", "val", "test"):
        indices = np.asarray(raw[name]).reshape(-1).astype(np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= count):
            raise ValueError(f"{path}: {name} indices must lie in [0, {count}) (the CSV has {count} rows)")
        splits[name] = indices
    return splits


def _read_csv(path: Path) -> List[Dict[str, str]]:
    with gzip.open(path, "rt", newline="") as handle:
        return list(csv.DictReader(handle))


def _parse_labels(text: str, row: int, width: int) -> List[float]:
    try:
        values = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):  # numpy's printing: "[0 1 0 ...]"
        values = text.strip().strip("[]").split()
    try:
        values = [float(value) for value in values]
    except (TypeError, ValueError):
        raise ValueError(f"row {row}: 'labels' must be a list of {width} numbers, got {text!r}") from None
    if len(values) != width:
        raise ValueError(f"row {row}: 'labels' holds {len(values)} values, expected {width}")
    return values


def _targets(task: str, rows: List[Dict[str, str]], path: Path) -> np.ndarray:
    columns = set(rows[0]) if rows else set()
    if task == "peptides-func":
        if "labels" not in columns:
            raise ValueError(f"{path}: no 'labels' column (columns: {sorted(columns)})")
        return np.array([_parse_labels(row["labels"], index, 10) for index, row in enumerate(rows)], np.float32)
    absent = [name for name in STRUCT_TARGETS if name not in columns]
    if absent:
        raise ValueError(f"{path}: missing target columns {absent}")
    values = np.array([[float(row[name]) for name in STRUCT_TARGETS] for row in rows], dtype=np.float64)
    spread = values.std(axis=0, ddof=1) if len(values) > 1 else np.ones(values.shape[1])
    return ((values - values.mean(axis=0)) / np.where(spread > 0, spread, 1.0)).astype(np.float32)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse(task: str, path: Path) -> Dict[str, np.ndarray]:
    rows = _read_csv(path)
    if not rows or "smiles" not in rows[0]:
        raise ValueError(f"{path}: expected a CSV with a 'smiles' column and one row per peptide")
    target = _targets(task, rows, path)
    try:
        graphs = smiles_to_graphs([row["smiles"] for row in rows])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return {
        "num_nodes": np.array([graph.num_nodes for graph in graphs], dtype=np.int64),
        "num_edges": np.array([graph.edge_index.shape[1] for graph in graphs], dtype=np.int64),
        "node_features": np.concatenate([graph.node_features for graph in graphs]).astype(np.uint8),
        "edge_index": np.concatenate([graph.edge_index for graph in graphs], axis=1).astype(np.int32),
        "edge_features": np.concatenate([graph.edge_features for graph in graphs]).astype(np.uint8),
        "target": target,
    }


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class MoleculeDataset(DenseDataset):
    """Molecular graphs stored as concatenated node and edge arrays (see :func:`load_peptides`)."""

    def __init__(self, arrays: Dict[str, np.ndarray], info: TaskInfo, indices: Optional[np.ndarray] = None):
        self.arrays = arrays
        self.info = info
        self.graphs = np.arange(len(arrays["num_nodes"])) if indices is None else np.asarray(indices, np.int64)
        self._nodes = _offsets(arrays["num_nodes"])
        self._edges = _offsets(arrays["num_edges"])

    def __len__(self) -> int:
        return len(self.graphs)

    def num_nodes(self, index: int) -> int:
        return int(self.arrays["num_nodes"][self.graphs[index]])

    def __getitem__(self, index: int) -> GraphSample:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"graph index {index} out of range for {len(self)} graphs")
        graph = int(self.graphs[index])
        n = int(self.arrays["num_nodes"][graph])
        first, last = self._edges[graph], self._edges[graph + 1]
        source, target = torch.from_numpy(self.arrays["edge_index"][:, first:last].astype(np.int64))
        adjacency = torch.zeros(n, n, dtype=torch.bool)
        adjacency[source, target] = True
        bonds = torch.zeros(n, n, len(BOND_FEATURE_DIMS), dtype=torch.int64)
        bonds[source, target] = torch.from_numpy(self.arrays["edge_features"][first:last].astype(np.int64)) + 1
        atoms = self.arrays["node_features"][self._nodes[graph]:self._nodes[graph + 1]]
        return GraphSample(adjacency=adjacency, node_features=torch.from_numpy(atoms.astype(np.int64)),
                           target=torch.from_numpy(self.arrays["target"][graph].copy()), target_level="graph",
                           edge_features=bonds, index=index)

    def subset(self, indices: Sequence[int]) -> "MoleculeDataset":
        return MoleculeDataset(self.arrays, self.info, self.graphs[np.asarray(indices, dtype=np.int64)])


def peptides_info(task: str, max_nodes: int) -> TaskInfo:
    if task == "peptides-func":
        return TaskInfo(name=task, kind="graph_classification", metric="average_precision", num_classes=10,
                        node_feature_dim=sum(ATOM_FEATURE_DIMS), edge_feature_dim=sum(BOND_FEATURE_DIMS),
                        max_nodes=max_nodes,
                        description="Peptides-func (LRGB): 10 binary functions of a peptide from its molecular graph")
    return TaskInfo(name=task, kind="regression", metric="mae", node_feature_dim=sum(ATOM_FEATURE_DIMS),
                    edge_feature_dim=sum(BOND_FEATURE_DIMS), max_nodes=max_nodes,
                    description="Peptides-struct (LRGB): 11 standardised 3D-structure properties of a peptide")


def load_peptides(task: str, data: Union[str, os.PathLike, None] = None, cache_dir: CacheDir = None) -> Splits:
    """The splits of ``peptides-func`` or ``peptides-struct`` from the published files.

    Args:
        task: ``peptides-func`` or ``peptides-struct``.
        data: directory holding the CSV and split files (see :func:`find_peptide_files`);
            None searches ``$LPS_FAST_DATA``, ``<repository>/data`` and ``../shared/data``.
        cache_dir: cache of the parsed graphs (see :mod:`lps_fast.data`).
    """
    if task not in PEPTIDE_TASKS:
        raise ValueError(f"unknown peptides task {task!r}; choose one of {', '.join(PEPTIDE_TASKS)}")
    files = find_peptide_files(task, data)
    arrays = cached_arrays(f"{task}-graphs", PARSER_VERSION, {"csv": _file_digest(files["csv"])},
                           lambda: _parse(task, files["csv"]), cache_dir)
    count = len(arrays["num_nodes"])
    indices = read_split_file(files["split"], count)
    info = peptides_info(task, int(arrays["num_nodes"].max()))
    full = MoleculeDataset(arrays, info)
    return Splits(train=full.subset(indices["train"]), val=full.subset(indices["val"]),
                  test=full.subset(indices["test"]), info=info,
                  meta={"csv": str(files["csv"]), "split": str(files["split"]), "graphs": count})


def molecule_inputs(batch: DenseBatch) -> Dict[str, torch.Tensor]:
    """The ``Symmetrize`` inputs of a molecule batch: one-hot atom features ``(B, n, 174)`` and
    edges ``(B, n, n, 14)`` (the adjacency, then the one-hot bond features), zero on padding."""
    atoms, bonds = batch.node_features.long(), batch.edge_features.long()
    nodes = torch.cat([F.one_hot(atoms[..., column], size) for column, size in enumerate(ATOM_FEATURE_DIMS)], dim=-1)
    # bond indices are shifted by one: class 0 ("no bond") is dropped from each one-hot
    edges = [F.one_hot(bonds[..., column], size + 1)[..., 1:] for column, size in enumerate(BOND_FEATURE_DIMS)]
    edges = torch.cat([batch.adjacency[..., None].long()] + edges, dim=-1)
    return {"nodes": nodes.float() * batch.mask[..., None].float(), "edges": edges.float(), "mask": batch.mask}


__all__ = ["PEPTIDE_TASKS", "STRUCT_TARGETS", "PeptideFiles", "MoleculeDataset", "find_peptide_files",
           "read_split_file", "load_peptides", "peptides_info", "molecule_inputs"]
