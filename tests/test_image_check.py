"""common/image_check.py: the pre-training check of every image file, its report and its cache."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import ImageDecodeError
from common.image_check import CACHE_NAME, check_images, decode_problem, quick_problem


def encoded(fmt: str, size: int = 24, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def write(folder: Path, name: str, data: bytes) -> str:
    (folder / name).write_bytes(data)
    return str(folder / name)


@pytest.fixture
def good(tmp_path: Path) -> list[str]:
    return [write(tmp_path, f"{i}.JPEG", encoded("JPEG", seed=i)) for i in range(6)] + \
        [write(tmp_path, "p.png", encoded("PNG"))]


def test_whole_jpegs_and_pngs_pass_also_with_trailing_padding(good: list[str], tmp_path: Path) -> None:
    padded = write(tmp_path, "padded.jpg", encoded("JPEG") + b"\0" * 300)  # some tools pad files
    gray = tmp_path / "gray.jpg"
    Image.new("L", (9, 7), 128).save(gray)
    files = good + [padded, str(gray)]
    assert [quick_problem(f) for f in files] == [None] * len(files)
    assert check_images(files, "quick") == len(files)
    assert check_images(files, "full") == len(files)


def test_a_jpeg_with_a_trailer_after_its_end_marker_passes_and_a_cut_one_still_fails(
        good: list[str], tmp_path: Path) -> None:
    # Some cameras write data after FF D9; the quick look at the end flags such a file,
    # and the full decode that follows clears it. A cut file fails both.
    trailer = write(tmp_path, "trailer.jpg", encoded("JPEG") + b"SEFH" + bytes(range(200)))
    assert quick_problem(trailer) is not None and decode_problem(trailer) is None
    assert check_images(good + [trailer], "quick") == len(good) + 1
    jpeg = encoded("JPEG", size=64)
    cut = write(tmp_path, "cut.jpg", jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg: truncated JPEG: no end-of-image marker"):
        check_images(good + [trailer, cut], "quick")


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_cut_short_and_zero_filled_to_full_size_fails_both_checks(progressive: bool, tmp_path: Path) -> None:
    # An interrupted copy can leave the file's size with zeros for its end. Zeros are valid
    # scan data, so the file decodes without error; only the missing end marker tells.
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", progressive=progressive)
    data = buffer.getvalue()
    half = len(data) // 2
    assert b"\xff\xda" in data[:half]  # the cut falls inside a scan
    path = write(tmp_path, "zero_tail.jpg", data[:half] + bytes(len(data) - half))
    if not progressive:
        with Image.open(path) as image:
            image.load()  # what made it pass before: PIL decodes it
    assert decode_problem(path) == ("truncated JPEG: no end-of-image marker (FF D9) after its scan "
                                    "(cut short or zero-filled)")
    for mode in ("quick", "full"):
        with pytest.raises(ImageDecodeError, match="zero_tail.jpg: truncated JPEG"):
            check_images([path], mode)
    whole = write(tmp_path, "whole.jpg", data)
    assert decode_problem(whole) is None
    # A trailer after the end marker may hold the bytes FF DA (no FF D9 after them): still whole.
    trailer = write(tmp_path, "trailer.jpg", data + b"TRAILER\xff\xda" + bytes(2000))
    assert decode_problem(trailer) is None and check_images([trailer], "quick") == 1
    # An EXIF thumbnail (a whole JPEG inside APP1, before the main scan) does not count as the scan.
    thumbnail = encoded("JPEG", size=8)
    app1 = b"Exif\x00\x00" + thumbnail
    with_thumbnail = data[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + data[2:]
    assert decode_problem(write(tmp_path, "thumb.jpg", with_thumbnail)) is None
    cut = with_thumbnail[:len(with_thumbnail) - len(data) // 2]
    assert decode_problem(write(tmp_path, "thumb_cut.jpg", cut + bytes(len(data) // 2))).startswith("truncated JPEG")


def test_each_kind_of_bad_file_is_named_with_its_reason(tmp_path: Path) -> None:
    jpeg, png = encoded("JPEG"), encoded("PNG")
    cases = {
        "empty.JPEG": (b"", "empty file (0 bytes)"),
        "cut.JPEG": (jpeg[: len(jpeg) // 2], "truncated JPEG: no end-of-image marker (FF D9) at its end"),
        "cut_by_2.JPEG": (jpeg[:-2], "truncated JPEG: no end-of-image marker (FF D9) at its end"),
        "cut.png": (png[:-5], "truncated PNG: no IEND chunk at its end"),
        "notes.JPEG": (b"hello\n", "not a JPEG or PNG: starts with 68 65 6c 6c, 6 bytes"),
    }
    for name, (data, reason) in cases.items():
        assert quick_problem(write(tmp_path, name, data)) == reason, name
    assert quick_problem(str(tmp_path / "missing.jpg")) == "cannot be read (No such file or directory)"


def test_report_counts_all_bad_files_and_names_the_first_five(good: list[str], tmp_path: Path) -> None:
    bad = [write(tmp_path, f"bad{i}.JPEG", b"not an image") for i in range(7)]
    files = good[:3] + bad + good[3:]
    with pytest.raises(ImageDecodeError) as error:
        check_images(files, "quick", advice="ADVICE LINE")
    lines = str(error.value).splitlines()
    assert lines[0].startswith(f"7 of {len(files)} image files are not whole JPEG/PNG images")
    assert [line.split(": ")[0].strip() for line in lines[1:6]] == bad[:5]
    assert lines[6:] == ["  ... and 2 more", "ADVICE LINE"]
    assert isinstance(error.value, ValueError)  # callers catching ValueError still do


def test_exactly_five_bad_files_are_all_named_with_no_count_line(good: list[str], tmp_path: Path) -> None:
    bad = [write(tmp_path, f"bad{i}.JPEG", b"not an image") for i in range(5)]
    with pytest.raises(ImageDecodeError) as error:
        check_images(good + bad, "quick")
    lines = str(error.value).splitlines()
    assert [line.split(": ")[0].strip() for line in lines[1:]] == bad  # no "... and 0 more"


def test_full_mode_finds_damage_that_leaves_both_ends_intact(tmp_path: Path) -> None:
    data = bytearray(encoded("JPEG", size=64))
    start_of_scan = data.index(b"\xff\xda")
    data[start_of_scan + 2: start_of_scan + 4] = b"\x00\x01"  # scan header length 1: invalid
    path = write(tmp_path, "middle.jpg", bytes(data))
    assert quick_problem(path) is None  # the ends look whole
    assert decode_problem(path) is not None
    with pytest.raises(ImageDecodeError, match=re.escape(path)):
        check_images([path], "full")
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (4, 4)).save(gif)
    assert decode_problem(str(gif)) == "a GIF image, not a JPEG or PNG"


def test_passes_of_two_file_sets_in_one_mode_are_both_kept(good: list[str], tmp_path: Path) -> None:
    # T1-T3's quick runs decode the test split in full; each such pass replaced a
    # --check-images full pass of every file, so alternating runs re-decoded everything.
    cache = [tmp_path / "cache" / CACHE_NAME]
    cache[0].parent.mkdir()
    cache[0].write_text(json.dumps({"passed": {"full": "an older file's one key"}}) + "\n")
    assert check_images(good, "full", cache) == len(good)
    assert check_images(good[:1], "full", cache) == 1
    assert check_images(good, "full", cache) == 0 and check_images(good[:1], "full", cache) == 0
    assert check_images(good, "quick", cache) == 0  # a full pass of these files vouches for quick
    assert len(json.loads(cache[0].read_text())["passed"]["full"]) == 3  # the older key kept too
    for n in range(1, len(good)):  # at most a few per mode: the oldest go
        check_images(good[n:], "full", cache)
    assert check_images(good, "full", cache) == len(good)


def test_a_pass_is_cached_by_path_size_and_mtime(good: list[str], tmp_path: Path) -> None:
    cache = [tmp_path / "cache" / CACHE_NAME]
    assert check_images(good, "quick", cache) == len(good)
    assert check_images(list(reversed(good)), "quick", cache) == 0  # same files, any order
    assert check_images(good, "full", cache) == len(good)  # quick does not vouch for full
    assert check_images(good, "quick", cache) == 0  # full vouches for quick
    assert set(json.loads(cache[0].read_text())["passed"]) == {"quick", "full"}
    os.utime(good[0], ns=(1, 1))  # touched: read again
    assert check_images(good, "quick", cache) == len(good)
    Path(good[1]).write_bytes(b"")  # emptied after a pass: found, not hidden by the cache
    with pytest.raises(ImageDecodeError, match="empty file"):
        check_images(good, "quick", cache)
    assert check_images(good, "off", cache) == 0


def test_a_missing_file_is_named_even_when_the_others_passed_before(good: list[str], tmp_path: Path) -> None:
    cache = [tmp_path / "cache" / CACHE_NAME]
    assert check_images(good, "quick", cache) == len(good)
    missing = str(tmp_path / "gone.JPEG")  # listed by the dataset, deleted since: no stat line
    with pytest.raises(ImageDecodeError, match=re.escape(missing) + r": cannot be read"):
        check_images(good + [missing], "quick", cache)


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_a_missing_file_does_not_hide_the_damaged_ones(good: list[str], tmp_path: Path, mode: str) -> None:
    # The missing file stopped the check: the message said "1 of 4" and named it alone.
    missing, notes = str(tmp_path / "gone.JPEG"), tmp_path / "notes.JPEG"
    notes.write_text("not an image\n")
    with pytest.raises(ImageDecodeError) as err:
        check_images([str(notes), good[0], missing, good[1]], mode)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("2 of 4 image files cannot be read or are not whole JPEG/PNG images")
    assert [line.split(": ")[0].strip() for line in lines[1:3]] == [str(notes), missing]  # in the files' order
    assert lines[3] == "A file that cannot be read needs to exist and be readable by the user running this."


def test_files_that_cannot_be_read_are_not_called_damaged(good: list[str], tmp_path: Path) -> None:
    # A file without read permission was headed "not whole JPEG/PNG images", with advice to
    # try another --check-images mode, which cannot help a file that is fine but unreadable.
    missing = str(tmp_path / "gone.JPEG")
    with pytest.raises(ImageDecodeError) as err:
        check_images([good[0], missing], "quick", advice="--check-images full decodes every file")
    assert str(err.value) == (
        "1 of 2 image files cannot be read (checked the start and end of each (size, JPEG/PNG "
        f"signature, end marker)); fix or replace them before training (one that an annotation file lists, "
        f"as val_annotations.txt and Cars196's .mat files do, cannot just be removed):\n  {missing}: cannot "
        "be read (No such file or directory)\nA file that cannot be read needs to exist and be "
        "readable by the user running this.")
    notes = tmp_path / "notes.JPEG"
    notes.write_text("not an image\n")
    with pytest.raises(ImageDecodeError) as err:  # a damaged one too: the advice is back
        check_images([str(notes), missing], "quick", advice="--check-images full decodes every file")
    assert str(err.value).endswith("readable by the user running this.\n--check-images full decodes every file")


def test_a_cache_file_that_is_not_ours_means_check_again(good: list[str], tmp_path: Path) -> None:
    cache = tmp_path / CACHE_NAME
    for text in ("[]", '{"passed": [1]}', "not json"):
        cache.write_text(text)
        assert check_images(good, "quick", [cache]) == len(good)  # read, not trusted
    assert check_images(good, "quick", [cache]) == 0  # the rewritten cache is ours


def test_cache_falls_back_when_the_first_place_is_read_only(good: list[str], tmp_path: Path) -> None:
    # /proc refuses new files even to root, like a dataset on a read-only mount
    cache = [Path("/proc/no-such-dataset") / CACHE_NAME, tmp_path / "out" / CACHE_NAME]
    assert check_images(good, "quick", cache) == len(good)
    assert cache[1].is_file()
    assert check_images(good, "quick", cache) == 0
    cache[1].write_text("{not json")  # a damaged cache only costs a re-check
    assert check_images(good, "quick", cache) == len(good)


def test_a_file_changed_in_size_but_not_in_mtime_is_read_again(good: list[str], tmp_path: Path) -> None:
    # A copy that keeps modification times (cp -p, rsync -t) of a file cut short: the same
    # mtime as the one that passed, so only its size tells the cache it is another file.
    cache = [tmp_path / "cache" / CACHE_NAME]
    assert check_images(good, "quick", cache) == len(good)
    before = os.stat(good[0])
    data = Path(good[0]).read_bytes()
    Path(good[0]).write_bytes(data[: len(data) // 2])
    os.utime(good[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ImageDecodeError, match=re.escape(good[0]) + ": truncated JPEG"):
        check_images(good, "quick", cache)


def test_a_png_whose_signature_lost_its_line_ending_bytes_is_not_a_png(tmp_path: Path) -> None:
    # The signature's \r\n and \x1a\n exist to catch a text-mode transfer; such a file has a
    # whole IEND chunk at its end, yet no decoder reads it.
    png = encoded("PNG")
    mangled = write(tmp_path, "mangled.png", png.replace(b"\r\n", b"\n", 1))
    assert quick_problem(mangled) == f"not a JPEG or PNG: starts with 89 50 4e 47, {len(png) - 1} bytes"
    with pytest.raises(ImageDecodeError, match="mangled.png: not a JPEG or PNG"):
        check_images([mangled], "quick")


def test_the_pass_is_written_to_the_first_writable_cache_only(good: list[str], tmp_path: Path) -> None:
    cache = [tmp_path / "dataset" / CACHE_NAME, tmp_path / "out" / CACHE_NAME]
    assert check_images(good, "quick", cache) == len(good)
    assert cache[0].is_file() and not cache[1].exists()


def test_a_file_pil_cannot_identify_is_named_without_pils_buffer_repr(tmp_path: Path) -> None:
    # PIL's message named the in-memory buffer: "cannot identify image file <_io.BytesIO
    # object at 0x7f...>", which says nothing about the file.
    fake = tmp_path / "val_3.JPEG"
    fake.write_bytes(b"\xff\xd8\xff" + bytes(100) + b"\xff\xd9")  # JPEG's ends, no image between
    with pytest.raises(ImageDecodeError) as err:
        check_images([str(fake)], "full")
    assert str(err.value).splitlines()[1] == f"  {fake}: does not decode: PIL recognises no image format in its bytes"
