"""Check every image file of a dataset before training, so a bad file stops the run before
epoch 1 instead of when its split is first read (the test split: after all training).

Two depths:
    quick  each file's two ends: nonzero size, a JPEG or PNG signature at the start, and
           the format's end marker at the end (JPEG end-of-image FF D9, PNG IEND chunk).
           Catches empty, truncated and non-image files (a text file named .JPEG) by reading
           about 1 KiB per file. A JPEG or PNG whose end looks wrong is then decoded in
           full, so one with bytes after its end marker (some cameras append a trailer)
           passes if it decodes.
    full   decodes every file with PIL: also finds some damage in the middle of a file
           (not all: a decoder reads many damaged scans without an error).
A passed check is remembered in a small JSON file (the first writable of the `cache`
paths), keyed by every file's path, size and modification time, so a rerun on the same
files reads nothing but their metadata.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from PIL import Image

from common.errors import ImageDecodeError
from common.files import write_text

CHECK_MODES = ("quick", "full", "off")
CACHE_NAME = ".image-check.json"

_JPEG_START = b"\xff\xd8\xff"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"
_TAIL_READ = 1024  # one read of the file's end; the marker must sit in its last _END_WINDOW bytes
# after trailing NUL padding. Small: entropy-coded JPEG data never holds FF D9 (an FF there
# is followed by 00 or a restart marker), but a small truncated file's header might.
_END_WINDOW = 64
_SHOWN = 5  # bad files named in the message; the rest are counted
_THREADS = 8  # stat, reads and PIL decoding release the GIL; more threads hide disk latency
T = TypeVar("T")


def check_images(files: Sequence[str], mode: str = "quick", cache: Sequence[Path] = (),
                 advice: str = "") -> int:
    """Raise ImageDecodeError naming the first few bad files of `files` and their count.

    Returns how many files were read: 0 for mode "off" or when a cache file records that
    the same files (path, size, mtime) already passed this check or a stricter one.
    `advice` is appended to the error message (e.g. which flag relaxes the check).
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"mode must be one of {CHECK_MODES}, got {mode!r}")
    if mode == "off" or not files:
        return 0
    key, unreadable = _fingerprint(files)
    if not unreadable and _cached(cache, key, mode):
        return 0
    # The others too: one missing file must not hide the damaged ones from the message.
    missing = {f for f, _ in unreadable}
    check = quick_problem if mode == "quick" else decode_problem
    problems = unreadable + _problems(check, [f for f in files if f not in missing])
    order = {f: i for i, f in enumerate(files)}
    problems.sort(key=lambda problem: order[problem[0]])  # in the files' order
    if problems and mode == "quick":  # trailing bytes or damage: a decode tells them apart
        problems = [(f, p) for f, p in problems if not p.startswith("truncated") or decode_problem(f)]
    if problems:
        raise ImageDecodeError(_report(problems, len(files), mode, advice))
    _remember(cache, key, mode)
    return len(files)


