"""Molecular graphs from SMILES (RDKit), with the atom and bond features of OGB's ``smiles2graph``.

Atoms are nodes with 9 categorical features and bonds are undirected edges with 3, each an
index into a fixed vocabulary whose last entry (where it has one) catches every value not
listed. The vocabularies (:data:`ATOM_FEATURES`, :data:`BOND_FEATURES`) follow the Open Graph
Benchmark's definitions, so the LRGB peptide data sets read here are encoded as the published
baselines encode them:

=====================  ============================================  =====
atom feature           values                                        size
=====================  ============================================  =====
atomic number          1 .. 118, other                               119
chirality tag          unspecified, CW, CCW, CHI_OTHER, other        5
total degree           0 .. 10, other                                12
formal charge          -5 .. 5, other                                12
total hydrogens        0 .. 8, other                                 10
radical electrons      0 .. 4, other                                 6
hybridization          SP, SP2, SP3, SP3D, SP3D2, other              6
aromatic               no, yes                                       2
in a ring              no, yes                                       2
bond type              single, double, triple, aromatic, other       5
bond stereo            none, Z, E, cis, trans, any                   6
conjugated             no, yes                                       2
=====================  ============================================  =====

RDKit is an optional dependency (``pip install rdkit``), imported when a SMILES is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import numpy as np

OTHER = "other"


@dataclass(frozen=True)
class Feature:
    """One categorical feature: its name, its vocabulary and how to read it from RDKit."""

    name: str
    values: Tuple[object, ...]
    read: Callable[[object], object]

    @property
    def size(self) -> int:
        return len(self.values)

    def index(self, item) -> int:
        """Position of the item's value; unlisted values go to the ``other`` entry (the last)."""
        value = self.read(item)
        try:
            return self.values.index(value)
        except ValueError:
            return self.size - 1


ATOM_FEATURES: Tuple[Feature, ...] = (
    Feature("atomic_num", tuple(range(1, 119)) + (OTHER,), lambda atom: atom.GetAtomicNum()),
    Feature("chirality", ("CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW", "CHI_OTHER", OTHER),
            lambda atom: str(atom.GetChiralTag())),
    Feature("degree", tuple(range(11)) + (OTHER,), lambda atom: atom.GetTotalDegree()),
    Feature("formal_charge", tuple(range(-5, 6)) + (OTHER,), lambda atom: atom.GetFormalCharge()),
    Feature("num_hs", tuple(range(9)) + (OTHER,), lambda atom: atom.GetTotalNumHs()),
    Feature("num_radical_electrons", tuple(range(5)) + (OTHER,), lambda atom: atom.GetNumRadicalElectrons()),
    Feature("hybridization", ("SP", "SP2", "SP3", "SP3D", "SP3D2", OTHER), lambda atom: str(atom.GetHybridization())),
    Feature("is_aromatic", (False, True), lambda atom: bool(atom.GetIsAromatic())),
    Feature("is_in_ring", (False, True), lambda atom: bool(atom.IsInRing())),
)

BOND_FEATURES: Tuple[Feature, ...] = (
    Feature("bond_type", ("SINGLE", "DOUBLE", "TRIPLE", "AROMATIC", OTHER), lambda bond: str(bond.GetBondType())),
    Feature("bond_stereo", ("STEREONONE", "STEREOZ", "STEREOE", "STEREOCIS", "STEREOTRANS", "STEREOANY"),
            lambda bond: str(bond.GetStereo())),
    Feature("is_conjugated", (False, True), lambda bond: bool(bond.GetIsConjugated())),
)

ATOM_FEATURE_DIMS: Tuple[int, ...] = tuple(feature.size for feature in ATOM_FEATURES)  # 119, 5, 12, 12, 10, 6, 6, 2, 2
BOND_FEATURE_DIMS: Tuple[int, ...] = tuple(feature.size for feature in BOND_FEATURES)  # 5, 6, 2


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
    except ImportError as exc:
        raise ImportError("reading SMILES needs RDKit: pip install rdkit (see requirements.txt for the pin)") from exc
    RDLogger.DisableLog("rdApp.*")
    return Chem


@dataclass
class MoleculeGraph:
    """A molecule as arrays: ``node_features (n, 9)`` and ``edge_features (E, 3)`` int64
    vocabulary indices, ``edge_index (2, E)`` int64 holding both directions of every bond."""

    node_features: np.ndarray
    edge_index: np.ndarray
    edge_features: np.ndarray

    @property
    def num_nodes(self) -> int:
        return int(self.node_features.shape[0])


def smiles_to_graph(smiles: str) -> MoleculeGraph:
    """The graph of a SMILES string (hydrogens implicit, as RDKit parses it).

    Raises:
        ValueError: RDKit cannot parse ``smiles``.
    """
    chem = _rdkit()
    molecule = chem.MolFromSmiles(smiles)
    if molecule is None:
        raise ValueError(f"RDKit cannot parse the SMILES {smiles!r}")
    nodes = np.array([[feature.index(atom) for feature in ATOM_FEATURES] for atom in molecule.GetAtoms()],
                     dtype=np.int64).reshape(-1, len(ATOM_FEATURES))
    pairs: List[Tuple[int, int]] = []
    features: List[List[int]] = []
    for bond in molecule.GetBonds():
        begin, end = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        values = [feature.index(bond) for feature in BOND_FEATURES]
        pairs += [(begin, end), (end, begin)]
        features += [values, values]
    edge_index = np.array(pairs, dtype=np.int64).reshape(-1, 2).T.copy()
    edge_features = np.array(features, dtype=np.int64).reshape(-1, len(BOND_FEATURES))
    return MoleculeGraph(nodes, edge_index, edge_features)


def smiles_to_graphs(smiles: Sequence[str]) -> List[MoleculeGraph]:
    """:func:`smiles_to_graph` of each string (the error names the failing row)."""
    graphs = []
    for row, text in enumerate(smiles):
        try:
            graphs.append(smiles_to_graph(text))
        except ValueError as error:
            raise ValueError(f"row {row}: {error}") from None
    return graphs


__all__ = ["ATOM_FEATURES", "BOND_FEATURES", "ATOM_FEATURE_DIMS", "BOND_FEATURE_DIMS", "Feature", "MoleculeGraph",
           "smiles_to_graph", "smiles_to_graphs"]
