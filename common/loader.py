"""Batch-by-batch image loading: a DALI pipeline (GPU decode + augment) with a torch fallback.

`ImageLoader(files, labels, LoaderSettings(batch_size, image_size, ...))` yields `(images, labels)` per batch:
    images: B x 3 x S x S float32, normalised with the ImageNet mean/std, on `device`
    labels: B int64, on `device`
Which images form each batch comes from `common.sampling` (a pure function of seed, epoch
and shard), so every backend (dali, torch, cache) sees the same batches, and a resumed run can restart inside an
epoch with `loader.epoch(e, start=k)`.

DALI graph (one definition for both devices; with CUDA the decoder is `mixed` = nvJPEG and
every later op runs on the GPU; without CUDA `device_id=None` and it all runs on the CPU):
    encoded bytes (external_source, read from the file list)
    train: decoders.image_slice (ROI decode of the crop box) -> resize S x S
           -> [colour jitter] -> flip + normalise
    eval:  decoders.image -> resize S x S, or resize shorter side to `eval_resize` + centre crop S
The fallback (`backend="torch"`, chosen automatically when `nvidia.dali` cannot be imported)
does the same with PIL + torchvision.transforms.v2 in a DataLoader.
Every backend draws each training image's crop box, jitter factors and flip with
training_draws((seed, epoch, shard), position in the epoch, image height and width), DALI
in its external source (the box needs the image's size: read from the file's header),
so the DALI graph has no random op of its own. So an image's augmentation depends on
neither backend, worker count nor pipeline rebuild: a run resumed mid-epoch repeats it
exactly, and an image a P x K batch repeats gets another crop each time.

`backend="cache"` decodes every file once (DALI, `mixed` on CUDA, else PIL) into one
N x S x S x 3 uint8 tensor on `device` (Tiny ImageNet: 1.2 GB) and augments there, on CUDA
a few batches per call (CACHE_CHUNK_BYTES of output): random-resized crop + flip by one
`grid_sample` (bilinear; the crop, at most S x S, is enlarged to S x S), normalise. No
process or thread feeds the GPU, so steps never wait for data. Crop boxes and flips come
from training_draws, drawn for the whole epoch at once. It takes images as S x S
(resized once when they are not, so a crop then has fewer source pixels than DALI's:
task_data's "auto" uses it only on S x S files) and does no colour jitter or eval_resize.
"""
from __future__ import annotations

