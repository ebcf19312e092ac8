"""Datasets of the paper's tasks, as padded dense batches.

- Provided files: EXP (:func:`load_exp_iso`, :func:`load_exp_classify`) from ``exp.npz`` and
  GRAPH8c (:func:`load_graph8c`) from ``graph8c.g6`` or nauty's ``geng``.
- Generated, deterministic by seed and cached on disk: charged n-body (:func:`load_nbody`),
  PATTERN SBM graphs (:func:`load_pattern`) and CSL (:func:`load_csl`), each with a self-check
  (:func:`nbody_energy_drift`, :func:`sbm_statistics`).
- The LRGB peptide tasks from their published files (:func:`load_peptides`): molecular graphs
  from SMILES with OGB's atom and bond features (:func:`smiles_to_graph`, RDKit).
- :func:`load_task` loads any of them by name; every loader returns :class:`Splits` of datasets
  whose items are :class:`GraphSample` and whose batches (:func:`collate_dense`,
  ``dataset.loader(...)``) are :class:`DenseBatch`: ``node_features (B, n, *F)``,
  ``adjacency (B, n, n)``, ``mask (B, n)``, ``target``, and ``edge_features (B, n, n, *E)`` /
  ``points (B, n, 3, C)`` where the task has them.
- :mod:`lps_fast.data.pyg`: conversion to and from PyTorch Geometric (optional dependency).

Example::

    from lps_fast.data import load_task
    splits = load_task("nbody", n_train=500)
    for batch in splits.train.loader(batch_size=100, shuffle=True, seed=0):
        batch.points        # (100, 5, 3, 2): positions and velocities
        batch.target        # (100, 5, 3): positions 1000 steps later

Environment: ``LPS_FAST_DATA`` (directory of the provided files), ``LPS_FAST_CACHE`` (cache
directory of generated data, default ``~/.cache/lps_fast``).
"""

from ._cache import CACHE_ENV, default_cache_dir
from ._paths import DATA_ENV, find_data_file
from .batch import IGNORE_INDEX, DenseBatch, GraphSample, collate_dense
from .csl import CSL_SKIPS, circular_skip_link, load_csl
from .dataset import DenseDataset, GraphDataset, Splits, TaskInfo
from .exp import load_exp_classify, load_exp_iso, read_exp
from .graph6 import decode_graph6, encode_graph6, parse_graph6, read_graph6
from .graph8c import find_geng, generate_connected_graphs, load_graph8c
from .nbody import (
    EnergyDriftReport,
    NBodyConfig,
    NBodyDataset,
    charged_nbody_energy,
    load_nbody,
    nbody_energy_drift,
    simulate_charged_nbody,
)
from .pattern import PatternConfig, SBMStatistics, load_pattern, sbm_statistics
from .molecules import smiles_to_graph
from .peptides import MoleculeDataset, load_peptides, molecule_inputs
from .tasks import TASKS, load_task

__all__ = [
    "load_task",
    "TASKS",
    "Splits",
    "TaskInfo",
    "DenseDataset",
    "GraphDataset",
    "NBodyDataset",
    "GraphSample",
    "DenseBatch",
    "collate_dense",
    "IGNORE_INDEX",
    "load_exp_iso",
    "load_exp_classify",
    "read_exp",
    "load_graph8c",
    "find_geng",
    "generate_connected_graphs",
    "decode_graph6",
    "encode_graph6",
    "parse_graph6",
    "read_graph6",
    "load_nbody",
    "NBodyConfig",
    "simulate_charged_nbody",
    "charged_nbody_energy",
    "nbody_energy_drift",
    "EnergyDriftReport",
    "load_pattern",
    "PatternConfig",
    "sbm_statistics",
    "SBMStatistics",
    "load_csl",
    "circular_skip_link",
    "CSL_SKIPS",
    "load_peptides",
    "MoleculeDataset",
    "molecule_inputs",
    "smiles_to_graph",
    "find_data_file",
    "default_cache_dir",
    "DATA_ENV",
    "CACHE_ENV",
]
