"""Dataset readers for Tiny ImageNet and Cars196: file lists and labels, no pixel loading.

Each reader checks the on-disk layout up front and fails with a message that says what
was expected and where, so a wrong ``--data-dir`` shows up before any training starts.
The labelled Tiny ImageNet val set serves as our test split (official test labels are not
public); Cars196 is split by class id for retrieval on unseen classes. Both carve a
stratified holdout out of the train split for early stopping.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import urllib.request
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
from tqdm import tqdm

from common.errors import DatasetError, DatasetNotFoundError, DownloadError
from common.files import folder_lock

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

TINY_IMAGENET_LAYOUT = """\
expected Tiny ImageNet layout (the unzipped tiny-imagenet-200 folder):
  tiny-imagenet-200/wnids.txt                  one wnid per line; line order = class index
  tiny-imagenet-200/words.txt                  wnid<TAB>readable name (optional)
  tiny-imagenet-200/train/<wnid>/images/*.JPEG
  tiny-imagenet-200/val/images/*.JPEG
  tiny-imagenet-200/val/val_annotations.txt    file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1"""

CARS196_LAYOUTS = """\
expected one of two Cars196 layouts:
  (a) cars_annos: <root>/cars_annos.mat and <root>/car_ims/*.jpg
  (b) torchvision StanfordCars: <root>/devkit/cars_meta.mat, <root>/devkit/cars_train_annos.mat,
      <root>/cars_test_annos_withlabels.mat, <root>/cars_train/*.jpg, <root>/cars_test/*.jpg
      (also accepted one level down, in <root>/stanford_cars/)"""

_TINY_IMAGE_SUFFIXES = (".jpeg", ".jpg")


def holdout_split(labels: Sequence[int], per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train_idx, holdout_idx) with exactly ``per_class`` holdout per class.

    Deterministic given the seed; both index lists are sorted. Every class keeps at least
    one training image, so ``per_class`` must be smaller than the smallest class.
    """
    if per_class < 0:
        raise DatasetError(f"per_class must be >= 0, got {per_class}")
    labels_array = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    holdout: list[int] = []
    for label in np.unique(labels_array):
        members = np.flatnonzero(labels_array == label)
        if len(members) <= per_class:
            raise DatasetError(f"class {int(label)} has {len(members)} images; a holdout of {per_class} "
                             f"per class needs more than {per_class} (at least one must stay in train)")
        holdout.extend(rng.choice(members, size=per_class, replace=False).tolist())
    holdout_set = set(holdout)
    train = [i for i in range(len(labels_array)) if i not in holdout_set]
    return train, sorted(holdout)


def load_tiny_imagenet(root: str | Path, holdout_per_class: int = 10, seed: int = 0) -> DatasetSplits:
    """Read the tiny-imagenet-200 folder ``root``; its labelled val set becomes the test split."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetNotFoundError(f"Tiny ImageNet folder not found: {root}\n{TINY_IMAGENET_LAYOUT}")
    wnids_path = root / "wnids.txt"
    if not wnids_path.is_file():
        raise DatasetNotFoundError(f"missing {wnids_path}\n{TINY_IMAGENET_LAYOUT}")
    wnids = [line.strip() for line in _text_lines(wnids_path) if line.strip()]
    if not wnids:
        raise DatasetError(f"{wnids_path} lists no wnids\n{TINY_IMAGENET_LAYOUT}")
    duplicates = sorted(w for w, n in Counter(wnids).items() if n > 1)
    if duplicates:
        raise DatasetError(f"{wnids_path} lists wnids more than once: {duplicates[:5]}")
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    classes = _tiny_imagenet_names(root / "words.txt", wnids)

    train_files: list[str] = []
    train_labels: list[int] = []
    for label, wnid in enumerate(wnids):
        images_dir = root / "train" / wnid / "images"
        if not images_dir.is_dir():
            raise DatasetNotFoundError(f"missing train folder {images_dir} for wnid {wnid} listed in "
                                    f"{wnids_path}\n{TINY_IMAGENET_LAYOUT}")
        names = _image_names(images_dir)
        if not names:
            raise DatasetError(f"no .JPEG images in {images_dir}\n{TINY_IMAGENET_LAYOUT}")
        train_files.extend(str(images_dir / n) for n in names)
        train_labels.extend([label] * len(names))

    test_files, test_labels = _read_val_annotations(root, label_of)
    train, holdout = _carve_holdout(ImageList(train_files, train_labels, classes), holdout_per_class, seed, root)
    return DatasetSplits(train=train, holdout=holdout, test=ImageList(test_files, test_labels, classes),
                         root=root, layout="tiny-imagenet-200")


def load_cars196(root: str | Path, holdout_per_class: int = 5, seed: int = 0) -> DatasetSplits:
    """Read Cars196 in either known layout; split by class id: first half train, second half test.

    With n classes, ids 1..n//2 become train labels 0..n//2-1 and ids n//2+1..n become test
    labels 0..n-n//2-1 (1-98 / 99-196 for the real data); the official train/test flag is
    ignored. Images are identified by their path, since torchvision's cars_train/ and
    cars_test/ reuse the same file names.
    """
    root = Path(root).expanduser().resolve()
    layout, base = _detect_cars_layout(root)
    if layout == "cars_annos":
        paths, class_ids, class_names = _read_cars_annos(base)
    else:
        paths, class_ids, class_names = _read_cars_torchvision(base)

    n = len(class_names)
    if n < 2:
        raise DatasetError(f"Cars196 at {base} lists {n} class name(s); the class-id split needs at least 2")
    out_of_range = [c for c in class_ids if not 1 <= c <= n]
    if out_of_range:
        raise DatasetError(f"Cars196 at {base}: class id {out_of_range[0]} is outside 1..{n} "
                         f"(there are {n} class names)")
    empty = sorted(set(range(1, n + 1)) - set(class_ids))
    if empty:
        raise DatasetError(f"Cars196 at {base}: class ids {empty[:10]} have no images")
    duplicates = [p for p, count in Counter(paths).items() if count > 1]
    if duplicates:
        raise DatasetError(f"Cars196 at {base}: {duplicates[0]} is annotated more than once")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetNotFoundError(f"Cars196 at {base} ({layout} layout): {len(missing)} of {len(paths)} "
                                f"annotated images are missing, first: {missing[0]}\n{CARS196_LAYOUTS}")

    n_train = n // 2
    order = sorted(range(len(paths)), key=lambda i: paths[i])
    train_all = ImageList([paths[i] for i in order if class_ids[i] <= n_train],
                          [class_ids[i] - 1 for i in order if class_ids[i] <= n_train], class_names[:n_train])
    test = ImageList([paths[i] for i in order if class_ids[i] > n_train],
                     [class_ids[i] - 1 - n_train for i in order if class_ids[i] > n_train], class_names[n_train:])
    train, holdout = _carve_holdout(train_all, holdout_per_class, seed, base)
    return DatasetSplits(train=train, holdout=holdout, test=test, root=base, layout=layout)


def find_tiny_imagenet(data_dir: str | Path, download: bool = True, url: str = TINY_IMAGENET_URL,
                       md5: str = TINY_IMAGENET_MD5) -> Path:
    """Return the tiny-imagenet-200 folder in (or at) ``data_dir``, downloading it if allowed.

    The zip is extracted into a temporary folder inside ``data_dir`` and only moved into
    place once complete, so an interrupted run never leaves a dataset that looks whole.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if data_dir.exists() and not data_dir.is_dir():
        raise DatasetNotFoundError(f"--data-dir {data_dir} is a file; expected a folder that holds "
                                   f"tiny-imagenet-200/ (or is it), or a new folder to download into.\n"
                                   f"{TINY_IMAGENET_LAYOUT}")
    if (data_dir / "wnids.txt").is_file():
        return data_dir
    target = data_dir / "tiny-imagenet-200"
    if (target / "wnids.txt").is_file():
        return target
    how_to_get_it = (f"Download {url} (MD5 {md5}) and unzip it so that {target / 'wnids.txt'} exists "
                     f"(expected path: {target}), or run with --smoke, which needs no dataset.")
    if (target / "tiny-imagenet-200" / "wnids.txt").is_file():  # the zip unzipped into a folder of its name
        raise DatasetNotFoundError(f"{target} holds the dataset one level deeper, in {target / 'tiny-imagenet-200'}: "
                                   f"pass --data-dir {target}")
    if target.exists():
        raise DatasetNotFoundError(f"{target} exists but has no wnids.txt; remove it or complete it.\n"
                                f"{how_to_get_it}\n{TINY_IMAGENET_LAYOUT}")
    inside = next((p for p in data_dir.parents if (p / "wnids.txt").is_file()), None)
    if inside is not None:  # e.g. --data-dir .../tiny-imagenet-200/val: never download into a dataset
        raise DatasetNotFoundError(f"--data-dir {data_dir} is inside the Tiny ImageNet at {inside}: "
                                   f"pass --data-dir {inside}")
    zip_path = data_dir / "tiny-imagenet-200.zip"
    if not download:
        unzipped = (f" {zip_path} is there, not unzipped: without --no-download the script checks its "
                    f"MD5 and unzips it." if zip_path.is_file() else "")
        raise DatasetNotFoundError(f"Tiny ImageNet not found in {data_dir}.{unzipped}\n{how_to_get_it}")

    created = _first_missing_folder(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise DownloadError(f"Could not download Tiny ImageNet into {data_dir}: {error}\n"
                            f"{how_to_get_it}") from error
    # Two runs started at once on a fresh --data-dir (T1 and T2 side by side) would write
    # the same zip and extract over each other: the second waits, then finds the dataset.
    with folder_lock(data_dir):
        if (target / "wnids.txt").is_file():
            return target
        try:
            download_file(url, zip_path, md5)
        except BaseException as error:
            if created is not None:  # leave no empty --data-dir behind; it held only the failed download
                shutil.rmtree(created, ignore_errors=True)
            if isinstance(error, (OSError, ValueError)):  # URLError is an OSError too
                raise DownloadError(f"Could not download Tiny ImageNet into {data_dir}: {error}\n"
                                    f"{how_to_get_it}") from error
            raise

        for stale in data_dir.glob(".tiny-imagenet-extract-*"):  # a kill mid-extraction skips `finally`
            shutil.rmtree(stale, ignore_errors=True)
        temporary = Path(tempfile.mkdtemp(prefix=".tiny-imagenet-extract-", dir=data_dir))
        try:
            safe_extract_zip(zip_path, temporary)
            extracted = temporary / "tiny-imagenet-200"
            if not (extracted / "wnids.txt").is_file():
                raise DownloadError(f"{zip_path} (from {url}) has no tiny-imagenet-200/wnids.txt; "
                                    f"it is not the Tiny ImageNet zip.\n{how_to_get_it}")
            os.replace(extracted, target)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        zip_path.unlink()  # kept on failure above, so a retry can reuse the verified download
    return target


def _first_missing_folder(path: Path) -> Path | None:
    """The outermost folder that `path.mkdir(parents=True)` would create, or None if `path` exists."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def download_file(url: str, dest: Path, md5: str) -> Path:
    """Download ``url`` to ``dest`` with a progress bar and check its MD5.

    An existing ``dest`` with the right MD5 is kept as is. The data go to ``dest.part``
    first; on an MD5 mismatch that file is deleted and ValueError is raised.
    """
    dest = Path(dest)
    if dest.is_file():
        found = _md5_of_file(dest)
        if found == md5.lower():
            return dest
        print(f"{dest} has MD5 {found}, not {md5.lower()} (a partial or other file): downloading it again")
    partial = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            length = response.headers.get("Content-Length")
            with tqdm(total=int(length) if length else None, unit="B", unit_scale=True,
                      desc=f"downloading {dest.name}") as progress:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.update(len(chunk))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != md5.lower():
        partial.unlink()
        raise DatasetError(f"MD5 mismatch for {url}: expected {md5.lower()}, got {digest.hexdigest()}; "
                         f"the downloaded file was deleted")
    os.replace(partial, dest)
    return dest


def safe_extract_zip(zip_path: Path, dest: Path) -> None:
    """Extract ``zip_path`` into ``dest``, refusing the whole archive if any member is unsafe.

    Unsafe: an absolute path, a '..' component, or a symlink, i.e. anything that could
    land outside ``dest``. All members are checked before anything is written.
    """
    dest = Path(dest).resolve()
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.infolist():
            _check_zip_member(member, dest, zip_path)
        dest.mkdir(parents=True, exist_ok=True)
        archive.extractall(dest)


def _tiny_imagenet_names(words_path: Path, wnids: list[str]) -> list[str]:
    """Readable name per wnid from words.txt; the wnid itself where words.txt has none."""
    names: dict[str, str] = {}
    if words_path.is_file():
        for line in words_path.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, name = line.partition("\t")
            if name.strip():
                names[wnid.strip()] = name.strip()
    return [names.get(wnid, wnid) for wnid in wnids]


def _read_val_annotations(root: Path, label_of: dict[str, int]) -> tuple[list[str], list[int]]:
    """Files and labels of the labelled val set, sorted by file name."""
    annotations_path = root / "val" / "val_annotations.txt"
    images_dir = root / "val" / "images"
    if not annotations_path.is_file():
        raise DatasetNotFoundError(f"missing {annotations_path}\n{TINY_IMAGENET_LAYOUT}")
    if not images_dir.is_dir():
        raise DatasetNotFoundError(f"missing {images_dir}\n{TINY_IMAGENET_LAYOUT}")
    present = set(os.listdir(images_dir))
    label_of_file: dict[str, int] = {}
    for line_number, line in enumerate(_text_lines(annotations_path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{annotations_path}, line {line_number}"
        if len(fields) < 2:
            raise DatasetError(f"{where}: expected file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1, got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in label_of:
            raise DatasetError(f"{where}: wnid {wnid!r} is not listed in {root / 'wnids.txt'}")
        if name not in present:
            raise DatasetNotFoundError(f"{where}: image {images_dir / name} does not exist")
        if name in label_of_file:
            raise DatasetError(f"{where}: {name} is annotated more than once")
        label_of_file[name] = label_of[wnid]
    if not label_of_file:
        raise DatasetError(f"{annotations_path} has no annotations\n{TINY_IMAGENET_LAYOUT}")
    # A cut or partly copied annotation file would otherwise give a smaller test split.
    unannotated = [n for n in _image_names(images_dir) if n not in label_of_file]
    if unannotated:
        raise DatasetError(f"{len(unannotated)} images in {images_dir} have no line in {annotations_path}, "
                           f"first: {unannotated[0]}; the test split needs them all\n{TINY_IMAGENET_LAYOUT}")
    wnid_of = {label: wnid for wnid, label in label_of.items()}
    without = sorted(set(label_of.values()) - set(label_of_file.values()))
    if without:
        raise DatasetError(f"{annotations_path} gives no image to {len(without)} of the {len(label_of)} "
                           f"wnids, first: {wnid_of[without[0]]}; the test split needs every class")
    names = sorted(label_of_file)
    return [str(images_dir / n) for n in names], [label_of_file[n] for n in names]


def _text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 (or ASCII, as Tiny ImageNet's) text file; other bytes are an
    error that names the file and line, not a bare UnicodeDecodeError."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        # Counted as splitlines counts (\n, \r\n, a bare \r, ...), so that it matches the line
        # numbers the readers give; the "x" stands for the line the bad byte is on.
        line = len((data[:err.start].decode("utf-8") + "x").splitlines())
        raise DatasetError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                           f"is it the file Tiny ImageNet's zip holds?\n{TINY_IMAGENET_LAYOUT}") from None


def _image_names(folder: Path) -> list[str]:
    """Sorted .JPEG / .jpg file names in `folder`, leaving out hidden files such as macOS's
    "._name.JPEG" metadata, which a copy from a Mac to an exFAT or SMB drive leaves beside each image."""
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(_TINY_IMAGE_SUFFIXES)
                  and not n.startswith("."))


def _carve_holdout(full: ImageList, per_class: int, seed: int, root: Path) -> tuple[ImageList, ImageList]:
    """Split a train list into (train, holdout) lists with the same classes."""
    present, counts = np.unique(np.asarray(full.labels, dtype=np.int64), return_counts=True)
    if counts.size and counts.min() <= per_class:  # named here: the flag and the class's name
        smallest = int(present[np.argmin(counts)])
        raise DatasetError(f"--holdout-per-class {per_class} is too large for the train split in "
                           f"{root}: class '{full.classes[smallest]}' has {counts.min()} images, "
                           f"and at least one must stay in train")
    train_idx, holdout_idx = holdout_split(full.labels, per_class, seed)

    def subset(indices: list[int]) -> ImageList:
        return ImageList([full.files[i] for i in indices], [full.labels[i] for i in indices], full.classes)

    return subset(train_idx), subset(holdout_idx)


def _detect_cars_layout(root: Path) -> tuple[str, Path]:
    """Return (layout, folder holding the layout's files) or raise listing both layouts."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"Cars196 folder not found: {root}\n{CARS196_LAYOUTS}")
    if (root / "cars_annos.mat").is_file():
        return "cars_annos", root
    for base in (root, root / "stanford_cars"):
        if (base / "devkit" / "cars_meta.mat").is_file():
            return "torchvision", base
    raise DatasetNotFoundError(f"no known Cars196 layout in {root}: found neither cars_annos.mat nor "
                            f"devkit/cars_meta.mat\n{CARS196_LAYOUTS}")


def _read_cars_annos(base: Path) -> tuple[list[str], list[int], list[str]]:
    """Layout (a): paths, 1-based class ids and class names from cars_annos.mat."""
    mat_path = base / "cars_annos.mat"
    mat = _load_mat(mat_path, ("annotations", "class_names"))
    paths, class_ids = [], []
    for relative, class_id in _annotation_fields(mat["annotations"], "relative_im_path", mat_path):
        if PurePosixPath(relative).is_absolute() or ".." in PurePosixPath(relative).parts:
            raise DatasetError(f"{mat_path}: relative_im_path {relative!r} must stay inside {base}")
        paths.append(str(base / relative))
        class_ids.append(class_id)
    return paths, class_ids, _strings(mat["class_names"])


def _read_cars_torchvision(base: Path) -> tuple[list[str], list[int], list[str]]:
    """Layout (b): merged train and test annotations; paths keep their cars_train/cars_test folder."""
    class_names = _strings(_load_mat(base / "devkit" / "cars_meta.mat", ("class_names",))["class_names"])
    paths, class_ids = [], []
    for mat_path, images_dir in ((base / "devkit" / "cars_train_annos.mat", base / "cars_train"),
                                 (base / "cars_test_annos_withlabels.mat", base / "cars_test")):
        annotations = _load_mat(mat_path, ("annotations",))["annotations"]
        for name, class_id in _annotation_fields(annotations, "fname", mat_path):
            if PurePosixPath(name).name != name:
                raise DatasetError(f"{mat_path}: fname {name!r} must be a plain file name")
            paths.append(str(images_dir / name))
            class_ids.append(class_id)
    return paths, class_ids, class_names


def _annotation_fields(annotations: object, path_field: str, mat_path: Path) -> list[tuple[str, int]]:
    """(path_field as str, 1-based class id) of each annotation struct, or a DatasetError
    naming the file when the variable is not a struct array with those fields."""
    try:
        # float() first: the .mat stores the class as uint8, an edited one perhaps as double
        fields = [(str(getattr(r, path_field)), float(getattr(r, "class"))) for r in _records(annotations)]
    except (AttributeError, TypeError, ValueError) as error:
        raise DatasetError(f"{mat_path}: 'annotations' is not a struct array with fields "
                           f"{path_field!r} and 'class' ({error})\n{CARS196_LAYOUTS}") from None
    for path, class_id in fields:  # int() would make 2.5 class 2, and move the image between splits
        if not class_id.is_integer():
            raise DatasetError(f"{mat_path}: {path} has class {class_id:g}, not a whole number")
    return [(path, int(class_id)) for path, class_id in fields]


def _load_mat(path: Path, keys: tuple[str, ...]) -> dict:
    """loadmat with squeezed arrays and attribute-style structs; check the expected keys."""
    if not path.is_file():
        raise DatasetNotFoundError(f"missing {path}\n{CARS196_LAYOUTS}")
    import scipy.io  # here, not at the top: only the Cars .mat files need scipy
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as error:  # noqa: BLE001 - scipy raises a different type per damaged byte range
        size = path.stat().st_size
        raise DatasetError(f"{path} ({size:,} bytes) is not a readable MATLAB .mat file, perhaps "
                           f"truncated or damaged ({type(error).__name__}: {error}); replace it "
                           f"with the original\n{CARS196_LAYOUTS}") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise DatasetError(f"{path} lacks the variable(s) {missing}\n{CARS196_LAYOUTS}")
    return mat


def _records(annotations: object) -> list:
    """Struct array as a list; squeeze_me turns a 1-element struct array into one struct."""
    return list(np.atleast_1d(annotations))


def _strings(cells: object) -> list[str]:
    """Cell array of strings as a list; squeeze_me turns a 1-element cell array into a str."""
    return [str(s).strip() for s in np.atleast_1d(cells)]


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_zip_member(member: zipfile.ZipInfo, dest: Path, zip_path: Path) -> None:
    """Raise ValueError if a zip member could be written outside ``dest``."""
    name = member.filename
    parts = name.replace("\\", "/").split("/")
    mode = member.external_attr >> 16
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        reason = "is an absolute path"
    elif ".." in parts:
        reason = "contains a '..' component"
    elif stat.S_ISLNK(mode):
        reason = "is a symbolic link"
    elif not (dest / name).resolve().is_relative_to(dest):
        reason = "would land outside the destination"
    else:
        return
    raise DatasetError(f"refusing to extract {zip_path}: member {name!r} {reason} "
                     f"(destination {dest}); nothing was extracted")


@dataclass(frozen=True)
class ImageList:
    """Image files with 0-based labels; ``classes[label]`` is the readable class name."""

    files: list[str]
    labels: list[int]
    classes: list[str]

    def __post_init__(self) -> None:
        if len(self.files) != len(self.labels):
            raise DatasetError(f"{len(self.files)} files but {len(self.labels)} labels")
        if self.labels and not 0 <= min(self.labels) <= max(self.labels) < len(self.classes):
            raise DatasetError(f"labels must lie in 0..{len(self.classes) - 1}, "
                             f"got {min(self.labels)}..{max(self.labels)}")

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class DatasetSplits:
    """Train / holdout (carved from train, for early stopping) / test lists of one dataset."""

    train: ImageList
    holdout: ImageList
    test: ImageList
    root: Path
    layout: str  # "tiny-imagenet-200", "cars_annos" or "torchvision"

    def fingerprint(self) -> str:
        """What a resumed run must find again (checkpoint meta "data"): the image counts and a
        digest of every split's file names, relative to root, and labels. A moved or
        re-extracted copy of the dataset matches; other files, labels or splits do not."""
        digest, prefix = hashlib.sha256(), f"{self.root}{os.sep}"
        for split in (self.train, self.holdout, self.test):
            digest.update("".join(f"{f.removeprefix(prefix)}\t{y}\n" for f, y in zip(split.files, split.labels))
                          .encode() + b"\0")
        return (f"{len(self.train)} train, {len(self.holdout)} holdout and {len(self.test)} test images of "
                f"{len(self.train.classes)} classes (names and labels sha256 {digest.hexdigest()[:12]})")
