"""The settings of one training run, and the parsing of budgets.

Every field left ``None`` takes the task recipe's default (:mod:`lps_fast.train.recipes`):
the paper's setup scaled to a CPU budget. :func:`resolve` fills them, and the resolved
config is what a checkpoint stores, so ``lps-fast eval`` rebuilds exactly the same model.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

DISTRIBUTIONS = ("learned", "uniform", "frame", "canonical", "none")
PRESETS = ("paper",)
DIST_NETWORKS = ("gin", "gin-bn", "vn", "vn-dgcnn")
NOISE_MODES = ("add", "concat")
SELECTIONS = ("metric", "loss")
BACKENDS = ("fast", "reference")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """One run. ``None`` means "the task's default" (see ``lps-fast train TASK --help``)."""

    task: str
    # "paper": the official settings of the paper's code (they fill the fields left None)
    preset: Optional[str] = None
    # symmetrization
    group: Optional[str] = None
    distribution: str = "learned"
    samples: Optional[int] = None
    eval_samples: Optional[int] = None
    test_samples: Optional[int] = None  # samples per input on the test split (default eval_samples)
    # backbone
    backbone: Optional[str] = None
    width: Optional[int] = None
    layers: Optional[int] = None
    hidden_sizes: Optional[str] = None  # MLP widths, e.g. "2048,4096,2048,10" (overrides width x layers)
    heads: Optional[int] = None
    patch_size: Optional[int] = None
    vit_model: Optional[str] = None
    vit_checkpoint: Optional[str] = None
    # ViT-PS (the vit-ps backbone): token grid, image padding, patch dropout
    vit_grid: Optional[int] = None
    pad_mode: Optional[str] = None
    centering: Optional[bool] = None
    patch_dropout: Optional[float] = None
    random_patch_dropout: Optional[bool] = None
    # learned distribution
    dist_network: Optional[str] = None
    noise: Optional[str] = None  # "add" (the paper) or "concat"
    knn: Optional[int] = None  # vn-dgcnn neighbours
    dist_dropout: Optional[float] = None  # vn-dgcnn vector dropout
    dist_width: Optional[int] = None
    dist_layers: Optional[int] = None
    tau: Optional[float] = None
    entropy_weight: Optional[float] = None
    noise_scale: Optional[float] = None
    # optimisation
    epochs: Optional[int] = None
    time_budget: Optional[float] = None  # seconds of training (validation included)
    max_batches: Optional[int] = None  # per training epoch
    batch_size: Optional[int] = None
    eval_batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    schedule: Optional[str] = None
    warmup: Optional[float] = None  # fraction of the run
    grad_clip: Optional[float] = None
    eval_every: int = 1
    test_trials: Optional[int] = None
    select: Optional[str] = None  # the best checkpoint by the validation "metric" or "loss"
    iso_seeds: Optional[int] = None  # isomorphism tasks: untrained models of seeds 0..N-1, pairs separated by any
    # data
    data: Optional[str] = None
    n_train: Optional[int] = None
    n_val: Optional[int] = None
    n_test: Optional[int] = None
    limit: Optional[int] = None  # first N graphs of every split
    fold: int = 0
    data_seed: int = 0
    # run
    seed: int = 0
    device: str = "auto"
    backend: str = "fast"
    threads: Optional[int] = None
    out: Optional[str] = None
    quiet: bool = False
    progress: Optional[bool] = None  # None: bars when stderr is a terminal

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys (from a newer version) are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)?\s*$", re.I)


def parse_duration(text: str) -> float:
    """A time budget in seconds from ``"90s"``, ``"5m"``, ``"1.5h"`` or a bare number of minutes."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 5m, 1.5h (a bare number means minutes)")
    value = float(match.group(1))
    unit = (match.group(2) or "m").lower()
    seconds = value * {"s": 1, "m": 60, "h": 3600}[unit[0]]
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["TrainConfig", "parse_duration", "format_duration", "DISTRIBUTIONS", "BACKENDS", "DEVICES", "SCHEDULES",
           "PRESETS", "DIST_NETWORKS", "NOISE_MODES", "SELECTIONS"]
