"""Which images go into which batch, per epoch and per rank: pure index arithmetic.

Every loader backend (DALI, the torch fallback, the device cache) takes its batches from
here, so all see the same images in the same order. Every function is a pure function of (seed, epoch, shard):
a resumed run recomputes the exact order of any epoch without saving sampler state, and can
start mid-epoch by skipping to batch `start`.

Output: a list of int64 index arrays, one per batch, each indexing the dataset's file list.
"""
from __future__ import annotations

import numpy as np

from common.errors import ConfigError


def _rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def shuffled_batches(num_items: int, batch_size: int, epoch: int, seed: int,
                     shard_id: int = 0, num_shards: int = 1) -> list[np.ndarray]:
    """Training batches: one global permutation per epoch, split across shards.

    Every shard gets the same number of full batches (the remainder is dropped), because
    DDP ranks must take the same number of steps.
    """
    perm = _rng(seed, epoch).permutation(num_items)
    per_shard = num_items // num_shards
    mine = perm[shard_id * per_shard:(shard_id + 1) * per_shard]
    n_batches = per_shard // batch_size
    if n_batches == 0:
        raise ConfigError(f"{num_items} training images over {num_shards} shard(s) do not fill "
                         f"one batch of {batch_size}; lower --batch-size")
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def sequential_batches(num_items: int, batch_size: int, shard_id: int = 0,
                       num_shards: int = 1) -> list[np.ndarray]:
    """Evaluation batches: every image exactly once over all shards; the last batch may be short."""
    mine = np.arange(shard_id, num_items, num_shards)
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def class_balanced_batches(labels: np.ndarray, classes_per_batch: int, per_class: int,
                           epoch: int, seed: int, shard_id: int = 0,
                           num_shards: int = 1) -> list[np.ndarray]:
    """P x K metric-learning batches: P distinct classes, K images of each, class-major order.

    An epoch is len(labels) // (P*K*num_shards) batches per shard, each drawn independently
    (as pytorch-metric-learning's MPerClassSampler does), not one pass over the images: an
    image can come twice in an epoch or not at all (on Cars196's 98 train classes, P = 32,
    K = 4: about 38 % unseen per epoch), and an image of a small class comes more often than
    one of a large class. A class with fewer than K images gives each of them once, then
    repeats some, so each batch keeps its P x K shape.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < classes_per_batch:
        raise ConfigError(f"P={classes_per_batch} classes per batch but only {len(classes)} "
                         f"classes in the training set; lower --classes-per-batch")
    by_class = {c: np.flatnonzero(labels == c) for c in classes}
    rng = _rng(seed, epoch, stream=1)
    batch = classes_per_batch * per_class
    n_batches = len(labels) // (batch * num_shards)
    if n_batches == 0:
        raise ConfigError(f"{len(labels)} training images do not fill one P x K batch of "
                          f"{classes_per_batch} x {per_class} = {batch} images"
                          f"{f' in each of {num_shards} processes' if num_shards > 1 else ''}; "
                          f"lower --classes-per-batch or --images-per-class")
    out = []
    for _ in range(n_batches * num_shards):
        chosen = rng.choice(classes, size=classes_per_batch, replace=False)
        out.append(np.concatenate([_draw_from_class(rng, by_class[c], per_class) for c in chosen]))
    return out[shard_id::num_shards]


def _draw_from_class(rng: np.random.Generator, members: np.ndarray, k: int) -> np.ndarray:
    """k of a class's image indices: distinct while it has k images; else every one of them
    once, then k - len(members) repeats, so a positive is another image whenever there is one."""
    if len(members) >= k:
        return rng.choice(members, size=k, replace=False)
    return np.concatenate([rng.permutation(members), rng.choice(members, size=k - len(members))])
