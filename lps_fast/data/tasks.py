"""One entry point for every task, by name (what a command line needs)."""

from __future__ import annotations

import os
from typing import Optional, Union

from ._cache import CacheDir
from .csl import load_csl
from .dataset import Splits
from .exp import load_exp_classify, load_exp_iso
from .graph8c import load_graph8c
from .nbody import load_nbody
from .pattern import load_pattern
from .peptides import PEPTIDE_TASKS, load_peptides

TASKS = ("exp-iso", "exp-classify", "graph8c", "nbody", "pattern", "csl") + tuple(PEPTIDE_TASKS)
"""Task names accepted by :func:`load_task`."""

_FILE_TASKS = {"exp-iso", "exp-classify", "graph8c"} | set(PEPTIDE_TASKS)
_SIZED_TASKS = {"nbody", "pattern"}


def load_task(
    name: str,
    data: Union[str, os.PathLike, None] = None,
    cache_dir: CacheDir = None,
    seed: int = 0,
    n_train: Optional[int] = None,
    n_val: Optional[int] = None,
    n_test: Optional[int] = None,
    fold: int = 0,
) -> Splits:
    """Load a task's splits by name.

    Args:
        name: one of :data:`TASKS`.
        data: data file or directory for the file-based tasks (EXP, GRAPH8c; for the peptides
            tasks the directory of the LRGB files, see :func:`~lps_fast.data.peptides.load_peptides`); None searches
            ``$LPS_FAST_DATA``, ``<repository>/data`` and ``<repository>/../shared/data``.
        cache_dir: cache of the generated tasks; None = ``$LPS_FAST_CACHE`` or
            ``~/.cache/lps_fast``; False disables caching.
        seed: seed of the generated tasks.
        n_train, n_val, n_test: split sizes of the generated n-body and PATTERN tasks (None =
            the paper's sizes).
        fold: CSL cross-validation fold.

    Raises:
        ValueError: an unknown task, or an option that does not apply to it.
        FileNotFoundError: a data file is missing (the message says where to get it).
    """
    key = name.lower().replace("_", "-")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    given = {size: value for size, value in sizes.items() if value is not None}
    if given and key not in _SIZED_TASKS:
        raise ValueError(f"task {key!r} has fixed splits; {', '.join(given)} only apply to nbody and pattern")
    if data is not None and key not in _FILE_TASKS:
        raise ValueError(f"task {key!r} is generated; a data path only applies to {sorted(_FILE_TASKS)}")
    if key == "exp-iso":
        return load_exp_iso(data)
    if key == "exp-classify":
        return load_exp_classify(data)
    if key == "graph8c":
        return load_graph8c(data)
    if key in PEPTIDE_TASKS:
        return load_peptides(key, data, cache_dir=cache_dir)
    if key == "nbody":
        return load_nbody(seed=seed, cache_dir=cache_dir, **given)
    if key == "pattern":
        return load_pattern(seed=seed, cache_dir=cache_dir, **given)
    return load_csl(fold=fold, seed=seed, cache_dir=cache_dir)
