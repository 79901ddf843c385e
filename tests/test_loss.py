"""Tests of common.loss.multi_similarity_loss.

`none` and `ms` are checked against pytorch-metric-learning (PML, test-only reference);
`hard` and `semihard` against a plain per-anchor Python loop written from the docstring.

Reduction: PML's MultiSimilarityLoss returns one loss per anchor ("element" reduction, all
B rows, rows without pairs being exactly 0 through its masked logsumexp) and its default
MeanReducer takes torch.mean over those B rows, so PML also divides by B, not by the number
of anchors having pairs: the two values are directly comparable. The one difference is a
PML shortcut: when every index tensor of the pair tuple has <= 1 element it returns 0
outright; the batches below always have many pairs, so it never triggers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import MultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from common.loss import MINING_CHOICES, multi_similarity_loss

TOL = 1e-5


def make_batch(seed: int, p: int, k: int, singletons: int = 0, dim: int = 8,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """P classes x K samples plus `singletons` samples of unique classes (no positives)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(p).repeat_interleave(k), torch.arange(p, p + singletons)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    # Class centres plus noise give a spread of similarities, so mining really selects.
    centres = torch.randn(p + singletons, dim, generator=g, dtype=dtype)
    emb = centres[labels] + 0.8 * torch.randn(labels.numel(), dim, generator=g, dtype=dtype)
    return emb, labels


BATCHES = [
    (0, 4, 4, 0),
    (1, 8, 4, 3),
    (2, 3, 6, 5),
    (3, 16, 2, 1),
    (4, 5, 3, 0),
]
PARAMS = [(2.0, 50.0, 0.5), (1.0, 10.0, 0.3), (3.0, 40.0, 0.7)]


def loss_and_grad(fn, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    emb = emb.clone().requires_grad_(True)
    loss = fn(emb)
    loss.backward()
    return loss.detach(), emb.grad


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("params", PARAMS)
def test_no_mining_matches_pml(batch, params):
    emb, labels = make_batch(*batch)
    alpha, beta, lam = params
    ref = MultiSimilarityLoss(alpha=alpha, beta=beta, base=lam)
    ours_l, ours_g = loss_and_grad(
        lambda e: multi_similarity_loss(e, labels, alpha, beta, lam, mining="none"), emb)
    ref_l, ref_g = loss_and_grad(lambda e: ref(e, labels), emb)
    assert ours_l.item() == pytest.approx(ref_l.item(), abs=TOL, rel=TOL)
    torch.testing.assert_close(ours_g, ref_g, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_ms_mining_matches_pml_miner(batch, epsilon):
    emb, labels = make_batch(*batch)
    miner = MultiSimilarityMiner(epsilon=epsilon)
    ref = MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    with torch.no_grad():
        tup = miner(emb, labels)
    n_all = (labels[:, None] == labels[None, :]).sum() - labels.numel() + (
        labels[:, None] != labels[None, :]).sum()
    # The comparison is only meaningful if the miner really dropped pairs.
    assert 2 < len(tup[0]) + len(tup[2]) < n_all
    ours_l, ours_g = loss_and_grad(
        lambda e: multi_similarity_loss(e, labels, mining="ms", epsilon=epsilon), emb)
    ref_l, ref_g = loss_and_grad(lambda e: ref(e, labels, tup), emb)
    assert ours_l.item() == pytest.approx(ref_l.item(), abs=TOL, rel=TOL)
    torch.testing.assert_close(ours_g, ref_g, atol=TOL, rtol=TOL)


# --- loop reference for hard / semihard -------------------------------------------------

def loop_reference(emb, labels, mining, alpha=2.0, beta=50.0, lam=0.5, eps=0.1) -> float:
    x = F.normalize(emb.double(), dim=1)
    s = (x @ x.T).tolist()
    lab = labels.tolist()
    b = len(lab)
    total = 0.0
    for i in range(b):
        pos = [j for j in range(b) if j != i and lab[j] == lab[i]]
        neg = [j for j in range(b) if lab[j] != lab[i]]
        if not pos or not neg:
            continue
        if mining == "hard":
            keep_p = [min(pos, key=lambda j: (s[i][j], j))]
            keep_n = [min(neg, key=lambda j: (-s[i][j], j))]
        elif mining == "semihard":
            s_p = min(s[i][j] for j in pos)
            s_n = max(s[i][j] for j in neg)
            keep_p = [j for j in pos if s[i][j] - eps < s_n]
            ms_n = [j for j in neg if s[i][j] + eps > s_p]
            keep_n = [j for j in ms_n if s[i][j] - eps < s_p]
            if ms_n and not keep_n:
                keep_n = [min(ms_n, key=lambda j: (s[i][j], j))]
        else:
            raise AssertionError(mining)
        pos_sum = sum(math.exp(-alpha * (s[i][j] - lam)) for j in keep_p)
        neg_sum = sum(math.exp(beta * (s[i][j] - lam)) for j in keep_n)
        total += math.log1p(pos_sum) / alpha + math.log1p(neg_sum) / beta
    return total / b


@pytest.mark.parametrize("batch", BATCHES)
def test_hard_mining_matches_loop(batch):
    emb, labels = make_batch(*batch)
    ours = multi_similarity_loss(emb, labels, mining="hard").item()
    assert ours == pytest.approx(loop_reference(emb, labels, "hard"), abs=TOL, rel=TOL)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("epsilon", [0.02, 0.1, 0.3])
def test_semihard_mining_matches_loop(batch, epsilon):
    emb, labels = make_batch(*batch)
    ours = multi_similarity_loss(emb, labels, mining="semihard", epsilon=epsilon).item()
    ref = loop_reference(emb, labels, "semihard", eps=epsilon)
    assert ours == pytest.approx(ref, abs=TOL, rel=TOL)


# Unit axes and their negatives: every similarity is exactly -1, 0 or 1, so pairs sit exactly
# on the mining thresholds (with epsilon 0 or 1), where only a strict comparison, as the
# docstring and PML's miner have it, gives the reference's value.
AXES = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [1, 0, 0], [0, -1, 0]],
                    dtype=torch.float64)
