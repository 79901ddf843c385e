"""Tests of common.recall: hand-computed cases, a NumPy brute-force reference, ties, self."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.recall import chance_recall_at_1, nearest_neighbours, recall_at_k

CHUNKS = [1, 2, 7, 64, 10_000]


def circle(degrees: list[float], radii: list[float] | None = None) -> torch.Tensor:
    ang = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    r = torch.ones_like(ang) if radii is None else torch.tensor(radii, dtype=torch.float64)
    return torch.stack([r * ang.cos(), r * ang.sin()], dim=1)


def brute_force(emb: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, dict]:
    """Full N x N matrix, stable argsort (ties -> lower index), self at -inf."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    hits = labels[order] == labels[:, None]
    recall = {kk: float(hits[:, :kk].any(axis=1).mean()) for kk in range(1, k + 1)}
    return order, recall


# --- hand-made cases --------------------------------------------------------------------

def test_unit_circle_by_hand():
    # Angles with labels; angular gaps give the neighbour order (cosine is monotone in it):
    #   A   0 (0): B10 C30        -> miss, hit@2
    #   B  10 (1): A10 C20 D90    -> miss, miss, hit@3
    #   C  30 (0): B20 A30        -> miss, hit@2
    #   D 100 (1): E15            -> hit@1
    #   E 115 (1): D15            -> hit@1
    #   F 205 (0): E90 D105 A155  -> miss, miss, hit@3
    # Radii differ to check the internal normalisation.
    emb = circle([0, 10, 30, 100, 115, 205], radii=[1, 2, 3, 0.5, 5, 7])
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    for chunk in CHUNKS:
        r = recall_at_k(emb, labels, ks=(1, 2, 3, 4), chunk_size=chunk)
        assert r == {1: 2 / 6, 2: 4 / 6, 3: 6 / 6, 4: 1.0}
    nn = nearest_neighbours(emb, 2)
    assert nn.tolist() == [[1, 2], [0, 2], [1, 0], [4, 2], [3, 2], [4, 3]]


def test_exact_ties_go_to_lower_index():
    # Three copies of e1 and two of e2: all similarities are exactly 1, 0 or -inf.
    emb = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1], [0, 1]])
    labels = torch.tensor([0, 1, 0, 1, 0])
    expected_nn4 = [[1, 2, 3, 4], [0, 2, 3, 4], [0, 1, 3, 4], [4, 0, 1, 2], [3, 0, 1, 2]]
    # k=2 makes query 3 choose among a three-way tie (0, 1, 2) for its second place.
    expected_nn2 = [row[:2] for row in expected_nn4]
    for chunk in CHUNKS:
        assert nearest_neighbours(emb, 4, chunk).tolist() == expected_nn4
        assert nearest_neighbours(emb, 2, chunk).tolist() == expected_nn2
        # Query 0: 1 (miss) then 2 (hit); 1: 0, 2 miss, 3 hit; 2: hit; 3: 4, 0 miss, 1 hit;
        # 4: 3 miss, 0 hit.
        assert recall_at_k(emb, labels, (1, 2, 3, 4), chunk) == {
            1: 1 / 5, 2: 3 / 5, 3: 1.0, 4: 1.0}


def test_ties_go_to_lower_index_whatever_order_topk_returns_them_in(monkeypatch):
    # The CPU's topk happens to return ties in index order; other kernels (CUDA) need not.
    real_topk = torch.Tensor.topk

    def topk_highest_index_first(self, k, dim=-1, *args, **kwargs):
        vals, idx = real_topk(self, k, dim, *args, **kwargs)
        by_index = idx.sort(dim=dim, descending=True, stable=True).indices
        vals, idx = vals.gather(dim, by_index), idx.gather(dim, by_index)
        by_value = vals.sort(dim=dim, descending=True, stable=True).indices
        return torch.return_types.topk((vals.gather(dim, by_value), idx.gather(dim, by_value)))
    monkeypatch.setattr(torch.Tensor, "topk", topk_highest_index_first)
    emb = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1], [0, 1]])
    assert torch.tensor([[3.0, 3.0, 1.0]]).topk(2).indices.tolist() == [[1, 0]]  # the fake works
    for chunk in CHUNKS:
        assert nearest_neighbours(emb, 4, chunk).tolist() == [[1, 2, 3, 4], [0, 2, 3, 4], [0, 1, 3, 4],
                                                              [4, 0, 1, 2], [3, 0, 1, 2]]


