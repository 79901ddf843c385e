"""Dataset readers against generated miniature datasets: labels, splits, layouts and errors."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from common.datasets import CARS196_LAYOUTS, holdout_split, load_cars196, load_tiny_imagenet
from common.errors import DatasetError
from common.synthetic import SHAPE_KINDS, class_style, make_cars196, make_tiny_imagenet, render_class_image

TINY_CLASSES, TINY_TRAIN, TINY_VAL = 5, 12, 4
CARS_CLASSES, CARS_PER_CLASS = 6, 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_imagenet(tmp_path_factory.mktemp("tiny"), num_classes=TINY_CLASSES,
                              train_per_class=TINY_TRAIN, val_per_class=TINY_VAL, image_size=32, seed=3)


@pytest.fixture(scope="module")
def cars_annos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cars196(tmp_path_factory.mktemp("cars_a"), "cars_annos", num_classes=CARS_CLASSES,
                        per_class=CARS_PER_CLASS, image_size=(48, 36), seed=5)


@pytest.fixture(scope="module")
def cars_torchvision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cars196(tmp_path_factory.mktemp("cars_tv"), "torchvision", num_classes=CARS_CLASSES,
                        per_class=CARS_PER_CLASS, image_size=(48, 36), seed=5)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    """A private copy to break, so the shared module fixtures stay intact."""
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def file_md5(path: str) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- holdout_split

def test_holdout_split_is_stratified_disjoint_complete_and_seeded() -> None:
    labels = [0] * 7 + [1] * 5 + [2] * 9
    rng = np.random.default_rng(0)
    labels = rng.permutation(labels).tolist()
    train, holdout = holdout_split(labels, per_class=3, seed=1)
    assert Counter(labels[i] for i in holdout) == {0: 3, 1: 3, 2: 3}
    assert set(train).isdisjoint(holdout)
    assert sorted(train + holdout) == list(range(len(labels)))
    assert train == sorted(train) and holdout == sorted(holdout)
    assert holdout_split(labels, 3, seed=1) == (train, holdout)
    assert any(holdout_split(labels, 3, seed=s)[1] != holdout for s in range(2, 6))
    assert holdout_split(labels, 0, seed=1) == (list(range(len(labels))), [])


def test_holdout_split_refuses_to_empty_a_class() -> None:
    with pytest.raises(ValueError, match="class 1 has 5 images"):
        holdout_split([0] * 7 + [1] * 5, per_class=5, seed=0)


# ---------------------------------------------------------------- Tiny ImageNet

def test_tiny_train_labels_follow_wnid_folders_and_words(tiny: Path) -> None:
    splits = load_tiny_imagenet(tiny, holdout_per_class=2, seed=0)
    wnids = (tiny / "wnids.txt").read_text().split()
    words = dict(line.split("\t") for line in (tiny / "words.txt").read_text().splitlines())
    assert splits.layout == "tiny-imagenet-200" and splits.root == tiny.resolve()
    assert splits.train.classes == [words[w] for w in wnids]
    for part in (splits.train, splits.holdout):
        for file, label in zip(part.files, part.labels):
            assert Path(file).is_absolute() and Path(file).parent.parent.name == wnids[label]
    assert len(splits.train) + len(splits.holdout) == TINY_CLASSES * TINY_TRAIN


def test_tiny_test_split_comes_from_val_annotations(tiny: Path) -> None:
    splits = load_tiny_imagenet(tiny, holdout_per_class=2)
    wnids = (tiny / "wnids.txt").read_text().split()
    expected = {}
    for line in (tiny / "val" / "val_annotations.txt").read_text().splitlines():
        name, wnid, *box = line.split("\t")
        assert len(box) == 4
        expected[str(tiny / "val" / "images" / name)] = wnids.index(wnid)
    assert splits.test.files == sorted(expected)
    assert splits.test.labels == [expected[f] for f in splits.test.files]
    assert Counter(splits.test.labels) == {c: TINY_VAL for c in range(TINY_CLASSES)}
    assert splits.test.classes == splits.train.classes


def test_the_fingerprint_follows_the_files_and_labels_not_the_folder(tiny: Path, tmp_path: Path) -> None:
    # What a resume compares (checkpoint meta "data"): the same dataset moved matches.
    original = load_tiny_imagenet(tiny, holdout_per_class=1).fingerprint()
    n_train = TINY_CLASSES * (TINY_TRAIN - 1)
    assert original.startswith(f"{n_train} train, {TINY_CLASSES} holdout and ")
    assert original.endswith(f" test images of {TINY_CLASSES} classes (names and labels sha256 "
                             f"{original[-13:-1]})")
    root = copy_of(tiny, tmp_path / "moved")
    assert load_tiny_imagenet(root, holdout_per_class=1).fingerprint() == original
    assert load_tiny_imagenet(root, holdout_per_class=1, seed=1).fingerprint() != original  # another holdout
    wnids = (root / "wnids.txt").read_text().split()  # the same files and counts, other labels
    (root / "wnids.txt").write_text("\n".join(wnids[::-1]) + "\n")
    relabelled = load_tiny_imagenet(root, holdout_per_class=1).fingerprint()
    assert relabelled != original and relabelled[:-14] == original[:-14]
    next((root / "train" / wnids[0] / "images").iterdir()).unlink()
    assert load_tiny_imagenet(root, holdout_per_class=1).fingerprint().startswith(f"{n_train - 1} train, ")


def test_tiny_label_order_is_wnids_txt_line_order(tiny: Path, tmp_path: Path) -> None:
    root = copy_of(tiny, tmp_path)
    wnids = (root / "wnids.txt").read_text().split()
    reordered = wnids[::-1]
    (root / "wnids.txt").write_text("\n".join(reordered) + "\n")
    # A wnid that words.txt does not name keeps its wnid as its name.
    words = (root / "words.txt").read_text().splitlines()
    (root / "words.txt").write_text("\n".join(l for l in words if not l.startswith(reordered[0])) + "\n")
    splits = load_tiny_imagenet(root, holdout_per_class=1)
    assert splits.train.classes[0] == reordered[0]
    for file, label in zip(splits.train.files, splits.train.labels):
        assert Path(file).parent.parent.name == reordered[label]
    original = load_tiny_imagenet(tiny, holdout_per_class=1)
    assert [TINY_CLASSES - 1 - label for label in original.test.labels] == splits.test.labels


def test_tiny_holdout_is_stratified_disjoint_and_deterministic(tiny: Path) -> None:
    splits = load_tiny_imagenet(tiny, holdout_per_class=3, seed=7)
    assert Counter(splits.holdout.labels) == {c: 3 for c in range(TINY_CLASSES)}
    assert set(splits.train.files).isdisjoint(splits.holdout.files)
    on_disk = {str(p) for p in (tiny / "train").glob("*/images/*.JPEG")}
    assert set(splits.train.files) | set(splits.holdout.files) == on_disk
    assert splits.train.files == sorted(splits.train.files, key=lambda f: (Path(f).parent.parent.name, f))
    again = load_tiny_imagenet(tiny, holdout_per_class=3, seed=7)
    assert again.holdout.files == splits.holdout.files
    assert load_tiny_imagenet(tiny, holdout_per_class=3, seed=8).holdout.files != splits.holdout.files


def test_tiny_errors_name_the_path_and_the_layout(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found.*nowhere(.|\n)*wnids.txt"):
        load_tiny_imagenet(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"missing {empty / 'wnids.txt'}")):
        load_tiny_imagenet(empty)
    with pytest.raises(ValueError, match=re.escape(f"--holdout-per-class {TINY_TRAIN} is too large for "
                                                   f"the train split in {tiny}: class '") + f"[^']+' has {TINY_TRAIN} images"):
        load_tiny_imagenet(tiny, holdout_per_class=TINY_TRAIN)


def test_a_wnid_listed_twice_is_refused(tiny: Path, tmp_path: Path) -> None:
    root = copy_of(tiny, tmp_path)
    wnids = (root / "wnids.txt").read_text().split()
    (root / "wnids.txt").write_text("\n".join(wnids + wnids[:1]) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"lists wnids more than once: ['{wnids[0]}']")):
        load_tiny_imagenet(root)


def test_bad_labels_and_holdout_sizes_are_dataset_errors() -> None:
    from common.datasets import ImageList
    with pytest.raises(DatasetError, match=r"labels must lie in 0\.\.0, got 1\.\.1"):
        ImageList(["a.jpg"], [1], ["only class"])
    with pytest.raises(DatasetError, match="per_class must be >= 0"):
        holdout_split([0, 0, 1, 1], -1, 0)


def test_an_odd_number_of_cars_classes_puts_the_extra_one_in_the_test_half(tmp_path: Path) -> None:
    root = make_cars196(tmp_path, num_classes=5, per_class=4, image_size=(32, 24))
    splits = load_cars196(root, holdout_per_class=1)
    assert (len(splits.train.classes), len(splits.test.classes)) == (2, 3)
    assert sorted(set(splits.test.labels)) == [0, 1, 2] and len(splits.test.files) == 12


def test_tiny_missing_wnid_folder(tiny: Path, tmp_path: Path) -> None:
    root = copy_of(tiny, tmp_path)
    shutil.rmtree(root / "train" / "n00000002")
    with pytest.raises(FileNotFoundError, match="n00000002/images for wnid n00000002"):
        load_tiny_imagenet(root)


def test_tiny_bad_val_annotations(tiny: Path, tmp_path: Path) -> None:
    root = copy_of(tiny, tmp_path)
    annotations = root / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    annotations.write_text("\n".join(lines + ["val_0.JPEG\tn99999999\t0\t0\t5\t5"]) + "\n")
    with pytest.raises(ValueError, match=f"line {len(lines) + 1}: wnid 'n99999999' is not listed"):
        load_tiny_imagenet(root)
    annotations.write_text("\n".join(lines + ["val_missing.JPEG\tn00000000\t0\t0\t5\t5"]) + "\n")
    with pytest.raises(FileNotFoundError, match="val_missing.JPEG does not exist"):
        load_tiny_imagenet(root)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("name", ["wnids.txt", "val/val_annotations.txt"])
def test_tiny_text_files_that_are_not_utf8_name_the_file_and_line(tiny: Path, tmp_path: Path, name: str,
                                                                  newline: str) -> None:
    # Both ended in a bare UnicodeDecodeError traceback, with neither file nor line. The line
    # is counted as the readers count lines: an old Mac file's bare \r ends a line too.
    root = copy_of(tiny, tmp_path)
    path = root / name
    lines = path.read_text().splitlines()
    path.write_bytes(newline.join(lines[:2] + ["caf"]).encode() + b"\xe9" + newline.encode())
    with pytest.raises(DatasetError) as err:
        load_tiny_imagenet(root)
    assert str(err.value).startswith(f"{path}, line 3: not UTF-8 text (byte 0xe9); is it the file "
                                     "Tiny ImageNet's zip holds?\n")


def test_tiny_space_separated_val_annotations_get_the_layout_error(tiny: Path, tmp_path: Path) -> None:
    # A copy edited by hand (or by a tool that turned tabs into spaces): one field per line.
    root = copy_of(tiny, tmp_path)
    annotations = root / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    annotations.write_text("\n".join([lines[0].replace("\t", " ")] + lines[1:]) + "\n")
    with pytest.raises(DatasetError, match=r"line 1: expected file<TAB>wnid<TAB>x0"):
        load_tiny_imagenet(root)


def test_tiny_empty_train_folder_is_refused(tiny: Path, tmp_path: Path) -> None:
    # A class with no training image would be trained on as if it existed.
    root = copy_of(tiny, tmp_path)
    for image in (root / "train" / "n00000000" / "images").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match=r"no \.JPEG images in .*n00000000/images"):
        load_tiny_imagenet(root)


def test_tiny_val_images_without_annotation_or_a_class_without_val_images_are_refused(
        tiny: Path, tmp_path: Path) -> None:
    # A cut or partly copied val_annotations.txt gave a smaller test split, silently.
    root = copy_of(tiny, tmp_path)
    annotations = root / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    annotations.write_text("\n".join(lines[:-2]) + "\n")
    first = sorted(line.split("\t")[0] for line in lines[-2:])[0]
    with pytest.raises(DatasetError, match=f"2 images in .*val/images have no line in .*val_annotations.txt, "
                                           f"first: {first}"):
        load_tiny_imagenet(root)
    wnid = lines[0].split("\t")[1]
    kept = [line for line in lines if line.split("\t")[1] != wnid]
    for line in lines:
        if line.split("\t")[1] == wnid:
            (root / "val" / "images" / line.split("\t")[0]).unlink()
    annotations.write_text("\n".join(kept) + "\n")
    with pytest.raises(DatasetError, match=f"gives no image to 1 of the .* wnids, first: {wnid}"):
        load_tiny_imagenet(root)


def test_tiny_hidden_files_beside_the_images_are_not_images(tiny: Path, tmp_path: Path) -> None:
    # macOS writes "._<name>" metadata beside each file copied to an exFAT or SMB drive.
    root = copy_of(tiny, tmp_path)
    before = load_tiny_imagenet(root)
    for folder in (root / "train" / "n00000000" / "images", root / "val" / "images"):
        for image in list(folder.iterdir())[:3]:
            (folder / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07" + bytes(20))
    after = load_tiny_imagenet(root)
    assert (after.train.files, after.holdout.files, after.test.files) == \
        (before.train.files, before.holdout.files, before.test.files)


def test_tiny_val_image_annotated_twice_is_refused(tiny: Path, tmp_path: Path) -> None:
    root = copy_of(tiny, tmp_path)
    annotations = root / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    annotations.write_text("\n".join(lines + [lines[0]]) + "\n")
    name = lines[0].split("\t")[0]
    with pytest.raises(ValueError, match=f"line {len(lines) + 1}: {name} is annotated more than once"):
        load_tiny_imagenet(root)


def test_tiny_fixture_looks_like_the_real_dataset(tiny: Path) -> None:
    assert len(list((tiny / "test" / "images").glob("*.JPEG"))) > 0
    assert (tiny / "train" / "n00000000" / "n00000000_boxes.txt").is_file()
    modes = Counter(Image.open(p).mode for p in tiny.rglob("*.JPEG"))
    assert modes["L"] >= 2 and modes["RGB"] > 10 * modes["L"]
    train_gray = [p for p in (tiny / "train").rglob("*.JPEG") if Image.open(p).mode == "L"]
    assert train_gray, "the train split should contain single-channel JPEGs"
    # val mixes the classes, as the real one: val_0, val_1, ... are not in class order
    wnids = [line.split("\t")[1] for line in (tiny / "val" / "val_annotations.txt").read_text().splitlines()]
    assert wnids != sorted(wnids) and Counter(wnids) == {w: TINY_VAL for w in set(wnids)}


# ---------------------------------------------------------------- Cars196

def read_cars_annos_classes(root: Path) -> dict[str, int]:
    """Path -> 1-based class id straight from the .mat, independent of the reader."""
    mat = scipy.io.loadmat(root / "cars_annos.mat")
    annotations = mat["annotations"][0]
    return {str(root / a["relative_im_path"][0]): int(a["class"][0, 0]) for a in annotations}


def test_cars_split_by_class_id(cars_annos: Path) -> None:
    splits = load_cars196(cars_annos, holdout_per_class=2)
    half = CARS_CLASSES // 2
    class_of = read_cars_annos_classes(cars_annos)
    names = [str(n[0]) for n in scipy.io.loadmat(cars_annos / "cars_annos.mat")["class_names"][0]]
    assert splits.layout == "cars_annos"
    assert splits.train.classes == names[:half] and splits.test.classes == names[half:]
    for part in (splits.train, splits.holdout):
        assert all(class_of[f] == label + 1 for f, label in zip(part.files, part.labels))
    assert all(class_of[f] == label + 1 + half for f, label in zip(splits.test.files, splits.test.labels))
    assert sorted(set(splits.train.labels)) == list(range(half))
    assert sorted(set(splits.test.labels)) == list(range(CARS_CLASSES - half))
    assert Counter(splits.test.labels) == {c: CARS_PER_CLASS for c in range(CARS_CLASSES - half)}
    # The official test flag is ignored: both flags appear in the train split.
    flags = {str(cars_annos / a.relative_im_path): a.test for a in
             scipy.io.loadmat(cars_annos / "cars_annos.mat", squeeze_me=True, struct_as_record=False)["annotations"]}
    assert {flags[f] for f in splits.train.files} == {0, 1}


def test_cars_annotations_split_each_class_in_half_and_box_the_object(cars_annos: Path) -> None:
    # As in the real cars_annos.mat: each class about half official train, half test; the
    # box (x1, y1, x2, y2), 1-based and inclusive, lies inside its image.
    annotations = scipy.io.loadmat(cars_annos / "cars_annos.mat", squeeze_me=True,
                                   struct_as_record=False)["annotations"]
    test_per_class = Counter(int(a.__dict__["class"]) for a in annotations if a.test == 1)
    assert test_per_class == {c: CARS_PER_CLASS // 2 for c in range(1, CARS_CLASSES + 1)}
    for a in annotations:
        with Image.open(cars_annos / a.relative_im_path) as im:
            width, height = im.size
        assert 1 <= a.bbox_x1 <= a.bbox_x2 <= width and 1 <= a.bbox_y1 <= a.bbox_y2 <= height, a.relative_im_path


def test_synthetic_boxes_are_x_then_y_on_a_wide_image() -> None:
    from common.synthetic import _render_with_box
    rng = np.random.default_rng(0)
    for class_id in range(len(SHAPE_KINDS)):
        image, (x0, y0, x1, y1) = _render_with_box(class_id, rng, (160, 40))
        assert image.shape == (40, 160, 3)
        # the object's centre lies at x in [35, 125]: beyond y's range, so x and y cannot swap
        assert 0 <= x0 <= x1 < 160 and 0 <= y0 <= y1 < 40 and x1 >= 40, (class_id, (x0, y0, x1, y1))


def test_a_kill_while_the_generated_datasets_marker_is_written_leaves_no_marker(tmp_path: Path, monkeypatch) -> None:
    # --smoke takes a dataset whose marker (wnids.txt, cars_annos.mat) exists as complete: a
    # kill mid-write must leave none, or every rerun fails on a half file.
    import scipy.io
    real_savemat, real_write_text = scipy.io.savemat, Path.write_text

    def killed_savemat(file, *args, **kw):
        file.write(b"MATLAB 5.0 MAT-file, cut short")
        raise KeyboardInterrupt

    def killed_write_text(path, text, *args, **kw):
        if path.name.startswith(".wnids.txt."):
            real_write_text(path, text[:7])
            raise KeyboardInterrupt
        return real_write_text(path, text, *args, **kw)

    monkeypatch.setattr(scipy.io, "savemat", killed_savemat)
    monkeypatch.setattr(Path, "write_text", killed_write_text)
    for layout in ("cars_annos", "torchvision"):
        with pytest.raises(KeyboardInterrupt):
            make_cars196(tmp_path / layout, layout, num_classes=2, per_class=2, image_size=(32, 24))
    with pytest.raises(KeyboardInterrupt):
        make_tiny_imagenet(tmp_path / "tiny", num_classes=2, train_per_class=2, val_per_class=1, image_size=16)
    left = sorted(p.name for p in tmp_path.rglob("*") if p.suffix in (".mat", ".tmp") or p.name == "wnids.txt")
    assert left == []
    monkeypatch.setattr(scipy.io, "savemat", real_savemat)
    monkeypatch.setattr(Path, "write_text", real_write_text)
    root = make_cars196(tmp_path / "cars_annos", num_classes=2, per_class=2, image_size=(32, 24))
    assert len(load_cars196(root, holdout_per_class=0).train.files) == 2  # the rerun's dataset is whole


def test_class_style_refuses_a_negative_class_id() -> None:
    with pytest.raises(ValueError, match="class_id must be >= 0, got -1"):
        class_style(-1)


def test_make_cars196_needs_two_classes_of_two_images(tmp_path: Path) -> None:
    for classes, per_class in ((1, 4), (4, 1)):
        with pytest.raises(ValueError, match="need num_classes >= 2"):
            make_cars196(tmp_path, num_classes=classes, per_class=per_class)
    assert list(tmp_path.iterdir()) == []


def test_cars_scenes_take_every_hue() -> None:
    # The scene is the nuisance that retrieval must learn to ignore: its hue varies freely.
    import colorsys
    from common.synthetic import _background
    rng = np.random.default_rng(0)
    hues = [colorsys.rgb_to_hsv(*(_background(rng, (16, 16), scene=True)[0].mean((0, 1)) / 255))[0]
            for _ in range(40)]
    assert np.histogram(hues, bins=4, range=(0, 1))[0].min() >= 4, hues


def test_cars_holdout_is_stratified_and_disjoint(cars_annos: Path) -> None:
    splits = load_cars196(cars_annos, holdout_per_class=3, seed=1)
    assert Counter(splits.holdout.labels) == {c: 3 for c in range(CARS_CLASSES // 2)}
    assert set(splits.train.files).isdisjoint(splits.holdout.files)
    assert len(splits.train) + len(splits.holdout) == CARS_PER_CLASS * (CARS_CLASSES // 2)
    assert load_cars196(cars_annos, holdout_per_class=3, seed=1).holdout == splits.holdout


def test_both_cars_layouts_give_the_same_images(cars_annos: Path, cars_torchvision: Path) -> None:
    a = load_cars196(cars_annos, holdout_per_class=0)
    b = load_cars196(cars_torchvision, holdout_per_class=0)
    assert b.layout == "torchvision" and b.root == (cars_torchvision / "stanford_cars").resolve()
    for part_a, part_b in ((a.train, b.train), (a.test, b.test)):
        assert part_a.classes == part_b.classes
        assert Counter(part_a.labels) == Counter(part_b.labels)
        by_label_a = sorted((label, file_md5(f)) for f, label in zip(part_a.files, part_a.labels))
        by_label_b = sorted((label, file_md5(f)) for f, label in zip(part_b.files, part_b.labels))
        assert by_label_a == by_label_b


def test_cars_torchvision_keeps_duplicate_base_names_apart(cars_torchvision: Path) -> None:
    base = cars_torchvision / "stanford_cars"
    splits = load_cars196(cars_torchvision, holdout_per_class=1)
    loaded = splits.train.files + splits.holdout.files + splits.test.files
    on_disk = {str(p) for p in base.glob("cars_t*/*.jpg")}
    assert len(loaded) == len(set(loaded)) == len(on_disk) == CARS_CLASSES * CARS_PER_CLASS
    assert set(loaded) == on_disk
    shared = {p.name for p in (base / "cars_train").iterdir()} & {p.name for p in (base / "cars_test").iterdir()}
    assert len(shared) >= CARS_CLASSES
    for name in shared:
        assert file_md5(str(base / "cars_train" / name)) != file_md5(str(base / "cars_test" / name))
        assert {str(base / "cars_train" / name), str(base / "cars_test" / name)} <= set(loaded)
    # Without the stanford_cars nesting the same folder reads the same.
    assert load_cars196(base, holdout_per_class=1) == splits


def test_cars_single_record_annotation_files(tmp_path: Path) -> None:
    """squeeze_me turns 1-element struct arrays into a bare struct; the reader must cope."""
    (tmp_path / "devkit").mkdir()
    for folder in ("cars_train", "cars_test"):
        (tmp_path / folder).mkdir()
        Image.fromarray(render_class_image(0, np.random.default_rng(0), (20, 16))).save(tmp_path / folder / "00001.jpg")
    names = np.array([["first", "second"]], dtype=object)
    scipy.io.savemat(tmp_path / "devkit" / "cars_meta.mat", {"class_names": names})
    for class_id, mat in ((1, tmp_path / "devkit" / "cars_train_annos.mat"),
                          (2, tmp_path / "cars_test_annos_withlabels.mat")):
        record = {"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 20, "bbox_y2": 16, "class": np.uint8(class_id),
                  "fname": "00001.jpg"}
        scipy.io.savemat(mat, {"annotations": record})
    splits = load_cars196(tmp_path, holdout_per_class=0)
    assert splits.train.files == [str(tmp_path.resolve() / "cars_train" / "00001.jpg")]
    assert splits.test.files == [str(tmp_path.resolve() / "cars_test" / "00001.jpg")]
    assert splits.train.labels == splits.test.labels == [0]
    assert (splits.train.classes, splits.test.classes) == (["first"], ["second"])


def test_cars_errors_are_clear(cars_annos: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Cars196 folder not found"):
        load_cars196(tmp_path / "nowhere")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        load_cars196(unknown)
    assert str(unknown) in str(error.value) and CARS196_LAYOUTS in str(error.value)
    assert "cars_annos.mat" in str(error.value) and "devkit/cars_meta.mat" in str(error.value)

    root = copy_of(cars_annos, tmp_path)
    gone = sorted((root / "car_ims").iterdir())[3]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"1 of {CARS_CLASSES * CARS_PER_CLASS} annotated images "
                                                          f"are missing, first: {gone}")):
        load_cars196(root)
    with pytest.raises(ValueError, match="too large"):
        load_cars196(cars_annos, holdout_per_class=CARS_PER_CLASS)


def _rewrite_annotations(mat_path: Path, change) -> None:
    """Replace the (1, N) struct array `annotations` of a .mat file by change(it)."""
    mat = {k: v for k, v in scipy.io.loadmat(mat_path).items() if not k.startswith("__")}
    mat["annotations"] = change(mat["annotations"])
    scipy.io.savemat(mat_path, mat)


def test_a_class_id_outside_1_to_n_is_named(cars_annos: Path, tmp_path: Path) -> None:
    root = copy_of(cars_annos, tmp_path)

    def class_zero(annotations):
        annotations = annotations.copy()
        annotations[0, 0]["class"] = np.array([[0]], dtype=np.uint8)
        return annotations
    _rewrite_annotations(root / "cars_annos.mat", class_zero)
    with pytest.raises(DatasetError, match=rf"class id 0 is outside 1\.\.{CARS_CLASSES} "
                                           rf"\(there are {CARS_CLASSES} class names\)"):
        load_cars196(root)


def test_a_class_id_that_is_not_whole_is_named(cars_annos: Path, tmp_path: Path) -> None:
    # int() made class 2.5 class 2: an image moved between classes, or from test to train.
    root = copy_of(cars_annos, tmp_path)

    def class_two_and_a_half(annotations):
        annotations = annotations.copy()
        annotations[0, 0]["class"] = np.array([[2.5]])
        return annotations
    _rewrite_annotations(root / "cars_annos.mat", class_two_and_a_half)
    first = str(scipy.io.loadmat(root / "cars_annos.mat")["annotations"][0, 0]["relative_im_path"].item())
    with pytest.raises(DatasetError) as error:
        load_cars196(root)
    assert str(error.value) == f"{root / 'cars_annos.mat'}: {first} has class 2.5, not a whole number"


def test_a_class_id_without_images_is_named(cars_annos: Path, tmp_path: Path) -> None:
    # The last class's rows lost (a damaged .mat): its test class would be silently empty.
    root = copy_of(cars_annos, tmp_path)
    _rewrite_annotations(root / "cars_annos.mat", lambda annotations: annotations[
        :, [int(a["class"].item()) != CARS_CLASSES for a in annotations[0]]])
    with pytest.raises(DatasetError, match=rf"class ids \[{CARS_CLASSES}\] have no images"):
        load_cars196(root)


def _with_first_field(field: str, value: str):
    def change(annotations):
        annotations = annotations.copy()
        annotations[0, 0][field] = np.array([value])
        return annotations
    return change


def test_cars_image_annotated_twice_is_refused(cars_annos: Path, tmp_path: Path) -> None:
    root = copy_of(cars_annos, tmp_path)
    _rewrite_annotations(root / "cars_annos.mat", lambda a: np.concatenate([a, a[:, :1]], axis=1))
    with pytest.raises(ValueError, match="is annotated more than once"):
        load_cars196(root)


@pytest.mark.parametrize("layout, mat, field, message", [
    ("annos", "cars_annos.mat", "relative_im_path", "must stay inside"),
    ("torchvision", "devkit/cars_train_annos.mat", "fname", "must be a plain file name")])
def test_cars_annotation_paths_cannot_leave_the_dataset_folder(cars_annos: Path, cars_torchvision: Path,
                                                               tmp_path: Path, layout, mat, field, message):
    root = copy_of(cars_annos if layout == "annos" else cars_torchvision, tmp_path)
    base = root if layout == "annos" else root / "stanford_cars"
    first = scipy.io.loadmat(base / mat)["annotations"][0, 0][field][0]
    _rewrite_annotations(base / mat, _with_first_field(field, "../" + first))
    images = base if layout == "annos" else base / "cars_train"  # what the path is relative to
    outside = (images / ".." / first).resolve()
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(images / first, outside)
    with pytest.raises(ValueError, match=message):  # even though the file outside exists
        load_cars196(root)


def test_cars_fixtures_hold_grayscale_jpegs(cars_annos: Path, cars_torchvision: Path) -> None:
    for root in (cars_annos, cars_torchvision):
        modes = Counter(Image.open(p).mode for p in root.rglob("*.jpg"))
        assert modes["L"] >= 2 and modes["RGB"] >= 10 * modes["L"]


# ---------------------------------------------------------------- synthetic content

def test_synthetic_data_is_deterministic_per_seed(tmp_path: Path) -> None:
    settings = dict(num_classes=2, train_per_class=2, val_per_class=1, image_size=16)
    first = make_tiny_imagenet(tmp_path / "a", **settings, seed=1)
    second = make_tiny_imagenet(tmp_path / "b", **settings, seed=1)
    other = make_tiny_imagenet(tmp_path / "c", **settings, seed=2)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert any((first / f).read_bytes() != (other / f).read_bytes() for f in files if f.suffix == ".JPEG")


def test_class_styles_vary_in_several_factors() -> None:
    styles = [class_style(c) for c in range(196)]
    assert len(set(styles)) == 196
    for a, b in zip(styles, styles[1:]):
        assert a[0] != b[0] and abs(a[1] - b[1]) > 0.05  # shape and hue both change
    assert Counter(s[2] for s in styles[:3 * len(SHAPE_KINDS)]) == {f: len(SHAPE_KINDS) for f in (2, 3, 4)}
    half = 14  # both halves of a 28-class range cover every shape kind
    assert {s[0] for s in styles[:half]} == {s[0] for s in styles[half:2 * half]} == set(SHAPE_KINDS)


def test_classes_are_separable_by_hue_but_not_by_one_pixel() -> None:
    """Nearest class centroid: the hue histogram of saturated pixels separates the classes,
    while the mean colour or the centre pixel do far worse (shapes move and backgrounds vary)."""
    rng = np.random.default_rng(0)
    num_classes, per_class, size = 8, 12, 32
    images = np.stack([render_class_image(c, rng, (size, size))
                       for c in range(num_classes) for _ in range(per_class)])
    labels = np.repeat(np.arange(num_classes), per_class)
    assert images.shape == (num_classes * per_class, size, size, 3) and images.dtype == np.uint8

    def nearest_centroid_accuracy(features: np.ndarray) -> float:
        train = np.arange(len(labels)) % per_class < per_class // 2
        centroids = np.stack([features[train & (labels == c)].mean(0) for c in range(num_classes)])
        distances = ((features[~train, None, :] - centroids[None]) ** 2).sum(-1)
        return float((distances.argmin(1) == labels[~train]).mean())

    hsv = np.stack([np.asarray(Image.fromarray(image).convert("HSV")) for image in images]).astype(int)
    saturated = hsv[..., 1] > 140
    hue_bins = hsv[..., 0] * 12 // 256
    histograms = np.stack([np.bincount(h[s], minlength=12) for h, s in zip(hue_bins, saturated)]).astype(float)
    histograms /= histograms.sum(1, keepdims=True) + 1e-9
    assert nearest_centroid_accuracy(histograms) >= 0.8
    assert nearest_centroid_accuracy(images.reshape(len(images), -1, 3).mean(1)) <= 0.5
    assert nearest_centroid_accuracy(images[:, size // 2, size // 2].astype(float)) <= 0.65


@pytest.mark.parametrize("layout, mat_name", [
    ("cars_annos", "cars_annos.mat"),
    ("torchvision", "stanford_cars/devkit/cars_meta.mat"),
    ("torchvision", "stanford_cars/devkit/cars_train_annos.mat"),
    ("torchvision", "stanford_cars/cars_test_annos_withlabels.mat"),
])
def test_truncated_mat_files_give_a_dataset_error_naming_the_file(cars_annos: Path, cars_torchvision: Path,
                                                                   tmp_path: Path, layout: str,
                                                                   mat_name: str) -> None:
    root = copy_of(cars_annos if layout == "cars_annos" else cars_torchvision, tmp_path)
    mat = root / mat_name
    whole = mat.read_bytes()
    # Each length broke scipy differently: MatReadError, IndexError, TypeError, OSError.
    # (The last few bytes are alignment padding: without them a file still reads whole.)
    lengths = {0, 1, 10, 50, 100, 127, 128, 129, 200, 1000, len(whole) // 2, len(whole) - 10}
    for length in sorted(n for n in lengths if n <= len(whole) - 10):
        mat.write_bytes(whole[:length])
        with pytest.raises(DatasetError) as error:
            load_cars196(root)
        assert str(mat.resolve()) in str(error.value) and CARS196_LAYOUTS in str(error.value), length
    mat.write_bytes(whole)
    assert len(load_cars196(root).test) == CARS_CLASSES // 2 * CARS_PER_CLASS


def test_annotations_that_are_not_structs_give_a_dataset_error(cars_annos: Path, tmp_path: Path) -> None:
    root = copy_of(cars_annos, tmp_path)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": np.arange(3), "class_names": ["a", "b"]})
    with pytest.raises(DatasetError, match=re.escape(f"{root.resolve() / 'cars_annos.mat'}: 'annotations' is "
                                                     f"not a struct array with fields 'relative_im_path'")):
        load_cars196(root)


def test_t4_finds_cars196_inside_a_data_folder_and_checks_its_images_as_asked(
        cars_annos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from common import runtime, task_data
    shutil.copytree(cars_annos, tmp_path / "data" / "cars196")  # --data-dir data, as for Tiny ImageNet
    modes = []
    monkeypatch.setattr(task_data, "check_images", lambda files, mode, **kw: modes.append((len(files), mode)) or 0)
    rt = runtime.Runtime(torch.device("cpu"))
    for mode in ("off", "full", "quick"):
        splits = task_data.cars196(tmp_path / "data", tmp_path / "out", rt, holdout_per_class=2, seed=0,
                                   check=mode)
        assert splits.root == tmp_path / "data" / "cars196"
    total = CARS_CLASSES * CARS_PER_CLASS  # every image of every split, in the mode asked for
    assert modes == [(total, "off"), (total, "full"), (total, "quick")]


def test_smoke_tiny_imagenet_is_generated_once_per_image_size(tmp_path):
    """--smoke generates its dataset at the run's --image-size; a rerun into the same --out at
    another size gets its own images, not the first size's upscaled by the loader."""
    import torch

    from common import task_data
    from common.runtime import Runtime
    rt = Runtime(torch.device("cpu"))
    sizes = {}
    for size in (32, 48, 32):
        splits = task_data.tiny_imagenet(None, tmp_path, rt, holdout_per_class=5, seed=0, check="off",
                                         smoke=True, smoke_image_size=size)
        assert Image.open(splits.train.files[0]).size == (size, size)
        sizes.setdefault(size, splits.train.files)
        assert splits.train.files == sizes[size]  # the same files again for the same size
    assert sorted(p.name for p in (tmp_path / "smoke_data").iterdir()) == ["32px", "48px"]


