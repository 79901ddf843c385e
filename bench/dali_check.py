"""Is DALI importable from where we expect, and does a decode pipeline run? (bench/gpu_check.sh)

    python bench/dali_check.py [--expect-under DIR] [--device cpu|mixed]

Imports nvidia.dali, prints its version and folder, and refuses a DALI found outside
`--expect-under` (an older DALI elsewhere on sys.path would otherwise be measured instead
of the one just installed). Then decodes 4 generated JPEGs (one grayscale) to RGB through
fn.readers.file + fn.decoders.image: on the CPU (device_id=None, needs no GPU) or with
`mixed` (nvJPEG on GPU 0), and checks each output's shape. Exit 0 and a last line starting
"DALI ok" when all of it works.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# (height, width, mode) of the test images: odd sizes and a grayscale file, as in the real sets.
_IMAGES = ((37, 53, "RGB"), (64, 64, "L"), (48, 31, "RGB"), (64, 64, "RGB"))


def _write_jpegs(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for i, (h, w, mode) in enumerate(_IMAGES):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"{i}.jpg", quality=90)


def decoded_shapes(folder: Path, device: str) -> list[tuple[int, ...]]:
    """HWC shapes of the images in `folder`, decoded to RGB by a DALI pipeline on `device`."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(_IMAGES), num_threads=1,
                  device_id=None if device == "cpu" else 0)
    def decode():
        jpegs, _ = fn.readers.file(file_root=str(folder), files=[f"{i}.jpg" for i in range(len(_IMAGES))])
        return fn.decoders.image(jpegs, device=device, output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (images,) = pipe.run()
    if device == "mixed":
        images = images.as_cpu()
    return [tuple(images.at(i).shape) for i in range(len(_IMAGES))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--expect-under", type=Path, help="DALI must be imported from this folder")
    p.add_argument("--device", choices=["cpu", "mixed"], default="cpu")
    args = p.parse_args()
    try:
        import nvidia.dali as dali
    except ImportError as e:
        print(f"DALI not importable: {e}")
        return 1
    where = Path(dali.__file__).resolve().parent
    print(f"DALI {dali.__version__} from {where}")
    if args.expect_under is not None and not where.is_relative_to(args.expect_under.resolve()):
        print(f"error: expected DALI under {args.expect_under}, found it at {where}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        _write_jpegs(Path(tmp))
        try:
            shapes = decoded_shapes(Path(tmp), args.device)
        except RuntimeError as err:  # mixed without a usable GPU: DALI's assert, as a traceback
            if args.device != "mixed":
                raise
            first = (str(err).strip().splitlines() or ["?"])[0][:300]
            print(f"error: --device mixed needs a CUDA GPU that DALI can use; building the pipeline "
                  f"failed: {first}")
            return 1
    expected = [(h, w, 3) for h, w, _ in _IMAGES]
    if shapes != expected:
        print(f"error: decoded shapes {shapes}, expected {expected}")
        return 1
    print(f"DALI ok: {args.device} decode of {len(shapes)} JPEGs (one grayscale) to RGB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