AXES_LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


def test_ms_mining_matches_pml_miner_on_exact_ties():
    miner = MultiSimilarityMiner(epsilon=0.0)
    ref = MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    with torch.no_grad():
        tup = miner(AXES, AXES_LABELS)
    ours_l, ours_g = loss_and_grad(
        lambda e: multi_similarity_loss(e, AXES_LABELS, mining="ms", epsilon=0.0), AXES)
    ref_l, ref_g = loss_and_grad(lambda e: ref(e, AXES_LABELS, tup), AXES)
    assert ref_l.item() > 0.1  # the pairs PML kept give a loss (not its <= 1-pair shortcut)
    assert ours_l.item() == pytest.approx(ref_l.item(), abs=1e-12)
    torch.testing.assert_close(ours_g, ref_g, atol=1e-12, rtol=1e-12)


def test_semihard_band_is_open_at_both_ends_on_exact_ties():
    ours = multi_similarity_loss(AXES, AXES_LABELS, mining="semihard", epsilon=1.0).item()
    assert ours == pytest.approx(loop_reference(AXES, AXES_LABELS, "semihard", eps=1.0), abs=1e-12)


def test_semihard_fallback_keeps_gentlest_too_hard_negative():
    # Unit circle at 0, 90, 10, 20 degrees; labels 0, 0, 1, 2. For both anchors of class 0
    # the positive has S = 0 and both negatives lie above the band (-eps, eps), so the band
    # is empty and only the least similar negative is kept: 20 deg for anchor 0 (S = cos 20),
    # 10 deg for anchor 1 (S = cos 80). Anchors 2 and 3 have no positive and give 0.
    ang = torch.tensor([0.0, 90.0, 10.0, 20.0], dtype=torch.float64).deg2rad()
    emb = torch.stack([ang.cos(), ang.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 2])
    alpha, beta, lam = 2.0, 50.0, 0.5

    def term(s_pos: float, s_negs: list[float]) -> float:
        return (math.log1p(math.exp(-alpha * (s_pos - lam))) / alpha
                + math.log1p(sum(math.exp(beta * (s - lam)) for s in s_negs)) / beta)

    cos = lambda deg: math.cos(math.radians(deg))  # noqa: E731
    expected = (term(0.0, [cos(20)]) + term(0.0, [cos(80)])) / 4
    got = multi_similarity_loss(emb, labels, alpha, beta, lam, "semihard", 0.1).item()
    assert got == pytest.approx(expected, abs=1e-12)
    # ms keeps both negatives of each anchor.
    ms_expected = (term(0.0, [cos(10), cos(20)]) + term(0.0, [cos(80), cos(70)])) / 4
    ms = multi_similarity_loss(emb, labels, alpha, beta, lam, "ms", 0.1).item()
    assert ms == pytest.approx(ms_expected, abs=1e-12)


def test_semihard_differs_from_ms_on_random_batches():
    # Guards the loop comparison above against a band that never bites.
    diffs = [
        abs(multi_similarity_loss(*make_batch(*b), mining="semihard", epsilon=0.1).item()
            - multi_similarity_loss(*make_batch(*b), mining="ms", epsilon=0.1).item())
        for b in BATCHES
    ]
    assert max(diffs) > 1e-3


@pytest.mark.parametrize("batch", BATCHES)
def test_semihard_with_wide_band_equals_ms(batch):
    emb, labels = make_batch(*batch)
    wide = multi_similarity_loss(emb, labels, mining="semihard", epsilon=3.0)
    ms = multi_similarity_loss(emb, labels, mining="ms", epsilon=3.0)
    assert wide.item() == pytest.approx(ms.item(), abs=1e-12)


