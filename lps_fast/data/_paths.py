"""Locating the provided data files, with errors that say where to get them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

DATA_ENV = "LPS_FAST_DATA"

SOURCES = {
    "exp.npz": (
        "EXP (Abboud et al., IJCAI 2021): 1,200 graphs from SAT formulas. The original graphs "
        "are published with https://github.com/ralphabb/GNN-RNI; this project reads them "
        "converted to exp.npz (format: lps_fast/data/exp.py or shared/data/README.md)."
    ),
    "graph8c.g6": (
        "GRAPH8c: all 11,117 connected graphs on 8 nodes, from Brendan McKay's collection "
        "https://users.cecs.anu.edu.au/~bdm/data/graphs.html (file graph8c.g6), or generated "
        "with nauty: `geng -c 8 > graph8c.g6`."
    ),
}


def candidate_directories() -> List[Path]:
    """Where data files are looked for when no path is given, in order: ``$LPS_FAST_DATA``,
    ``<repository>/data`` and ``<repository>/../shared/data`` (this project's shared folder)."""
    directories = []
    if os.environ.get(DATA_ENV):
        directories.append(Path(os.environ[DATA_ENV]).expanduser())
    repository = Path(__file__).resolve().parents[2]
    directories.append(repository / "data")
    directories.append(repository.parent / "shared" / "data")
    return directories


def find_data_file(filename: str, path: Union[str, os.PathLike, None] = None) -> Path:
    """Resolve a provided data file.

    Args:
        filename: the file's standard name (``exp.npz``, ``graph8c.g6``).
        path: the file itself, or a directory holding ``filename``; None searches
            :func:`candidate_directories`.

    Raises:
        FileNotFoundError: naming the places looked at and where to get the file.
    """
    if path is not None:
        path = Path(path).expanduser()
        candidates = [path / filename] if path.is_dir() else [path]
    else:
        candidates = [directory / filename for directory in candidate_directories()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(
        f"{filename} not found (looked at: {looked}). In this project it is in shared/data "
        f"next to the repository (pass --data /path/to/shared/data, or set ${DATA_ENV}). "
        f"Source: {SOURCES.get(filename, 'see shared/data/README.md')}"
    )