import io
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from common import sampling
from common.errors import ConfigError, ImageDecodeError, MissingPackageError
from common.image_check import decode_problem
from common.schema import RANDOM_AREA, RANDOM_ASPECT

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Backend "cache" on CUDA: float32 output of one augmentation call, several batches (10
# batches of 256 at 64 px).
CACHE_CHUNK_BYTES = 128 * 2**20

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    HAVE_DALI = True
except ImportError:  # e.g. a fresh Colab runtime
    HAVE_DALI = False

_fallback_logged = False


def _pick_backend(backend: str) -> str:
    global _fallback_logged
    if backend not in ("auto", "dali", "torch", "cache"):
        raise ValueError(f"backend must be auto, dali, torch or cache, got {backend!r}")
    if backend == "dali" and not HAVE_DALI:
        raise MissingPackageError("backend='dali' but nvidia.dali cannot be imported; "
                          "pip install nvidia-dali-cuda120, or use the torch backend")
    if backend == "auto":
        backend = "dali" if HAVE_DALI else "torch"
        if backend == "torch" and not _fallback_logged:
            log.warning("nvidia.dali not importable: using the torch DataLoader fallback "
                        "(pip install nvidia-dali-cuda120 for GPU decoding)")
            _fallback_logged = True
    return backend


def _first_bad_image(files: Sequence[str]) -> str | None:
    return next((f for f in files if decode_problem(f) is not None), None)


def pil_rgb(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB, as DALI decodes it. PIL's convert("RGB") clips a 16-bit grey image
    (mode I;16 or I) at 255, which turns it white; DALI scales it (v / 257)."""
    if im.mode.startswith("I"):
        grey = np.asarray(im, dtype=np.float64) / 257
        im = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def decode_error(path: str) -> ImageDecodeError:
    """The error every backend raises for a file it cannot decode; one it cannot even open
    (removed since the dataset was listed, no read permission) is named as unreadable."""
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        return ImageDecodeError(f"cannot read image {path} ({err.strerror})")
    return ImageDecodeError(f"cannot decode image {path}: corrupt or not a JPEG/PNG")


@dataclass(frozen=True)
class LoaderSettings:
    """How an ImageLoader turns files into batches. A run's loaders share most of these
    (task_data builds each with dataclasses.replace); an evaluation shard is the same
    settings with another shard_id / num_shards."""
    batch_size: int  # per process
    image_size: int  # S: training crop and evaluation size, pixels
    train: bool = False  # augmented, reshuffled, full batches; else every image once, in order
    device: torch.device | str = "cpu"
    eval_resize: int | None = None  # evaluation: resize to this, then centre-crop S
    color_jitter: float = 0.0  # brightness / contrast / saturation range of training images
    seed: int = 0  # batch order and augmentation
    shard_id: int = 0  # this process's shard of the file list ...
    num_shards: int = 1  # ... of this many (DDP ranks)
    workers: int = 2  # DALI decoding threads / DataLoader worker processes
    backend: str = "auto"  # auto (DALI if importable), dali, torch or cache
    classes_per_batch: int | None = None  # P x K batches of P classes (train only)
    # Processes reading encoded bytes for DALI; default: up to 4 on CUDA (where Python file
    # reading would otherwise stall the GPU), none on CPU.
    reader_processes: int | None = None


class ImageLoader:
    """Loads `files` (with integer `labels`) batch by batch, decoded and augmented.

    train=True: reshuffled every epoch (or P x K class-balanced batches when
    `classes_per_batch` is set), full batches only. train=False: every image of this shard
    exactly once, in order, the last batch possibly short.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], settings: LoaderSettings) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        if len(files) == 0:
            raise ValueError("no images to load")
        self.files, self.labels, self.settings = list(files), np.asarray(labels, dtype=np.int64), settings
        s = settings
        self.batch_size, self.train, self.image_size = s.batch_size, s.train, s.image_size
        self.device = torch.device(s.device)
        self.eval_resize, self.color_jitter = s.eval_resize, s.color_jitter
        self.seed, self.shard_id = s.seed, s.shard_id
        self.workers, self.classes_per_batch = s.workers, s.classes_per_batch
        self.reader_processes = s.reader_processes
        if s.classes_per_batch is not None and s.batch_size % s.classes_per_batch:
            raise ValueError(f"batch size {s.batch_size} is not a multiple of P={s.classes_per_batch}")
        self._plan = _BatchPlan(self.labels, s.batch_size, s.train, s.classes_per_batch, s.seed,
                                s.shard_id, s.num_shards)
        self.backend = _pick_backend(s.backend)
        if not 0 <= s.color_jitter < 1:
            raise ValueError(f"color_jitter must be in [0, 1) (factors drawn from 1 +- it must stay "
                             f"positive); got {s.color_jitter}")
        if self.backend == "cache" and (s.color_jitter > 0 or s.eval_resize):
            raise ConfigError("--backend cache does no colour jitter (--color-jitter) and no "
                              "resize-then-centre-crop evaluation (T4's Cars images); use "
                              "--backend dali, torch or auto")
        self._dali_iter = None
        self._dali_next = None  # (epoch, start) the built DALI pipeline will produce next
        self._cache: torch.Tensor | None = None  # backend "cache": N x S x S x 3 uint8 on device
        # Seconds of each DALI pipeline build or cache fill, in order (engine.fit logs them).
        self.build_times: list[float] = []

    def close(self) -> None:
        """Let go of the DALI pipeline (its reader processes, the next epoch's batches it
        prefetched) and of the device cache. A loader a run is done with holds them until
        the process ends otherwise; a later epoch() builds them again."""
        self._dali_iter = self._dali_next = None
        self._cache = None

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Index arrays of this shard's batches in `epoch`."""
        return self._plan(epoch)

    def __len__(self) -> int:
        return len(self.batches(0))

    @property
    def num_samples(self) -> int:
        return sum(len(b) for b in self.batches(0))

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields the batches of `epoch` from batch index `start` on."""
        if self.backend == "dali":
            yield from self._dali_epoch(epoch, start)
        elif self.backend == "cache":
            yield from self._cache_epoch(epoch, start)
        else:
            yield from self._torch_epoch(epoch, start)

    # ---- DALI ----
    def _dali_epoch(self, epoch: int, start: int):
        key = (epoch, start) if self.train else (0, start)  # eval batches do not depend on epoch
        if self._dali_iter is None or self._dali_next != key:
            self._dali_iter = self._build_dali(*key)
        self._dali_next = None  # an epoch left early leaves the pipeline mid-way: rebuild next time
        position = start
        it = iter(self._dali_iter)
        while True:
            try:
                out = next(it)
            except StopIteration:
                break
            except Exception as err:  # noqa: BLE001 - reader processes raise a bare Exception
                self._dali_iter = None
                upcoming = [self.files[i] for b in self.batches(epoch)[position:position + 4] for i in b]
                bad = _first_bad_image(upcoming)
                if bad:
                    raise decode_error(bad) from err
                raise
            position += 1
            yield out[0]["images"], out[0]["labels"]
        self._dali_next = (epoch + 1, 0) if self.train else (0, 0)

    def _build_dali(self, epoch: int, start: int, raw: bool = False):
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        plan = self._plan
        if raw:  # the cache's fill: every image once, in file order, whatever the shard
            plan = _BatchPlan(self.labels, self.batch_size, train=False, classes_per_batch=None,
                              seed=0, shard_id=0, num_shards=1)
        augment = (self.seed, self.shard_id, self.color_jitter) if self.train and not raw else None
        source = _EncodedBatches(self.files, self.labels, plan, epoch, start, augment)
        readers = self.reader_processes
        if readers is None:
            # Spawned readers (about 8 s to start) pay for themselves in a long training
            # epoch; evaluation passes and the one cache fill read in this process.
            readers = min(4, self.workers) if cuda and self.train and not raw else 0
        pipe = _dali_pipeline(
            source=source, train=self.train and not raw, size=self.image_size,
            eval_resize=self.eval_resize,
            color_jitter=self.color_jitter, raw=raw,
            decode_device="mixed" if cuda else "cpu", parallel=readers > 0, readers=readers,
            batch_size=self.batch_size, num_threads=max(1, self.workers),
            device_id=(self.device.index or 0) if cuda else None,
            py_num_workers=max(1, readers), py_start_method="spawn")
        pipe.build()
        if not raw:  # the cache fill records its whole time itself
            self.build_times.append(time.perf_counter() - t0)
        return DALIGenericIterator(pipe, ["images", "labels"], auto_reset=True,
                                   last_batch_policy=LastBatchPolicy.PARTIAL,
                                   prepare_first_batch=False)

    # ---- device cache ----
    def _cache_epoch(self, epoch: int, start: int):
        if self._cache is None:
            t0 = time.perf_counter()
            self._cache = self._decode_all()
            self.build_times.append(time.perf_counter() - t0)
        labels = torch.as_tensor(self.labels, device=self.device)
        mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1) * 255
        # The epoch's indices (and draws) go to the device once: a host-to-device copy per
        # batch would wait for the GPU's queue (pageable memory) and stall the loop every step.
        batches = self.batches(epoch)
        skipped = sum(len(b) for b in batches[:start])                          # positions before `start`
        batches = batches[start:]
        order = torch.from_numpy(np.concatenate(batches)).to(self.device) if batches else None
        offsets = np.cumsum([0] + [len(b) for b in batches])
        if self.train and batches:
            sizes = np.full(offsets[-1], self.image_size)
            draws = training_draws((self.seed, epoch, self.shard_id), skipped + np.arange(offsets[-1]), sizes, sizes)
            boxes = torch.from_numpy(draws.boxes).float().to(self.device)      # positions x 4
            flips = torch.from_numpy(draws.flips).to(self.device)
        chunk = cache_batches_per_call(self.device, self.batch_size, self.image_size)
        for first in range(0, len(batches), chunk):
            last = min(first + chunk, len(batches))
            index = order[offsets[first]:offsets[last]]                        # n images
            images = self._cache[index].permute(0, 3, 1, 2).float()           # n x 3 x S x S
            if self.train:
                at = slice(offsets[first], offsets[last])                       # these positions
                images = resized_crop_flip(images, boxes[at], flips[at])
            images, chunk_labels = (images - mean) / std, labels[index]
            for i in range(first, last):
                rows = slice(offsets[i] - offsets[first], offsets[i + 1] - offsets[first])
                yield images[rows], chunk_labels[rows]

    def _decode_all(self) -> torch.Tensor:
        """Every file decoded, S x S, into one N x S x S x 3 uint8 tensor on self.device."""
        size = self.image_size
        cache = torch.empty(len(self.files), size, size, 3, dtype=torch.uint8, device=self.device)
        if HAVE_DALI:
            position = 0
            try:
                for out in self._build_dali(0, 0, raw=True):
                    images = out[0]["images"]                                  # B x S x S x 3 uint8
                    cache[position:position + len(images)] = images.to(self.device)
                    position += len(images)
            except RuntimeError as err:
                bad = _first_bad_image(self.files[position:])
                if bad:
                    raise decode_error(bad) from err
                raise
            if position != len(self.files):
                raise RuntimeError(f"cache fill decoded {position} of {len(self.files)} images")
            return cache
        dataset = _RawFiles(self.files, size)
        batches = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=self.workers,
                                              generator=torch.Generator())  # global RNG untouched
        position = 0
        with self._worker_errors(batch_bytes=256 * 3 * size ** 2):  # uint8 batches of 256
            for images in batches:
                cache[position:position + len(images)] = images.to(self.device)
                position += len(images)
        return cache

    # ---- torch fallback ----
    def _torch_epoch(self, epoch: int, start: int):
        dataset = _AugmentedFiles(self, epoch)
        # (position in the epoch, image index) pairs: the augmentation draws from the
        # position, so an image that a P x K batch repeats gets two different crops.
        plan, position = [], 0
        for batch in self.batches(epoch):
            plan.append([(position + j, int(i)) for j, i in enumerate(batch)])
            position += len(batch)
        # Its own generator: the DataLoader otherwise draws its base seed from the global RNG,
        # whose stream (dropout) a resumed epoch must repeat exactly.
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=plan[start:], generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        with self._worker_errors():
            for images, labels in loader:
                yield (images.to(self.device, non_blocking=True),
                       labels.to(self.device, non_blocking=True))

    @contextmanager
    def _worker_errors(self, batch_bytes: int | None = None) -> Iterator[None]:
        """Around a DataLoader's batches (the fallback's epochs, the cache's PIL fill): a bad
        image or a dead worker process becomes one error line, not a worker's traceback.
        batch_bytes: of one batch in shared memory (default: a float32 training batch)."""
        try:
            yield
        except ImageDecodeError as err:
            # From a worker process the message carries the worker's whole traceback; its
            # last line is ours: "...ImageDecodeError: cannot decode image PATH: ...".
            raise ImageDecodeError(str(err).strip().splitlines()[-1].split("ImageDecodeError: ", 1)[-1]) from None
        except RuntimeError as err:
            if "exited unexpectedly" not in str(err):
                raise
            batch_mb = (batch_bytes or self.batch_size * 3 * self.image_size ** 2 * 4) / 2**20
            raise ConfigError(
                f"a loader worker process died ({err}). Workers hand each batch over through "
                f"shared memory (/dev/shm, {_shm_size()} here; {self.workers} workers x 2 batches "
                f"of {batch_mb:.1f} MB in flight), and in a container it is often too small. Run "
                f"with --workers 0, give the container more (docker run --shm-size=8g), or "
                f"install nvidia-dali-cuda120, which does not use it") from err


class _BatchPlan:
    """epoch -> this shard's index batches (picklable, so DALI reader processes can use it)."""

    def __init__(self, labels, batch_size, train, classes_per_batch, seed, shard_id, num_shards):
        self.labels, self.batch_size, self.train = labels, batch_size, train
        self.classes_per_batch, self.seed = classes_per_batch, seed
        self.shard_id, self.num_shards = shard_id, num_shards

    def __call__(self, epoch: int) -> list[np.ndarray]:
        n = len(self.labels)
        if not self.train:
            return sampling.sequential_batches(n, self.batch_size, self.shard_id, self.num_shards)
        if self.classes_per_batch:
            return sampling.class_balanced_batches(
                self.labels, self.classes_per_batch, self.batch_size // self.classes_per_batch,
                epoch, self.seed, self.shard_id, self.num_shards)
        return sampling.shuffled_batches(n, self.batch_size, epoch, self.seed, self.shard_id,
                                         self.num_shards)