# --- numerics at the extremes -----------------------------------------------------------

def pk_labels(p: int, k: int) -> torch.Tensor:
    return torch.arange(p).repeat_interleave(k)


@pytest.mark.parametrize("mining", MINING_CHOICES)
@pytest.mark.parametrize("beta", [50.0, 200.0])
def test_identical_embeddings_finite_and_exact(mining, beta):
    # All S = 1: negatives violate by 1 - lam, exp(beta * 0.5) overflows fp32 at beta=200.
    p, k, alpha, lam = 4, 4, 2.0, 0.5
    b = p * k
    emb = torch.ones(b, 16, dtype=torch.float32, requires_grad=True)
    loss = multi_similarity_loss(emb, pk_labels(p, k), alpha, beta, lam, mining, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    n_pos, n_neg = (1, 1) if mining == "hard" else (k - 1, b - k)
    # All ties: ms / semihard keep every pair (S + eps > S, S - eps < S).
    expected = (math.log1p(n_pos * math.exp(-alpha * (1 - lam))) / alpha
                + (beta * (1 - lam) + math.log(n_neg + math.exp(-beta * (1 - lam)))) / beta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def log1p_sum_exp(xs: list[float]) -> float:
    """log(1 + sum exp(x)) in float64 without overflow, for expected values by hand."""
    m = max([0.0, *xs])
    return m + math.log(math.exp(-m) + sum(math.exp(x - m) for x in xs))


# Antipodal worst case, per anchor: its one positive at S = -1; of its 6 negatives, 3 at
# S = 1 (identical) and 3 at S = -1. ms keeps every pair (S_n + eps > -1, S_p - eps < 1);
# hard keeps the positive and one S = 1 negative; semihard keeps the negatives within eps
# above the hardest positive (S - eps < -1): the 3 at S = -1.
ANTIPODAL_NEGATIVES = {"none": [1, 1, 1, -1, -1, -1], "ms": [1, 1, 1, -1, -1, -1],
                       "hard": [1], "semihard": [-1, -1, -1]}


@pytest.mark.parametrize("mining", MINING_CHOICES)
@pytest.mark.parametrize("beta", [50.0, 200.0])
def test_antipodal_worst_case_matches_hand_value_and_stays_finite(mining, beta):
    # Positives antipodal (S = -1) and negatives identical (S = 1): every pair maximally
    # wrong; exp(beta * 0.5) overflows float32 at beta = 200.
    alpha, lam = 2.0, 0.5
    v = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    emb = torch.cat([v.repeat(4, 1), -v.repeat(4, 1)]).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss = multi_similarity_loss(emb, labels, alpha, beta, lam, mining, 0.1)
    loss.backward()
    expected = (log1p_sum_exp([-alpha * (-1 - lam)]) / alpha
                + log1p_sum_exp([beta * (s - lam) for s in ANTIPODAL_NEGATIVES[mining]]) / beta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # every anchor alike
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("mining", ["ms", "hard", "semihard"])
def test_no_positives_gives_zero_loss_with_valid_grad(mining):
    emb = torch.randn(12, 8, requires_grad=True)
    loss = multi_similarity_loss(emb, torch.arange(12), mining=mining)
    loss.backward()
    assert loss.item() == 0.0
    assert emb.grad is not None and torch.equal(emb.grad, torch.zeros_like(emb))


def test_no_positives_without_mining_keeps_negative_term():
    emb, _ = make_batch(7, 6, 1)
    labels = torch.arange(6)
    ref = MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)(emb, labels)
    ours = multi_similarity_loss(emb, labels, mining="none")
    assert ours.item() == pytest.approx(ref.item(), abs=TOL) and ours.item() > 0


def test_single_sample_batch_is_zero():
    emb = torch.randn(1, 4, requires_grad=True)
    loss = multi_similarity_loss(emb, torch.tensor([3]), mining="none")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(emb.grad).all()


def test_scale_invariance():
    emb, labels = make_batch(5, 4, 4)
    a = multi_similarity_loss(emb, labels)
    b = multi_similarity_loss(emb * 37.0, labels)
    assert a.item() == pytest.approx(b.item(), abs=1e-10)


# --- validation -------------------------------------------------------------------------

def test_bad_mining_name_lists_choices():
    with pytest.raises(ValueError) as err:
        multi_similarity_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), mining="easy")
    for name in MINING_CHOICES:
        assert name in str(err.value)


@pytest.mark.parametrize("emb_shape,labels_shape", [
    ((4, 3), (5,)),
    ((4, 3), (4, 1)),
    ((4,), (4,)),
    ((2, 4, 3), (2,)),
])
def test_shape_mismatch_raises(emb_shape, labels_shape):
    labels = torch.zeros(labels_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"(labels must be \(B,\) with B = \d+|embeddings must be \(B, D\)), got shape"):
        multi_similarity_loss(torch.randn(emb_shape), labels)


