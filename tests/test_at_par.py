"""The assignment's at-par rule as a test: CUBS-ResNet-18 (serial, plain blocks) must learn as
fast as vanilla ResNet-18 on the same data, seed and budget.

Paired: at one seed the CUBS network starts from exactly vanilla's tensors (ResNet18 draws
its attention modules last) and sees the same batches, so the two runs differ only by what
the attention does. Generated Tiny ImageNet layout, 16x16, width 8, CPU, 7 classes whose
colour is only a weak cue (bench/synthetic_options.py's hue_jitter 0.2), so the class must be
read from shape. Over SEEDS:
  - both networks learn: at each seed, holdout accuracy LEARNED_MARGIN above the untrained
    network's;
  - holdout accuracy (the assignment's measure, 140 images a seed), averaged over the seeds:
    CUBS within AT_PAR_MARGIN of vanilla;
  - learning speed: the training loss averaged over every step of every epoch (all 420
    training images, 8 times: far less noisy than 140 holdout images), averaged over the
    seeds, at most LOSS_MARGIN above vanilla's.
What the margins separate (one thread, 2026-12-08, 2-core AMD EPYC VM; with
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 in brackets: other kernels, other
rounding), CUBS minus vanilla at seeds 0-5, train loss, and its mean:
    serial, open gates (the default init)  +0.007 -0.015 +0.002 -0.008 -0.005 +0.033  mean +0.002 (+0.002)
    serial, gate_logit None (the old init)  +0.016 +0.011 +0.018 +0.012 +0.036 +0.043  mean +0.023 (+0.024)
    serial, gates closed (logit -4)         +0.028 +0.033 +0.028 +0.027 +0.021 +0.066  mean +0.034
and holdout points, mean over the seeds: default -1.2 (-0.8), old init -2.1, closed -5.8 (it fails
AT_PAR_MARGIN too).
Holdout accuracy at this budget does not separate the old init (the larger ablation of
docs/cubs.md does: 5.1 test points on 2,000 images); the training loss does, though not seed by seed:
the old init is above the default at every seed, by 0.009-0.041, but the default's own gap
ranges from -0.015 to +0.033. So the test averages six seeds, and LOSS_MARGIN sits between
the means with about 0.01 either side. (Two seeds were enough with the loader's earlier
augmentation draws, 2026-12-07: default +0.009, old init +0.029 over seeds 0 and 1; with
today's draws those two seeds give -0.004 and +0.014, 0.018 apart, less than the seeds'
spread, and the old init passed the margin of 0.018 used then.)
"""
import statistics

import pytest
import torch

from bench.synthetic_options import hue_jitter
from common import engine, runtime
from common.evaluate import evaluate_classifier
from tests.conftest import fit
from common.cubs import cubs_resnet18
from common.datasets import load_tiny_imagenet
from common.loader import ImageLoader, LoaderSettings
from common.models import ResNet18
from common.synthetic import make_tiny_imagenet

# 7 classes: one per shape kind, so shape alone separates them; colour is a weak cue.
CLASSES, SIZE, WIDTH, EPOCHS, HUE_JITTER, SEEDS = 7, 16, 8, 8, 0.2, (0, 1, 2, 3, 4, 5)
AT_PAR_MARGIN = 0.05    # mean holdout accuracy CUBS may trail vanilla by, over SEEDS (140 images each)
LEARNED_MARGIN = 0.15   # both must beat the untrained network (chance: 0.14) by this much, at each seed
LOSS_MARGIN = 0.012     # mean training loss CUBS may exceed vanilla's by, over SEEDS


def _train(build, splits, out, seed: int) -> tuple[float, float, float]:
    """(holdout accuracy untrained, holdout accuracy after EPOCHS epochs, training loss
    averaged over the epochs) of the model build() returns, at `seed`."""
    torch.manual_seed(seed)
    rt = runtime.Runtime(torch.device("cpu"))
    train = ImageLoader(splits.train.files, splits.train.labels, LoaderSettings(batch_size=32, train=True,
                        image_size=SIZE, backend="torch", workers=0, seed=5 + seed))
    holdout = ImageLoader(splits.holdout.files, splits.holdout.labels, LoaderSettings(batch_size=140,
                          train=False, image_size=SIZE, backend="torch", workers=0))
    model = build()
    untrained = evaluate_classifier(model, holdout, rt)["acc"]
    cfg = engine.FitConfig(epochs=EPOCHS, lr=0.2, warmup_epochs=1, patience=100)
    history = fit(model, train, lambda m: {"holdout_acc": evaluate_classifier(m, holdout, rt)["acc"]},
                  cfg, out, rt, {"task": "test", "model": "at_par"})["history"]
    return untrained, history[-1]["holdout_acc"], statistics.mean(h["train_loss"] for h in history)


@pytest.fixture
def one_thread():
    # The measured figures above are one thread's; a thread count sums in its own order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cubs_serial_plain_learns_at_par_with_vanilla_resnet18(tmp_path, one_thread, monkeypatch):
    with hue_jitter(HUE_JITTER):
        root = make_tiny_imagenet(tmp_path / "data", num_classes=CLASSES, train_per_class=60,
                                  val_per_class=1, image_size=SIZE, seed=21)
    splits = load_tiny_imagenet(root, holdout_per_class=20, seed=0)
    loss_gaps, holdout_gaps = [], []
    for seed in SEEDS:
        untrained_v, vanilla, loss_v = _train(lambda: ResNet18(CLASSES, width=WIDTH), splits,
                                              tmp_path / f"vanilla{seed}", seed)
        untrained_c, cubs, loss_c = _train(
            lambda: cubs_resnet18(CLASSES, width=WIDTH, d=64, placement="serial"), splits,
            tmp_path / f"cubs{seed}", seed)
        print(f"seed {seed}: holdout vanilla {untrained_v:.3f} -> {vanilla:.3f}, CUBS serial "
              f"{untrained_c:.3f} -> {cubs:.3f}; mean train loss {loss_v:.4f} vs {loss_c:.4f}")
        assert vanilla >= untrained_v + LEARNED_MARGIN and cubs >= untrained_c + LEARNED_MARGIN
        holdout_gaps.append(cubs - vanilla)
        loss_gaps.append(loss_c - loss_v)
    assert statistics.mean(holdout_gaps) >= -AT_PAR_MARGIN, f"CUBS serial below vanilla: holdout gaps {holdout_gaps}"
    assert statistics.mean(loss_gaps) <= LOSS_MARGIN, f"CUBS trains slower: loss gaps {loss_gaps}"