class _EncodedBatches:
    """DALI external_source callback: batch_info -> (encoded JPEG bytes, labels), and for
    training (`augment` = (seed, shard_id, color_jitter)) each image's draws as well: crop
    start (top, left) and shape (h, w) in pixels (B x 2 int32 each), the brightness,
    contrast and saturation factors (B float32 each, only when color_jitter > 0) and the
    flip (B int32), from training_draws; each file's size is read from its header once per
    pipeline build and process.

    Picklable, so DALI can run it in reader processes. Epoch numbering starts at
    `first_epoch`; the first epoch starts at batch `first_start` (mid-epoch resume).
    """

    def __init__(self, files, labels, batches_fn, first_epoch: int, first_start: int,
                 augment: tuple[int, int, float] | None = None):
        self.files, self.labels, self.batches_fn = files, labels, batches_fn
        self.first_epoch, self.first_start, self.augment = first_epoch, first_start, augment
        self._cache = (None, None, None)
        self._sizes: dict[int, tuple[int, int]] = {}  # file index -> (height, width) in this process

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        if self._cache[0] != epoch:
            batches = self.batches_fn(epoch)
            self._cache = (epoch, batches, np.cumsum([0] + [len(b) for b in batches]))
        _, batches, offsets = self._cache
        i = info.iteration + (self.first_start if info.epoch_idx == 0 else 0)
        if i >= len(batches):
            raise StopIteration
        idx = batches[i]
        encoded = [_file_bytes(self.files[j]) for j in idx]
        if self.augment is None:
            return encoded, self.labels[idx]
        seed, shard_id, color_jitter = self.augment
        for j, data in zip(idx, encoded):
            if j not in self._sizes:
                self._sizes[j] = _stored_size(data, self.files[j])
        heights, widths = np.array([self._sizes[j] for j in idx]).T                # B each
        draws = training_draws((seed, epoch, shard_id), offsets[i] + np.arange(len(idx)), heights, widths,
                               color_jitter)
        boxes = draws.boxes.astype(np.int32)                                        # B x 4: top, left, h, w
        # DALI takes only densely packed arrays: copies, not strided views
        return (encoded, self.labels[idx], boxes[:, :2].copy(), boxes[:, 2:].copy(),
                *np.ascontiguousarray(draws.jitter.T, dtype=np.float32), draws.flips.astype(np.int32))


