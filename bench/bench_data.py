"""Training-data throughput: our ImageLoader vs a plain torchvision Dataset + DataLoader + PIL.

Both sides do the same work per image: decode the JPEG, RandomResizedCrop(scale=(0.25, 1),
ratio=(3/4, 4/3)) to S x S, random horizontal flip, to float CHW, normalise; both get the
same number of threads / worker processes (--workers) and read the same generated files:
  (a) 64 x 64 Tiny-ImageNet-like JPEGs at S=64   (goal: ours >= 3x the baseline)
  (b) 500 x 375 Cars-like JPEGs at S=224         (goal: ours >= 1.3x the baseline)
One warm-up epoch each, then rounds in which each loader runs two epochs back to back and
only the second is timed (so a change in machine load hits both, and DALI, which starts on
its next epoch as soon as one ends, gets no head start from the other loader's epoch: an
alternation epoch by epoch gave it 2 ready batches of 4 per --quick epoch, 6.46x instead of
about 3x), and the medians of the per-epoch images/s are printed. The goals
are for a 2-core CPU; the machine's load average is printed, since other jobs skew it.
No assertions. Run: python -m bench.bench_data [--workers 2] [--batch-size N] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # allow `python bench/...py`

from bench.machine import load_note  # noqa: E402
from common.loader import HAVE_DALI, MEAN, STD, ImageLoader, LoaderSettings  # noqa: E402
from common.schema import RANDOM_AREA, RANDOM_ASPECT  # noqa: E402
from common.synthetic import render_class_image  # noqa: E402


def write_jpegs(folder: Path, count: int, size: tuple[int, int], num_classes: int,
                seed: int) -> tuple[list[str], list[int]]:
    """`count` class images of `size` (w, h) as JPEG, every 17th grayscale like the fixtures."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files, labels = [], []
    for i in range(count):
        label = i % num_classes
        picture = Image.fromarray(render_class_image(label, rng, size))
        if i % 17 == 0:
            picture = picture.convert("L")
        path = folder / f"{i:06d}.JPEG"
        picture.save(path, format="JPEG", quality=90)
        files.append(str(path))
        labels.append(label)
    return files, labels


class PilFiles(torch.utils.data.Dataset):
    """The baseline: PIL decode + torchvision transforms, one image per __getitem__."""

    def __init__(self, files: list[str], labels: list[int], size: int) -> None:
        from torchvision import transforms as T
        self.files, self.labels = files, labels
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=RANDOM_AREA, ratio=RANDOM_ASPECT, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        with Image.open(self.files[index]) as im:
            image = im.convert("RGB")
        return self.transform(image), self.labels[index]


def consume(batches) -> int:
    n = 0
    for images, labels in batches:
        n += images.shape[0]
    return n


def timed(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def bench_case(name: str, files: list[str], labels: list[int], size: int, batch_size: int,
               workers: int, epochs: int, goal: float, backends: list[str]) -> None:
    ours = {b: ImageLoader(files, labels, LoaderSettings(batch_size=batch_size, train=True, image_size=size,
                           workers=workers, backend=b, seed=0)) for b in backends}
    base = torch.utils.data.DataLoader(
        PilFiles(files, labels, size), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0)
    runs: dict[str, callable] = {f"ours ({b})": (lambda e, ld=ld: consume(ld.epoch(e)))
                                 for b, ld in ours.items()}
    runs["baseline (PIL+DataLoader)"] = lambda e: consume(base)
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for label, run in runs.items():
        run(0)  # warm-up
    for round_ in range(epochs):
        for label, run in runs.items():
            run(2 * round_ + 1)  # untimed: what a loader prepares after it counts for itself only
            n, seconds = timed(lambda: run(2 * round_ + 2))
            rates[label].append(n / seconds)
    baseline = statistics.median(rates["baseline (PIL+DataLoader)"])
    print(f"\n{name}: {len(files)} files, {len(files) // batch_size * batch_size} images/epoch, "
          f"batch {batch_size}, {workers} workers, {epochs} timed epochs (medians)")
    for label, r in rates.items():
        median = statistics.median(r)
        extra = "" if label.startswith("baseline") else (
            f"   ratio {median / baseline:5.2f}x" + (f"   goal >= {goal}x" if "dali" in label else ""))
        print(f"  {label:28s} {median:9.0f} images/s   (per epoch: "
              f"{', '.join(f'{x:.0f}' for x in r)}){extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 256 for 64x64, 32 for Cars-like")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs (default 3, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="fewer files and epochs")
    parser.add_argument("--fallback", action="store_true",
                        help="also time our torch fallback backend")
    args = parser.parse_args()
    epochs = args.epochs or (2 if args.quick else 3)
    n_tiny, n_cars = (1024, 128) if args.quick else (4096, 384)
    backends = (["dali"] if HAVE_DALI else []) + (["torch"] if args.fallback or not HAVE_DALI else [])

    print(f"torch {torch.__version__}, DALI {'yes' if HAVE_DALI else 'NOT importable'}, {load_note()}")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        t0 = time.perf_counter()
        tiny = write_jpegs(Path(tmp) / "tiny", n_tiny, (64, 64), num_classes=50, seed=0)
        cars = write_jpegs(Path(tmp) / "cars", n_cars, (500, 375), num_classes=20, seed=1)
        print(f"generated {n_tiny} 64x64 + {n_cars} 500x375 JPEGs in {time.perf_counter() - t0:.1f} s")
        bench_case("(a) 64x64 Tiny-ImageNet-like -> 64", *tiny, size=64,
                   batch_size=args.batch_size or 256, workers=args.workers, epochs=epochs,
                   goal=3.0, backends=backends)
        bench_case("(b) 500x375 Cars-like -> 224", *cars, size=224,
                   batch_size=args.batch_size or 32, workers=args.workers, epochs=epochs,
                   goal=1.3, backends=backends)
    print("\n" + load_note("at the end"))


if __name__ == "__main__":
    main()
