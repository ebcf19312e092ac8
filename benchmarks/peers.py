"""The natural peers: each op written the way a user would write it by hand in PyTorch.

The reference path (``lps_fast.reference``) spells the ops out with dense permutation matrices,
a formulation chosen for clarity that nobody would use for speed. These functions are what a
user writes instead: advanced indexing for the gathers, ``index_add_`` for the scatter-means,
``einsum`` for the 3 x 3 frames, ``torch.linalg.qr`` for Gram-Schmidt and dual potentials for
Sinkhorn. With ``soft``, the forward value is the hard result and the gradient to ``soft`` is the
straight-through one, ``hard + (t - t.detach())`` with ``t`` the product of ``soft`` with the
detached data (the linear term of the dense formula, so the gradients equal the reference's).

The benchmark providers ``gather`` (eager) and ``gather+compile`` (``torch.compile`` of these,
``fullgraph=True``) run them; like every provider they pass the agreement gate against the
reference before they are timed. Each function has the signature of the public op.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

EPS = 1e-12
MASKED_EPS = 1e-6


def _batch_index(perm: torch.Tensor, extra_dims: int = 0) -> torch.Tensor:
    """``arange(B)`` shaped to broadcast against ``perm`` (plus ``extra_dims`` trailing dims)."""
    return torch.arange(perm.shape[0], device=perm.device).view(-1, *([1] * (perm.dim() - 1 + extra_dims)))


def _straight_through(hard: torch.Tensor, soft_term: Optional[torch.Tensor]) -> torch.Tensor:
    return hard if soft_term is None else hard + (soft_term - soft_term.detach())


def _scatter_mean_rows(y: torch.Tensor, index: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """``out[index[t]] += y[t] / k`` over the flattened leading dims: ``y (T, *F) -> (rows, *F)``."""
    out = y.new_zeros((rows, *y.shape[1:]))
    return out.index_add_(0, index, y) / k


def permute_nodes(x: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    hard = x[_batch_index(perm), perm]  # [B, k, n, *F]
    term = None if soft is None else torch.einsum("bjir,bi...->bjr...", soft, x.detach())
    return _straight_through(hard, term)


def permute_edges(e: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    b = _batch_index(perm, 1)
    hard = e[b, perm[:, :, :, None], perm[:, :, None, :]]  # [B, k, n, n, *F]
    if soft is None:
        return hard
    # d(H^T e H) = dH^T (e H) + (H^T e) dH, with e H and H^T e as gathers
    detached = e.detach()
    rows = detached[_batch_index(perm), perm]  # [b, j, r, u] = e[p(r), u]
    cols = detached.transpose(1, 2)[_batch_index(perm), perm].transpose(2, 3)  # [b, j, i, s] = e[i, p(s)]
    term = torch.einsum("bjir,bjis...->bjrs...", soft, cols) + torch.einsum("bjru...,bjus->bjrs...", rows, soft)
    return hard + (term - term.detach())


def _node_index(perm: torch.Tensor) -> torch.Tensor:
    """Flat row ``b * n + perm[b, j, r]`` of every (b, j, r)."""
    return (perm + _batch_index(perm) * perm.shape[-1]).reshape(-1)


def unpermute_mean(y: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    batch, k, n = perm.shape
    features = y.shape[3:]
    out = _scatter_mean_rows(y.reshape(batch * k * n, *features), _node_index(perm), batch * n, k)
    out = out.reshape(batch, n, *features)
    term = None if soft is None else torch.einsum("bjir,bjr...->bi...", soft, y.detach()) / k
    return _straight_through(out, term)


def unpermute_edges_mean(y: torch.Tensor, perm: torch.Tensor, soft: Optional[torch.Tensor] = None,
                         diagonal: bool = False) -> torch.Tensor:
    batch, k, n = perm.shape
    features = y.shape[4:]
    if diagonal:
        on_diagonal = torch.diagonal(y, dim1=2, dim2=3).movedim(-1, 2)  # [B, k, n, *F]
        out = _scatter_mean_rows(on_diagonal.reshape(batch * k * n, *features), _node_index(perm), batch * n, k)
        out = out.reshape(batch, n, *features)
    else:
        index = ((perm[:, :, :, None] + _batch_index(perm, 1) * n) * n + perm[:, :, None, :]).reshape(-1)
        out = _scatter_mean_rows(y.reshape(batch * k * n * n, *features), index, batch * n * n, k)
        out = out.reshape(batch, n, n, *features)
    if soft is None:
        return out
    # d(H y H^T) = dH (y H^T) + (H y) dH^T; y H^T and H y are gathers by the inverse permutation
    detached = y.detach()
    inverse = torch.argsort(perm, dim=-1)  # q: position of each node
    b = _batch_index(perm)
    by_rows = detached[b, torch.arange(k, device=y.device)[None, :, None], inverse]  # [b, j, i, s] = y[q(i), s]
    by_cols = detached.transpose(2, 3)[b, torch.arange(k, device=y.device)[None, :, None], inverse]
    by_cols = by_cols.transpose(2, 3)  # [b, j, r, u] = y[r, q(u)]
    if diagonal:
        term = (torch.einsum("bjir,bjri...->bi...", soft, by_cols)
                + torch.einsum("bjis...,bjis->bi...", by_rows, soft))
    else:
        term = (torch.einsum("bjir,bjru...->biu...", soft, by_cols)
                + torch.einsum("bjis...,bjus->biu...", by_rows, soft))
    return out + (term / k - (term / k).detach())


def frame_apply(x: torch.Tensor, R: torch.Tensor, perm: Optional[torch.Tensor] = None,
                center: Optional[torch.Tensor] = None, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    if center is not None:
        x = x - center[:, None]
    if perm is None:
        return torch.einsum("bjam,brac->bjrmc", R, x)
    gathered = permute_nodes(x, perm, soft)  # [B, k, n, 3, C]
    return torch.einsum("bjam,bjrac->bjrmc", R, gathered)


def frame_unapply_mean(y: torch.Tensor, R: torch.Tensor, perm: Optional[torch.Tensor] = None,
                       center: Optional[torch.Tensor] = None, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    rotated = torch.einsum("bjam,bjrmc->bjrac", R, y)
    out = rotated.mean(dim=1) if perm is None else unpermute_mean(rotated, perm, soft)
    return out if center is None else out + center[:, None]


def sinkhorn_sort(scores: torch.Tensor, tau: float, n_iter: int = 20,
                  mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft sort, then Sinkhorn on dual potentials ``f`` (rows) and ``g`` (columns): the matrix
    is only formed as ``L + f + g`` inside each logsumexp. Padded pairs get a large negative
    finite log value instead of -inf and padded potentials stay 0, so that no gradient meets
    inf - inf."""
    if mask is None:
        normalized = scores / scores.norm(dim=-1, keepdim=True).clamp_min(EPS)
        perm = torch.sort(normalized.detach(), dim=-1, descending=True, stable=True).indices
        pairs = rows = cols = None
    else:
        real = mask[:, None, :]
        normalized = scores.masked_fill(~real, 0.0)
        normalized = normalized / normalized.norm(dim=-1, keepdim=True).clamp_min(MASKED_EPS)
        keys = normalized.detach().masked_fill(~real, float("-inf"))
        perm = torch.sort(keys, dim=-1, descending=True, stable=True).indices
        real_nodes = real.expand(perm.shape)
        rows = real_nodes[..., :, None]  # real node i
        cols = torch.gather(real_nodes, -1, perm)[..., None, :]  # real position r
        pairs = rows & cols
    ordered = torch.gather(normalized, -1, perm)
    log_matrix = -(normalized[..., :, None] - ordered[..., None, :]).abs() / tau
    if pairs is not None:
        log_matrix = log_matrix.masked_fill(~pairs, -1e30)
    f = torch.zeros_like(log_matrix[..., :1])
    g = torch.zeros_like(log_matrix[..., :1, :])
    for _ in range(n_iter):
        f = -torch.logsumexp(log_matrix + g, dim=-1, keepdim=True)
        if rows is not None:
            f = f.masked_fill(~rows, 0.0)  # padded rows stay at -1e30 and never reach a real column
        g = -torch.logsumexp(log_matrix + f, dim=-2, keepdim=True)
        if cols is not None:
            g = g.masked_fill(~cols, 0.0)
    soft = (log_matrix + f + g).exp()
    if pairs is not None:
        soft = torch.where(pairs, soft, 0.0)
    return soft, perm