def _stored_size(data: np.ndarray, path: str) -> tuple[int, int]:
    """(height, width) of an encoded image, from its header, as stored (EXIF orientation
    ignored, as the decoders here ignore it)."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return im.height, im.width
    except Exception as err:  # noqa: BLE001 - PIL raises several types for a bad header
        raise decode_error(path) from err


def _file_bytes(path: str) -> np.ndarray:
    """A file's bytes (uint8) for DALI's decoder; one that cannot be read raises
    decode_error, not a bare OSError from inside DALI's prefetch."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise decode_error(path) from err


if HAVE_DALI:
    @pipeline_def
    def _dali_pipeline(source, train, size, eval_resize, color_jitter, raw,
                       decode_device, parallel, readers):
        # In parallel mode each prefetched batch goes to one reader process: prefetch as many.
        prefetch = {"prefetch_queue_depth": max(2, readers)} if parallel else {}
        # Training: the source's draws (_EncodedBatches) after the bytes and labels: crop
        # start, crop shape, [brightness, contrast, saturation], flip.
        draw_types = [types.INT32] * 2 + [types.FLOAT] * 3 * (color_jitter > 0) + [types.INT32] if train else []
        jpegs, labels, *draws = fn.external_source(source=source, num_outputs=2 + len(draw_types), batch=True,
                                                   batch_info=True, parallel=parallel,
                                                   dtype=[types.UINT8, types.INT64, *draw_types], **prefetch)
        mean, std = [255 * m for m in MEAN], [255 * s for s in STD]
        # adjust_orientation=False: pixels as stored, EXIF Orientation ignored, as PIL's
        # decode (the torch fallback, torchvision's loaders) leaves them; rotating on one
        # backend only would make the figures depend on whether DALI is installed.
        if train:
            start, shape, *factors, flip = draws
            images = fn.decoders.image_slice(jpegs, device=decode_device, output_type=types.RGB,
                                             adjust_orientation=False, start=start, shape=shape,
                                             axis_names="HW")
            images = fn.resize(images, resize_x=size, resize_y=size)
            if factors:
                images = dali_color_jitter(images, *factors)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=mean, std=std, mirror=flip)
        elif raw:  # the cache fill: S x S x 3 uint8, augmented later on the device
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB,
                                        adjust_orientation=False)
            images = fn.resize(images, resize_x=size, resize_y=size)
        else:
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB,
                                        adjust_orientation=False)
            if eval_resize:
                # subpixel_scale=False: the whole-pixel size the fallback (and torchvision)
                # resizes to; DALI's default keeps the exact scale, shifting the crop by a
                # fraction of a pixel (up to 10 levels apart on textured 500 x 375 images).
                images = fn.resize(images, resize_shorter=eval_resize, subpixel_scale=False)
                images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                                  crop=[size, size], mean=mean, std=std)
            else:
                images = fn.resize(images, resize_x=size, resize_y=size)
                images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                                  mean=mean, std=std)
        if decode_device == "mixed":
            labels = labels.gpu()
        return images, labels


