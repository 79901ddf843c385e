"""common.loader.ImageLoader on CPU, both backends ("dali" and the torch fallback).

Fixtures are generated once per module: a 5-class Tiny-ImageNet-like set of 64 x 64 JPEGs
and a small Cars-like set of 160 x 120 JPEGs (plus a few odd sizes) for the eval_resize
path. Both contain grayscale JPEGs. Where a test needs to know which file an output came
from, it passes `labels = arange(n)` so the labels are the file indices.
"""

import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import loader as loader_module
from common.datasets import load_cars196, load_tiny_imagenet
from common.errors import ConfigError, ImageDecodeError
from common.loader import MEAN, STD, ImageLoader, LoaderSettings
from common.synthetic import make_cars196, make_tiny_imagenet, render_class_image

BACKENDS = ["dali", "torch"]
REPO_ROOT = Path(__file__).resolve().parents[1]
_MEAN = np.array(MEAN)[:, None, None]
_STD = np.array(STD)[:, None, None]

# DALI vs PIL / torchvision on the eval_resize=256 + centre crop 224 path: same geometry,
# slightly different bilinear kernels. Measured on these fixtures: mean |diff| 0.0047,
# max 0.17 (normalised units; 1 grey level is about 0.017).
CARS_MEAN_TOL = 0.01
CARS_MAX_TOL = 0.35
# 64 x 64 -> 64 x 64 is an identity resize: both decoders are libjpeg-turbo, so the
# outputs agree to float rounding (measured max 4e-7).
EXACT_TOL = 1e-5


needs_dali = pytest.mark.skipif(not loader_module.HAVE_DALI, reason="nvidia.dali not importable")


def _backend_params():
    return [pytest.param("dali", marks=needs_dali), "torch"]


def make(files, labels, backend, **kw):
    kw.setdefault("workers", 2 if backend == "dali" else 0)  # DALI: threads; torch: in-process
    return ImageLoader(files, labels, LoaderSettings(backend=backend, **kw))


def collect(loader, epoch=0, start=0):
    images, labels = [], []
    for x, y in loader.epoch(epoch, start):
        images.append(x.clone())
        labels.append(y.clone())
    return images, labels


