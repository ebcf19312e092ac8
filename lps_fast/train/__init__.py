"""Training and evaluation of symmetrized models on the paper's tasks (``lps-fast train``).

Example::

    from lps_fast.train import TrainConfig, train

    result = train(TrainConfig(task="nbody", distribution="learned", epochs=5, out="runs/nbody"))
    result.metrics["test"]["mse"]

See :mod:`lps_fast.train.recipes` for the tasks and their defaults, :mod:`~.trainer` for the
engine (logs, checkpoints, multi-process training) and :mod:`~.compare` for the README's main job.
"""

from .config import TrainConfig, format_duration, parse_duration
from .recipes import RECIPES, TASK_NAMES, get_recipe, resolve
from .trainer import RunResult, evaluate_checkpoint, load_checkpoint, train

__all__ = ["TrainConfig", "train", "evaluate_checkpoint", "load_checkpoint", "RunResult", "RECIPES", "TASK_NAMES",
           "get_recipe", "resolve", "parse_duration", "format_duration"]
