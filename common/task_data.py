"""Every dataset and loader a task script needs, from plain values (no argparse here).

    splits = tiny_imagenet(data_dir, out, rt, holdout_per_class=10, seed=0)  # or cars196(...)
    settings = LoaderSettings(batch_size=256, image_size=64, workers=4, seed=0)  # common/loader.py
    loaders = classifier_loaders(splits, settings, rt)  # train / holdout / test, this rank's shard
    test_all = whole_split_loader(splits.test, settings, rt)              # every image, any rank
    pk = pk_loader(splits.train, settings, rt, classes_per_batch=32, images_per_class=4)

A loader yields (images B x 3 x image_size x image_size float32, normalised; labels B int64).
With smoke=True the dataset is a generated miniature in out/smoke_data (SMOKE_TINY_IMAGENET
in <size>px/ at the run's image size, SMOKE_CARS196), made once by rank 0.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from common.datasets import DatasetSplits, ImageList, find_tiny_imagenet, load_cars196, load_tiny_imagenet
from common.errors import DatasetNotFoundError
from common.image_check import CACHE_NAME, check_images
from common.loader import ImageLoader, LoaderSettings
from common.runtime import Runtime, main_first

# The --smoke datasets: small enough for a CPU, learnable in a few epochs (tests/test_scripts.py).
SMOKE_TINY_IMAGENET = dict(num_classes=10, train_per_class=45, val_per_class=10, seed=1234)
SMOKE_CARS196 = dict(layout="cars_annos", num_classes=16, per_class=24, image_size=(128, 96),
                     seed=1234)


@dataclass
class Loaders:
    train: ImageLoader
    holdout: ImageLoader
    test: ImageLoader


# ---------------------------------------------------------------- datasets
def tiny_imagenet(data_dir: str | Path, out: str | Path, rt: Runtime, *, holdout_per_class: int,
                  seed: int, check: str = "quick", download: bool = True, smoke: bool = False,
                  smoke_image_size: int = 32) -> DatasetSplits:
    """Tiny ImageNet from `data_dir` (downloaded there if missing and `download`), or with
    `smoke` the generated miniature (SMOKE_TINY_IMAGENET at smoke_image_size pixels).
    `holdout_per_class` train images per class are held out (seeded); the labelled val split
    is the test split. Every image is checked first (`check`: quick, full or off)."""
    if smoke:
        # One folder per size: a rerun at another --image-size must not train on upscaled images.
        root = Path(out) / "smoke_data" / f"{smoke_image_size}px" / "tiny-imagenet-200"
        from common.synthetic import make_tiny_imagenet  # --smoke only
        # Every rank calls main_first (a collective), whatever it sees on disk meanwhile.
        main_first(rt, lambda: (root / "wnids.txt").exists() or make_tiny_imagenet(
            root.parent, image_size=smoke_image_size, **SMOKE_TINY_IMAGENET))
    else:
        main_first(rt, lambda: find_tiny_imagenet(data_dir, download=download))
        root = find_tiny_imagenet(data_dir, download=False)
    splits = load_tiny_imagenet(root, holdout_per_class=holdout_per_class, seed=seed)
    check_split_images(splits, check, out, rt, decode_test=True)
    return splits


def cars196(data_dir: str | Path, out: str | Path, rt: Runtime, *, holdout_per_class: int,
            seed: int, check: str = "quick", smoke: bool = False) -> DatasetSplits:
    """Cars196 from `data_dir` or `data_dir`/cars196 (either layout, common/datasets.py), or
    with `smoke` the generated SMOKE_CARS196. Classes 1-98 train (minus a stratified holdout
    of `holdout_per_class` images each), 99-196 test."""
    root = Path(data_dir)
    if smoke:
        root = Path(out) / "smoke_data" / "cars196"
        from common.synthetic import make_cars196  # --smoke only
        main_first(rt, lambda: (root / "cars_annos.mat").exists() or make_cars196(root, **SMOKE_CARS196))
    elif (root / "cars196").is_dir():
        root = root / "cars196"
    try:
        splits = load_cars196(root, holdout_per_class=holdout_per_class, seed=seed)
    except DatasetNotFoundError as err:
        if smoke or root.name == "cars196":
            raise
        # README's Data section puts it in data/cars196/: say that this subfolder counts too.
        raise DatasetNotFoundError(f"{err}\n(read from --data-dir, or from its cars196/ subfolder when "
                                   f"that exists, as README's Data section places it: data/cars196/)") from None
    check_split_images(splits, check, out, rt)
    return splits


def check_split_images(splits: DatasetSplits, check: str, out: str | Path, rt: Runtime,
                       decode_test: bool = False) -> None:
    """Check every image of every split (`check`) before the first epoch, so a bad test image
    cannot end a run after all its training. decode_test: with `check` quick, also decode
    the test split in full, for a task that reads it only after training (T1-T3: a JPEG
    damaged inside, with whole ends, passes the quick check; Tiny ImageNet's 10,000 test
    images take seconds). Rank 0 checks, the others wait (runtime.main_first). Each pass is
    cached in the dataset folder, or in `out` where that folder is read-only."""
    def check_all() -> None:
        cache = [splits.root / CACHE_NAME, Path(out) / CACHE_NAME]
        files = [f for s in (splits.train, splits.holdout, splits.test) for f in s.files]
        read = check_images(files, check, cache=cache, advice=_CHECK_ADVICE.get(check, ""))
        if read:
            print(f"checked {read:,} image files ({check}): all readable")
        if check == "quick" and decode_test:
            read = check_images(splits.test.files, "full", cache=cache, advice=_TEST_DECODE_ADVICE)
            if read:
                print(f"decoded the {read:,} test images: all whole")
    main_first(rt, check_all)


_TEST_DECODE_ADVICE = ("The test split is read only after training, so it is decoded in full up front: "
                       "--check-images off skips every check.")
_CHECK_ADVICE = {
    "quick": ("If these files open in an image viewer, --check-images full decodes every file "
              "instead of checking its ends; --check-images off skips the check."),
    "full": "--check-images off skips the check; training then stops at the first bad file it reads.",
}


# ---------------------------------------------------------------- loaders
def classifier_loaders(splits: DatasetSplits, s: LoaderSettings, rt: Runtime) -> Loaders:
    """This rank's shard of each split: train reshuffled and augmented every epoch (full
    batches), holdout and test every image exactly once across ranks, in order."""
    return Loaders(train=_loader(splits.train, s, rt, train=True),
                   holdout=_loader(splits.holdout, s, rt, train=False),
                   test=_loader(splits.test, s, rt, train=False))


def whole_split_loader(split: ImageList, s: LoaderSettings, rt: Runtime) -> ImageLoader:
    """Every image of `split` in this process, unsharded: for retrieval, where each query
    needs every other image as a candidate."""
    return _loader(split, s, rt, train=False, sharded=False)


def pk_loader(split: ImageList, s: LoaderSettings, rt: Runtime, *, classes_per_batch: int,
              images_per_class: int) -> ImageLoader:
    """Augmented training batches of P = classes_per_batch classes x K = images_per_class
    images each (batch P x K; s.batch_size is not used), sharded across ranks."""
    return _loader(split, s, rt, train=True, batch_size=classes_per_batch * images_per_class,
                   classes_per_batch=classes_per_batch)


def _loader(split: ImageList, s: LoaderSettings, rt: Runtime, *, train: bool, sharded: bool = True,
            batch_size: int | None = None, classes_per_batch: int | None = None) -> ImageLoader:
    shards = dict(shard_id=rt.rank, num_shards=rt.world_size) if sharded else {}
    # Training never centre-crops (no eval_resize); evaluation never jitters, and its seed is
    # fixed at 0 so that an evaluation pipeline does not depend on --seed.
    augment = dict(eval_resize=None) if train else dict(seed=0, color_jitter=0.0)
    return ImageLoader(split.files, split.labels, replace(
        s, batch_size=batch_size or s.batch_size, train=train, device=rt.device,
        backend=_backend(s, split.files, rt), classes_per_batch=classes_per_batch,
        **shards, **augment))


def _backend(s: LoaderSettings, files: list[str], rt: Runtime) -> str:
    """"auto" on a GPU: the device cache (decode once, augment on the GPU; common/loader.py)
    where it does what the run asks (no colour jitter, no eval resize: T1-T3 on Tiny
    ImageNet, 1.2 GB), the files are S x S already, and it takes at most a quarter of the
    GPU's memory; else DALI or torch. The cache stores S x S images and crops from them, so
    at another --image-size its training crops would be enlarged from fewer pixels (a 25 %
    crop at S = 32: 16 x 16 stored pixels) than DALI's and the fallback's, which crop the
    file first: blurrier training images than the evaluation's."""
    if s.backend != "auto" or not rt.cuda or s.color_jitter or s.eval_resize:
        return s.backend
    if not files or _stored_size(files[0]) != (s.image_size, s.image_size):  # the first file stands for all
        return s.backend
    cache_bytes = len(files) * s.image_size ** 2 * 3
    fits = cache_bytes <= torch.cuda.get_device_properties(rt.device).total_memory / 4
    return "cache" if fits else s.backend


def _stored_size(path: str) -> tuple[int, int] | None:
    """(width, height) from an image file's header; None when it cannot be read (the loader
    names the file then)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, Image.DecompressionBombError):
        return None