def dali_color_jitter(images, brightness, contrast, saturation):
    """torchvision's adjust_brightness, adjust_contrast and adjust_saturation, in that order
    (as the torch fallback applies them), on DALI's H x W x 3 uint8 images; each factor a
    float or a DataNode. Step by step as torchvision computes them on uint8 images, so the
    two backends give the same pixels (up to float rounding at a level's edge):
      brightness  x * b, clamped to [0, 255], truncated to an integer level
      contrast    x * c + m * (1 - c), m the image's mean grey (the grey levels truncated)
      saturation  x * s + grey * (1 - s), grey = 0.2989 R + 0.587 G + 0.114 B truncated
    DALI's own ops differ: color_twist scales contrast around mid-grey (128), which took a
    dark image's pixels to 0 (up to 68 levels from torchvision), and it rounds each step
    where torchvision truncates (about 1.4 levels brighter over the three steps)."""
    def factor(value):  # arithmetic with GPU images takes GPU operands (after mixed decoding)
        return value.gpu() if images.device == "gpu" and hasattr(value, "gpu") else value

    def level(x):  # torchvision's uint8 result: clamp, then .to(uint8) truncates
        return dmath.floor(dmath.clamp(x, 0, 255))

    def grey(x):  # H x W x 1, torchvision's _rgb_to_grayscale_image weights, floored
        return dmath.floor(fn.coord_transform(x, M=[0.2989, 0.587, 0.114], dtype=types.FLOAT))

    x = level(fn.cast(images, dtype=types.FLOAT) * factor(brightness))
    c, s = factor(contrast), factor(saturation)
    x = level(x * c + fn.reductions.mean(grey(x)) * (1 - c))
    x = level(x * s + grey(x) * (1 - s))
    return fn.cast(x, dtype=types.UINT8)  # whole levels in [0, 255]: exact


