"""Time the pre-training image check (common/image_check.py) against its goal (no assertions).

Writes --files small JPEGs (default 110,000, the size of Tiny ImageNet's train + val) into a
temporary folder, 200 subfolders like Tiny ImageNet's train/<wnid>/, then times:
    quick check, first run    (reads both ends of every file; goal < 10 s for 110,000 files)
    quick check, rerun        (cache hit: only the files' metadata)
    full check of 2,000 files (PIL decodes each; scaled to --files for an estimate)
The files were just written, so they sit in the page cache: a first run on a cold disk reads
slower. Run: python -m bench.bench_image_check [--files N]
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # allow `python bench/...py`

from bench.machine import load_note  # noqa: E402
from common.image_check import CACHE_NAME, check_images  # noqa: E402

GOAL_S = 10.0
GOAL_FILES = 110_000


def write_jpegs(root: Path, count: int, folders: int = 200) -> list[str]:
    """`count` 64x64 JPEGs (20 distinct noise images, copied), spread over `folders` folders."""
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(20):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    files = []
    for i in range(count):
        folder = root / f"n{i % folders:08d}"
        if i < folders:
            folder.mkdir()
        path = folder / f"img_{i}.JPEG"
        path.write_bytes(encoded[i % len(encoded)])
        files.append(str(path))
    return files


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=GOAL_FILES, help="how many JPEGs to generate")
    args = parser.parse_args()
    print(load_note())
    with tempfile.TemporaryDirectory(prefix="bench-image-check-") as tmp:
        root = Path(tmp)
        seconds, files = timed(lambda: write_jpegs(root, args.files))
        print(f"wrote {len(files):,} JPEGs in {seconds:.1f} s")
        cache = [root / CACHE_NAME]
        first, read = timed(lambda: check_images(files, "quick", cache))
        rerun, reread = timed(lambda: check_images(files, "quick", cache))
        subset = files[:2000]
        full, _ = timed(lambda: check_images(subset, "full"))
    goal = GOAL_S * len(files) / GOAL_FILES
    print(f"quick check, first run : {first:6.2f} s for {read:,} files ({read / first:,.0f} files/s)"
          f"   goal < {goal:.1f} s ({GOAL_S:.0f} s per {GOAL_FILES:,})")
    print(f"quick check, rerun     : {rerun:6.2f} s ({reread} files read: cached)")
    print(f"full check (PIL decode): {full:6.2f} s for {len(subset):,} files "
          f"-> about {full * len(files) / len(subset):.1f} s for {len(files):,}")


if __name__ == "__main__":
    main()