def test_mining_gives_an_anchor_without_negatives_no_loss():
    # Every mining keeps a positive only against a negative; without mining (none) the
    # positive term stays, as the formula and pytorch-metric-learning say.
    embeddings = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(4, dtype=torch.long)  # one class: no anchor has a negative
    for mining in ("ms", "hard", "semihard"):
        assert multi_similarity_loss(embeddings, labels, mining=mining).item() == 0.0, mining
    reference = MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)(embeddings, labels)
    unmined = multi_similarity_loss(embeddings, labels, mining="none").item()
    assert unmined == pytest.approx(reference.item(), rel=1e-5) and unmined > 0


def test_low_precision_embeddings_are_compared_in_fp32():
    embeddings = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    labels = torch.arange(16) % 4
    loss = multi_similarity_loss(embeddings, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, multi_similarity_loss(embeddings.float(), labels), rtol=1e-6, atol=1e-6)


def test_bad_constants_and_an_empty_batch_are_refused():
    embeddings, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    for alpha, beta in ((0.0, 50.0), (2.0, 0.0), (-1.0, 50.0)):
        with pytest.raises(ValueError, match=f"alpha and beta must be > 0, got alpha={alpha}, beta={beta}"):
            multi_similarity_loss(embeddings, labels, alpha=alpha, beta=beta)
    with pytest.raises(ValueError, match="empty batch"):
        multi_similarity_loss(torch.empty(0, 3), torch.empty(0, dtype=torch.long))


def hard_mining_loop_with_autograd(emb: torch.Tensor, labels: torch.Tensor, alpha=2.0, beta=50.0,
                                   lam=0.5) -> torch.Tensor:
    """loop_reference's hard mining as a differentiable torch loss: the pairs are chosen in
    Python (ties to the lowest index, as documented), the terms computed from the tensor."""
    x = F.normalize(emb, dim=1)
    s = x @ x.T
    values, lab = s.tolist(), labels.tolist()
    terms = []
    for i in range(len(lab)):
        pos = [j for j in range(len(lab)) if j != i and lab[j] == lab[i]]
        neg = [j for j in range(len(lab)) if lab[j] != lab[i]]
        if pos and neg:
            p = min(pos, key=lambda j: (values[i][j], j))
            n = min(neg, key=lambda j: (-values[i][j], j))
            terms.append(torch.log1p(torch.exp(-alpha * (s[i, p] - lam))) / alpha
                         + torch.log1p(torch.exp(beta * (s[i, n] - lam))) / beta)
    return torch.stack(terms).sum() / len(lab)


@pytest.mark.parametrize("degrees, labels", [
    ([0, 90, 30, -30], [0, 0, 1, 2]),   # anchor 0's two negatives tie (cos 30 deg each)
    ([0, 50, -50, 40], [0, 0, 0, 1]),   # anchor 0's two positives tie (cos 50 deg each)
])
def test_hard_mining_breaks_exact_ties_by_the_lowest_index_in_the_gradient(degrees, labels):
    """The loss value is the same whichever tied sample is kept; only the gradient says which
    one got the pull or push. The docstring's rule: the lowest index."""
    angles = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor(labels)
    ours_loss, ours_grad = loss_and_grad(lambda e: multi_similarity_loss(e, labels, mining="hard"), emb)
    ref_loss, ref_grad = loss_and_grad(lambda e: hard_mining_loop_with_autograd(e, labels), emb)
    assert ours_loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-9, atol=1e-12)
    if labels.tolist() == [0, 0, 1, 2]:  # sample 3, the higher-index tie, is never chosen
        assert ours_grad[3].abs().max().item() == 0.0 and ours_grad[2].abs().max().item() > 0


def test_the_defaults_are_the_recipes_constants():
    """alpha 2, beta 50, lambda 0.5, ms mining, epsilon 0.1 (pytorch-metric-learning's
    defaults, and T4's RECIPE): a caller that passes nothing gets exactly those."""
    emb, labels = make_batch(0, 8, 4)
    assert multi_similarity_loss(emb, labels).item() == \
        multi_similarity_loss(emb, labels, 2.0, 50.0, 0.5, "ms", 0.1).item()
    import inspect
    defaults = {name: p.default for name, p in inspect.signature(multi_similarity_loss).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults == {"alpha": 2.0, "beta": 50.0, "lam": 0.5, "mining": "ms", "epsilon": 0.1}


def test_integer_embeddings_are_refused():
    with pytest.raises(ValueError, match="embeddings must be floating point, got torch.int64"):
        multi_similarity_loss(torch.randint(0, 5, (8, 4)), torch.arange(8) % 2)
