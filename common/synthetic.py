"""Miniature Tiny ImageNet and Cars196 datasets written in the exact on-disk formats.

Tests and every script's ``--smoke`` mode run on these instead of the real downloads, so
the files mirror the real ones (JPEGs, wnids.txt / words.txt / val_annotations.txt,
MATLAB ``.mat`` annotations with 1-based class ids) and include the traps the real data
has: a few single-channel JPEGs, and, in the torchvision Cars layout, the same file names
in ``cars_train/`` and ``cars_test/`` with different content.

Every class is one member of a shared parametric family (shape kind x hue x pattern
frequency), drawn at a random place, size and angle on a noisy, tinted background. A small
CNN separates the classes within a few epochs, and features learned on some classes also
separate unseen ones, which the Cars retrieval split (unseen second half of the class
ids) relies on. In the Cars set every object sits on a "scene": a saturated background of a
random hue, as a car model is photographed in many places. The scene is a class-independent
nuisance that outweighs the object in the pixels and in an untrained network's pooled
features, so retrieval needs learned features (tests/test_scripts.py, T4).
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

from common.files import atomic_file, write_text

SHAPE_KINDS = ("disc", "square", "triangle", "ring", "stripes", "checkerboard", "cross")

# Successive multiples of the golden ratio spread hues evenly over the colour wheel for any
# prefix of class ids, and consecutive ids land far apart on it.
_GOLDEN_RATIO_FRACTION = 0.6180339887498949
_HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "teal",
              "cyan", "azure", "blue", "violet", "magenta", "pink")
# Cars backgrounds ("scenes"): any hue, saturated, mid to bright; see make_cars196.
_SCENE_SATURATION = (0.5, 0.9)
_SCENE_VALUE = (0.45, 0.85)
_GRAYSCALE_EVERY = 17  # every 17th image is saved as a single-channel JPEG
# Each object's hue is its class hue +- this (0-1 wheel): colour alone gives the class away, so the
# smoke runs learn in a few epochs (bench/synthetic_options.py widens it for the ablations).
HUE_JITTER = 0.02
_JPEG_QUALITY = 90


def class_style(class_id: int) -> tuple[str, float, int]:
    """Return (shape kind, hue in [0, 1), pattern frequency) of a 0-based class id.

    Shape kind and hue both change from one class id to the next, so the first and the
    second half of any class range both cover many shapes and hues.
    """
    if class_id < 0:
        raise ValueError(f"class_id must be >= 0, got {class_id}")
    shape = SHAPE_KINDS[class_id % len(SHAPE_KINDS)]
    hue = (class_id * _GOLDEN_RATIO_FRACTION) % 1.0
    frequency = 2 + (class_id // len(SHAPE_KINDS)) % 3
    return shape, hue, frequency


def describe_class(class_id: int) -> str:
    """Readable name of a synthetic class, e.g. 'red disc 0' (the id keeps names unique)."""
    shape, hue, _ = class_style(class_id)
    return f"{_HUE_NAMES[int(hue * len(_HUE_NAMES))]} {shape} {class_id}"


def render_class_image(class_id: int, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Draw one image of a class; ``size`` is (width, height) like PIL. Returns H x W x 3 uint8."""
    image, _ = _render_with_box(class_id, rng, size)
    return image


