"""CPU timings of recall_at_k and multi_similarity_loss against their goals (no assertions).

Shapes: recall on (8041, 512) random embeddings with 98 classes (about Cars196's test split:
8,131 images of classes 99-196);
loss forward + backward on a (256, 512) batch, mining "ms". Run: python -m bench.bench_retrieval
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # allow `python bench/...py`

from bench.machine import load_note  # noqa: E402
from common.loss import multi_similarity_loss  # noqa: E402
from common.recall import recall_at_k  # noqa: E402


def median_seconds(fn: Callable[[], object], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_recall() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(8041, 512, generator=g)
    labels = torch.randint(0, 98, (8041,), generator=g)
    t = median_seconds(lambda: recall_at_k(emb, labels), runs=5, warmup=1)
    print(f"recall_at_k 8041x512 (ks 1,2,4,8)      : {t:8.3f} s   goal < 1 s")


def bench_loss() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(256, 512, generator=g).requires_grad_(True)
    labels = torch.arange(64).repeat_interleave(4)  # 64 classes x 4 samples

    def step() -> None:
        emb.grad = None
        multi_similarity_loss(emb, labels, mining="ms").backward()

    t = median_seconds(step, runs=20, warmup=5)
    print(f"MS loss fwd+bwd B=256 D=512 mining=ms   : {t * 1e3:8.2f} ms  goal < 20 ms")


def main() -> None:
    argparse.ArgumentParser(prog="python -m bench.bench_retrieval", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()  # --help; no flags
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, {load_note()}")
    bench_recall()
    bench_loss()


if __name__ == "__main__":
    main()