def test_generated_names_and_boxes_follow_the_real_files(tiny: Path, cars_annos: Path) -> None:
    # cars_annos.mat numbers car_ims/ from 000001 and names class k (1-based) at index k - 1;
    # Tiny ImageNet's <wnid>_boxes.txt has one tab-separated line per image: name x0 y0 x1 y1.
    from common.synthetic import describe_class
    mat = scipy.io.loadmat(cars_annos / "cars_annos.mat", squeeze_me=True, struct_as_record=False)
    paths = sorted(a.relative_im_path for a in mat["annotations"])
    assert paths == [f"car_ims/{i:06d}.jpg" for i in range(1, CARS_CLASSES * CARS_PER_CLASS + 1)]
    assert [str(name).split(" ", 1)[1] for name in mat["class_names"]] == [
        f"{describe_class(c)} {2000 + c % 13}" for c in range(CARS_CLASSES)]
    for wnid in (tiny / "wnids.txt").read_text().split():
        lines = (tiny / "train" / wnid / f"{wnid}_boxes.txt").read_text().splitlines()
        images = sorted(p.name for p in (tiny / "train" / wnid / "images").iterdir())
        assert sorted(line.split("\t")[0] for line in lines) == images
        for line in lines:
            name, *box = line.split("\t")
            x0, y0, x1, y1 = map(int, box)
            assert 0 <= x0 <= x1 < 32 and 0 <= y0 <= y1 < 32, line