def test_tie_rule_is_positional_not_label_based():
    # Same geometry, labels of the tied copies swapped: now query 0 hits at rank 1.
    emb = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]])
    assert recall_at_k(emb, torch.tensor([0, 1, 0, 1]), (1, 2))[1] == pytest.approx(1 / 4)
    assert recall_at_k(emb, torch.tensor([0, 0, 1, 1]), (1, 2))[1] == pytest.approx(2 / 4)


def test_self_never_counted():
    # All embeddings identical and every class a singleton: counting self would give 1.
    emb = torch.ones(10, 3)
    r = recall_at_k(emb, torch.arange(10), ks=(1, 5, 9))
    assert r == {1: 0.0, 5: 0.0, 9: 0.0}
    nn = nearest_neighbours(emb, 9, chunk_size=3)
    assert not (nn == torch.arange(10)[:, None]).any()
    assert nn.tolist() == [[j for j in range(10) if j != i] for i in range(10)]


def test_two_samples():
    emb = circle([0, 170])
    assert recall_at_k(emb, torch.tensor([4, 4]), ks=(1,)) == {1: 1.0}
    assert recall_at_k(emb, torch.tensor([4, 5]), ks=(1,)) == {1: 0.0}


# --- brute-force reference --------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_random(seed):
    g = torch.Generator().manual_seed(seed)
    n, d, classes, kmax = 257, 16, 12, 10
    emb = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    order, ref = brute_force(emb.numpy(), labels.numpy(), kmax)
    ks = tuple(range(1, kmax + 1))
    for chunk in CHUNKS:
        assert nearest_neighbours(emb, kmax, chunk).numpy().tolist() == order.tolist()
        got = recall_at_k(emb, labels, ks, chunk)
        assert got == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_with_many_ties(seed):
    # Signed basis vectors: only 8 distinct points, similarities exactly -1, 0, 1, so almost
    # every rank is a tie and the lower-index rule decides everything.
    g = torch.Generator().manual_seed(seed)
    n = 60
    basis = torch.cat([torch.eye(4), -torch.eye(4)]).double()
    emb = basis[torch.randint(0, 8, (n,), generator=g)]
    labels = torch.randint(0, 5, (n,), generator=g)
    order, ref = brute_force(emb.numpy(), labels.numpy(), 20)
    for chunk in CHUNKS:
        for k in (1, 3, 8, 20):
            assert nearest_neighbours(emb, k, chunk).tolist() == order[:, :k].tolist()
        assert recall_at_k(emb, labels, (1, 2, 4, 8, 16), chunk) == pytest.approx(
            {k: ref[k] for k in (1, 2, 4, 8, 16)}, abs=1e-12)


def test_float32_agrees_with_float64():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(500, 32, generator=g)
    labels = torch.randint(0, 20, (500,), generator=g)
    r32 = recall_at_k(emb, labels, chunk_size=128)
    r64 = recall_at_k(emb.double(), labels, chunk_size=500)
    # Near-ties may flip in float32; at most a query or two.
    for k in r32:
        assert abs(r32[k] - r64[k]) <= 2 / 500


def test_returns_python_floats_for_the_requested_ks_only():
    # Angles 0, 10, 30, 100 with labels 0, 0, 1, 1. Nearest first: 0 -> 10 (hit);
    # 10 -> 0 (hit); 30 -> 10, 0 (misses), 100 (hit at 3); 100 -> 30 (hit).
    emb = circle([0, 10, 30, 100])
    r = recall_at_k(emb, torch.tensor([0, 0, 1, 1]), ks=[3, 1])
    assert r == {1: 3 / 4, 3: 1.0} and all(type(v) is float for v in r.values())


# --- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("ks, message", [
    *(((k,), rf"k must satisfy 0 < k < N = 5 \(self is excluded\), got {k}") for k in (0, -1, 5, 6)),
    ((1.0,), "k must be an int, got 1.0"), ((True,), "k must be an int, got True"),
    ((), "ks must not be empty")])
def test_bad_ks_raise(ks, message):
    emb = torch.randn(5, 3)
    with pytest.raises(ValueError, match=message):
        recall_at_k(emb, torch.arange(5), ks=ks)


