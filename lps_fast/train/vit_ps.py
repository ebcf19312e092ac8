"""Training support for the paper's ViT-PS tasks: Peptides-func, Peptides-struct and PATTERN.

* Objectives and metrics of the peptide tasks: multi-label binary cross-entropy with logits
  and average precision (``peptides-func``), L1 loss and mean absolute error
  (``peptides-struct``). Average precision needs every score, not a running sum, so
  :class:`~lps_fast.train.recipes.Meter` keeps a histogram of the logits per label
  (:func:`logit_histogram`), which processes add with one ``all_reduce``; the metric is then
  the exact average precision of the logits rounded to :data:`AP_BINS` bins over
  ``[-AP_LOGIT_RANGE, AP_LOGIT_RANGE]`` (a bin is 1/64 of a logit wide).
* :data:`PAPER_PRESETS`: the settings of the paper's ViT-PS runs, read from its configs, as
  ``--preset paper``; they replace the recipe's CPU-sized defaults (a ``None`` here clears
  one, e.g. the peptides' default ``limit`` of 1000 graphs per split). The paper counts
  optimizer steps; here they are epochs of the training split at the paper's batch size
  (50,000 steps of 128 graphs over the 10,873 training peptides are 589 epochs; 25,000 steps
  over 10,000 PATTERN graphs are 320), warmup as the same fraction.
* :func:`build_vit_ps`: the ``vit-ps`` backbone of a config.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from lps_fast.data.peptides import PEPTIDE_TASKS

AP_BINS = 2048
AP_LOGIT_RANGE = 16.0

# the paper's learned distribution for graphs: 3 batch-norm GIN layers of width 64, Sinkhorn temperature
# 0.01, entropy weight 0.1, unit noise (its interface settings in every ViT-PS config)
_PAPER_DISTRIBUTION = dict(dist_network="gin-bn", dist_width=64, dist_layers=3, tau=0.01, entropy_weight=0.1,
                           noise="add", noise_scale=1.0)
# ViT-B/16 (width 768, 12 blocks, 12 heads): from scratch unless --vit-checkpoint gives its weights
_PAPER_VIT = dict(backbone="vit-ps", vit_model="vit_base_patch16_224", width=768, layers=12, heads=12, vit_grid=14,
                  samples=1, eval_samples=10, batch_size=128, limit=None,
                  lr=1e-5, schedule="linear", grad_clip=0.0, **_PAPER_DISTRIBUTION)

PAPER_PRESETS: Dict[str, Dict[str, Any]] = {
    "peptides-func": dict(_PAPER_VIT, epochs=589, warmup=0.1, weight_decay=0.1, pad_mode="reflect", centering=True,
                          patch_dropout=0.5, random_patch_dropout=False),
    "peptides-struct": dict(_PAPER_VIT, epochs=589, warmup=0.1, weight_decay=0.1, pad_mode="circular",
                            centering=True, patch_dropout=0.5, random_patch_dropout=True),
    "pattern": dict(_PAPER_VIT, epochs=320, warmup=0.2, weight_decay=0.01, pad_mode="zero", centering=False,
                    patch_dropout=0.0, n_train=10000, n_val=2000, n_test=2000),
}


def paper_preset(task: str) -> Dict[str, Any]:
    """The paper's settings for ``task`` (raises ``ValueError`` where there are none here)."""
    if task not in PAPER_PRESETS:
        raise ValueError(f"--preset paper: no paper setting for task {task}; it exists for nbody, exp-classify, "
                         f"exp-iso, graph8c, {', '.join(PAPER_PRESETS)}")
    return dict(PAPER_PRESETS[task])


def target_width(task: str) -> int:
    """Labels (peptides-func) or regression targets (peptides-struct) per graph."""
    return PEPTIDE_TASKS[task].targets


# ---------------------------------------------------------------------------------------------
# Objectives