def make_tiny_imagenet(root: str | Path, num_classes: int = 10, train_per_class: int = 40,
                       val_per_class: int = 10, image_size: int = 64, seed: int = 0) -> Path:
    """Write a miniature Tiny ImageNet to ``root/tiny-imagenet-200`` and return that folder.

    Layout as in the official zip: wnids.txt, words.txt (with extra unrelated wnids, like
    the real one), train/<wnid>/images/*.JPEG with <wnid>_boxes.txt, val/images/*.JPEG with
    val/val_annotations.txt (shuffled order, boxes), and a few unlabelled test/images.
    wnids.txt is written last, so its presence means the dataset is complete.
    """
    if num_classes < 1 or train_per_class < 1 or val_per_class < 0:
        raise ValueError("need num_classes >= 1, train_per_class >= 1, val_per_class >= 0")
    rng = np.random.default_rng(seed)
    size = (image_size, image_size)
    dataset = Path(root) / "tiny-imagenet-200"
    dataset.mkdir(parents=True, exist_ok=True)
    wnids = [f"n{i:08d}" for i in range(num_classes)]
    unrelated = [f"n9{i:07d}\tunrelated synset {i}" for i in range(3)]
    words = [f"{w}\t{describe_class(i)}" for i, w in enumerate(wnids)]
    (dataset / "words.txt").write_text("\n".join(unrelated[:2] + words + unrelated[2:]) + "\n")

    counter = 0
    for class_id, wnid in enumerate(wnids):
        images_dir = dataset / "train" / wnid / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        box_lines = []
        for i in range(train_per_class):
            name = f"{wnid}_{i}.JPEG"
            box = _write_jpeg(images_dir / name, class_id, rng, size, counter)
            counter += 1
            box_lines.append(f"{name}\t" + "\t".join(map(str, box)))
        (dataset / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(box_lines) + "\n")

    # The real val folder mixes all classes in random order, so labels can only come
    # from val_annotations.txt.
    val_classes = np.repeat(np.arange(num_classes), val_per_class)
    rng.shuffle(val_classes)
    val_dir = dataset / "val" / "images"
    val_dir.mkdir(parents=True, exist_ok=True)
    annotation_lines = []
    for i, class_id in enumerate(val_classes.tolist()):
        name = f"val_{i}.JPEG"
        box = _write_jpeg(val_dir / name, class_id, rng, size, counter)
        counter += 1
        annotation_lines.append(f"{name}\t{wnids[class_id]}\t" + "\t".join(map(str, box)))
    (dataset / "val" / "val_annotations.txt").write_text("".join(f"{line}\n" for line in annotation_lines))

    test_dir = dataset / "test" / "images"
    test_dir.mkdir(parents=True, exist_ok=True)
    for i in range(min(5, num_classes)):
        _write_jpeg(test_dir / f"test_{i}.JPEG", int(rng.integers(num_classes)), rng, size, counter)
        counter += 1
    # Written last, atomically: its presence is what marks a complete dataset, so an
    # interrupted run is not mistaken for a finished one.
    write_text(dataset / "wnids.txt", "".join(f"{w}\n" for w in wnids))
    return dataset


def make_cars196(root: str | Path, layout: str = "cars_annos", num_classes: int = 8,
                 per_class: int = 12, image_size: tuple[int, int] = (160, 120), seed: int = 0) -> Path:
    """Write a miniature Cars196 and return the root to pass to ``load_cars196``.

    ``layout="cars_annos"`` writes ``root/cars_annos.mat`` + ``root/car_ims/*.jpg``;
    ``layout="torchvision"`` writes torchvision's StanfordCars files under
    ``root/stanford_cars/`` (devkit/cars_meta.mat, devkit/cars_train_annos.mat,
    cars_test_annos_withlabels.mat, cars_train/, cars_test/), numbering train and test
    images separately so the same names occur in both folders. ``image_size`` is
    (width, height). Both layouts hold identical images for the same seed. The .mat files
    are written after the images, so their presence means the dataset is complete. Each
    object is drawn on a random saturated scene (see the module docstring).
    """
    if layout not in ("cars_annos", "torchvision"):
        raise ValueError(f"layout must be 'cars_annos' or 'torchvision', got {layout!r}")
    if num_classes < 2 or per_class < 2:
        raise ValueError("need num_classes >= 2 (train and test classes) and per_class >= 2 "
                         "(both the official train and test files get images)")
    rng = np.random.default_rng(seed)
    class_ids = np.repeat(np.arange(num_classes), per_class)
    # Like the real data, each class is split about evenly between the official train and
    # test files, and the file numbering does not follow the classes.
    is_test = np.tile(np.arange(per_class) % 2, num_classes)
    order = rng.permutation(len(class_ids))
    class_ids, is_test = class_ids[order], is_test[order]

    root = Path(root)
    dataset = root if layout == "cars_annos" else root / "stanford_cars"
    class_names = [f"Synthetic {describe_class(c)} {2000 + c % 13}" for c in range(num_classes)]
    if layout == "cars_annos":
        relative_paths = [f"car_ims/{i + 1:06d}.jpg" for i in range(len(class_ids))]
    else:
        train_number = np.cumsum(is_test == 0)
        test_number = np.cumsum(is_test == 1)
        relative_paths = [f"cars_test/{test_number[i]:05d}.jpg" if is_test[i]
                          else f"cars_train/{train_number[i]:05d}.jpg"
                          for i in range(len(class_ids))]
    for folder in {p.split("/")[0] for p in relative_paths}:
        (dataset / folder).mkdir(parents=True, exist_ok=True)

    records = []
    for counter, (class_id, relative_path) in enumerate(zip(class_ids.tolist(), relative_paths)):
        box = _write_jpeg(dataset / relative_path, class_id, rng, image_size, counter, scene=True)
        # The real .mat files hold 1-based pixel boxes and 1-based class ids as small uints.
        records.append({"relative_im_path": relative_path, "fname": relative_path.split("/")[1],
                        "bbox": [b + 1 for b in box], "class": class_id + 1})

    class_dtype = np.uint8 if num_classes < 256 else np.uint16
    if layout == "cars_annos":
        annotations = _struct_array(records, ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2",
                                              "class", "test"], class_dtype, is_test.tolist())
        _savemat(dataset / "cars_annos.mat", {"annotations": annotations, "class_names": _cell_row(class_names)})
    else:
        (dataset / "devkit").mkdir(parents=True, exist_ok=True)
        fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
        for flag, mat_path in ((0, dataset / "devkit" / "cars_train_annos.mat"),
                               (1, dataset / "cars_test_annos_withlabels.mat")):
            chosen = [r for r, t in zip(records, is_test.tolist()) if t == flag]
            annotations = _struct_array(chosen, fields, class_dtype, [flag] * len(chosen))
            _savemat(mat_path, {"annotations": annotations})
        _savemat(dataset / "devkit" / "cars_meta.mat", {"class_names": _cell_row(class_names)})
    return root