def permutation_entropy(soft: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row and column entropies with ``torch.special.entr``; padded entries are set to 1 before
    ``entr`` (whose gradient at 0 is infinite) and their terms dropped after."""
    clamped = soft.clamp_min(EPS)
    pairs = None
    if mask is not None:
        pairs = (mask[:, :, None] & mask[:, None, :])[:, None]
        clamped = torch.where(pairs, clamped, 0.0)

    def entropy(dim: int) -> torch.Tensor:
        total = clamped.sum(dim=dim, keepdim=True)
        p = clamped / (total if pairs is None else torch.where(total > 0, total, 1.0))
        if pairs is None:
            return torch.special.entr(p).sum(dim=dim)
        return torch.where(pairs, torch.special.entr(torch.where(pairs, p, 1.0)), 0.0).sum(dim=dim)

    per_node = (entropy(-2) + entropy(-1)).mean(dim=1)  # [B, n]
    if mask is None:
        return per_node.mean()
    n_real = mask.sum(dim=-1).clamp_min(1).to(soft.dtype)
    return (torch.where(mask, per_node, 0.0).sum(dim=-1) / n_real).mean()


def gram_schmidt(V: torch.Tensor, proper: bool = False) -> torch.Tensor:
    """QR with the signs fixed so that R has a positive diagonal: the Gram-Schmidt frame."""
    Q, R = torch.linalg.qr(V)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[..., None, :]
    if proper:
        det = torch.linalg.det(Q)[..., None, None]
        Q = torch.cat([Q[..., :1] * det, Q[..., 1:]], dim=-1)
    return Q


PEERS = {name: globals()[name] for name in (
    "permute_nodes", "permute_edges", "unpermute_mean", "unpermute_edges_mean", "frame_apply",
    "frame_unapply_mean", "sinkhorn_sort", "permutation_entropy", "gram_schmidt")}