def _shm_size() -> str:
    try:
        return f"{shutil.disk_usage('/dev/shm').total / 2**20:.0f} MB"
    except OSError:
        return "size unknown"


def cache_batches_per_call(device: torch.device, batch_size: int, image_size: int) -> int:
    """How many batches backend "cache" augments per call. CUDA: CACHE_CHUNK_BYTES of output
    (each image's result does not depend on its neighbours), so the ~20 small kernels of a
    call are launched once per chunk, not once per step. The CPU launches nothing, and there
    50 batches per call ran 2.6x slower than one (a large new buffer each call): 1."""
    if device.type != "cuda":
        return 1
    return max(1, CACHE_CHUNK_BYTES // (batch_size * 3 * image_size ** 2 * 4))


@dataclass(frozen=True)
class TrainingDraws:
    """The augmentation of n training images: boxes n x 4 int64 (top, left, h, w) in pixels of
    each stored image, jitter n x 3 float64 (brightness, contrast, saturation factors; n x 0
    without colour jitter), flips n bool."""
    boxes: np.ndarray
    jitter: np.ndarray
    flips: np.ndarray


_DRAWS_PER_IMAGE = 26  # 10 x (area, aspect) tries, top, left, flip, 3 jitter factors


def training_draws(key: tuple[int, int, int], positions: np.ndarray, heights: np.ndarray,
                   widths: np.ndarray, color_jitter: float = 0.0) -> TrainingDraws:
    """Random-resized-crop boxes, jitter factors and flips of the images at `positions` (n) of
    one epoch, each image heights[i] x widths[i]; key = (seed, epoch, shard). A pure function:
    image i's draws depend only on key and positions[i], so a batch, one image or a whole
    epoch drawn at once agree, in any process. The box rule is torchvision's
    RandomResizedCrop: up to 10 tries of an area fraction in RANDOM_AREA and an aspect
    ratio in RANDOM_ASPECT (log-uniform), the first that fits; else a centre crop, the whole
    image cut down to the nearest aspect ratio in RANDOM_ASPECT."""
    u = _uniforms(key, np.asarray(positions), _DRAWS_PER_IMAGE)                   # n x 26 in [0, 1)
    heights, widths = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    area = heights * widths                                                      # n
    target = (RANDOM_AREA[0] + (RANDOM_AREA[1] - RANDOM_AREA[0]) * u[:, 0:20:2]) * area[:, None]  # n x 10
    low, high = math.log(RANDOM_ASPECT[0]), math.log(RANDOM_ASPECT[1])
    aspect = np.exp(low + (high - low) * u[:, 1:20:2])                           # n x 10
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.argmax(axis=1)                                                  # n: the first try that fits
    rows, found = np.arange(len(u)), fits.any(axis=1)
    # no try fits (rare, but most images of an aspect far outside RANDOM_ASPECT): centre crop
    wide, tall = widths > heights * RANDOM_ASPECT[1], widths < heights * RANDOM_ASPECT[0]
    whole_h = np.where(tall, np.round(widths / RANDOM_ASPECT[0]), heights).astype(np.int64)
    whole_w = np.where(wide, np.round(heights * RANDOM_ASPECT[1]), widths).astype(np.int64)
    h, w = np.where(found, h[rows, first], whole_h), np.where(found, w[rows, first], whole_w)
    top = np.where(found, np.floor(u[:, 20] * (heights - h + 1)), (heights - h) // 2).astype(np.int64)
    left = np.where(found, np.floor(u[:, 21] * (widths - w + 1)), (widths - w) // 2).astype(np.int64)
    jitter = 1 + color_jitter * (2 * u[:, 23:26] - 1) if color_jitter > 0 else np.empty((len(u), 0))
    return TrainingDraws(np.stack((top, left, h, w), axis=1), jitter, u[:, 22] < 0.5)


def _uniforms(key: tuple[int, ...], positions: np.ndarray, count: int) -> np.ndarray:
    """n x count floats in [0, 1), a pure function of (key, position, column): SplitMix64's
    output function of a counter, vectorised, with 53 random bits each, like numpy's."""
    state = 0
    for part in key:  # fold the key in, one SplitMix64 step a part
        state = _splitmix64(state ^ (int(part) % 2**64))
    counter = positions.astype(np.uint64)[:, None] * np.uint64(count) + np.arange(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the 64-bit sums and products wrap, as SplitMix64 wants
        bits = _splitmix64(counter + np.uint64(state))
    return (bits >> np.uint64(11)) * 2.0 ** -53


def _splitmix64(x):
    """SplitMix64's step on a Python int or a uint64 array (Steele, Lea and Flood, 2014)."""
    if isinstance(x, int):
        x = (x + 0x9E3779B97F4A7C15) % 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
        return x ^ (x >> 31)
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def resized_crop_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Crop each B x 3 x S x S image to its box (B x 4: top, left, h, w in pixels), resize
    the crop to S x S (bilinear), mirror where `flips` (B bool). One grid_sample per batch."""
    b, _, size, _ = images.shape
    top, left, h, w = boxes.unbind(1)
    # Output pixel centre x_o in [-1, 1] (align_corners=False) samples the input at
    # (w / S) x_o + (2 left + w) / S - 1: the box's pixel centres, stretched over S.
    scale_x = torch.where(flips, -w, w) / size
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = scale_x, (2 * left + w) / size - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / size, (2 * top + h) / size - 1
    grid = torch.nn.functional.affine_grid(theta, [b, 3, size, size], align_corners=False)
    # Sample the crop alone, as a crop-then-resize does: clamp to its outer pixel centres.
    low = torch.stack((2 * left + 1, 2 * top + 1), dim=1) / size - 1                # B x 2
    high = torch.stack((2 * (left + w) - 1, 2 * (top + h) - 1), dim=1) / size - 1  # B x 2
    grid = torch.clamp(grid, low[:, None, None, :], high[:, None, None, :])        # B x S x S x 2
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


class _RawFiles(torch.utils.data.Dataset):
    """Cache fill without DALI: index -> S x S x 3 uint8 (PIL decode, resized if not S x S)."""

    def __init__(self, files: Sequence[str], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            with Image.open(self.files[index]) as im:
                im = pil_rgb(im)
                if im.size != (self.size, self.size):
                    im = im.resize((self.size, self.size), Image.BILINEAR)
                return torch.from_numpy(np.asarray(im).copy())
        except Exception as err:
            raise decode_error(self.files[index]) from err


class _AugmentedFiles(torch.utils.data.Dataset):
    """Fallback dataset: (position in the epoch, index) -> (3 x S x S float32 normalised,
    int64 label). Training augmentation is a function of (seed, epoch, position, shard),
    so a resumed epoch repeats it exactly."""

    def __init__(self, spec: ImageLoader, epoch: int):
        self.spec, self.epoch = spec, epoch

    def __len__(self) -> int:
        return len(self.spec.files)

    def __getitem__(self, item: tuple[int, int]):
        from torchvision.transforms.v2 import functional as F
        s = self.spec
        position, index = item
        path = s.files[index]
        try:
            with Image.open(path) as im:
                image = torch.from_numpy(np.asarray(pil_rgb(im)).copy()).permute(2, 0, 1)
        except Exception as err:
            raise decode_error(path) from err
        size = [s.image_size, s.image_size]
        if s.train:
            draws = training_draws((s.seed, self.epoch, s.shard_id), np.array([position]), [image.shape[1]],
                                   [image.shape[2]], s.color_jitter)
            image = F.resized_crop(image, *draws.boxes[0].tolist(), size, antialias=True)
            if s.color_jitter > 0:
                brightness, contrast, saturation = draws.jitter[0].tolist()
                image = F.adjust_brightness(image, brightness)
                image = F.adjust_contrast(image, contrast)
                image = F.adjust_saturation(image, saturation)
            if draws.flips[0]:
                image = F.horizontal_flip(image)
        elif s.eval_resize:
            # DALI's geometry: resize_shorter rounds the longer side (torchvision truncates it),
            # and the centre crop rounds a half-pixel offset up (torchvision rounds half to even).
            h, w = image.shape[1:]
            scale = s.eval_resize / min(h, w)
            image = F.resize(image, [max(1, math.floor(h * scale + 0.5)),
                                     max(1, math.floor(w * scale + 0.5))], antialias=True)
            h, w = image.shape[1:]
            if h >= s.image_size and w >= s.image_size:
                image = F.crop(image, (h - s.image_size + 1) // 2, (w - s.image_size + 1) // 2,
                               s.image_size, s.image_size)
            else:
                image = F.center_crop(image, size)
        else:
            image = F.resize(image, size, antialias=True)
        image = F.normalize(image.float() / 255, MEAN, STD)
        return image, torch.tensor(s.labels[index], dtype=torch.int64)
