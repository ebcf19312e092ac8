"""Per-task recipes: the model, the inputs, the loss and the metrics of each of the paper's tasks.

==============  =========================  ==========================================  ====================
task            default model              objective                                   metric (paper)
==============  =========================  ==========================================  ====================
nbody           Sn x E3, transformer       MSE of the positions 1000 steps later       ``mse`` (0.00417)
exp-classify    Sn, MLP on the adjacency   cross-entropy, satisfiable or not           ``accuracy`` (100%)
exp-iso         Sn, MLP (untrained)        none: embeddings of 600 1-WL-hard pairs     ``pairs_separated``
graph8c         Sn, MLP (untrained)        none: embeddings of 11,117 graphs           ``pairs_not_separated``
pattern         Sn, ViT on the adjacency   class-weighted cross-entropy per node       ``weighted_accuracy``
csl             Sn, GIN with node ids      cross-entropy over 10 skip lengths          ``accuracy``
peptides-func   Sn, ViT-PS                 binary cross-entropy over 10 labels         ``average_precision`` (0.6575)
peptides-struct Sn, ViT-PS                 L1 over 11 standardised targets             ``mae`` (0.2559)
==============  =========================  ==========================================  ====================

Two sets of settings per task. The defaults follow the paper (Kim et al., NeurIPS 2023) with
sizes scaled to a CPU budget; ``preset="paper"`` (``--preset paper``) gives the settings of the
paper's own code instead (backbone sizes, distribution network, samples, schedule, epochs, test
protocol), for a GPU. Either way every field can still be overridden
(:class:`~lps_fast.train.config.TrainConfig`): explicit values win over the preset, the preset over
the defaults. Where the paper's n-body model is called "Sn x O3" it centers the positions first
and predicts a displacement added to the input positions after the average: here that is the
group ``SnxE3`` (O(3) about the centroid) with an :class:`lps_fast.InputResidual` of the positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import lps_fast
from lps_fast import backbones as backbone_lib
from lps_fast import distributions as distribution_lib
from lps_fast import groups as group_lib
from lps_fast.data import IGNORE_INDEX, DenseBatch, TaskInfo, load_task
from lps_fast.data.peptides import PEPTIDE_TASKS, molecule_inputs

from . import vit_ps
from .config import DIST_NETWORKS, DISTRIBUTIONS, NOISE_MODES, PRESETS, SCHEDULES, SELECTIONS, TrainConfig

PERMUTATION_GROUPS = ("Sn",)
PARTICLE_GROUPS = ("SnxE3", "SnxO3", "SnxSE3", "SnxSO3", "E3", "O3", "SE3", "SO3", "Sn")
GRAPH_BACKBONES = ("mlp", "gin-id", "gin", "transformer")
MOLECULE_BACKBONES = ("vit-ps", "gin-id", "gin", "transformer")  # no MLP on a flattened 444 x 444 x 14 input
ISOMORPHISM_THRESHOLD = 1e-3  # L1 distance above which two embeddings count as different
EMBEDDING_DIM = 10  # the paper's embedding width for the isomorphism tests


@dataclass(frozen=True)
class Recipe:
    """What a task trains and measures; ``defaults`` fill the ``None`` fields of a config."""

    name: str
    summary: str
    paper: str
    objective: str  # "mse", "cross_entropy", "weighted_cross_entropy", "multilabel_bce", "l1" or "none" (untrained)
    metric: str
    higher_is_better: bool
    groups: Tuple[str, ...]
    backbones: Tuple[str, ...]
    defaults: Dict[str, Any] = field(default_factory=dict)
    paper_settings: Dict[str, Any] = field(default_factory=dict)  # what --preset paper sets

    @property
    def trained(self) -> bool:
        return self.objective != "none"


_COMMON = dict(schedule="cosine", warmup=0.05, weight_decay=0.0, grad_clip=1.0, dist_width=64, dist_layers=3,
               entropy_weight=0.1, noise_scale=1.0, heads=4, patch_size=None, vit_model="vit_tiny_patch16_224",
               noise="add", knn=4, dist_dropout=0.08, test_trials=1, select="metric", iso_seeds=1)

# The settings of the paper's code (Kim et al., NeurIPS 2023), task by task.
_PAPER_NBODY = dict(group="SnxE3", backbone="pair-transformer", width=64, layers=8, heads=4, dist_network="vn-dgcnn",
                    dist_width=64, knn=4, dist_dropout=0.08, noise="add", noise_scale=1.0, tau=0.1,
                    entropy_weight=0.1, samples=20, eval_samples=20, test_samples=200, test_trials=5, batch_size=100,
                    lr=1e-3, weight_decay=1e-12, schedule="constant", warmup=0.0, grad_clip=0.0, epochs=10000,
                    n_train=3000, n_val=2000, n_test=2000, select="loss")
_PAPER_GRAPH_DISTRIBUTION = dict(dist_network="gin-bn", dist_width=64, dist_layers=3, noise="add", noise_scale=1.0,
                                 tau=0.01, entropy_weight=0.1, samples=10, eval_samples=10)
_PAPER_EXP_MLP = "2048,4096,2048,10"


def _peptides_recipe(name: str, what: str, figure: str, objective: str, metric: str, higher_is_better: bool,
                     **defaults) -> Recipe:
    """A LRGB peptides task; its CPU default: a small ViT-PS from scratch, one epoch over the
    first 1000 graphs of each split."""
    return Recipe(
        name=name,
        summary=f"{name.capitalize()} (LRGB): {what} of a peptide from its molecular graph (--data: the LRGB files; "
                "by default the first 1000 graphs of each split, --preset paper: all)",
        paper=f"pretrained ViT-B/16 with learned Sn symmetrization (ViT-PS), 1 sample in training: test {figure}",
        objective=objective, metric=metric, higher_is_better=higher_is_better,
        groups=PERMUTATION_GROUPS, backbones=MOLECULE_BACKBONES,
        defaults=dict(_COMMON, group="Sn", backbone="vit-ps", width=96, layers=4, heads=4, vit_grid=8, samples=1,
                      eval_samples=4, batch_size=8, lr=3e-4, weight_decay=0.1, epochs=1, limit=1000, centering=True,
                      patch_dropout=0.5, **defaults),
    )


RECIPES: Dict[str, Recipe] = {
    "nbody": Recipe(
        name="nbody",
        summary="charged 5-body system: positions and velocities -> positions 1000 steps later",
        paper="transformer with learned Sn x O3 symmetrization, 20 samples, 10,000 epochs: test MSE 0.00417 "
              "(canonicalization 0.00779)",
        objective="mse", metric="mse", higher_is_better=False,
        groups=PARTICLE_GROUPS, backbones=("transformer", "pair-transformer", "mlp"),
        defaults=dict(_COMMON, group="SnxE3", backbone="transformer", width=64, layers=4, samples=4, eval_samples=20,
                      dist_network="vn-dgcnn", schedule="constant", warmup=0.0, batch_size=100, lr=1e-3,
                      grad_clip=0.0, epochs=100, n_train=3000, n_val=1000, n_test=2000, select="loss"),
        paper_settings=_PAPER_NBODY,
    ),
    "exp-classify": Recipe(
        name="exp-classify",
        summary="EXP: is the SAT formula behind a graph satisfiable? (pairs of 1-WL-equivalent graphs)",
        paper="MLP with learned Sn symmetrization: 100% test accuracy (group averaging 50%)",
        objective="cross_entropy", metric="accuracy", higher_is_better=True,
        groups=PERMUTATION_GROUPS, backbones=GRAPH_BACKBONES,
        defaults=dict(_COMMON, group="Sn", backbone="mlp", width=512, layers=2, samples=10, eval_samples=10,
                      dist_network="gin-bn", schedule="constant", batch_size=100, lr=1e-3, epochs=100, warmup=0.1,
                      grad_clip=0.1, select="loss"),
        paper_settings=dict(_PAPER_GRAPH_DISTRIBUTION, backbone="mlp", hidden_sizes=_PAPER_EXP_MLP, batch_size=100,
                            lr=1e-3, weight_decay=0.0, schedule="constant", warmup=0.1, grad_clip=0.1, epochs=2000,
                            test_samples=10, select="loss"),
    ),
    "exp-iso": Recipe(
        name="exp-iso",
        summary="EXP-iso: does an untrained model tell apart each of 600 1-WL-equivalent pairs?",
        paper="untrained MLP with learned Sn symmetrization separates all 600 pairs (L1 > 1e-3)",
        objective="none", metric="pairs_separated", higher_is_better=True,
        groups=PERMUTATION_GROUPS, backbones=GRAPH_BACKBONES,
        defaults=dict(_COMMON, group="Sn", backbone="mlp", width=512, layers=2, samples=10, eval_samples=10,
                      dist_network="gin-bn", batch_size=100, lr=0.0, epochs=0),
        paper_settings=dict(_PAPER_GRAPH_DISTRIBUTION, backbone="mlp", hidden_sizes="2048,4096,2048", batch_size=100,
                            iso_seeds=100),
    ),
    "graph8c": Recipe(
        name="graph8c",
        summary="GRAPH8c: does an untrained model tell apart every pair of the 11,117 connected 8-node graphs?",
        paper="untrained MLP with learned Sn symmetrization: 0 pairs not separated",
        objective="none", metric="pairs_not_separated", higher_is_better=False,
        groups=PERMUTATION_GROUPS, backbones=GRAPH_BACKBONES,
        defaults=dict(_COMMON, group="Sn", backbone="mlp", width=128, layers=2, samples=10, eval_samples=10,
                      dist_network="gin-bn", batch_size=500, lr=0.0, epochs=0),
        paper_settings=dict(_PAPER_GRAPH_DISTRIBUTION, backbone="mlp", hidden_sizes="128,64", batch_size=500,
                            iso_seeds=100),
    ),
    "pattern": Recipe(
        name="pattern",
        summary="PATTERN: find the nodes of a planted 20-node pattern in SBM graphs (44-188 nodes)",
        paper="ViT-Base on the adjacency image with learned Sn symmetrization, 1 sample in training and 10 in "
              "evaluation; weighted node accuracy",
        objective="weighted_cross_entropy", metric="weighted_accuracy", higher_is_better=True,
        groups=PERMUTATION_GROUPS, backbones=GRAPH_BACKBONES + ("vit", "vit-ps"),
        defaults=dict(_COMMON, group="Sn", backbone="vit", width=96, layers=4, heads=4, samples=1,
                      eval_samples=4, batch_size=32, lr=3e-4, weight_decay=0.01, epochs=20, n_train=1000, n_val=200,
                      n_test=200),
    ),
    "csl": Recipe(
        name="csl",
        summary="CSL: classify 41-node circular skip-link graphs by skip length (10 classes, 4-regular)",
        paper="not in the paper; a standard test of expressive power beyond 1-WL",
        objective="cross_entropy", metric="accuracy", higher_is_better=True,
        groups=PERMUTATION_GROUPS, backbones=GRAPH_BACKBONES,
        defaults=dict(_COMMON, group="Sn", backbone="gin-id", width=64, layers=3, samples=4, eval_samples=16,
                      batch_size=30, lr=1e-3, epochs=100),
    ),
    # ViT-PS on molecular graphs (the paper's real-world tasks); --preset paper gives its setting
    "peptides-func": _peptides_recipe(
        "peptides-func", "10 binary functions", "AP 0.6575", "multilabel_bce", "average_precision", True,
        pad_mode="reflect", random_patch_dropout=False),
    "peptides-struct": _peptides_recipe(
        "peptides-struct", "11 3D-structure properties", "MAE 0.2559", "l1", "mae", False,
        pad_mode="circular", random_patch_dropout=True),
}

TASK_NAMES = tuple(RECIPES)


def get_recipe(task: str) -> Recipe:
    key = task.lower().replace("_", "-")
    if key not in RECIPES:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[key]


def parse_hidden_sizes(text: str) -> Tuple[int, ...]:
    """``"2048,4096,2048,10"`` -> ``(2048, 4096, 2048, 10)`` (positive widths)."""
    try:
        sizes = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated positive integers such as 2048,4096,2048, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"expected comma-separated positive integers such as 2048,4096,2048, got {text!r}")
    return sizes


def _canonical_group(name: str) -> str:
    """``'sn x o3'`` -> ``'SnxO3'`` (the spelling of the recipes' lists)."""
    group = group_lib.parse(name)
    return repr(group).replace(" ", "")


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill every ``None`` field from the task's recipe and check the combination.

    Raises:
        ValueError: with a message naming the option and its allowed values.
    """
    recipe = get_recipe(config.task)
    values = dataclasses.asdict(config)
    values["task"] = recipe.name
    if config.preset is not None and config.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {config.preset!r}")
    paper_settings = {}
    if config.preset == "paper":
        # The n-body, EXP and isomorphism presets live in the recipes, the ViT-PS ones beside ViT-PS.
        paper_settings = recipe.paper_settings or vit_ps.paper_preset(recipe.name)
    defaults = dict(recipe.defaults, **paper_settings)  # a preset's None also replaces a default
    for key, default in defaults.items():
        if key == "epochs" and values.get("time_budget") is not None:
            continue  # a time budget alone runs as many epochs as fit
        if values.get(key) is None:
            values[key] = default
    resolved = TrainConfig(**values)
    try:
        resolved.group = _canonical_group(resolved.group)
    except ValueError as error:
        raise ValueError(f"--group: {error}") from None
    if resolved.group not in recipe.groups:
        raise ValueError(f"--group {resolved.group} does not fit task {recipe.name}; choose from {', '.join(recipe.groups)}")
    if resolved.distribution not in DISTRIBUTIONS:
        raise ValueError(f"--distribution must be one of {', '.join(DISTRIBUTIONS)}, got {resolved.distribution!r}")
    if resolved.backbone not in recipe.backbones:
        raise ValueError(f"--backbone {resolved.backbone} does not fit task {recipe.name}; "
                         f"choose from {', '.join(recipe.backbones)}")
    if resolved.schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {resolved.schedule!r}")
    for key, allowed in (("dist_network", DIST_NETWORKS), ("noise", NOISE_MODES), ("select", SELECTIONS)):
        value = getattr(resolved, key)
        if value is not None and value not in allowed:
            raise ValueError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")
    if resolved.hidden_sizes is not None:
        try:
            sizes = parse_hidden_sizes(resolved.hidden_sizes)
        except ValueError as error:
            raise ValueError(f"--hidden-sizes: {error}") from None
        resolved.hidden_sizes = ",".join(str(size) for size in sizes)
    positive = ("samples", "eval_samples", "test_samples", "batch_size", "width", "layers", "heads", "dist_width",
                "dist_layers", "eval_every", "test_trials", "knn", "iso_seeds")
    for key in positive:
        value = getattr(resolved, key)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    for key in ("n_train", "n_val", "n_test", "limit", "max_batches", "eval_batch_size", "patch_size"):
        value = getattr(resolved, key)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    if resolved.epochs is not None and resolved.epochs < 0:
        raise ValueError(f"--epochs must be >= 0, got {resolved.epochs}")
    if resolved.lr < 0 or resolved.weight_decay < 0:
        raise ValueError("--lr and --weight-decay must be >= 0")
    if not 0 <= resolved.warmup < 1:
        raise ValueError(f"--warmup is a fraction of the run in [0, 1), got {resolved.warmup}")
    if resolved.backbone == "vit" and resolved.width % resolved.heads:
        raise ValueError(f"--width {resolved.width} must be a multiple of --heads {resolved.heads} for the ViT")
    if resolved.dist_dropout is not None and not 0 <= resolved.dist_dropout < 1:
        raise ValueError(f"--dist-dropout must be in [0, 1), got {resolved.dist_dropout}")
    if resolved.backbone in ("transformer", "pair-transformer") and resolved.width % resolved.heads:
        raise ValueError(f"--width {resolved.width} must be a multiple of --heads {resolved.heads}")
    if resolved.backbone == "vit-ps":
        if resolved.width % resolved.heads and not resolved.vit_checkpoint:
            raise ValueError(f"--width {resolved.width} must be a multiple of --heads {resolved.heads} for the ViT")
        if resolved.vit_grid is not None and resolved.vit_grid < 1:
            raise ValueError(f"--vit-grid must be >= 1, got {resolved.vit_grid}")
        if resolved.patch_dropout and recipe.objective == "weighted_cross_entropy":
            raise ValueError("--patch-dropout applies to graph-level tasks only (node outputs need every token)")
    return resolved


# ---------------------------------------------------------------------------------------------
# Data


def load_splits(config: TrainConfig):
    """The task's :class:`~lps_fast.data.Splits` for a resolved config (data errors propagate)."""
    kwargs: Dict[str, Any] = {}
    if config.task in ("exp-iso", "exp-classify", "graph8c") + tuple(PEPTIDE_TASKS):
        kwargs["data"] = config.data
    elif config.data is not None:
        raise ValueError(f"--data only applies to exp-iso, exp-classify, graph8c and the peptides tasks (task "
                         f"{config.task} is generated)")
    if config.task in ("nbody", "pattern"):
        kwargs.update(n_train=config.n_train, n_val=config.n_val, n_test=config.n_test, seed=config.data_seed)
    elif config.task == "csl":
        kwargs.update(fold=config.fold, seed=config.data_seed)
    return load_task(config.task, **kwargs)


@dataclass(frozen=True)
class InputDims:
    """Widths of the model inputs a task produces (see :func:`make_inputs`)."""

    node_dim: int
    edge_dim: int
    point_channels: int
    max_nodes: int


def input_dims(info: TaskInfo) -> InputDims:
    if info.name == "nbody":
        # charges; edges [q_i q_j, |x_i - x_j|^2]; points [position, velocity]
        return InputDims(node_dim=1, edge_dim=2, point_channels=info.point_channels or 2, max_nodes=info.max_nodes)
    node_dim = info.num_node_categories or info.node_feature_dim or 0
    return InputDims(node_dim=node_dim, edge_dim=1 + (info.edge_feature_dim or 0),
                     point_channels=info.point_channels or 0, max_nodes=info.max_nodes)


def make_inputs(batch: DenseBatch, info: TaskInfo) -> Dict[str, torch.Tensor]:
    """The :class:`lps_fast.Symmetrize` inputs dict of a batch (float32 features, bool mask)."""
    mask = batch.mask
    if info.name in PEPTIDE_TASKS:
        return molecule_inputs(batch)
    if info.name == "nbody":
        positions = batch.points[..., 0]  # [B, n, 3]
        squared_distance = (positions[:, :, None, :] - positions[:, None, :, :]).pow(2).sum(-1, keepdim=True)
        edges = torch.cat([batch.edge_features.float(), squared_distance], dim=-1)
        return {"nodes": batch.node_features.float(), "edges": edges, "points": batch.points.float(), "mask": mask}
    real = mask[..., None].float()
    if info.num_node_categories:
        nodes = F.one_hot(batch.node_features.long(), info.num_node_categories).float() * real
    else:
        nodes = batch.node_features.float().reshape(*mask.shape, -1)
    edges = batch.adjacency.float()[..., None]
    if batch.edge_features is not None:
        edges = torch.cat([edges, batch.edge_features.float().reshape(*edges.shape[:3], -1)], dim=-1)
    inputs = {"nodes": nodes, "edges": edges, "mask": mask}
    if batch.points is not None:
        inputs["points"] = batch.points.float()
    return inputs


# ---------------------------------------------------------------------------------------------
# Models


class TanhOutput(nn.Module):
    """``tanh`` of a backbone's output: the bounded embeddings of the paper's isomorphism tests."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, views: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tanh(self.backbone(views))


def _output_kind(recipe: Recipe, backbone: str) -> Tuple[str, str]:
    """``(kind the backbone emits, kind Symmetrize returns)``."""
    if recipe.objective == "mse":
        return "vector", "vector"  # a displacement; the input positions are added after the average
    if backbone == "vit-ps":
        return vit_ps.output_kind(recipe.objective)
    if recipe.objective == "weighted_cross_entropy":
        return ("edge", "diagonal") if backbone == "vit" else ("node", "node")
    return "invariant", "invariant"


def _out_dim(recipe: Recipe, info: TaskInfo) -> int:
    if recipe.objective == "mse":
        return 1
    if recipe.objective == "none":
        return EMBEDDING_DIM
    if recipe.objective == "l1":
        return vit_ps.target_width(recipe.name)
    return int(info.num_classes)


def build_backbone(config: TrainConfig, info: TaskInfo) -> nn.Module:
    recipe = get_recipe(config.task)
    dims = input_dims(info)
    emitted, _ = _output_kind(recipe, config.backbone)
    out_dim = _out_dim(recipe, info)
    sizes = dict(node_dim=dims.node_dim, edge_dim=dims.edge_dim)
    name = config.backbone
    if name == "mlp":
        activation = nn.Tanh if recipe.objective == "none" else nn.ReLU
        hidden = parse_hidden_sizes(config.hidden_sizes) if config.hidden_sizes else (config.width,) * config.layers
        backbone = backbone_lib.MLP(dims.max_nodes, point_channels=dims.point_channels, hidden=hidden,
                                    out_dim=out_dim, output=emitted, activation=activation, **sizes)
    elif name in ("gin", "gin-id"):
        backbone = backbone_lib.GINID(dims.max_nodes, point_channels=dims.point_channels, hidden=config.width,
                                      layers=config.layers, out_dim=out_dim, output=emitted,
                                      identifiers=name == "gin-id", **sizes)
    elif name == "transformer":
        backbone = backbone_lib.Transformer(dims.max_nodes, point_channels=dims.point_channels, d_model=config.width,
                                            heads=config.heads, layers=config.layers, out_dim=out_dim,
                                            output=emitted, **sizes)
    elif name == "pair-transformer":
        backbone = backbone_lib.PairTransformer(dims.max_nodes, point_channels=dims.point_channels, d_model=config.width,
                                                heads=config.heads, layers=config.layers, out_dim=out_dim,
                                                output=emitted, **sizes)
    elif name == "vit":
        timm_kwargs: Dict[str, Any] = {}
        if config.patch_size:
            timm_kwargs["patch_size"] = config.patch_size
        if not config.vit_checkpoint:  # a pretrained file fixes the architecture of vit_model
            timm_kwargs.update(depth=config.layers, embed_dim=config.width, num_heads=config.heads)
        backbone = backbone_lib.ViT(dims.max_nodes, out_dim=out_dim, output=emitted, model_name=config.vit_model,
                                    checkpoint=config.vit_checkpoint, **sizes, **timm_kwargs)
    elif name == "vit-ps":
        backbone = vit_ps.build_vit_ps(config, dims.node_dim, dims.edge_dim, dims.max_nodes, out_dim, emitted)
    else:  # resolve() rejects these first
        raise ValueError(f"unknown backbone {name!r}")
    if recipe.objective == "none":
        backbone = TanhOutput(backbone)
    return backbone


def build_distribution(config: TrainConfig, info: TaskInfo) -> Optional[distribution_lib.Distribution]:
    dims = input_dims(info)
    name = config.distribution
    if name == "none":
        return None
    if name in ("learned", "canonical"):
        rotations = group_lib.parse(config.group).rotation is not None
        network = config.dist_network
        if network is not None and (network in ("vn", "vn-dgcnn")) != rotations:
            network = None  # the default network of the group (e.g. an Sn run of the n-body task)
        kwargs = dict(node_dim=dims.node_dim, edge_dim=dims.edge_dim, point_channels=dims.point_channels,
                      hidden=config.dist_width, layers=config.dist_layers, network=network, tau=config.tau,
                      entropy_weight=config.entropy_weight, neighbours=config.knn, dropout=config.dist_dropout)
        if name == "learned":
            return distribution_lib.Learned(noise=config.noise, noise_scale=config.noise_scale, **kwargs)
        return distribution_lib.Canonical(**kwargs)
    return distribution_lib.create(name)


def make_optimizer(parameters, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """The optimizer of every training run: AdamW, with PyTorch's fused kernel where all
    parameters are real floating-point tensors on the CPU or a CUDA device. Same update as the
    per-parameter loop to rounding; the loop runs a Python iteration per tensor, 4 ms of the 60 ms
    n-body step (84 tensors, one CPU thread), the fused kernel 1 ms."""
    parameters = list(parameters)
    fused = bool(parameters) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


def build_model(config: TrainConfig, info: TaskInfo) -> lps_fast.Symmetrize:
    """The symmetrized model of a resolved config (parameters drawn from torch's global RNG)."""
    recipe = get_recipe(config.task)
    _, returned = _output_kind(recipe, config.backbone)
    residual = None
    if recipe.objective == "mse":
        # positions later = positions now + the symmetrized displacement (added after the average)
        residual = lps_fast.InputResidual("points", channels=(0,))
    return lps_fast.Symmetrize(
        build_backbone(config, info),
        config.group,
        build_distribution(config, info),
        n_samples=config.samples,
        eval_n_samples=config.eval_samples,
        output=returned,
        backend=config.backend,
        residual=residual,
    )


def prediction(output: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """The task's prediction from the symmetrized output (``(B, n, 3, 1)`` positions -> ``(B, n, 3)``)."""
    return output[..., 0] if recipe.objective == "mse" else output


# ---------------------------------------------------------------------------------------------
# Losses and metrics


def class_balanced_weights(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class weights ``(V - V_c) / V`` over the labelled nodes of a batch (Dwivedi et al.'s
    PATTERN loss): the rarer class weighs more, an absent class not at all."""
    labelled = target[target != IGNORE_INDEX]
    counts = torch.bincount(labelled, minlength=num_classes).to(torch.float32)
    total = counts.sum().clamp_min(1.0)
    return (total - counts) / total * (counts > 0)


def task_loss(recipe: Recipe, output: torch.Tensor, batch: DenseBatch, num_classes: Optional[int]) -> torch.Tensor:
    """The training objective (without the distribution's auxiliary losses)."""
    predicted = prediction(output, recipe)
    if recipe.objective == "mse":
        return F.mse_loss(predicted, batch.target.to(predicted.dtype))
    if recipe.objective == "cross_entropy":
        return F.cross_entropy(predicted, batch.target.long())
    if recipe.objective == "weighted_cross_entropy":
        target = batch.target.long()
        weights = class_balanced_weights(target, num_classes).to(predicted.device)
        return F.cross_entropy(predicted.reshape(-1, num_classes), target.reshape(-1), weight=weights,
                               ignore_index=IGNORE_INDEX)
    if recipe.objective == "multilabel_bce":
        return vit_ps.multilabel_bce(predicted, batch.target)
    if recipe.objective == "l1":
        return vit_ps.l1_loss(predicted, batch.target)
    raise ValueError(f"task {recipe.name} is not trained")


class Meter:
    """Sums over a pass through a split, kept in one float64 tensor so that processes can add
    them with a single ``all_reduce``; :meth:`result` turns them into the reported metrics."""

    def __init__(self, recipe: Recipe, num_classes: Optional[int]):
        self.recipe = recipe
        self.num_classes = num_classes or 0
        self.names: List[str] = ["loss_sum", "graphs"]
        if recipe.objective == "mse":
            self.names += ["squared_error", "elements"]
        elif recipe.objective == "cross_entropy":
            self.names += ["correct"]
        elif recipe.objective == "weighted_cross_entropy":
            self.names += [f"confusion_{t}_{p}" for t in range(self.num_classes) for p in range(self.num_classes)]
        elif recipe.objective == "l1":
            self.names += ["absolute_error", "elements"]
        # average precision: a logit histogram per label after the named sums (see vit_ps.logit_histogram)
        histogram = self.num_classes * 2 * vit_ps.AP_BINS if recipe.objective == "multilabel_bce" else 0
        self.sums = torch.zeros(len(self.names) + histogram, dtype=torch.float64)

    def reset(self) -> None:
        self.sums.zero_()

    @torch.no_grad()
    def update(self, output: torch.Tensor, batch: DenseBatch, loss: Optional[torch.Tensor]) -> None:
        predicted = prediction(output, self.recipe).detach()
        graphs = batch.batch_size
        values = {"loss_sum": float(loss) * graphs if loss is not None else 0.0, "graphs": graphs}
        if self.recipe.objective == "mse":
            values["squared_error"] = float((predicted.double() - batch.target.double().to(predicted.device)).pow(2).sum())
            values["elements"] = batch.target.numel()
        elif self.recipe.objective == "cross_entropy":
            values["correct"] = float((predicted.argmax(-1).cpu() == batch.target.cpu()).sum())
        elif self.recipe.objective == "weighted_cross_entropy":
            target = batch.target.cpu().reshape(-1)
            guess = predicted.argmax(-1).cpu().reshape(-1)
            labelled = target != IGNORE_INDEX
            counts = torch.bincount(target[labelled] * self.num_classes + guess[labelled],
                                    minlength=self.num_classes ** 2)
            for index, count in enumerate(counts.tolist()):
                values[f"confusion_{index // self.num_classes}_{index % self.num_classes}"] = count
        elif self.recipe.objective == "l1":
            values["absolute_error"] = float((predicted.double() - batch.target.double().to(predicted.device)).abs().sum())
            values["elements"] = batch.target.numel()
        elif self.recipe.objective == "multilabel_bce":
            self.sums[len(self.names):] += vit_ps.logit_histogram(predicted, batch.target).flatten()
        self.sums[:len(self.names)] += torch.tensor([values.get(name, 0.0) for name in self.names], dtype=torch.float64)

    def result(self) -> Dict[str, float]:
        sums = dict(zip(self.names, self.sums.tolist()))
        graphs = max(sums["graphs"], 1.0)
        out = {"loss": sums["loss_sum"] / graphs}
        if self.recipe.objective == "mse":
            out["mse"] = sums["squared_error"] / max(sums["elements"], 1.0)
        elif self.recipe.objective == "cross_entropy":
            out["accuracy"] = sums["correct"] / graphs
        elif self.recipe.objective == "weighted_cross_entropy":
            c = self.num_classes
            confusion = torch.tensor([sums[f"confusion_{t}_{p}"] for t in range(c) for p in range(c)]).reshape(c, c)
            per_class = confusion.sum(1)
            recall = confusion.diagonal() / per_class.clamp_min(1)
            # Dwivedi et al.: the mean over classes of each class's accuracy (absent classes count 0)
            out["weighted_accuracy"] = float(recall.sum() / c)
            out["accuracy"] = float(confusion.diagonal().sum() / per_class.sum().clamp_min(1))
        elif self.recipe.objective == "l1":
            out["mae"] = sums["absolute_error"] / max(sums["elements"], 1.0)
        elif self.recipe.objective == "multilabel_bce":
            out["average_precision"] = vit_ps.histogram_average_precision(self.sums[len(self.names):])
        out["graphs"] = sums["graphs"]
        return out


__all__ = ["Recipe", "RECIPES", "make_optimizer", "TASK_NAMES", "get_recipe", "resolve", "load_splits", "input_dims", "InputDims",
           "make_inputs", "build_backbone", "build_distribution", "build_model", "prediction", "task_loss", "Meter",
           "TanhOutput", "parse_hidden_sizes", "class_balanced_weights", "ISOMORPHISM_THRESHOLD", "EMBEDDING_DIM"]