def test_class_ids_above_255_keep_their_value_in_the_mat_file(tmp_path: Path, monkeypatch) -> None:
    # uint8 holds the real 196 ids; from 256 on the id must not wrap around to 0.
    from common import synthetic
    monkeypatch.setattr(synthetic, "_write_jpeg", lambda *args, **kw: (0, 0, 1, 1))  # no pixels
    root = make_cars196(tmp_path, num_classes=256, per_class=2, image_size=(8, 8))
    annotations = scipy.io.loadmat(root / "cars_annos.mat")["annotations"][0]
    assert Counter(int(a["class"].item()) for a in annotations) == {c: 2 for c in range(1, 257)}


def test_task_loaders_augment_train_only_and_shard_as_documented(tiny: Path) -> None:
    import torch

    from common import task_data
    from common.runtime import Runtime
    splits = load_tiny_imagenet(tiny, holdout_per_class=2, seed=0)
    s = task_data.LoaderSettings(batch_size=8, image_size=32, backend="torch", seed=5, color_jitter=0.3,
                                 eval_resize=40)
    ranks = [Runtime(torch.device("cpu"), rank=r, world_size=2) for r in (0, 1)]
    shards = [task_data.classifier_loaders(splits, s, rt) for rt in ranks]
    for rank, loaders in enumerate(shards):
        t = loaders.train.settings
        assert (t.train, t.seed, t.color_jitter, t.shard_id, t.num_shards) == (True, 5, 0.3, rank, 2)
        for part in (loaders.holdout, loaders.test):  # in order, resize-then-crop kept
            e = part.settings
            assert (e.train, e.eval_resize, e.shard_id, e.num_shards) == (False, 40, rank, 2)
    for name, split in (("holdout", splits.holdout), ("test", splits.test)):  # each image once across ranks
        indices = [i for loaders in shards for b in getattr(loaders, name).batches(0) for i in b.tolist()]
        assert sorted(indices) == list(range(len(split))), name
    whole = task_data.whole_split_loader(splits.test, s, ranks[1])  # retrieval: every image on every rank
    assert sorted(np.concatenate(whole.batches(0)).tolist()) == list(range(len(splits.test)))
    pk = task_data.pk_loader(splits.train, s, ranks[0], classes_per_batch=2, images_per_class=3)
    assert (pk.settings.batch_size, pk.settings.classes_per_batch, pk.settings.shard_id) == (6, 2, 0)
    for batch in pk.batches(0):
        assert sorted(Counter(splits.train.labels[i] for i in batch.tolist()).values()) == [3, 3]


