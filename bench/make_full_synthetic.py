"""Full-size synthetic datasets for GPU throughput checks, written in parallel.

    python bench/make_full_synthetic.py --tiny /tmp/data --cars /tmp/data/cars196 --procs 16

Tiny ImageNet: 200 classes x 500 train JPEGs of 64 x 64 (100,000) + 10,000 labelled val,
in the official layout. The layout files and val split come from common.synthetic; the
train images are then topped up to 500 per class by a process pool (one seeded RNG per
image, so the result does not depend on the process count). Cars-like: 196 classes x
`--cars-per-class` JPEGs of 500 x 375 in the cars_annos layout. The pixel content is
learnable but the point here is speed: file count, sizes and formats match the real sets.
tiny-imagenet-200/FULL_SIZE_MARKER is written last: wnids.txt exists from the start, so only
the marker tells a finished set from one a kill cut short (gpu_check.sh regenerates without it).
"""
import argparse
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.synthetic import make_cars196, make_tiny_imagenet, render_class_image  # noqa: E402

FULL_SIZE_MARKER = ".full-size-complete"


def _write_train_images(job: tuple[Path, int, int, int]) -> int:
    folder, class_id, first, last = job
    for i in range(first, last):
        rng = np.random.default_rng([class_id, i])
        Image.fromarray(render_class_image(class_id, rng, (64, 64))).save(
            folder / f"{folder.parent.name}_{i}.JPEG", quality=90)
    return last - first


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", type=Path, help="folder to receive tiny-imagenet-200/")
    p.add_argument("--cars", type=Path, help="folder to receive the cars_annos layout")
    p.add_argument("--cars-per-class", type=int, default=10)
    p.add_argument("--procs", type=int, default=8)
    args = p.parse_args(argv)
    if not (args.tiny or args.cars):
        p.error("nothing to make: name --tiny DIR, --cars DIR or both")
    if args.cars_per_class < 2:  # the holdout and the P x K batches need two images of a class
        p.error(f"--cars-per-class must be >= 2, got {args.cars_per_class}")
    if args.procs < 1:
        p.error(f"--procs must be >= 1, got {args.procs}")
    if args.tiny:
        root = make_tiny_imagenet(args.tiny, num_classes=200, train_per_class=20,
                                  val_per_class=50, image_size=64, seed=0)
        jobs = [(root / "train" / f"n{c:08d}" / "images", c, start, start + 40)
                for c in range(200) for start in range(20, 500, 40)]
        with Pool(args.procs) as pool:
            total = sum(pool.imap_unordered(_write_train_images, jobs, chunksize=4))
        (root / FULL_SIZE_MARKER).write_text(f"{20 * 200 + total} train images\n")
        print(f"Tiny ImageNet-like: {root} ({20 * 200 + total} train, 10000 val JPEGs)")
    if args.cars:
        make_cars196(args.cars, layout="cars_annos", num_classes=196,
                     per_class=args.cars_per_class, image_size=(500, 375), seed=0)
        print(f"Cars-like: {args.cars} ({196 * args.cars_per_class} JPEGs of 500x375)")


if __name__ == "__main__":
    main()