def quick_problem(path: str) -> str | None:
    """What is wrong with the two ends of `path`, or None if they look like a whole JPEG/PNG."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, len(_PNG_START), 0)
            tail = os.pread(fd, _TAIL_READ, max(0, size - _TAIL_READ))
        finally:
            os.close(fd)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if size == 0:
        return "empty file (0 bytes)"
    end = tail.rstrip(b"\0")[-_END_WINDOW:]
    if head.startswith(_JPEG_START):
        return None if _JPEG_END in end else "truncated JPEG: no end-of-image marker (FF D9) at its end"
    if head.startswith(_PNG_START):
        return None if _PNG_END in end else "truncated PNG: no IEND chunk at its end"
    return f"not a JPEG or PNG: starts with {head[:4].hex(' ')}, {size} bytes"


def decode_problem(path: str) -> str | None:
    """Why PIL cannot decode `path` as a JPEG/PNG, or None if it decodes completely.

    A JPEG must also hold an end-of-image marker after its first start-of-scan marker
    (_first_scan; an FF D9 cannot occur inside entropy-coded data): a file cut short and
    zero-filled to its full size (an interrupted copy) decodes without error, zeros being
    valid scan data. What follows that marker (a camera's trailer) is not read."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    scan = _first_scan(data) if data.startswith(_JPEG_START) else -1
    if scan >= 0 and data.find(_JPEG_END, scan) < 0:
        return "truncated JPEG: no end-of-image marker (FF D9) after its scan (cut short or zero-filled)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("JPEG", "PNG"):
                return f"a {image.format} image, not a JPEG or PNG"
            image.load()  # raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES is off)
    except Exception as err:  # noqa: BLE001 - PIL raises many types; every one means "bad file"
        reason = _BUFFER_REPR.sub("", str(err))  # PIL names the in-memory buffer it read
        if reason == "cannot identify image file":
            reason = "PIL recognises no image format in its bytes"
        return f"does not decode: {reason}"
    return None


_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")


def _first_scan(data: bytes) -> int:
    """Offset of a JPEG's first start-of-scan marker (FF DA), found by walking its marker
    segments from the start by their lengths (so an EXIF thumbnail inside APP1 is skipped);
    -1 where the walk finds no scan (then the decoder judges the file)."""
    i = 2  # after SOI
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA:
            return i
        if marker == 0xFF:  # a fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return -1


def _fingerprint(files: Sequence[str]) -> tuple[str, list[tuple[str, str]]]:
    """(hash of every file's path, size and mtime, files that cannot be stat'ed)."""
    stats = _map_threaded(_stat_line, files)
    problems = [(f, line) for f, (ok, line) in zip(files, stats) if not ok]
    lines = sorted(line for ok, line in stats if ok)  # the same files in any order: the same key
    return hashlib.sha256("".join(lines).encode()).hexdigest(), problems


def _stat_line(path: str) -> tuple[bool, str]:
    """(True, 'path size mtime' line) or (False, why the file cannot be read)."""
    try:
        st = os.stat(path)
    except OSError as err:
        return False, f"cannot be read ({err.strerror})"
    return True, f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n"


def _problems(check: Callable[[str], str | None], files: Sequence[str]) -> list[tuple[str, str]]:
    """[(path, problem)] of the files `check` finds fault with, in their order."""
    return [(f, p) for f, p in zip(files, _map_threaded(check, files)) if p is not None]


def _map_threaded(fn: Callable[[str], T], files: Sequence[str]) -> list[T]:
    """[fn(f) for f in files] on _THREADS threads, one chunk of files per task: a future per
    file would cost more than the system calls it waits for."""
    chunk = max(1, -(-len(files) // (_THREADS * 4)))
    chunks = [files[i:i + chunk] for i in range(0, len(files), chunk)]
    with ThreadPoolExecutor(_THREADS) as pool:
        return [r for part in pool.map(lambda part: [fn(f) for f in part], chunks) for r in part]


def _report(problems: list[tuple[str, str]], total: int, mode: str, advice: str) -> str:
    what = ("checked the start and end of each (size, JPEG/PNG signature, end marker)"
            if mode == "quick" else "decoded each with PIL")
    unreadable = sum(problem.startswith("cannot be read") for _, problem in problems)
    kind = ("are not whole JPEG/PNG images", "cannot be read or are not whole JPEG/PNG images",
            "cannot be read")[(unreadable > 0) + (unreadable == len(problems))]
    lines = [f"{len(problems):,} of {total:,} image files {kind} ({what}); "
             f"fix or replace them before training (one that an annotation file lists, as "
             f"val_annotations.txt and Cars196's .mat files do, cannot just be removed):"]
    lines += [f"  {path}: {problem}" for path, problem in problems[:_SHOWN]]
    if len(problems) > _SHOWN:
        lines.append(f"  ... and {len(problems) - _SHOWN:,} more")
    if unreadable:  # the file may be fine: another check mode would not help
        lines.append("A file that cannot be read needs to exist and be readable by the user running this.")
    return "\n".join(lines + ([advice] if advice and unreadable < len(problems) else []))


def _cached(cache: Sequence[Path], key: str, mode: str) -> bool:
    """Whether a cache file says these files passed `mode` (or "full", which implies quick)."""
    accepted = ("quick", "full") if mode == "quick" else ("full",)
    return any(key in _keys(_passed(Path(path)).get(m)) for path in cache for m in accepted)


def _remember(cache: Sequence[Path], key: str, mode: str) -> None:
    """Record the pass in the first cache file that can be written; the dataset folder may be
    read-only, and a missed cache only costs a re-check next time, so errors are skipped."""
    for path in map(Path, cache):
        passed = _passed(path)
        # A few keys per mode: T1-T3's quick runs also decode the test split in full, and
        # must not push out a --check-images full pass of every file (or the other way round).
        earlier = [k for k in _keys(passed.get(mode)) if k != key]
        passed[mode] = (earlier + [key])[-_KEYS_KEPT:]
        try:
            write_text(path, json.dumps({"passed": passed}) + "\n")
            return
        except OSError:
            continue


_KEYS_KEPT = 4


def _keys(recorded: object) -> list[str]:
    """The keys a cache file records for one mode: a list, or one string (older files)."""
    if isinstance(recorded, str):
        return [recorded]
    return [k for k in recorded if isinstance(k, str)] if isinstance(recorded, list) else []


def _passed(path: Path) -> dict:
    """{mode: keys of the passes kept (_keys)} recorded in a cache file; empty if it is
    missing, unreadable or not ours."""
    try:
        passed = json.loads(path.read_text()).get("passed")
    except (OSError, ValueError, AttributeError):
        return {}
    return passed if isinstance(passed, dict) else {}