@pytest.mark.parametrize("emb,labels,message", [
    (torch.randn(5, 3), torch.arange(4), r"labels must be \(N,\) with N = 5, got shape \(4,\)"),
    (torch.randn(5, 3), torch.zeros(5, 1, dtype=torch.long), r"labels must be \(N,\) with N = 5, got shape \(5, 1\)"),
    (torch.randn(5), torch.arange(5), r"embeddings must be \(N, D\), got shape \(5,\)"),
    (torch.ones(5, 3, dtype=torch.long), torch.arange(5), "embeddings must be floating point, got torch.int64"),
])
def test_bad_shapes_raise(emb, labels, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(emb, labels, ks=(1,))


@pytest.mark.parametrize("chunk", [0, -3, 2.5])
def test_bad_chunk_size_raises(chunk):
    with pytest.raises(ValueError, match=f"chunk_size must be a positive int, got {chunk}"):
        nearest_neighbours(torch.randn(5, 3), 2, chunk_size=chunk)


def test_every_k_is_checked_not_only_the_largest():
    embeddings, labels = torch.randn(5, 3), torch.arange(5)
    for ks in ((0, 2), (2, 5), (1, 2.0)):
        with pytest.raises(ValueError, match="^k must"):
            recall_at_k(embeddings, labels, ks=ks)


def test_chance_recall_at_1_by_hand_and_by_brute_force():
    """R@1 of a random ranking: per query, the share of the N - 1 others in its class."""
    assert chance_recall_at_1(torch.tensor([0, 0, 1, 1])) == pytest.approx(1 / 3)
    assert chance_recall_at_1(torch.tensor([5, 5, 5, 2])) == pytest.approx(0.5)  # (3 x 2/3 + 0) / 4
    assert chance_recall_at_1(torch.tensor([0, 1, 2])) == 0.0
    labels = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(0))
    per_query = [(labels == labels[i]).sum().item() - 1 for i in range(50)]
    assert chance_recall_at_1(labels) == pytest.approx(sum(per_query) / (50 * 49), rel=1e-12)
    # And what random embeddings score on average: within 3 standard errors of 1,000 draws.
    gen = torch.Generator().manual_seed(1)
    r1 = [recall_at_k(torch.randn(50, 4, generator=gen), labels, ks=(1,))[1] for _ in range(1000)]
    assert abs(np.mean(r1) - chance_recall_at_1(labels)) < 3 * np.std(r1) / np.sqrt(1000)


@pytest.mark.parametrize("labels", [torch.tensor([3]), torch.zeros(2, 2, dtype=torch.long)])
def test_chance_recall_at_1_refuses_fewer_than_two_labels_or_a_matrix(labels):
    with pytest.raises(ValueError, match="labels must be"):
        chance_recall_at_1(labels)


def test_a_non_finite_embedding_is_refused_not_ranked_first():
    # One inf feature made that row NaN after normalising, and every query's nearest neighbour.
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(20).repeat_interleave(4)
    embeddings = torch.randn(20, 16, generator=generator)[labels] + 0.1 * torch.randn(80, 16, generator=generator)
    assert recall_at_k(embeddings, labels, ks=(1,)) == {1: 1.0}
    for bad in (float("inf"), float("nan")):
        broken = embeddings.clone()
        broken[7, 3] = bad
        broken[41, 0] = bad
        with pytest.raises(ValueError, match=r"2 of 80 embeddings hold inf or NaN, rows \[7, 41\]"):
            recall_at_k(broken, labels, ks=(1,))


def test_fp16_embeddings_of_a_large_norm_are_normalised_in_fp32():
    # In fp16 a row norm above 65504 is inf, which made every row 0 and every similarity a tie.
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(10).repeat_interleave(3)
    embeddings = torch.randn(10, 512, generator=generator)[labels] + 0.1 * torch.randn(30, 512, generator=generator)
    big = (embeddings * 5000).half()
    assert torch.isinf(big.float().norm(dim=1).half()).all()
    assert recall_at_k(big, labels, ks=(1, 2)) == recall_at_k(embeddings, labels, ks=(1, 2)) == {1: 1.0, 2: 1.0}


def test_nearest_neighbours_checks_k_and_finiteness_itself():
    """plots.retrieval_grid calls nearest_neighbours directly, not through recall_at_k: the
    same checks, or k = N returns self as a neighbour and a NaN row ranks first."""
    embeddings = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    for k in (0, 5):
        with pytest.raises(ValueError, match=rf"k must satisfy 0 < k < N = 5 \(self is excluded\), got {k}"):
            nearest_neighbours(embeddings, k)
    broken = embeddings.clone()
    broken[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"1 of 5 embeddings hold inf or NaN, rows \[2\]"):
        nearest_neighbours(broken, 2)
