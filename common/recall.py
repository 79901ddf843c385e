"""Leave-one-out retrieval Recall@K by cosine similarity, computed in query chunks.

Shapes
------
embeddings : (N, D) float, any scale (L2-normalised here)
labels     : (N,)   integer class ids
per chunk  : (C, N - s) similarities of C queries (rows s..s+C-1) against samples s..N-1,
             C = chunk_size: the upper block triangle; the rest is its transpose
neighbours : (N, k) long gallery indices, self excluded, most similar first

Every sample is a query; its gallery is the N - 1 other samples. A query scores 1 at K
when one of its K nearest neighbours shares its label; R@K is the mean over queries
(the usual protocol of the metric-learning literature, e.g. Cars196 / CUB).

Ties (bitwise-equal similarities) are broken by the lower gallery index, both when
choosing which samples enter the top k and when ordering them, so the result does not
depend on topk's unspecified tie order. It can depend on ``chunk_size`` in the last bit:
a matrix product may round a dot product differently for another chunk shape, so
duplicated embeddings may tie in one chunking and not in another.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


KS = (1, 2, 4, 8)  # the K of the task's Recall@K


def _check_embeddings(embeddings: Tensor) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    # One inf or NaN row would be every query's nearest neighbour (sorting puts NaN first).
    bad = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{len(bad)} of {embeddings.shape[0]} embeddings hold inf or NaN, rows "
                         f"{bad[:10]}{' ...' if len(bad) > 10 else ''} (e.g. an fp16 overflow in the network)")


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 0 < k < n:
        # k <= N - 1 keeps self (set to -inf) out of every top k.
        raise ValueError(f"k must satisfy 0 < k < N = {n} (self is excluded), got {k}")


def _topk_lowest_index_ties(sim: Tensor, k: int) -> Tensor:
    """(C, k) indices of the k largest entries per row (k < row length); ties -> lower
    index; best first."""
    # One extra place reveals ties straddling the k-th place (where topk may have picked
    # any of the equal entries) far cheaper than counting over the whole row.
    vals, idx = sim.topk(k + 1, dim=1)
    kth = vals[:, k - 1 : k]
    ambiguous = vals[:, k] == vals[:, k - 1]
    idx = idx[:, :k]
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(1)
        s, t = sim[rows], kth[rows]
        above = s > t
        equal = s == t
        need = k - above.sum(dim=1, keepdim=True)
        take = above | (equal & (equal.cumsum(dim=1) <= need))
        # Exactly k per row; nonzero is row-major, so columns come out grouped by row.
        idx[rows] = take.nonzero()[:, 1].view(-1, k)
    # Canonical order: ascending index, then a stable sort by descending similarity.
    idx, _ = idx.sort(dim=1)
    order = sim.gather(1, idx).sort(dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


def _merge(best_vals: Tensor, best_idx: Tensor, vals: Tensor, idx: Tensor, k: int
           ) -> tuple[Tensor, Tensor]:
    """Keep the k best of two candidate lists per row: higher similarity, then lower index."""
    v, i = torch.cat([best_vals, vals], dim=1), torch.cat([best_idx, idx], dim=1)
    i, by_index = i.sort(dim=1)
    v = v.gather(1, by_index)
    order = v.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return v.gather(1, order), i.gather(1, order)


def _block_candidates(sim: Tensor, k: int, offset: int) -> tuple[Tensor, Tensor]:
    """(C, min(k, W)) best entries of each row of a C x W block, as (values, global indices)."""
    local = _topk_lowest_index_ties(sim, k) if k < sim.shape[1] else \
        torch.arange(sim.shape[1], device=sim.device).expand(sim.shape[0], -1)
    return sim.gather(1, local), local + offset


def nearest_neighbours(embeddings: Tensor, k: int, chunk_size: int = 1024) -> Tensor:
    """(N, k) indices of each sample's k most cosine-similar other samples, best first.

    The similarity matrix is symmetric, so only its upper block triangle is computed: the
    block of query chunk i against columns i.. serves chunk i's rows directly and, transposed,
    the rows of every later chunk (half the matrix products of the plain loop).
    """
    _check_embeddings(embeddings)
    n = embeddings.shape[0]
    _check_k(k, n)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    # In fp32 at least: an fp16 row norm above 65504 is inf and would zero the row.
    x = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), p=2, dim=1)
    found_vals = torch.full((n, k), float("-inf"), dtype=x.dtype, device=x.device)
    found_idx = torch.full((n, k), n, dtype=torch.long, device=x.device)  # n sorts after any real index
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sim = x[start:stop] @ x[start:].T  # C x (n - start)
        rows = torch.arange(stop - start, device=x.device)
        sim[rows, rows] = float("-inf")  # self
        v, i = _block_candidates(sim, k, start)
        found_vals[start:stop], found_idx[start:stop] = _merge(
            found_vals[start:stop], found_idx[start:stop], v, i, k)
        if stop < n:  # the same block, transposed, for the rows of later chunks
            v, i = _block_candidates(sim[:, stop - start:].T.contiguous(), k, start)
            found_vals[stop:], found_idx[stop:] = _merge(found_vals[stop:], found_idx[stop:], v, i, k)
    return found_idx


def recall_at_k(
    embeddings: Tensor,
    labels: Tensor,
    ks: Sequence[int] = KS,
    chunk_size: int = 1024,
) -> dict[int, float]:
    """{K: R@K} over all N leave-one-out queries, K in ``ks``."""
    _check_embeddings(embeddings)
    n = embeddings.shape[0]
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be (N,) with N = {n}, got shape {tuple(labels.shape)}")
    ks = list(ks)
    if not ks:
        raise ValueError("ks must not be empty")
    for k in ks:
        _check_k(k, n)

    nn = nearest_neighbours(embeddings, max(ks), chunk_size)
    labels = labels.to(embeddings.device)
    hits = labels[nn] == labels.unsqueeze(1)
    # hit_by[:, j] = a match among the first j + 1 neighbours.
    hit_by = hits.cumsum(dim=1) > 0
    # Integer count / N avoids float32 rounding in the reported figure.
    return {k: hit_by[:, k - 1].sum().item() / n for k in ks}


def chance_recall_at_1(labels: Tensor) -> float:
    """R@1 of a random ranking on (N,) ``labels``: the chance that a random other sample
    shares the query's class, averaged over queries, sum_c n_c (n_c - 1) / (N (N - 1))."""
    if labels.dim() != 1 or labels.shape[0] < 2:
        raise ValueError(f"labels must be (N,) with N >= 2, got shape {tuple(labels.shape)}")
    counts = torch.unique(labels, return_counts=True)[1].double()
    n = labels.shape[0]
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))
