"""From command-line settings to ready loaders: find (or generate, with --smoke) the dataset,
split it, and build the train / holdout / test `ImageLoader`s for this process's shard."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from common.datasets import DatasetSplits, find_tiny_imagenet, load_cars196, load_tiny_imagenet
from common.runtime import Runtime
from common.image_check import CACHE_NAME, check_images
from common.loader import ImageLoader
from common.synthetic import make_cars196, make_tiny_imagenet


@dataclass
class Loaders:
    train: ImageLoader
    holdout: ImageLoader
    test: ImageLoader


def tiny_imagenet(args: argparse.Namespace, rt: Runtime) -> DatasetSplits:
    """The real dataset from --data-dir (downloaded if missing), or with --smoke a generated
    miniature in --out/smoke_data (10 classes, args.image_size pixels)."""
    if args.smoke:
        root = Path(args.out) / "smoke_data" / "tiny-imagenet-200"
        if rt.is_main and not (root / "wnids.txt").exists():
            make_tiny_imagenet(root.parent, num_classes=10, train_per_class=45,
                               val_per_class=10, image_size=args.image_size, seed=1234)
        _barrier(rt)
    else:
        if rt.is_main:
            root = find_tiny_imagenet(args.data_dir, download=not args.no_download)
        _barrier(rt)
        root = find_tiny_imagenet(args.data_dir, download=False)
    splits = load_tiny_imagenet(root, holdout_per_class=args.holdout_per_class, seed=args.seed)
    check_split_images(splits, args, rt)
    return splits


def cars196(args: argparse.Namespace, rt: Runtime) -> DatasetSplits:
    """Cars196 from --data-dir (either layout), or with --smoke a generated one in --out."""
    root = Path(args.data_dir)
    if args.smoke:
        root = Path(args.out) / "smoke_data" / "cars196"
        if rt.is_main and not (root / "cars_annos.mat").exists():
            make_cars196(root, layout="cars_annos", num_classes=16, per_class=24,
                         image_size=(128, 96), seed=1234)
        _barrier(rt)
    elif (root / "cars196").is_dir():
        root = root / "cars196"
    splits = load_cars196(root, holdout_per_class=args.holdout_per_class, seed=args.seed)
    check_split_images(splits, args, rt)
    return splits


def check_split_images(splits: DatasetSplits, args: argparse.Namespace, rt: Runtime) -> None:
    """Check every image of every split (--check-images) before the first epoch, so a bad
    test image cannot end a run after all its training. Rank 0 checks, the others wait; if
    it fails, torchrun stops them. The pass is cached in the dataset folder, or in --out
    where that folder is read-only."""
    if rt.is_main:
        files = [f for s in (splits.train, splits.holdout, splits.test) for f in s.files]
        read = check_images(files, args.check_images,
                            cache=[splits.root / CACHE_NAME, Path(args.out) / CACHE_NAME],
                            advice=_CHECK_ADVICE.get(args.check_images, ""))
        if read:
            print(f"checked {read:,} image files ({args.check_images}): all readable")
    _barrier(rt)


_CHECK_ADVICE = {
    "quick": ("If these files open in an image viewer, --check-images full decodes every file "
              "instead of checking its ends; --check-images off skips the check."),
    "full": "--check-images off skips the check; training then stops at the first bad file it reads.",
}


def make_loaders(splits: DatasetSplits, args: argparse.Namespace, rt: Runtime,
                 eval_resize: int | None = None,
                 classes_per_batch: int | None = None) -> Loaders:
    """Train loader (shuffled or P x K) and exactly-once holdout / test loaders for this rank."""
    common = dict(image_size=args.image_size, device=rt.device, workers=args.workers,
                  backend=args.backend, shard_id=rt.rank, num_shards=rt.world_size)
    train = ImageLoader(splits.train.files, splits.train.labels, batch_size=args.batch_size,
                        train=True, seed=args.seed, color_jitter=args.color_jitter,
                        classes_per_batch=classes_per_batch, **common)
    holdout, test = (ImageLoader(s.files, s.labels, batch_size=args.batch_size, train=False,
                                 eval_resize=eval_resize, **common)
                     for s in (splits.holdout, splits.test))
    return Loaders(train, holdout, test)


def _barrier(rt: Runtime) -> None:
    if rt.world_size > 1:
        import torch.distributed as dist
        dist.barrier()