def _savemat(path: Path, content: dict) -> None:
    """Atomically, like every file the project writes: a kill leaves no half .mat file,
    whose presence would mark a complete dataset (task_data reads cars_annos.mat's)."""
    import scipy.io  # here, not at the top: only the Cars .mat files need scipy
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        scipy.io.savemat(f, content)


def _render_with_box(class_id: int, rng: np.random.Generator, size: tuple[int, int],
                     scene: bool = False) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Draw one class image; also return the shape's box (x0, y0, x1, y1), 0-based, inclusive.

    scene: a saturated background of a random hue (see make_cars196) instead of a greyish tint.
    """
    width, height = size
    shape, hue, frequency = class_style(class_id)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    background, noise = _background(rng, size, scene)  # H x W x 3 each

    short_side = min(width, height)
    radius = rng.uniform(0.2, 0.34) * short_side
    # Off-centre placement, so that no fixed pixel tells the class most of the time.
    cx = rng.uniform(0.22, 0.78) * width
    cy = rng.uniform(0.22, 0.78) * height
    angle = rng.uniform(0.0, 2.0 * np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    u = ((xs - cx) * cos + (ys - cy) * sin) / radius
    v = (-(xs - cx) * sin + (ys - cy) * cos) / radius
    mask, dark = _shape_mask(shape, frequency, u, v)

    jittered_hue = (hue + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    colour = 255.0 * np.array(colorsys.hsv_to_rgb(jittered_hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)),
                              dtype=np.float32)
    shading = (1.0 + 0.15 * np.clip(v, -1.0, 1.0)) * np.where(dark, 0.4, 1.0)  # light from one side
    foreground = colour * shading[..., None]
    foreground = foreground + 12.0 * noise
    image = np.where(mask[..., None], foreground, background)
    image = np.clip(image, 0, 255).astype(np.uint8)
    if mask.any():
        rows, cols = np.nonzero(mask)
        box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
    else:  # only for images too small to hold the shape
        box = (0, 0, width - 1, height - 1)
    return image, box


def _background(rng: np.random.Generator, size: tuple[int, int], scene: bool) -> tuple[np.ndarray, np.ndarray]:
    """An image's background and its pixel noise (which the object shares), H x W x 3 float32
    each, ``size`` (width, height): a random tint (see _render_with_box's scene) with smooth
    blotches and the noise, so that a single pixel or the mean colour alone does not give the
    class away."""
    width, height = size
    if scene:
        tint = 255.0 * np.array(colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(*_SCENE_SATURATION),
                                                    rng.uniform(*_SCENE_VALUE)))
    else:
        tint = rng.uniform(70, 180) + rng.normal(0.0, 20.0, size=3)
    blotches = _upsample_bilinear(rng.normal(0.0, 25.0, size=(4, 4, 3)).astype(np.float32), height, width)
    noise = rng.standard_normal((height, width, 3), dtype=np.float32)
    return tint.astype(np.float32) + blotches + 10.0 * noise, noise


def _shape_mask(shape: str, frequency: int, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask of a shape in its own (u, v) frame (unit radius), and the mask of its dark part."""
    distance = np.hypot(u, v)
    square = (np.abs(u) < 0.85) & (np.abs(v) < 0.85)
    no_dark = np.zeros_like(u, dtype=bool)
    if shape == "disc":
        return distance < 1.0, no_dark
    if shape == "square":
        return square, no_dark
    if shape == "triangle":
        return (v < 0.6) & (v > -1.0 + 1.8 * np.abs(u)), no_dark
    if shape == "ring":
        inner = 0.4 + 0.1 * frequency  # the frequency factor sets the ring's thickness
        return (distance < 1.0) & (distance > inner), no_dark
    if shape == "stripes":
        # Two-tone patterns keep their dark parts in the class hue, so the patch stays visible.
        return square, square & (np.sin(np.pi * (frequency + 1) * u) < 0)
    if shape == "checkerboard":
        cells = np.floor(u * (frequency + 1)) + np.floor(v * (frequency + 1))
        return square, square & (cells % 2 == 0)
    if shape == "cross":
        arm = 0.3
        return ((np.abs(u) < arm) & (np.abs(v) < 1.0)) | ((np.abs(v) < arm) & (np.abs(u) < 1.0)), no_dark
    raise ValueError(f"unknown shape kind {shape!r}; known: {SHAPE_KINDS}")


def _upsample_bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a small (h, w, c) grid to (height, width, c), columns then rows."""
    grid_h, grid_w = grid.shape[:2]

    def positions(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.linspace(0.0, n_in - 1.0, n_out, dtype=np.float32)
        low = np.minimum(t.astype(int), n_in - 2)
        return low, t - low

    x0, wx = positions(width, grid_w)
    y0, wy = positions(height, grid_h)
    columns = grid[:, x0] * (1 - wx)[None, :, None] + grid[:, x0 + 1] * wx[None, :, None]
    return columns[y0] * (1 - wy)[:, None, None] + columns[y0 + 1] * wy[:, None, None]


def _write_jpeg(path: Path, class_id: int, rng: np.random.Generator, size: tuple[int, int],
                counter: int, scene: bool = False) -> tuple[int, int, int, int]:
    """Render and save one JPEG (single-channel for every 17th counter); return its box."""
    image, box = _render_with_box(class_id, rng, size, scene)
    picture = Image.fromarray(image)
    if counter % _GRAYSCALE_EVERY == 0:
        picture = picture.convert("L")
    picture.save(path, format="JPEG", quality=_JPEG_QUALITY)
    return box


def _struct_array(records: list[dict], fields: list[str], class_dtype: type, test_flags: list[int]) -> np.ndarray:
    """A 1 x N object record array, which savemat writes as a MATLAB struct array."""
    array = np.zeros((1, len(records)), dtype=[(f, object) for f in fields])
    for i, (record, flag) in enumerate(zip(records, test_flags)):
        values = {"relative_im_path": record["relative_im_path"], "fname": record["fname"],
                  "class": class_dtype(record["class"]), "test": np.uint8(flag)}
        values.update({name: np.uint16(b) for name, b in
                       zip(("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"), record["bbox"])})
        for field in fields:
            array[field][0, i] = values[field]
    return array


def _cell_row(strings: list[str]) -> np.ndarray:
    """A 1 x N object array, which savemat writes as a MATLAB cell array."""
    cells = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        cells[0, i] = s
    return cells