def pil_reference(path, image_size, eval_resize=None):
    """PIL open -> RGB -> resize (DALI's geometry) -> normalise, as float64 C x H x W."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    if eval_resize:
        w, h = im.size
        scale = eval_resize / min(w, h)
        nw, nh = math.floor(w * scale + 0.5), math.floor(h * scale + 0.5)
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - image_size + 1) // 2, (nh - image_size + 1) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
    elif im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BILINEAR)
    a = np.asarray(im, dtype=np.float64).transpose(2, 0, 1) / 255
    return (a - _MEAN) / _STD


def is_grayscale(path):
    with Image.open(path) as im:
        return im.mode == "L"


def to_pixels(x):
    """Undo the normalisation: C x H x W tensor -> 0..255 float64."""
    return (x.double().numpy() * _STD + _MEAN) * 255


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_tiny_imagenet(tmp_path_factory.mktemp("tiny"), num_classes=5, train_per_class=12,
                              val_per_class=4, image_size=64, seed=0)
    return load_tiny_imagenet(root, holdout_per_class=2, seed=0)


@pytest.fixture(scope="module")
def tiny_ref(tiny):
    return np.stack([pil_reference(f, 64) for f in tiny.test.files])


@pytest.fixture(scope="module")
def cars_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cars")
    splits = load_cars196(make_cars196(root / "data", num_classes=4, per_class=4,
                                       image_size=(160, 120), seed=0), holdout_per_class=1)
    files = list(splits.test.files)
    # odd sizes, where rounding of the longer side / the crop offset matters; one portrait
    for i, size in enumerate([(203, 120), (301, 200), (100, 151)]):
        path = root / f"odd_{i}.jpg"
        Image.fromarray(render_class_image(i, np.random.default_rng(i), size)).save(path, quality=90)
        files.append(str(path))
    Image.open(files[0]).convert("L").save(root / "gray.jpg", quality=90)
    files.append(str(root / "gray.jpg"))
    return files


@pytest.fixture(scope="module")
def cars_outputs(cars_files):
    n = len(cars_files)
    out = {}
    for backend in BACKENDS:
        if backend == "dali" and not loader_module.HAVE_DALI:
            continue
        loader = make(cars_files, np.arange(n), backend, batch_size=4, train=False,
                      image_size=224, eval_resize=256)
        images, labels = collect(loader)
        assert torch.cat(labels).tolist() == list(range(n))
        out[backend] = torch.cat(images).double().numpy()
    return out


@pytest.fixture(scope="module")
def solid_png(tmp_path_factory):
    """A solid-colour 80 x 60 PNG (lossless), R, G and B all different."""
    path = tmp_path_factory.mktemp("solid") / "solid.png"
    Image.new("RGB", (80, 60), (200, 30, 90)).save(path)
    return str(path)


# ---- eval: shapes, dtypes, labels, values ----

@pytest.mark.parametrize("backend", _backend_params())
def test_eval_shapes_dtypes_labels_in_file_order(tiny, backend):
    test = tiny.test
    loader = make(test.files, test.labels, backend, batch_size=8, train=False, image_size=64)
    assert len(loader) == 3 and loader.num_samples == 20
    images, labels = collect(loader)
    assert [x.shape for x in images] == [(8, 3, 64, 64), (8, 3, 64, 64), (4, 3, 64, 64)]
    assert all(x.dtype == torch.float32 and x.device.type == "cpu" for x in images)
    assert all(y.dtype == torch.int64 for y in labels)
    assert torch.cat(labels).tolist() == list(test.labels)
    # a second pass (the loader is reused every validation) gives the same tensors
    again, again_labels = collect(loader)
    assert torch.equal(torch.cat(images), torch.cat(again))
    assert torch.equal(torch.cat(labels), torch.cat(again_labels))


@pytest.mark.parametrize("backend", _backend_params())
def test_eval_matches_pil_reference_64(tiny, tiny_ref, backend):
    test = tiny.test
    loader = make(test.files, test.labels, backend, batch_size=8, train=False, image_size=64)
    out = torch.cat(collect(loader)[0]).double().numpy()
    assert np.abs(out - tiny_ref).max() < EXACT_TOL


@pytest.mark.parametrize("backend", _backend_params())
def test_eval_matches_pil_reference_cars_eval_resize(cars_files, cars_outputs, backend):
    ref = np.stack([pil_reference(f, 224, eval_resize=256) for f in cars_files])
    out = cars_outputs[backend]
    assert out.shape == (len(cars_files), 3, 224, 224)
    diff = np.abs(out - ref)
    assert diff.mean() < CARS_MEAN_TOL and diff.max() < CARS_MAX_TOL
    # every image on its own, so a one-pixel shift in one image cannot hide in the mean
    assert diff.mean(axis=(1, 2, 3)).max() < CARS_MEAN_TOL


@needs_dali
def test_fallback_equals_dali_eval_64(tiny):
    test = tiny.test
    out = {b: torch.cat(collect(make(test.files, test.labels, b, batch_size=8, train=False,
                                     image_size=64))[0]) for b in BACKENDS}
    assert (out["dali"] - out["torch"]).abs().max().item() < EXACT_TOL


@needs_dali
def test_fallback_close_to_dali_cars_eval_resize(cars_outputs):
    diff = np.abs(cars_outputs["dali"] - cars_outputs["torch"])
    assert diff.mean() < CARS_MEAN_TOL and diff.max() < CARS_MAX_TOL
    assert diff.mean(axis=(1, 2, 3)).max() < CARS_MEAN_TOL


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("mode", ["eval", "eval_resize", "train"])
def test_normalisation_solid_colour_rgb_order(solid_png, backend, mode):
    kw = dict(train=mode == "train", eval_resize=72 if mode == "eval_resize" else None)
    loader = make([solid_png] * 4, [7, 7, 7, 7], backend, batch_size=4, image_size=32, **kw)
    (x,), (y,) = collect(loader)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [7, 7, 7, 7]
    # ImageNet's statistics in RGB order, written out: the ones torchvision's pretrained
    # ResNet-18 (--init imagenet) was trained with, not the loader's own constants again.
    assert (MEAN, STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = (np.array([200, 30, 90]) / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.abs(x.double().numpy() - expected[None, :, None, None]).max() < 1e-5


@pytest.mark.parametrize("backend", _backend_params())
def test_colour_jitter_changes_the_colours_of_training_images(solid_png, backend):
    """--color-jitter reaches the pipeline: 8 copies of one solid image get 8 different
    colours (a crop of a solid image is the same colour; only the jitter varies it), and
    without it all 8 are the same."""
    spread = {}
    for jitter in (0.0, 0.4):
        loader = make([solid_png] * 8, [0] * 8, backend, batch_size=8, image_size=32, train=True,
                      color_jitter=jitter, seed=0)
        (x,), _ = collect(loader)
        spread[jitter] = x[:, :, 16, 16].double().std(0)
    assert spread[0.0].max() < 1e-5 and spread[0.4].min() > 0.1, spread


@pytest.mark.parametrize("backend", _backend_params())
def test_colour_jitter_takes_all_three_steps(tmp_path, backend):
    """Brightness, contrast and saturation all act, each over [1 - j, 1 + j]. On a solid image
    the three are linear in the colour c with luma L: brightness b scales it, contrast and
    saturation (factors cf, s) both scale its chroma c - L(c) around L. So an output p gives
    b = L(p) / L(c) and f = s cf = (p - L(p)) . (c - L(c)) / (b |c - L(c)|^2). With j = 0.3
    and both steps f spans [0.49, 1.69]: 256 images reach beyond 1.42 and below 0.62 (each
    image with probability 0.063 and 0.035), which one step alone (0.7 to 1.3, plus <= 0.06
    of uint8 truncation) cannot."""
    colour = np.array([160.0, 100.0, 60.0])  # no channel clips for any factors in range
    path = tmp_path / "solid.png"
    Image.new("RGB", (40, 30), tuple(int(v) for v in colour)).save(path)
    (x,), _ = collect(make([str(path)] * 256, [0] * 256, backend, batch_size=256, image_size=8,
                           train=True, color_jitter=0.3, seed=0))
    p = np.stack([to_pixels(image)[:, 4, 4] for image in x])                          # 256 x 3
    luma = np.array([0.2989, 0.587, 0.114])  # torchvision's rgb_to_grayscale
    b = p @ luma / (colour @ luma)
    chroma = colour - colour @ luma
    f = (p - (p @ luma)[:, None]) @ chroma / (b * (chroma @ chroma))
    assert 0.65 < b.min() < 0.75 and 1.25 < b.max() < 1.35, (b.min(), b.max())
    assert 0.4 < f.min() < 0.62 and 1.42 < f.max() < 1.78, (f.min(), f.max())


@pytest.fixture(scope="module")
def exif_rotated_jpeg(tmp_path_factory):
    """A 90 x 60 JPEG whose EXIF Orientation (6) asks viewers to turn it to 60 x 90."""
    y, x = np.mgrid[0:60, 0:90]
    image = Image.fromarray(np.stack([x * 2.8, y * 4.2, np.full_like(x, 90)], -1).astype(np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path_factory.mktemp("exif") / "rotated.jpg"
    image.save(path, quality=95, exif=exif.tobytes())
    return str(path)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("eval_resize", [None, 40])
def test_exif_orientation_is_ignored_as_pil_ignores_it(exif_rotated_jpeg, backend, eval_resize):
    # Both backends must see the same pixels: DALI's decoders would rotate by default,
    # PIL's decode (the fallback, torchvision's loaders) does not.
    (x,), _ = collect(make([exif_rotated_jpeg], [0], backend, batch_size=1, train=False,
                           image_size=32, eval_resize=eval_resize))
    ref = pil_reference(exif_rotated_jpeg, 32, eval_resize=eval_resize)
    assert np.abs(x[0].double().numpy() - ref).max() < 0.1  # a rotation differs by ~3


@pytest.mark.parametrize("backend", _backend_params())
def test_training_ignores_exif_orientation_too(exif_rotated_jpeg, backend, monkeypatch):
    # The crop fixed to the whole 90 x 60 image: the output is it resized (or its mirror image).
    monkeypatch.setattr(loader_module, "RANDOM_AREA", (1.0, 1.0))
    monkeypatch.setattr(loader_module, "RANDOM_ASPECT", (1.5, 1.5))
    x, _ = collect(make([exif_rotated_jpeg] * 4, range(4), backend, batch_size=4, train=True,
                        image_size=32))
    ref = pil_reference(exif_rotated_jpeg, 32)
    for image in x[0].double().numpy():
        assert min(np.abs(image - ref).max(), np.abs(image[..., ::-1] - ref).max()) < 0.1


@pytest.mark.parametrize("decoder", [pytest.param("dali", marks=needs_dali), "pil"])
def test_the_device_cache_fill_ignores_exif_orientation_too(exif_rotated_jpeg, decoder, monkeypatch):
    if decoder == "pil":
        monkeypatch.setattr(loader_module, "HAVE_DALI", False)
    (x,), _ = collect(make([exif_rotated_jpeg], [0], "cache", batch_size=1, train=False,
                           image_size=32, workers=0))
    assert np.abs(x[0].double().numpy() - pil_reference(exif_rotated_jpeg, 32)).max() < 0.1


@pytest.mark.parametrize("backend", [*_backend_params(), pytest.param("cache", marks=needs_dali),
                                     "cache-pil"])
def test_a_16_bit_grey_png_is_scaled_to_8_bits_by_every_backend(backend, tmp_path, monkeypatch):
    # PIL's convert("RGB") clips 16-bit values at 255 (a white image); DALI scales them.
    # Named .jpg, as a dataset's file list would hold it. cache-pil: the cache filled by PIL.
    if backend == "cache-pil":
        monkeypatch.setattr(loader_module, "HAVE_DALI", False)
        backend = "cache"
    ramp = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    wide, narrow = tmp_path / "ramp16.jpg", tmp_path / "ramp8.png"
    Image.fromarray(ramp).save(wide, format="PNG")
    Image.fromarray(np.rint(ramp / 257).astype(np.uint8), "L").save(narrow)
    (x,), _ = collect(make([str(wide)], [0], backend, batch_size=1, train=False, image_size=32,
                           **({"workers": 0} if backend == "cache" else {})))
    error = np.abs(x[0].double().numpy() - pil_reference(narrow, 32)) * _STD * 255
    assert error.max() < 1.5, error.max()  # grey levels; white would be off by up to 255


@pytest.mark.parametrize("backend", _backend_params())
def test_grayscale_jpegs_give_three_identical_channels(tiny, cars_files, backend):
    test = tiny.test
    gray = [i for i, f in enumerate(test.files) if is_grayscale(f)]
    assert gray, "fixture should contain a grayscale JPEG in the eval set"
    images = torch.cat(collect(make(test.files, test.labels, backend, batch_size=8, train=False,
                                    image_size=64))[0])
    for i in gray:
        px = to_pixels(images[i])
        assert np.abs(px[0] - px[1]).max() < 1e-3 and np.abs(px[0] - px[2]).max() < 1e-3
        assert px.std() > 1  # not a blank image
    # train mode (random crop decode) and the eval_resize path too
    train = tiny.train
    train_gray = [i for i, f in enumerate(train.files) if is_grayscale(f)]
    assert train_gray
    loader = make(train.files, np.arange(len(train.files)), backend, batch_size=10, train=True,
                  image_size=48)
    for x, y in loader.epoch(0):
        for row, idx in enumerate(y.tolist()):
            if idx in train_gray:
                px = to_pixels(x[row])
                assert np.abs(px[0] - px[1]).max() < 1e-3 and np.abs(px[0] - px[2]).max() < 1e-3
    gray_car = cars_files[-1]
    assert is_grayscale(gray_car)
    (x,), _ = collect(make([gray_car], [0], backend, batch_size=1, train=False, image_size=224,
                           eval_resize=256))
    px = to_pixels(x[0])
    assert np.abs(px[0] - px[1]).max() < 1e-3 and np.abs(px[0] - px[2]).max() < 1e-3


# ---- sharding ----

@pytest.mark.parametrize("backend", _backend_params())
def test_two_shards_cover_eval_set_exactly_once(tiny, tiny_ref, backend):
    # 29 images (20 test + 9 holdout): shards of 15 and 14, last batches short
    files = tiny.test.files + tiny.holdout.files[:9]
    ref = np.concatenate([tiny_ref, np.stack([pil_reference(f, 64) for f in tiny.holdout.files[:9]])])
    seen = []
    for shard in range(2):
        loader = make(files, np.arange(len(files)), backend, batch_size=4, train=False,
                      image_size=64, shard_id=shard, num_shards=2)
        images, labels = collect(loader)
        idx = torch.cat(labels).numpy()
        assert loader.num_samples == len(idx) == (15 if shard == 0 else 14)
        # the content is that of the files the labels name
        assert np.abs(torch.cat(images).double().numpy() - ref[idx]).max() < EXACT_TOL
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(files)))


# ---- train mode ----

@pytest.mark.parametrize("backend", _backend_params())
def test_train_batches_follow_plan_and_reshuffle(tiny, backend):
    train = tiny.train
    n = len(train.files)  # 50
    loader = make(train.files, np.arange(n), backend, batch_size=8, train=True, image_size=48, seed=3)
    orders = {}
    for epoch in (0, 1, 0, 2):  # epoch 0 twice: going back rebuilds the same order
        images, labels = collect(loader, epoch)
        assert len(images) == 6 == len(loader)
        assert all(x.shape == (8, 3, 48, 48) and x.dtype == torch.float32 for x in images)
        got = [y.tolist() for y in labels]
        assert got == [b.tolist() for b in loader.batches(epoch)]
        orders.setdefault(epoch, got)
        assert orders[epoch] == got
        flat = sum(got, [])
        assert len(set(flat)) == 48  # full batches only, no repeats
    assert orders[0] != orders[1] != orders[2]


@needs_dali
def test_dali_reader_processes_give_the_planned_batches_and_eval_set(tiny, tiny_ref):
    """The GPU default reads bytes in spawned reader processes; the same path, forced on CPU."""
    train = tiny.train
    n = len(train.files)
    loader = make(train.files, np.arange(n), "dali", batch_size=8, train=True, image_size=48,
                  seed=3, reader_processes=2)
    for epoch in (0, 1):
        _, labels = collect(loader, epoch)
        assert [y.tolist() for y in labels] == [b.tolist() for b in loader.batches(epoch)]
    test = tiny.test
    evaluated = make(test.files, test.labels, "dali", batch_size=7, train=False, image_size=64,
                     reader_processes=2)
    images, labels = collect(evaluated)
    assert torch.cat(labels).tolist() == list(test.labels)
    in_process, _ = collect(make(test.files, test.labels, "dali", batch_size=7, train=False,
                                 image_size=64))
    assert torch.allclose(torch.cat(images), torch.cat(in_process))
    # training draws come from (seed, epoch, position) in whichever process reads the bytes
    trained, _ = collect(loader, 1)
    in_process, _ = collect(make(train.files, np.arange(n), "dali", batch_size=8, train=True, image_size=48,
                                 seed=3), 1)
    assert all(torch.equal(a, b) for a, b in zip(trained, in_process))


@needs_dali
@pytest.mark.parametrize("color_jitter, tolerance", [(0.0, 0.01), (0.4, 0.01)])
def test_dali_and_torch_draw_the_same_training_augmentation(tiny, monkeypatch, color_jitter, tolerance):
    """Both backends take each image's crop box, jitter factors and flip from
    training_draws, so their training batches differ only by the decoders' and resizers'
    rounding (measured, 2026-12-08: at most 0.004 a pixel on an image's average without jitter,
    0.005 with it; 0.033 when DALI's jitter rounded where torchvision truncates). Drawn for the next position
    instead, the torch images are 0.18-0.6 away (median 0.53): the tolerance tells the two apart."""
    train = tiny.train

    def images(backend):
        loader = make(train.files, train.labels, backend, batch_size=8, train=True, image_size=32, seed=3,
                      color_jitter=color_jitter)
        return torch.cat(collect(loader, 1)[0])
    dali = images("dali")
    per_image = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3))  # noqa: E731
    assert per_image(dali, images("torch")).max() < tolerance
    draws = loader_module.training_draws
    monkeypatch.setattr(loader_module, "training_draws",
                        lambda key, positions, *rest: draws(key, np.asarray(positions) + 1, *rest))
    assert per_image(dali, images("torch")).median() > 0.2


@needs_dali
def test_train_same_batch_composition_dali_and_torch(tiny):
    train = tiny.train
    labels = {}
    for backend in BACKENDS:
        loader = make(train.files, train.labels, backend, batch_size=8, train=True, image_size=32,
                      seed=5)
        labels[backend] = [[y.tolist() for y in collect(loader, e)[1]] for e in (0, 1)]
    assert labels["dali"] == labels["torch"]
    assert labels["dali"][0] != labels["dali"][1]


@pytest.mark.parametrize("backend", _backend_params())
def test_epoch_start_yields_batches_from_k_on(tiny, backend):
    train = tiny.train
    n = len(train.files)
    loader = make(train.files, np.arange(n), backend, batch_size=8, train=True, image_size=32, seed=1)
    full_images, full = collect(loader, 2)
    part_images, part = collect(loader, 2, start=4)
    assert [y.tolist() for y in part] == [y.tolist() for y in full[4:]]
    assert [y.tolist() for y in part] == [b.tolist() for b in loader.batches(2)[4:]]
    # augmentation: a function of (seed, epoch, position in the epoch), with DALI too
    assert all(torch.equal(a, b) for a, b in zip(part_images, full_images[4:]))
    # eval: start skips batches too, same tensors as the full pass from there on
    test = tiny.test
    ev = make(test.files, np.arange(len(test.files)), backend, batch_size=8, train=False, image_size=64)
    full_images, full = collect(ev)
    part_images, part = collect(ev, 0, start=1)
    assert [y.tolist() for y in part] == [y.tolist() for y in full[1:]]
    assert all(torch.equal(a, b) for a, b in zip(part_images, full_images[1:]))
    assert torch.cat(collect(ev)[1]).tolist() == list(range(len(test.files)))  # then a full pass again


@pytest.mark.parametrize("backend", _backend_params())
def test_class_balanced_p_by_k(tiny, backend):
    train = tiny.train
    P, K = 3, 4
    loader = make(train.files, train.labels, backend, batch_size=P * K, train=True, image_size=32,
                  classes_per_batch=P, seed=2)
    labels = np.asarray(train.labels)
    n_batches = 0
    for epoch in (0, 1):
        plan = loader.batches(epoch)
        for (x, y), idx in zip(loader.epoch(epoch), plan, strict=True):
            assert x.shape == (P * K, 3, 32, 32)
            rows = y.numpy().reshape(P, K)
            assert (rows == rows[:, :1]).all() and len(np.unique(rows[:, 0])) == P
            assert y.tolist() == labels[idx].tolist()
            n_batches += 1
    assert n_batches == 2 * (len(labels) // (P * K))


def test_two_shards_take_different_p_by_k_batches_half_as_many_each(tiny):
    # Under DDP each rank must step through its own P x K batches: the same batches on both
    # ranks would train on each twice, at twice the steps of an epoch.
    train, P, K = tiny.train, 2, 4
    plans = [make(train.files, train.labels, "torch", batch_size=P * K, train=True, image_size=32,
                  classes_per_batch=P, seed=2, **shards).batches(0)
             for shards in ({}, dict(shard_id=0, num_shards=2), dict(shard_id=1, num_shards=2))]
    whole, shard0, shard1 = plans
    assert len(shard0) == len(shard1) == len(train.labels) // (2 * P * K) >= 2
    assert len(whole) == len(train.labels) // (P * K)
    assert all(not np.array_equal(a, b) for a, b in zip(shard0, shard1))
    labels = np.asarray(train.labels)
    for idx in shard0 + shard1:  # each still P classes x K images
        rows = labels[idx].reshape(P, K)
        assert (rows == rows[:, :1]).all() and len(np.unique(rows[:, 0])) == P


@pytest.mark.parametrize("backend", _backend_params())
def test_an_image_a_p_by_k_batch_repeats_is_augmented_differently_each_time(tiny, backend):
    # A class with fewer than K images is drawn with replacement (common/sampling.py). Two
    # identical crops of one image would make a positive pair at distance 0.
    train = tiny.train
    files, labels = list(train.files[:9]), np.asarray(train.labels[:9])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])  # class 2: one image, file 8
    loader = make(files, labels, backend, batch_size=4, train=True, image_size=32,
                  classes_per_batch=2, seed=0)
    repeats = 0
    for epoch in range(4):
        for (x, _), idx in zip(loader.epoch(epoch), loader.batches(epoch), strict=True):
            rows = np.flatnonzero(idx == 8)
            if len(rows) == 2:
                repeats += 1
                assert (x[rows[0]] - x[rows[1]]).abs().max() > 0.1, (epoch, idx)
    assert repeats >= 2  # the plan drew class 2 in some batches


def _one_file_outputs(file, backend, epoch, shard, n=16, **kw):
    """A train loader over n copies of one file, labelled 0..n-1, on shard `shard` of 2: its
    images in the order it yields them and their labels. Two outputs differ only by their
    augmentation draws."""
    loader = make([file] * n, np.arange(n), backend, batch_size=4, train=True, image_size=32,
                  seed=3, shard_id=shard, num_shards=2, **kw)
    images, labels = collect(loader, epoch)
    return torch.cat(images), torch.cat(labels)


def _all_differ(a, b):
    return bool(((a - b).abs().flatten(1).amax(1) > 1e-3).all())


@pytest.mark.parametrize("backend", _backend_params() + ["cache"])
def test_training_draws_differ_by_epoch_shard_and_position_and_shards_split_the_images(tiny, backend):
    file = tiny.train.files[0]
    e0s0, labels0 = _one_file_outputs(file, backend, epoch=0, shard=0)
    e1s0, _ = _one_file_outputs(file, backend, epoch=1, shard=0)
    e0s1, labels1 = _one_file_outputs(file, backend, epoch=0, shard=1)
    # the shards' batches split the images between them
    assert sorted(labels0.tolist() + labels1.tolist()) == list(range(16))
    assert _all_differ(e0s0, e1s0)  # every position: another draw in another epoch
    assert _all_differ(e0s0, e0s1)  # and on another shard
    for i in range(len(e0s0)):  # and at another position of the same epoch
        assert _all_differ(e0s0[i:i + 1], torch.cat([e0s0[:i], e0s0[i + 1:]])), i


@pytest.mark.parametrize("backend", _backend_params() + ["cache"])
def test_training_flips_about_half_the_images(tiny, backend, monkeypatch):
    # With the crop fixed to the whole image, each output is the image or its mirror image.
    monkeypatch.setattr(loader_module, "RANDOM_AREA", (1.0, 1.0))
    monkeypatch.setattr(loader_module, "RANDOM_ASPECT", (1.0, 1.0))
    images, _ = _one_file_outputs(tiny.train.files[0], backend, epoch=0, shard=0, n=32)
    (whole,), _ = collect(make([tiny.train.files[0]], [0], backend, batch_size=1, image_size=32))
    # the backend's own evaluation image; it and its mirror image differ by 0.33 on average
    mirrored = [(x - whole[0].flip(-1)).abs().mean().item() < 0.01 for x in images]
    unmirrored = [(x - whole[0]).abs().mean().item() < 0.01 for x in images]
    assert all(m != u for m, u in zip(mirrored, unmirrored))  # each is one of the two
    assert 3 <= sum(mirrored) <= 13, sum(mirrored)  # 16 draws; outside [3, 13] p < 0.5 %


@pytest.mark.parametrize("backend", ["torch", "cache"])
@pytest.mark.parametrize("workers", [0, 2])
def test_the_torch_and_cache_loaders_leave_the_global_rng_alone(tiny, workers, backend, monkeypatch):
    # Dropout draws from the global RNG, which a resume restores: an epoch of the loader
    # (or the cache fill, by PIL here) drawing from it too would give a resumed epoch
    # another dropout stream.
    monkeypatch.setattr(loader_module, "HAVE_DALI", False)
    train = tiny.train
    loader = make(train.files[:16], train.labels[:16], backend, batch_size=8, train=True,
                  image_size=64 if backend == "cache" else 32, workers=workers)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    collect(loader, 1)
    assert torch.equal(torch.rand(3), expected)


def test_torch_fallback_independent_of_worker_count(tiny):
    train = tiny.train
    out = [collect(ImageLoader(train.files[:16], train.labels[:16], LoaderSettings(batch_size=8, train=True,
                               image_size=32, seed=4, workers=w, backend="torch")), 1)
           for w in (0, 2)]
    assert all(torch.equal(a, b) for a, b in zip(out[0][0], out[1][0]))
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


# ---- errors ----

@pytest.fixture(scope="module")
def corrupt_files(tiny, tmp_path_factory):
    bad = tmp_path_factory.mktemp("corrupt") / "broken_image.JPEG"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 700, dtype=np.uint8).tobytes())
    files = list(tiny.train.files[:11])
    files.insert(9, str(bad))  # third batch of 4
    return files, str(bad)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("train", [False, True])
def test_corrupt_jpeg_raises_value_error_naming_file(corrupt_files, backend, train):
    files, bad = corrupt_files
    loader = make(files, np.arange(len(files)), backend, batch_size=4, train=train, image_size=32)
    with pytest.raises(ValueError, match=re.escape(bad)):
        for _ in loader.epoch(0):
            pass


@pytest.mark.parametrize("backend", _backend_params())
def test_a_file_gone_since_the_check_is_named_as_unreadable_not_corrupt(tiny, tmp_path, backend):
    # The torch backend called a file it could not open (removed, or no read permission)
    # "corrupt or not a JPEG/PNG"; DALI gave a FileNotFoundError traceback from inside its prefetch.
    gone = str(tmp_path / "n00000000_99.JPEG")
    files = list(tiny.train.files[:7]) + [gone]
    loader = make(files, np.arange(len(files)), backend, batch_size=4, train=True, image_size=32)
    with pytest.raises(ImageDecodeError) as err:
        for _ in loader.epoch(0):
            pass
    assert str(err.value) == f"cannot read image {gone} (No such file or directory)"


@needs_dali
def test_a_file_gone_is_one_error_line_with_dali_reader_processes_too(tiny, tmp_path):
    # The GPU's training default reads files in spawned reader processes, which raised a
    # bare Exception carrying the worker's traceback. In a process of its own: a pipeline
    # whose readers failed leaves them stuck, and a later fork or pool start in the same
    # process can hang (seen after one such failure in a pytest worker).
    gone = str(tmp_path / "n00000000_99.JPEG")
    files = list(tiny.train.files[:7]) + [gone]
    code = (f"import numpy as np\nfrom common import cli\nfrom common.loader import ImageLoader, LoaderSettings\n"
            f"files = {files!r}\n"
            f"loader = ImageLoader(files, np.arange(len(files)), LoaderSettings(backend='dali', batch_size=4, "
            f"train=True, image_size=32, workers=2, reader_processes=2))\n"
            f"def main():\n    for _ in loader.epoch(0):\n        pass\n"
            f"if __name__ == '__main__':\n    cli.run(main)\n")
    script = tmp_path / "read_gone.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == f"error: cannot read image {gone} (No such file or directory)"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@needs_dali
def test_close_ends_the_dali_reader_processes(tiny, tmp_path):
    # T4 closes Phase A's loaders before Phase B: on a GPU each training pipeline keeps its
    # reader processes (about 0.5 GB each) and a prefetched epoch otherwise. In a process of
    # its own, as the test above, and counting that process's children.
    code = f"""import os, gc, time
import numpy as np
from common.loader import ImageLoader, LoaderSettings
def children():
    me = str(os.getpid())
    return sum(1 for p in os.listdir('/proc') if p.isdigit() and _parent(p) == me)
def _parent(p):
    try:
        return open(f'/proc/{{p}}/stat').read().rsplit(')', 1)[1].split()[1]
    except OSError:
        return None
if __name__ == '__main__':
    files = {list(tiny.train.files[:16])!r}
    loader = ImageLoader(files, np.arange(16), LoaderSettings(backend='dali', batch_size=4,
                         train=True, image_size=32, workers=2, reader_processes=2))
    before = children()
    batches = sum(1 for _ in loader.epoch(0))
    during = children()
    loader.close()
    gc.collect()
    for _ in range(100):
        if children() <= before + 1:
            break
        time.sleep(0.1)
    print(batches, before, during, children(), sum(1 for _ in loader.epoch(1)))
"""
    script = tmp_path / "close.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    batches, before, during, after, batches_after = map(int, proc.stdout.split()[-5:])
    assert batches == batches_after == 4
    assert during >= before + 2  # the two readers
    assert after == during - 2  # the readers gone (multiprocessing's resource tracker stays)


@pytest.mark.parametrize("backend", ["torch", "cache"])
def test_corrupt_jpeg_torch_workers_still_value_error(corrupt_files, backend, monkeypatch):
    # cache: its fill by PIL (no DALI, e.g. a fresh Colab GPU runtime) in a worker process
    monkeypatch.setattr(loader_module, "HAVE_DALI", False)
    files, bad = corrupt_files
    loader = ImageLoader(files, np.arange(len(files)),
                         LoaderSettings(batch_size=4, train=False, image_size=32,
                                        backend=backend, workers=1))
    with pytest.raises(ImageDecodeError) as err:
        for _ in loader.epoch(0):
            pass
    # the worker's traceback is dropped: what a user sees is our one-line message
    assert str(err.value) == f"cannot decode image {bad}: corrupt or not a JPEG/PNG"


@pytest.mark.parametrize("message, expected", [
    ("DataLoader worker (pid(s) 4242) exited unexpectedly", "ConfigError"),
    ("CUDA out of memory", "RuntimeError"),
])
def test_a_dead_torch_worker_names_shared_memory_and_the_remedies(tiny, monkeypatch, message, expected):
    # A worker killed by a bus error (a container's 64 MB /dev/shm) surfaces in the main
    # process as this RuntimeError; any other RuntimeError passes through unchanged.
    def die(self, index):
        raise RuntimeError(message)
    monkeypatch.setattr(loader_module._AugmentedFiles, "__getitem__", die)
    loader = make(tiny.train.files, np.arange(len(tiny.train.files)), "torch", batch_size=8,
                  train=True, image_size=64, workers=0)
    with pytest.raises(Exception) as err:
        next(loader.epoch(0))
    assert type(err.value).__name__ == expected and message in str(err.value)
    if expected == "ConfigError":
        assert "/dev/shm" in str(err.value) and "--workers 0" in str(err.value)
        assert "0 workers x 2 batches of 0.4 MB" in str(err.value)  # 8 x 3 x 64 x 64 x 4 B


def test_a_dead_worker_of_the_cache_fill_names_its_own_batches(tiny, monkeypatch):
    # The PIL fill hands uint8 batches of 256 through shared memory, not training batches.
    def die(self, index):
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    monkeypatch.setattr(loader_module, "HAVE_DALI", False)
    monkeypatch.setattr(loader_module._RawFiles, "__getitem__", die)
    loader = make(tiny.train.files, np.arange(len(tiny.train.files)), "cache", batch_size=8,
                  train=True, image_size=64, workers=0)
    with pytest.raises(ConfigError, match="0 workers x 2 batches of 3.0 MB"):  # 256 x 64 x 64 x 3 B
        next(loader.epoch(0))


# ---- backend choice ----

@needs_dali
def test_auto_picks_dali_when_importable(tiny):
    loader = ImageLoader(tiny.test.files, tiny.test.labels, LoaderSettings(batch_size=4, train=False,
                         image_size=64, backend="auto"))
    assert loader.backend == "dali"


def test_auto_falls_back_to_torch_and_logs_once(tiny, monkeypatch, caplog):
    monkeypatch.setattr(loader_module, "HAVE_DALI", False)
    monkeypatch.setattr(loader_module, "_fallback_logged", False)
    test = tiny.test
    with caplog.at_level(logging.WARNING, logger="common.loader"):
        loaders = [ImageLoader(test.files, test.labels,
                               LoaderSettings(batch_size=8, train=False, image_size=64,
                                              backend="auto", workers=0)) for _ in range(3)]
    assert all(ld.backend == "torch" for ld in loaders)
    warnings = [r for r in caplog.records if r.name == "common.loader" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nvidia.dali" in warnings[0].getMessage()
    assert torch.cat(collect(loaders[0])[1]).tolist() == list(test.labels)
    with pytest.raises(ImportError, match="nvidia.dali"):
        ImageLoader(test.files, test.labels,
                    LoaderSettings(batch_size=8, train=False, image_size=64, backend="dali"))


def test_bad_arguments_raise_value_error(tiny):
    test = tiny.test
    with pytest.raises(ValueError, match="backend"):
        ImageLoader(test.files, test.labels,
                    LoaderSettings(batch_size=8, train=False, image_size=64, backend="gpu"))
    with pytest.raises(ValueError, match="labels"):
        ImageLoader(test.files, test.labels[:-1], LoaderSettings(batch_size=8, train=False, image_size=64))
    with pytest.raises(ValueError, match="multiple of P"):
        ImageLoader(test.files, test.labels, LoaderSettings(batch_size=10, train=True, image_size=64,
                    classes_per_batch=3))
    for jitter in (1.0, -0.1):  # a factor 1 - 1.0 = 0 or below would blacken or invert colours
        with pytest.raises(ValueError, match=r"color_jitter must be in \[0, 1\)"):
            ImageLoader(test.files, test.labels, LoaderSettings(batch_size=8, train=True, image_size=64,
                        color_jitter=jitter))


# ---------------------------------------------------------------- backend "cache"
@pytest.mark.parametrize("decoder", [pytest.param("dali", marks=needs_dali), "pil"])
def test_cache_eval_equals_the_pil_reference_and_the_torch_backend(tiny, tiny_ref, decoder, monkeypatch):
    if decoder == "pil":
        monkeypatch.setattr(loader_module, "HAVE_DALI", False)
    files, labels = tiny.test.files, tiny.test.labels
    cached = make(files, labels, "cache", batch_size=6, train=False, image_size=64, workers=0)
    images, got_labels = collect(cached)
    assert [len(y) for y in got_labels] == [6, 6, 6, 2]
    assert torch.equal(torch.cat(got_labels), torch.as_tensor(labels))
    np.testing.assert_allclose(torch.cat(images).double().numpy(), tiny_ref, atol=EXACT_TOL)
    assert len(cached.build_times) == 1  # the fill; a second pass reuses it
    collect(cached)
    assert len(cached.build_times) == 1


def test_cache_train_crops_are_the_boxes_resized_and_flipped(tiny):
    # Each output image is its box of the 64 x 64 image, enlarged to 64 x 64 (bilinear,
    # align_corners=False, as torch's interpolate), mirrored where flipped: checked image by
    # image against the decoded pixels, with the boxes and flips that training_draws gives
    # for its position in the epoch.
    files = tiny.train.files[:16]
    loader = make(files, np.arange(16), "cache", batch_size=8, train=True, image_size=64, seed=5)
    images, labels = collect(loader, epoch=2)
    draws = loader_module.training_draws((5, 2, 0), np.arange(16), np.full(16, 64), np.full(16, 64))
    boxes, flips = draws.boxes, draws.flips
    assert (boxes[:, 2] < 64).any() and flips.any() and not flips.all()  # the check has teeth
    for position, (image, index) in enumerate(zip(torch.cat(images), torch.cat(labels).tolist())):
        raw = torch.from_numpy(np.array(Image.open(files[index]).convert("RGB"))).permute(2, 0, 1).float()
        top, left, h, w = (int(v) for v in boxes[position])
        expected = torch.nn.functional.interpolate(raw[None, :, top:top + h, left:left + w], size=(64, 64),
                                                   mode="bilinear", align_corners=False)[0]
        if flips[position]:
            expected = expected.flip(-1)
        expected = (expected / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        torch.testing.assert_close(image, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_cache_output_does_not_depend_on_how_many_batches_are_augmented_per_call(tiny, monkeypatch, train):
    # On CUDA one call augments several batches: every batch, with a chunk of 1 batch (the
    # CPU's), of 4 (the last one short) or of the whole epoch, and resumed inside a chunk,
    # is the same bit for bit.
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert loader_module.cache_batches_per_call(cuda, 256, 64) == 10  # 12 MiB per batch
    assert loader_module.cache_batches_per_call(cuda, 256, 224) == 1
    assert loader_module.cache_batches_per_call(cpu, 256, 64) == 1
    n = len(tiny.train.files)
    loader = make(tiny.train.files, np.arange(n), "cache", batch_size=8, train=train, image_size=64, seed=3)
    runs = {}
    for batches_per_call in (1, 4, 1000):
        monkeypatch.setattr(loader_module, "cache_batches_per_call", lambda *_, k=batches_per_call: k)
        runs[batches_per_call] = collect(loader, epoch=1)
        resumed = collect(loader, epoch=1, start=5)
        for a, b in zip(runs[batches_per_call][0][5:], resumed[0], strict=True):
            assert torch.equal(a, b)
    assert len(runs[1][0]) == len(loader) > 5 and len(loader) % 4  # chunks of 4 end short
    for batches_per_call in (4, 1000):
        for a, b in zip(runs[1][0], runs[batches_per_call][0], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(runs[1][1], runs[batches_per_call][1], strict=True):
            assert torch.equal(a, b)


def test_cache_train_batches_follow_the_plan_and_resume_mid_epoch(tiny):
    n = len(tiny.train.files)
    loader = make(tiny.train.files, np.arange(n), "cache", batch_size=8, train=True, image_size=64, seed=3)
    images, labels = collect(loader, epoch=1)
    assert [y.tolist() for y in labels] == [b.tolist() for b in loader.batches(1)]
    resumed, resumed_labels = collect(loader, epoch=1, start=2)
    for a, b in zip(images[2:], resumed, strict=True):
        assert torch.equal(a, b)
    other_epoch, _ = collect(loader, epoch=2)
    assert not torch.equal(torch.cat(images).mean(0), torch.cat(other_epoch).mean(0))


@pytest.mark.parametrize("height, width", [(64, 64), (375, 500), (500, 375)])
def test_training_draws_follow_the_random_resized_crop_rule(height, width):
    n = 20000
    draws = loader_module.training_draws((0, 0, 0), np.arange(n), np.full(n, height), np.full(n, width), 0.4)
    top, left, h, w = draws.boxes.T
    assert ((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width)).all()
    inner = (h < height) & (w < width)  # such boxes reach every edge: the offsets take all values
    assert ((top == 0) & inner).any() and ((top + h == height) & inner).any()
    assert ((left == 0) & inner).any() and ((left + w == width) & inner).any()
    area = h * w / (height * width)
    # 5/8 on average for the first try; tries that do not fit are mostly large ones (0.57 at
    # 64 x 64, 0.52 at 500 x 375)
    assert area.min() >= 0.24 and area.max() <= 1.0 and 0.5 < area.mean() < 0.6
    aspect = w / h
    # Rounding to whole pixels widens 3/4..4/3 a little at 64 px; boxes with no fitting
    # try in 10 are the whole image (aspect 1 at 64 x 64).
    assert aspect.min() > 0.7 and aspect.max() < 1.43
    assert 0.48 < draws.flips.mean() < 0.52
    assert draws.jitter.shape == (n, 3) and 0.6 <= draws.jitter.min() and draws.jitter.max() <= 1.4
    assert np.allclose(draws.jitter.mean(axis=0), 1, atol=0.01)
    # a pure function of (key, position): any subset, in any order, gets the same draws
    some = np.array([19999, 5, 777])
    again = loader_module.training_draws((0, 0, 0), some, np.full(3, height), np.full(3, width), 0.4)
    assert (again.boxes == draws.boxes[some]).all() and (again.flips == draws.flips[some]).all()
    assert (again.jitter == draws.jitter[some]).all()
    for key in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):  # seed, epoch, shard each change every draw
        other = loader_module.training_draws(key, np.arange(n), np.full(n, height), np.full(n, width), 0.4)
        assert (other.boxes != draws.boxes).any(axis=1).mean() > 0.99
    plain = loader_module.training_draws((0, 0, 0), np.arange(n), np.full(n, height), np.full(n, width))
    assert plain.jitter.shape == (n, 0) and (plain.boxes == draws.boxes).all()  # jitter takes its own draws


@pytest.mark.parametrize("height, width", [(64, 64), (375, 500)])
def test_training_draws_are_distributed_as_torchvisions_and_independent(height, width):
    # The test above checks each draw's range and mean; a top and left taken from one uniform
    # (crops on the diagonal), a flip tied to the crop's position, a uniform (not log-uniform)
    # aspect or three equal jitter factors passed it. Reference: torchvision's get_params,
    # sampled as often, with the same area and aspect ranges.
    from torchvision.transforms import RandomResizedCrop
    n = 20000
    draws = loader_module.training_draws((0, 0, 0), np.arange(n), np.full(n, height), np.full(n, width), 0.4)
    torch.manual_seed(0)
    reference = np.array([RandomResizedCrop.get_params(torch.zeros(1, height, width), scale=list(
        loader_module.RANDOM_AREA), ratio=list(loader_module.RANDOM_ASPECT)) for _ in range(n)])

    def described(boxes):  # quantiles of log aspect and of area, and where the box sits
        top, left, h, w = boxes.T.astype(float)
        q = [0.1, 0.25, 0.5, 0.75, 0.9]
        return np.log(w / h), h * w / (height * width), top / np.maximum(height - h, 1), left / np.maximum(width - w, 1), q
    ours, theirs = described(draws.boxes), described(reference)
    q = ours[-1]
    for a, b in zip(ours[:4], theirs[:4]):  # sampling error of these quantiles: about 0.005-0.01
        assert np.abs(np.quantile(a, q) - np.quantile(b, q)).max() < 0.03, (np.quantile(a, q), np.quantile(b, q))
    log_aspect, area, top_at, left_at = ours[:4]
    moved = (top_at > 0) | (left_at > 0)
    columns = np.stack([top_at[moved], left_at[moved], draws.flips[moved], log_aspect[moved], area[moved],
                        *draws.jitter[moved].T])
    correlation = np.corrcoef(columns)
    # Area and aspect depend on each other through the "does it fit" rule (torchvision's too);
    # every other pair is drawn from its own uniform: |r| about 0.01 at n = 20000.
    independent = np.ones_like(correlation, dtype=bool)
    np.fill_diagonal(independent, False)
    independent[3, 4] = independent[4, 3] = False
    assert np.abs(correlation[independent]).max() < 0.05, correlation.round(3)


@pytest.mark.parametrize("height, width", [(64, 64), (375, 500), (100, 400), (400, 100), (7, 3)])
def test_training_draws_fall_back_to_torchvisions_centre_crop(monkeypatch, height, width):
    # An area fraction of 1.5 never fits, so every image takes the fallback: torchvision's
    # own get_params (which draws nothing once its 10 tries fail) is the reference.
    from torchvision.transforms import RandomResizedCrop
    monkeypatch.setattr(loader_module, "RANDOM_AREA", (1.5, 1.5))
    draws = loader_module.training_draws((0, 0, 0), np.arange(50), np.full(50, height), np.full(50, width))
    reference = RandomResizedCrop.get_params(torch.zeros(3, height, width), scale=[1.5, 1.5],
                                             ratio=list(loader_module.RANDOM_ASPECT))
    assert (draws.boxes == np.array(reference)).all(), (draws.boxes[0], reference)
    cut = not 3 / 4 <= width / height <= 4 / 3
    assert (reference != (0, 0, height, width)) == cut  # the wide and tall cases are cut


def test_training_draws_are_uniform_and_independent():
    """The counter-based uniforms behind training_draws: a whole epoch's worth, tested for
    the moments and the independence between neighbouring positions and columns that a
    seeded generator gives."""
    u = loader_module._uniforms((3, 1, 0), np.arange(50000), 26)
    assert u.shape == (50000, 26) and u.min() >= 0 and u.max() < 1
    assert np.allclose(u.mean(axis=0), 0.5, atol=0.01) and np.allclose(u.var(axis=0), 1 / 12, atol=0.003)
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.02  # neighbouring positions
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.02  # neighbouring columns
    histogram, _ = np.histogram(u[:, 22], bins=20, range=(0, 1))
    assert (abs(histogram - 2500) < 250).all()  # 5 standard deviations


@pytest.mark.parametrize("decoder", [pytest.param("dali", marks=needs_dali), "pil"])
def test_cache_fill_names_a_corrupt_file(corrupt_files, decoder, monkeypatch):
    if decoder == "pil":
        monkeypatch.setattr(loader_module, "HAVE_DALI", False)
    files, bad = corrupt_files
    loader = make(files, np.arange(len(files)), "cache", batch_size=4, train=True, image_size=32)
    with pytest.raises(ImageDecodeError, match=re.escape(bad)):
        next(loader.epoch(0))


def test_cache_refuses_what_it_does_not_do(tiny):
    for kw in (dict(train=True, color_jitter=0.2), dict(train=False, eval_resize=73)):
        with pytest.raises(ValueError, match="cache"):
            make(tiny.test.files, tiny.test.labels, "cache", batch_size=4, image_size=64, **kw)


def test_auto_takes_the_device_cache_on_a_gpu_only_where_it_applies(monkeypatch, tmp_path):
    # task_data's rule for --backend auto: the cache for T1-T3 on a GPU (no colour jitter, no
    # eval resize, files of the training size) while it takes at most a quarter of the GPU's
    # memory; else DALI / torch.
    from types import SimpleNamespace

    from common import runtime, task_data
    memory = {"total": 80 * 2**30}
    monkeypatch.setattr(task_data.torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=memory["total"]))
    gpu = runtime.Runtime(torch.device("cuda", 0))
    cpu = runtime.Runtime(torch.device("cpu"))
    tiny = task_data.LoaderSettings(batch_size=256, image_size=64, workers=4, backend="auto", seed=0)
    Image.new("RGB", (64, 64)).save(tmp_path / "a.JPEG")
    Image.new("RGB", (500, 375)).save(tmp_path / "car.jpg")
    n = [str(tmp_path / "a.JPEG")] * 100_000  # 1.2 GB of 64 x 64 x 3 bytes
    assert task_data._backend(tiny, n, gpu) == "cache"
    assert task_data._backend(tiny, n, cpu) == "auto"
    assert task_data._backend(task_data.LoaderSettings(**{**vars(tiny), "color_jitter": 0.2}), n, gpu) == "auto"
    cars = task_data.LoaderSettings(**{**vars(tiny), "image_size": 224, "eval_resize": 256})
    assert task_data._backend(cars, [str(tmp_path / "car.jpg")] * 8000, gpu) == "auto"  # T4: DALI
    assert task_data._backend(task_data.LoaderSettings(**{**vars(tiny), "backend": "dali"}), n, gpu) == "dali"
    # --image-size 32 on 64 px files: the cache would crop from 32 x 32 copies (blurrier
    # training crops than DALI's), so auto keeps DALI; an unreadable first file too.
    assert task_data._backend(task_data.LoaderSettings(**{**vars(tiny), "image_size": 32}), n, gpu) == "auto"
    (tmp_path / "bad.JPEG").write_bytes(b"not an image")
    assert task_data._backend(tiny, [str(tmp_path / "bad.JPEG")] + n[1:], gpu) == "auto"
    memory["total"] = 4 * 2**30  # 1.2 GB > a quarter of 4 GiB
    assert task_data._backend(tiny, n, gpu) == "auto"


@needs_dali
def test_dali_colour_jitter_is_torchvisions_brightness_contrast_saturation():
    # DALI's color_twist scaled contrast around mid-grey: 68 levels from torchvision (and the
    # torch fallback) on a half-dark image, where dark pixels went to 0. It also rounded each
    # step where torchvision truncates: 1.4 levels brighter on average over the three.
    from nvidia.dali import fn, pipeline_def
    from torchvision.transforms.v2 import functional as F
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    image[:10] //= 4
    factors = [(1.3, 1.4, 0.7), (0.7, 0.6, 1.3), (1.0, 1.0, 1.0), *(1 + 0.4 * (2 * rng.random((6, 3)) - 1))]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def jittered(b, c, s):
        x = fn.external_source(source=lambda: [image], batch=True, layout="HWC")
        return loader_module.dali_color_jitter(x, b, c, s)

    for b, c, s in factors:
        pipe = jittered(float(b), float(c), float(s))
        pipe.build()
        ours = np.array(pipe.run()[0][0]).astype(int)
        reference = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(
            torch.from_numpy(image).permute(2, 0, 1), b), c), s).permute(1, 2, 0).numpy().astype(int)
        # Float rounding at a level's edge may move a pixel by one level, rarely (1.2 % of them at most, measured).
        assert np.abs(ours - reference).max() <= 1, (b, c, s)
        assert np.mean(ours != reference) < 0.03, (b, c, s)  # measured: at most 0.012
        assert abs(np.mean(ours - reference)) < 0.05, (b, c, s)  # rounding each step: about +1.4


@needs_dali
def test_cars_eval_of_textured_photo_sized_images_agrees_between_backends(tmp_path):
    # DALI kept the exact 256 / h scale (subpixel_scale) where the fallback, as torchvision,
    # resizes to whole pixels: the 224 crops were shifted by a fraction of a pixel, about one
    # grey level apart on average on textured images (the smooth fixtures above hid it).
    files = []
    for i, size in enumerate([(500, 375), (640, 480), (667, 1000)]):
        rng = np.random.default_rng(i)
        texture = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
        picture = Image.fromarray(texture).resize(size, Image.NEAREST)  # 4 x 4 blocks: sharp edges
        picture.save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    outputs = [torch.cat(collect(make(files, np.arange(3), backend, batch_size=3, train=False, image_size=224,
                                      eval_resize=256))[0]).double().numpy() for backend in BACKENDS]
    diff = np.abs(outputs[0] - outputs[1])
    assert diff.mean(axis=(1, 2, 3)).max() < 0.006, diff.mean(axis=(1, 2, 3))  # about a third of a level


@needs_dali
@pytest.mark.parametrize("train, color_jitter, eval_resize", [(True, 0.0, None), (True, 0.4, None), (False, 0.0, 256),
                                                                (False, 0.0, None)])
def test_the_gpu_pipeline_graph_is_valid_up_to_cuda_itself(train, color_jitter, eval_resize):
    # With mixed (GPU) decoding, a GPU value passed as a named argument (the jitter's mean
    # grey as brightness_contrast's contrast_center) failed every GPU run with jitter; the
    # CPU tests never build that graph. Here it is built up to the point where DALI needs CUDA.
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the CUDA tests run the real pipeline")
    pipe = loader_module._dali_pipeline(
        source=lambda info: None, train=train, size=64, eval_resize=eval_resize,
        color_jitter=color_jitter, raw=False, decode_device="mixed", parallel=False, readers=0,
        batch_size=2, num_threads=1, device_id=0, seed=1)
    with pytest.raises(RuntimeError, match="CUDA"):  # not a ValueError about the graph
        pipe.build()


@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: GPU (mixed) decoding and jitter")
def test_gpu_training_pipeline_applies_the_same_draws_as_the_cpu_pipeline(tiny):
    # The GPU path (mixed decoding of the crop boxes, dali_color_jitter's arithmetic on GPU
    # values, the flips) runs only here.
    files, labels = tiny.train.files[:32], tiny.train.labels[:32]
    per_device = {}
    for device in ("cpu", "cuda"):
        loader = ImageLoader(files, labels, LoaderSettings(batch_size=16, train=True, image_size=32, backend="dali",
                                                           workers=2, color_jitter=0.4, device=device, seed=0))
        images = torch.cat([x.float().cpu() for x, _ in loader.epoch(0)])
        assert images.shape == (32, 3, 32, 32) and torch.isfinite(images).all()
        per_device[device] = images
    # Same boxes, factors and flips on both devices; only the decoders (nvJPEG, libjpeg-turbo)
    # and the resizers round differently. On the CPU, DALI against the torch fallback differ
    # by at most 0.005 an image with this jitter (test_dali_and_torch_draw_the_same_training_
    # augmentation), images drawn for another position by about 0.5: not measured on a GPU.
    per_image = (per_device["cpu"] - per_device["cuda"]).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 0.1, per_image
