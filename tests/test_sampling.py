"""common.sampling: which indices form each batch, per epoch and shard (pure numpy, fast)."""

import numpy as np
import pytest

from common.sampling import class_balanced_batches, sequential_batches, shuffled_batches


def _as_lists(batches):
    return [b.tolist() for b in batches]


# ---- shuffled_batches (training) ----

def test_shuffled_full_batches_only_and_equal_count_per_shard():
    for shard in range(3):
        batches = shuffled_batches(103, 8, epoch=0, seed=1, shard_id=shard, num_shards=3)
        # 103 // 3 = 34 per shard -> 4 full batches of 8, the rest dropped
        assert len(batches) == 4
        assert all(len(b) == 8 for b in batches)
        assert all(b.dtype.kind == "i" for b in batches)


def test_shuffled_shards_disjoint_and_in_range():
    seen = [np.concatenate(shuffled_batches(100, 10, epoch=3, seed=7, shard_id=s, num_shards=2))
            for s in range(2)]
    assert len(np.intersect1d(seen[0], seen[1])) == 0
    both = np.concatenate(seen)
    assert len(np.unique(both)) == len(both) == 100  # 50 per shard, 5 full batches each
    assert both.min() >= 0 and both.max() < 100


def test_shuffled_no_repeats_within_shard():
    idx = np.concatenate(shuffled_batches(64, 8, epoch=0, seed=0))
    assert sorted(idx.tolist()) == list(range(64))


def test_shuffled_deterministic_per_seed_epoch():
    a = shuffled_batches(50, 5, epoch=2, seed=11, shard_id=1, num_shards=2)
    b = shuffled_batches(50, 5, epoch=2, seed=11, shard_id=1, num_shards=2)
    assert _as_lists(a) == _as_lists(b)


def test_shuffled_differs_between_epochs_and_seeds():
    e0 = _as_lists(shuffled_batches(50, 5, epoch=0, seed=11))
    e1 = _as_lists(shuffled_batches(50, 5, epoch=1, seed=11))
    s2 = _as_lists(shuffled_batches(50, 5, epoch=0, seed=12))
    assert e0 != e1
    assert e0 != s2


def test_shuffled_too_few_items_raises():
    with pytest.raises(ValueError, match="batch"):
        shuffled_batches(10, 8, epoch=0, seed=0, shard_id=0, num_shards=2)


# ---- sequential_batches (evaluation) ----

@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_sequential_shards_cover_every_index_once(num_shards):
    all_idx = []
    for shard in range(num_shards):
        batches = sequential_batches(103, 16, shard_id=shard, num_shards=num_shards)
        assert all(len(b) == 16 for b in batches[:-1])
        assert 1 <= len(batches[-1]) <= 16
        all_idx.extend(np.concatenate(batches).tolist())
    assert sorted(all_idx) == list(range(103))


def test_sequential_two_shards_sizes_51_52():
    b0 = sequential_batches(103, 16, shard_id=0, num_shards=2)
    b1 = sequential_batches(103, 16, shard_id=1, num_shards=2)
    assert sum(map(len, b0)) == 52 and sum(map(len, b1)) == 51
    assert [len(b) for b in b0] == [16, 16, 16, 4]
    assert [len(b) for b in b1] == [16, 16, 16, 3]
    assert b0[0][:3].tolist() == [0, 2, 4] and b1[0][:3].tolist() == [1, 3, 5]


