"""Multi-Similarity loss (Wang et al., CVPR 2019) with pair mining, fully vectorised.

Shapes
------
embeddings : (B, D) float, any scale (L2-normalised here)
labels     : (B,)   integer class ids
S          : (B, B) cosine similarities, S[i, j] = <x_i, x_j> / (|x_i| |x_j|)
masks      : (B, B) bool, row i = anchor i
returns    : ()     scalar loss

    L = 1/B sum_i [ 1/alpha log(1 + sum_{p in P_i} exp(-alpha (S_ip - lam)))
                  + 1/beta  log(1 + sum_{n in N_i} exp( beta (S_in - lam))) ]

P_i = same label, j != i; N_i = different label. Mining shrinks P_i / N_i
(selection is done on detached similarities; gradients flow only through the loss):

``none``
    all pairs.
``ms``
    the paper's pair mining, identical to pytorch-metric-learning's
    ``MultiSimilarityMiner(epsilon)`` (strict inequalities):
    keep n if S_in + eps > min_{p in P_i} S_ip, keep p if S_ip - eps < max_{n in N_i} S_in.
    An anchor without positives keeps no negatives and vice versa (min / max over an
    empty set are +inf / -inf).
``hard``
    batch-hard: per anchor the single hardest positive (argmin_p S_ip) and the single
    hardest negative (argmax_n S_in); as with ``ms`` only anchors having both positives
    and negatives contribute. Ties go to the lowest index.
``semihard`` (ours)
    a semi-hard band around the hardest positive s_i = min_p S_ip: keep n with
    s_i - eps < S_in < s_i + eps, i.e. the ``ms`` negatives capped from above.
    With beta = 50 the log-sum-exp is dominated by the very hardest negatives (in Cars196
    these can be near-identical sibling models or label noise); the cap is meant to damp
    them, early in training especially, while keeping negatives near the hardest positive.
    This is a design hypothesis, not a measured gain.
    If the anchor has ``ms`` negatives but all lie at or above the upper edge, the least
    similar of them (the one nearest the band) is kept, so strongly violated anchors keep a
    repulsive term. Positives follow the ``ms`` rule. ``epsilon`` is the band half-width:
    for epsilon > 2 the cap is void and ``semihard`` is exactly ``ms``.

Anchors without selected pairs contribute 0 and the mean is over all B anchors. A batch
without any positive pair therefore gives 0 under ``ms``, ``hard`` and ``semihard``; under
``none`` the negative term remains, as the formula (and pytorch-metric-learning) says.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MINING_CHOICES: tuple[str, ...] = ("none", "ms", "hard", "semihard")

_Masks = tuple[Tensor, Tensor]


def _pair_masks(labels: Tensor) -> _Masks:
    """(B, B) positive mask (same label, off-diagonal) and negative mask (other label)."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    pos = same & ~torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    return pos, ~same


def _hardest(sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """Per-anchor min positive and max negative similarity, +inf / -inf when absent."""
    min_pos = sim.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
    max_neg = sim.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
    return min_pos, max_neg


def _mine_none(sim: Tensor, pos: Tensor, neg: Tensor, eps: float) -> _Masks:
    return pos, neg


def _mine_ms(sim: Tensor, pos: Tensor, neg: Tensor, eps: float) -> _Masks:
    min_pos, max_neg = _hardest(sim, pos, neg)
    # Same expressions as PML (x + eps > t, x - eps < t) so float rounding agrees at edges.
    return pos & (sim - eps < max_neg), neg & (sim + eps > min_pos)


def _one_hot_rows(idx: Tensor, keep_row: Tensor, n: int) -> Tensor:
    return F.one_hot(idx, n).bool() & keep_row.unsqueeze(1)


def _mine_hard(sim: Tensor, pos: Tensor, neg: Tensor, eps: float) -> _Masks:
    n = sim.shape[1]
    # argmin/argmax return the first extremum, which gives the lowest-index tie rule.
    hard_p = sim.masked_fill(~pos, float("inf")).argmin(dim=1)
    hard_n = sim.masked_fill(~neg, float("-inf")).argmax(dim=1)
    # Like ms, an anchor needs both kinds of pair: the hardness of one is judged against
    # the other, and a lone term would just pull/push without a reference.
    valid = pos.any(dim=1) & neg.any(dim=1)
    return _one_hot_rows(hard_p, valid, n), _one_hot_rows(hard_n, valid, n)


def _mine_semihard(sim: Tensor, pos: Tensor, neg: Tensor, eps: float) -> _Masks:
    pos_keep, ms_neg = _mine_ms(sim, pos, neg, eps)
    min_pos, _ = _hardest(sim, pos, neg)
    band = ms_neg & (sim - eps < min_pos)
    # Fallback only where the band is empty although ms found negatives: all of them are
    # "too hard", so keep the gentlest one instead of silencing the anchor.
    fallback = ms_neg.any(dim=1) & ~band.any(dim=1)
    easiest_hard = sim.masked_fill(~ms_neg, float("inf")).argmin(dim=1)
    return pos_keep, band | _one_hot_rows(easiest_hard, fallback, sim.shape[1])


_MINERS: dict[str, Callable[[Tensor, Tensor, Tensor, float], _Masks]] = {
    "none": _mine_none,
    "ms": _mine_ms,
    "hard": _mine_hard,
    "semihard": _mine_semihard,
}
assert tuple(_MINERS) == MINING_CHOICES


def _log1p_sum_exp(x: Tensor, keep: Tensor) -> Tensor:
    """Row-wise log(1 + sum_{keep} exp(x)) as logsumexp([0, x...]), dropped entries at -inf.

    The explicit 0 term makes every row finite (empty rows give exactly 0) and logsumexp
    subtracts the row max, so neither value nor gradient overflows when beta * S is large.
    """
    x = x.masked_fill(~keep, float("-inf"))
    zero = x.new_zeros(x.shape[0], 1)
    return torch.logsumexp(torch.cat([zero, x], dim=1), dim=1)


def _validate(embeddings: Tensor, labels: Tensor, alpha: float, beta: float, mining: str) -> None:
    if mining not in _MINERS:
        raise ValueError(f"unknown mining {mining!r}; valid choices: {', '.join(MINING_CHOICES)}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (B, D), got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be (B,) with B = {embeddings.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    if embeddings.shape[0] == 0:
        raise ValueError("empty batch")
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"alpha and beta must be > 0, got alpha={alpha}, beta={beta}")


def multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    alpha: float = 2.0,
    beta: float = 50.0,
    lam: float = 0.5,
    mining: str = "ms",
    epsilon: float = 0.1,
) -> Tensor:
    """Scalar MS loss of a (B, D) batch with (B,) labels; see the module docstring."""
    _validate(embeddings, labels, alpha, beta, mining)
    # S in fp32 (or fp64) whatever the autocast: beta = 50 multiplies S, and bf16 rounds S
    # near 1 by up to 2^-9, which would shift the negative term's exponents by up to 0.1.
    with torch.autocast(embeddings.device.type, enabled=False):
        x = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), p=2, dim=1)
        sim = x @ x.T
    pos, neg = _pair_masks(labels)
    with torch.no_grad():
        pos_keep, neg_keep = _MINERS[mining](sim.detach(), pos, neg, epsilon)
    pos_term = _log1p_sum_exp(-alpha * (sim - lam), pos_keep) / alpha
    neg_term = _log1p_sum_exp(beta * (sim - lam), neg_keep) / beta
    return (pos_term + neg_term).mean()