def multilabel_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits over the labelled entries (NaN targets are unlabelled)."""
    target = target.to(logits.dtype)
    labelled = ~torch.isnan(target)
    return F.binary_cross_entropy_with_logits(logits[labelled], target[labelled])


def l1_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(predicted, target.to(predicted.dtype))


# ---------------------------------------------------------------------------------------------
# Average precision


def average_precision_from_counts(positives: torch.Tensor, negatives: torch.Tensor) -> Tuple[float, int]:
    """Mean average precision over labels from counts per score level.

    Args:
        positives, negatives: ``(L, K)`` counts of positive and negative examples per label and
            score level, levels ordered from the highest score to the lowest; examples at one
            level are tied.

    Returns:
        ``(mean AP over the labels with both classes present, how many such labels)``; AP is
        ``sum_k (R_k - R_{k-1}) P_k`` over the levels (scikit-learn's definition, ties counted
        at once). ``(nan, 0)`` when no label has both classes.
    """
    positives, negatives = positives.double(), negatives.double()
    true_positives = positives.cumsum(dim=1)
    predicted = true_positives + negatives.cumsum(dim=1)
    precision = true_positives / predicted.clamp_min(1.0)
    total = positives.sum(dim=1)
    scored = (total > 0) & (negatives.sum(dim=1) > 0)
    if not bool(scored.any()):
        return float("nan"), 0
    per_label = (positives * precision).sum(dim=1) / total.clamp_min(1.0)
    return float(per_label[scored].mean()), int(scored.sum())


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact mean average precision of ``(G, L)`` scores against ``(G, L)`` 0/1 labels.

    Per label, over the graphs whose label is not NaN; averaged over the labels that have both
    a positive and a negative example (as OGB's and LRGB's evaluators do). Tied scores count
    at once. ``nan`` when no label qualifies.
    """
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(f"average_precision: scores and labels must both be (G, L), got {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    values = []
    for column in range(scores.shape[1]):
        label = labels[:, column].double()
        keep = ~torch.isnan(label)
        score, label = scores[keep, column].double(), label[keep]
        levels, inverse = torch.unique(score, return_inverse=True)  # ascending
        positives = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, inverse, label)
        negatives = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, inverse, 1.0 - label)
        value, count = average_precision_from_counts(positives.flip(0)[None], negatives.flip(0)[None])
        if count:
            values.append(value)
    return sum(values) / len(values) if values else float("nan")


def logit_histogram(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(L, 2, AP_BINS)`` float64 counts of positives (row 0) and negatives (row 1) per label,
    by logit bin from the highest logits to the lowest; NaN labels are left out."""
    logits, labels = logits.detach().double().cpu(), labels.detach().double().cpu()
    width = 2 * AP_LOGIT_RANGE / AP_BINS
    bins = ((AP_LOGIT_RANGE - logits.clamp(-AP_LOGIT_RANGE, AP_LOGIT_RANGE)) / width).long().clamp_(0, AP_BINS - 1)
    counts = torch.zeros(labels.shape[1], 2, AP_BINS, dtype=torch.float64)
    labelled = ~torch.isnan(labels)
    for column in range(labels.shape[1]):
        keep = labelled[:, column]
        label = labels[keep, column]
        counts[column, 0].index_add_(0, bins[keep, column], label)
        counts[column, 1].index_add_(0, bins[keep, column], 1.0 - label)
    return counts


def histogram_average_precision(counts: torch.Tensor) -> float:
    """Mean AP of a (summed) :func:`logit_histogram`."""
    counts = counts.reshape(-1, 2, AP_BINS)
    return average_precision_from_counts(counts[:, 0], counts[:, 1])[0]


# ---------------------------------------------------------------------------------------------
# The backbone


def build_vit_ps(config, node_dim: int, edge_dim: int, max_nodes: int, out_dim: int, output: str):
    """The ``vit-ps`` backbone of a resolved config (:class:`lps_fast.backbones.ViTPS`)."""
    from lps_fast.vit_ps import ViTPS

    timm_kwargs: Dict[str, Any] = {}
    if not config.vit_checkpoint:  # a pretrained file fixes the architecture of vit_model
        timm_kwargs.update(depth=config.layers, embed_dim=config.width, num_heads=config.heads)
    return ViTPS(max_nodes, node_dim=node_dim, edge_dim=edge_dim, out_dim=out_dim, output=output,
                 model_name=config.vit_model or "vit_base_patch16_224", checkpoint=config.vit_checkpoint,
                 grid_size=config.vit_grid, patch_size=config.patch_size, pad_mode=config.pad_mode or "zero",
                 centering=bool(config.centering), patch_dropout=config.patch_dropout or 0.0,
                 random_patch_dropout=bool(config.random_patch_dropout), **timm_kwargs)


def output_kind(objective: str) -> Tuple[str, str]:
    """``(kind ViT-PS emits, kind Symmetrize returns)``: node predictions come from the
    diagonal inside the backbone, graph-level ones from its pooled token."""
    if objective == "weighted_cross_entropy":
        return "node", "node"
    return "invariant", "invariant"


__all__ = ["PAPER_PRESETS", "paper_preset", "target_width", "multilabel_bce", "l1_loss", "average_precision",
           "average_precision_from_counts", "logit_histogram", "histogram_average_precision", "AP_BINS",
           "AP_LOGIT_RANGE", "build_vit_ps", "output_kind"]
