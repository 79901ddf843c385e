"""Images/s of ImageLoader alone (no model), as bench/gpu_check.sh reports it.

    python bench/loader_alone.py DATA [--device cuda] [--workers 8] [--min-batches 60]

DATA holds tiny-imagenet-200/ and cars196/ (bench/make_full_synthetic.py writes both).
Four streams: Tiny ImageNet 64 px train augmentation from the device cache (what T1-T3 use
on a GPU) and from DALI (or the torch fallback), Cars 224 px train augmentation and Cars
224 px eval (resize 256 + centre crop). Each stream runs one warm-up epoch (pipeline
build, nvJPEG state, the cache fill), then at least `--min-batches` batches over as many epochs as that
takes. The clock starts when the first batch (a cache's whole first call: on CUDA it
augments CACHE_CHUNK_BYTES of batches, 10 of 256 at 64 px, at once) has arrived, and those
batches are not timed, so that batches computed before the clock are not counted for free.
DALI's prefetch queue (a few batches) is still ahead of the clock: over the 60 or more timed
batches that counts a few percent in DALI's favour.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cli  # noqa: E402
from common.datasets import load_cars196, load_tiny_imagenet  # noqa: E402
from common.loader import ImageLoader, LoaderSettings, cache_batches_per_call  # noqa: E402


def images_per_second(loader: ImageLoader, min_batches: int, device: torch.device) -> tuple[float, int]:
    """(images/s, images timed) over whole epochs after a warm-up epoch."""
    for _ in loader.epoch(0):
        pass
    # Batches that one call makes: the clock starts when the last of the first call's has
    # arrived (and is done), so that none of those computed before it is counted.
    ahead = (cache_batches_per_call(device, loader.batch_size, loader.image_size)
             if loader.backend == "cache" else 1)
    epochs = max(1, -(-(min_batches + ahead) // len(loader)))  # ceil
    n, start, last, arrived = 0, None, None, 0
    for epoch in range(1, 1 + epochs):
        for images, labels in loader.epoch(epoch):
            arrived += 1
            if arrived <= ahead:
                if arrived == ahead:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                continue
            n += len(labels)
            last = images
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del last
    return n / (time.perf_counter() - start), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--min-batches", type=int, default=60)
    p.add_argument("--tiny-batch", type=int, default=256)
    p.add_argument("--cars-batch", type=int, default=128)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    device = torch.device(args.device)
    tiny = load_tiny_imagenet(args.data / "tiny-imagenet-200")
    cars = load_cars196(args.data / "cars196", holdout_per_class=0)  # all of classes 1-98 in train
    streams = (("tiny 64px train", tiny.train, 64, None, args.tiny_batch, "cache"),
               ("tiny 64px train", tiny.train, 64, None, args.tiny_batch, "auto"),
               ("cars 224px train", cars.train, 224, None, args.cars_batch, "auto"),
               ("cars 224px eval", cars.test, 224, 256, args.cars_batch, "auto"))
    for name, split, size, resize, batch, backend in streams:
        loader = ImageLoader(split.files, split.labels, LoaderSettings(batch_size=batch, train=resize is None,
                             image_size=size, eval_resize=resize, device=device,
                             workers=args.workers, backend=backend))
        rate, n = images_per_second(loader, args.min_batches, device)
        print(f"loader {name:18s} {describe(loader):16s} {rate:10.0f} images/s ({n} images timed, "
              f"{len(split.files)} files, batch {batch}, builds {sum(loader.build_times):.1f} s)", flush=True)


def describe(loader: ImageLoader) -> str:
    """The loader as the figures should be labelled: DALI's decode device, or the fallback."""
    if loader.backend == "cache":
        return "device cache"
    if loader.backend == "dali":
        return f"DALI {'mixed' if loader.device.type == 'cuda' else 'cpu'} decode"
    return "torch fallback"


if __name__ == "__main__":  # DALI reader processes are spawned: they re-import this file
    cli.run(main)  # a missing dataset or a bad image: one error line, as in the task scripts
