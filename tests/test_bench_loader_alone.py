"""bench/loader_alone.py on CPU: it times whole epochs after a warm-up and skips the first batch."""

from __future__ import annotations

import subprocess
import sys

import torch

from bench import loader_alone
from common.datasets import load_tiny_imagenet
from common.loader import ImageLoader, LoaderSettings
from common.synthetic import make_cars196, make_tiny_imagenet
from tests.conftest import ROOT


def test_images_per_second_counts_every_timed_image_but_the_clock_starting_batch(tmp_path):
    root = make_tiny_imagenet(tmp_path, num_classes=3, train_per_class=12, val_per_class=1, image_size=16)
    split = load_tiny_imagenet(root, holdout_per_class=0).train  # 36 images
    loader = ImageLoader(split.files, split.labels, LoaderSettings(batch_size=8, train=True, image_size=16,
                         backend="torch", workers=0))
    assert len(loader) == 4  # the short last training batch is dropped
    rate, n = loader_alone.images_per_second(loader, min_batches=6, device=torch.device("cpu"))
    # 7 batches needed (6 + the one that starts the clock) -> 2 epochs of 4 -> 7 timed batches
    assert n == 7 * 8 and rate > 0


def test_a_cache_on_cuda_starts_the_clock_after_its_first_call(tmp_path, monkeypatch):
    # The device cache on CUDA augments 10 batches of 256 in one call: the 9 that come with the
    # clock-starting batch were computed before the clock and must not be counted.
    root = make_tiny_imagenet(tmp_path, num_classes=3, train_per_class=12, val_per_class=1, image_size=16)
    split = load_tiny_imagenet(root, holdout_per_class=0).train  # 36 images
    loader = ImageLoader(split.files, split.labels, LoaderSettings(batch_size=4, train=True, image_size=16,
                         backend="cache", workers=0))
    assert len(loader) == 9
    monkeypatch.setattr(loader_alone, "cache_batches_per_call", lambda device, batch, size: 3)
    rate, n = loader_alone.images_per_second(loader, min_batches=7, device=torch.device("cpu"))
    # 10 batches needed (7 + the first call's 3) -> 2 epochs of 9 -> 18 - 3 = 15 timed batches
    assert n == 15 * 4 and rate > 0


def test_command_line_prints_one_line_per_stream(tmp_path):
    make_tiny_imagenet(tmp_path, num_classes=3, train_per_class=14, val_per_class=1, image_size=16)
    make_cars196(tmp_path / "cars196", num_classes=4, per_class=3, image_size=(40, 30))
    done = subprocess.run([sys.executable, "bench/loader_alone.py", str(tmp_path), "--device", "cpu",
                           "--workers", "0", "--min-batches", "2", "--tiny-batch", "4",
                           "--cars-batch", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("loader ")]
    assert [line.split()[1:3] for line in lines] == [["tiny", "64px"], ["tiny", "64px"], ["cars", "224px"],
                                                     ["cars", "224px"]]
    assert "device cache" in lines[0]
    for line in lines:
        assert float(line.split("images/s")[0].split()[-1]) > 0


def test_a_missing_dataset_is_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, "bench/loader_alone.py", str(tmp_path / "none"), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.startswith(f"error: Tiny ImageNet folder not found: {tmp_path / 'none' / 'tiny-imagenet-200'}")


def test_device_cuda_without_a_gpu_is_a_usage_error(tmp_path):
    # It failed with "Found no NVIDIA driver" from the cache fill, as a traceback.
    if torch.cuda.is_available():
        import pytest
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    done = subprocess.run([sys.executable, "bench/loader_alone.py", str(tmp_path), "--device", "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--device cuda: torch sees no GPU here" in done.stderr, done.stderr[-2000:]
