"""On-disk cache for generated datasets.

A cache entry is one ``.npz`` file whose name is derived from the generator's name, its code
version and every parameter, so changing any of them misses the cache instead of returning stale
data. Files are written to a temporary name in the same directory and moved into place with
``os.replace``, which is atomic: processes that race on the same entry each generate the same
(deterministic) arrays and the last rename wins, and no reader ever sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np

CacheDir = Union[str, os.PathLike, None, bool]
"""A cache location: a directory, ``None`` for the default, or ``False`` to disable caching."""

CACHE_ENV = "LPS_FAST_CACHE"


def default_cache_dir() -> Path:
    """``$LPS_FAST_CACHE`` when set, else ``$XDG_CACHE_HOME/lps_fast`` (``~/.cache/lps_fast``)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lps_fast"


def resolve_cache_dir(cache_dir: CacheDir) -> Optional[Path]:
    """The directory to cache in, or None when caching is disabled (``cache_dir=False``)."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    return Path(cache_dir).expanduser()


def cache_key(name: str, version: int, params: Dict[str, object]) -> str:
    """File name for a generator's output: readable prefix plus a hash of every parameter."""
    canonical = json.dumps(
        {"name": name, "version": version, "params": params}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:20]
    return f"{name}-v{version}-{digest}.npz"


def cached_arrays(
    name: str,
    version: int,
    params: Dict[str, object],
    generate: Callable[[], Dict[str, np.ndarray]],
    cache_dir: CacheDir = None,
) -> Dict[str, np.ndarray]:
    """Load ``generate()``'s arrays from the cache, or generate and store them.

    Args:
        name: generator name (file prefix).
        version: bump when the generator's output changes for the same parameters.
        params: every parameter the output depends on (JSON-serialisable).
        generate: builds the arrays; must be deterministic in ``params``.
        cache_dir: see :data:`CacheDir`.
    """
    directory = resolve_cache_dir(cache_dir)
    if directory is None:
        return generate()
    path = directory / cache_key(name, version, params)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {key: stored[key] for key in stored.files}
        except Exception as error:  # a truncated or foreign file: regenerate over it
            warnings.warn(f"lps_fast.data: ignoring unreadable cache file {path} ({error})")
    arrays = generate()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
    except OSError as error:
        warnings.warn(f"lps_fast.data: could not write cache file {path} ({error}); not caching")
    return arrays