def test_sequential_single_shard_in_file_order_last_batch_short():
    batches = sequential_batches(10, 4)
    assert _as_lists(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ---- class_balanced_batches (P x K) ----

def _labels():
    # 6 classes with 10 images each, plus class 6 with only 2 images (< K)
    return np.concatenate([np.repeat(np.arange(6), 10), [6, 6]])


def test_class_balanced_p_classes_times_k_class_major():
    labels = _labels()
    P, K = 4, 3
    batches = class_balanced_batches(labels, P, K, epoch=0, seed=0)
    assert len(batches) == len(labels) // (P * K)
    for b in batches:
        assert len(b) == P * K
        per_class = labels[b].reshape(P, K)
        assert (per_class == per_class[:, :1]).all()          # class-major: K of one class in a row
        assert len(np.unique(per_class[:, 0])) == P           # P distinct classes
        for row in b.reshape(P, K):
            if labels[row[0]] != 6:                           # enough images: no repeats
                assert len(np.unique(row)) == K


def test_class_balanced_small_class_gives_every_image_then_repeats():
    labels = _labels()
    hits = 0
    for epoch in range(20):
        for b in class_balanced_batches(labels, 7, 3, epoch=epoch, seed=0):
            rows = b.reshape(7, 3)
            small = rows[labels[rows[:, 0]] == 6]
            assert len(small) == 1  # P == number of classes: class 6 is always there
            assert set(small[0].tolist()) == {60, 61}  # both images before a repeat: a positive besides itself
            hits += 1
    assert hits > 0


def test_class_balanced_deterministic_and_epoch_dependent():
    labels = _labels()
    a = class_balanced_batches(labels, 3, 4, epoch=5, seed=2)
    b = class_balanced_batches(labels, 3, 4, epoch=5, seed=2)
    c = class_balanced_batches(labels, 3, 4, epoch=6, seed=2)
    assert _as_lists(a) == _as_lists(b)
    assert _as_lists(a) != _as_lists(c)


def test_class_balanced_shards_same_count_and_differ():
    labels = _labels()
    s0 = class_balanced_batches(labels, 3, 2, epoch=0, seed=0, shard_id=0, num_shards=2)
    s1 = class_balanced_batches(labels, 3, 2, epoch=0, seed=0, shard_id=1, num_shards=2)
    assert len(s0) == len(s1) == len(labels) // (6 * 2)
    assert _as_lists(s0) != _as_lists(s1)


def test_class_balanced_too_many_classes_raises():
    with pytest.raises(ValueError, match="P=8 classes per batch but only 7 classes"):
        class_balanced_batches(_labels(), 8, 2, epoch=0, seed=0)


def test_adjacent_seeds_do_not_replay_each_others_epochs():
    """The generator is seeded with the tuple (seed, epoch, stream), not a sum: seed 11's
    epoch 1 is not seed 12's epoch 0, and the P x K stream is not the shuffled one."""
    assert _as_lists(shuffled_batches(50, 5, epoch=1, seed=11)) != _as_lists(shuffled_batches(50, 5, epoch=0, seed=12))
    labels = np.repeat(np.arange(10), 5)
    assert _as_lists(class_balanced_batches(labels, 2, 5, epoch=1, seed=11)) != \
        _as_lists(class_balanced_batches(labels, 2, 5, epoch=0, seed=12))


def test_shuffled_shard_sizes_round_down_so_no_shard_gets_a_short_batch():
    # 10 items, 3 shards: 3 each (one dropped), one full batch of 3 per shard, all distinct
    batches = [shuffled_batches(10, 3, epoch=0, seed=0, shard_id=s, num_shards=3) for s in range(3)]
    assert [[len(b) for b in shard] for shard in batches] == [[3], [3], [3]]
    every = np.concatenate([b for shard in batches for b in shard])
    assert len(np.unique(every)) == 9


def test_class_balanced_draws_reach_every_image_of_a_large_class():
    """K of a class's images are drawn at random each time, not its first K: over 30 epochs
    of 4 classes x 20 images (P = 2, K = 4), every image is drawn."""
    labels = np.repeat(np.arange(4), 20)
    seen = {int(i) for epoch in range(30) for b in class_balanced_batches(labels, 2, 4, epoch=epoch, seed=0)
            for i in b}
    assert seen == set(range(80))


def test_class_balanced_too_few_images_for_one_batch_raises():
    with pytest.raises(ValueError, match=r"^6 training images do not fill one P x K batch of 2 x 4 = 8 "
                                         r"images; lower --classes-per-batch or --images-per-class$"):
        class_balanced_batches(np.array([0, 0, 0, 1, 1, 1]), 2, 4, epoch=0, seed=0)
    with pytest.raises(ValueError, match="12 training images do not fill one P x K batch of 2 x 4 = 8 "
                                         "images in each of 2 processes"):
        class_balanced_batches(np.repeat([0, 1], 6), 2, 4, epoch=0, seed=0, num_shards=2)
