"""The plain CUBS blocks' largest logit at every training step of a T3 run.

    python bench/cubs_logit_trace.py --smoke --width 64 --image-size 64 --lr 0.025 --epochs 8 \
        --backend torch --out /tmp/trace          # any t3_cubs.py flags

Runs t3_cubs.py's main with those flags (eager: the CPU, or --no-compile) and records, for
every call of similarity_attention with gradients on (training steps, and the one forward
and backward of each epoch's diagnostics pass), max q * max k over
the batch, the largest scale-1 logit. The Taylor series is exact up to
cubs.TAYLOR_MAX_LOGIT; beyond it a block takes the fused kernel (per-block branch) or the
step is redone in eager mode (CUDA graphs, cubs.range_check). Prints, per sequence length
L (Block 2: L = H * W positions; Block 1: L = d), the calls, the largest logit, the share
above the range, and the same per quarter of the run. docs/cubs.md quotes it.
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common.cubs as cubs  # noqa: E402

largest: list[tuple[int, float]] = []  # (L, max q * max k) per training call
_similarity_attention = cubs.similarity_attention


def traced(q, k, v, out_of_range=None):
    if torch.is_grad_enabled():
        with torch.no_grad():
            largest.append((q.shape[1], (q.float().amax(1) * k.float().amax(1)).amax().item()))
    return _similarity_attention(q, k, v, out_of_range)


def report() -> None:
    by_length = collections.defaultdict(list)
    for length, value in largest:
        by_length[length].append(value)
    limit = cubs.TAYLOR_MAX_LOGIT
    for length, values in sorted(by_length.items()):
        t = torch.tensor(values)
        quarters = [t[i * len(t) // 4:(i + 1) * len(t) // 4] for i in range(4)]
        print(f"L={length}: {len(t)} calls, largest logit {t.max():.2f}, share above {limit}: "
              f"{(t > limit).float().mean():.3f}; per quarter of the run: largest "
              f"{[round(q.max().item(), 2) for q in quarters if len(q)]}, share above "
              f"{[round((q > limit).float().mean().item(), 3) for q in quarters if len(q)]}")


if __name__ == "__main__":
    cubs.similarity_attention = traced  # the blocks look it up in common.cubs at each call
    import t3_cubs
    try:
        t3_cubs.main(sys.argv[1:])
    finally:
        report()