def test_task_datasets_pass_on_the_seed_and_the_download_flag(tiny: Path, cars_annos: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from common import task_data
    from common.runtime import Runtime
    rt = Runtime(torch.device("cpu"))
    calls = []
    monkeypatch.setattr(task_data, "find_tiny_imagenet", lambda data_dir, download: calls.append(download) or tiny)
    for seed in (0, 1, 2):
        splits = task_data.tiny_imagenet(tmp_path, tmp_path, rt, holdout_per_class=2, seed=seed, check="off",
                                         download=False)
        assert splits.holdout == load_tiny_imagenet(tiny, holdout_per_class=2, seed=seed).holdout
        cars = task_data.cars196(cars_annos, tmp_path, rt, holdout_per_class=2, seed=seed, check="off")
        assert cars.holdout == load_cars196(cars_annos, holdout_per_class=2, seed=seed).holdout
    assert calls == [False] * 6  # --no-download: no download, also on rank 0
    assert load_tiny_imagenet(tiny, holdout_per_class=2, seed=0).holdout != \
        load_tiny_imagenet(tiny, holdout_per_class=2, seed=1).holdout
    assert load_cars196(cars_annos, holdout_per_class=2, seed=0).holdout != \
        load_cars196(cars_annos, holdout_per_class=2, seed=2).holdout


def test_smoke_datasets_left_half_written_are_generated_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A --smoke run killed while generating leaves images but not the file written last.
    import torch

    from common import task_data
    from common.runtime import Runtime
    rt = Runtime(torch.device("cpu"))
    monkeypatch.setattr(task_data, "SMOKE_CARS196", dict(layout="cars_annos", num_classes=4, per_class=2,
                                                         image_size=(16, 12), seed=0))
    monkeypatch.setattr(task_data, "SMOKE_TINY_IMAGENET", dict(num_classes=2, train_per_class=2,
                                                               val_per_class=1, seed=0))
    (tmp_path / "smoke_data" / "cars196" / "car_ims").mkdir(parents=True)
    (tmp_path / "smoke_data" / "16px" / "tiny-imagenet-200" / "train").mkdir(parents=True)
    splits = task_data.cars196(tmp_path / "unused", tmp_path, rt, holdout_per_class=0, seed=0, check="off",
                               smoke=True)
    assert (len(splits.train), len(splits.test)) == (4, 4)
    splits = task_data.tiny_imagenet(None, tmp_path, rt, holdout_per_class=0, seed=0, check="off", smoke=True,
                                     smoke_image_size=16)
    assert (len(splits.train), len(splits.test)) == (4, 2)


def test_the_image_check_covers_every_split_and_ends_with_the_modes_advice(cars_annos: Path, tmp_path: Path) -> None:
    import torch

    from common import task_data
    from common.errors import ImageDecodeError
    from common.image_check import CACHE_NAME
    from common.runtime import Runtime
    root = copy_of(cars_annos, tmp_path)
    splits = load_cars196(root, holdout_per_class=1, seed=0)
    task_data.check_split_images(splits, "quick", tmp_path / "out", Runtime(torch.device("cpu")))
    assert (root / CACHE_NAME).is_file() and not (tmp_path / "out").exists()  # cached beside the images
    for broken in (splits.holdout.files[0], splits.test.files[-1]):
        Path(broken).write_text("not an image\n")
    for mode, advice in (("quick", "--check-images full decodes every file"), ("full", "--check-images off skips")):
        with pytest.raises(ImageDecodeError) as error:
            task_data.check_split_images(splits, mode, tmp_path / "out", Runtime(torch.device("cpu")))
        lines = str(error.value).splitlines()
        assert lines[0].startswith(f"2 of {CARS_CLASSES * CARS_PER_CLASS} image files")
        assert {line.split(": ")[0].strip() for line in lines[1:3]} == {splits.holdout.files[0], splits.test.files[-1]}
        assert advice in lines[-1]


def _damage_huffman_table(path: Path) -> None:
    """Overwrite the code counts of a JPEG's first Huffman table: both ends stay whole, so
    the quick check passes it; decoding fails."""
    data = bytearray(Path(path).read_bytes())
    table = data.find(b"\xff\xc4")
    data[table + 5:table + 21] = b"\xff" * 16
    Path(path).write_bytes(bytes(data))


def test_tiny_imagenets_test_split_is_decoded_up_front_under_the_quick_check(tiny: Path, tmp_path: Path,
                                                                           capsys) -> None:
    # T1-T3 read the test split only after training: a test JPEG damaged inside, with whole
    # ends, ended a run after all its epochs ("cannot decode image .../val_5.JPEG").
    import torch

    from common import task_data
    from common.errors import ImageDecodeError
    from common.runtime import Runtime
    rt = Runtime(torch.device("cpu"))
    root = copy_of(tiny, tmp_path)
    splits = load_tiny_imagenet(root, holdout_per_class=1)
    task_data.check_split_images(splits, "quick", tmp_path / "out", rt, decode_test=True)
    n_files = len(splits.train) + len(splits.holdout) + len(splits.test)
    assert capsys.readouterr().out == (f"checked {n_files} image files (quick): all readable\n"
                                       f"decoded the {len(splits.test)} test images: all whole\n")
    bad = splits.test.files[1]
    _damage_huffman_table(Path(bad))
    task_data.check_split_images(splits, "quick", tmp_path / "out", rt)  # ends only: passes
    with pytest.raises(ImageDecodeError) as error:
        task_data.check_split_images(splits, "quick", tmp_path / "out", rt, decode_test=True)
    lines = str(error.value).splitlines()
    assert lines[0] == (f"1 of {len(splits.test)} image files are not whole JPEG/PNG images (decoded each "
                        "with PIL); fix or replace them before training (one that an annotation file lists, as "
                        "val_annotations.txt and Cars196's .mat files do, cannot just be removed):")
    assert lines[1].startswith(f"  {bad}: does not decode: ")
    assert lines[2] == ("The test split is read only after training, so it is decoded in full up front: "
                        "--check-images off skips every check.")
