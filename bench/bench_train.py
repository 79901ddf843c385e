"""Training throughput of the Tiny ImageNet models: images/s per model and per speed option.

Models (input B x 3 x 64 x 64, 200 classes, cifar stem, `--width`):
    custom_cnn          common.models.CustomCNN
    resnet18            common.models.ResNet18
    cubs_serial_plain   common.cubs.cubs_resnet18(placement="serial", variant="plain")
    cubs_serial_plus    common.cubs.cubs_resnet18(placement="serial", variant="plus")
Configurations: every combination of channels_last on/off, bf16 autocast on/off (CUDA only;
"n/a" on CPU) and torch.compile on/off (CUDA by default; on CPU only with --compile-on-cpu,
since compiling is slow there; --no-compile skips it everywhere).

One step is what common.engine does per batch: forward (under autocast when bf16), label-
smoothed cross-entropy (0.1, the scripts' default) on float32 logits, backward, SGD step
(SGD Nesterov over engine.param_groups: weight decay on weights only). The model alone is
compiled, as in engine.fit. Inputs are fixed random tensors already on the device, so this
is pure model throughput. Timing: `--warmup` steps first (compiled configurations get
COMPILE_EXTRA_WARMUP more: their first steps compile the forward and backward graphs), then
`--windows` windows of `--steps` steps each; the device is synchronised before and after
every window, and the step time is the median over windows of window time / steps.

On CUDA also:
    MFU      FLOPs of one step (forward + backward, counted once per model with
             torch.utils.flop_counter.FlopCounterMode on an eager fp32 step at the same batch)
             / step time / the GPU's peak dense bf16 FLOP/s (PEAK_FLOPS table, or
             --peak-tflops). FlopCounterMode counts matmuls, convolutions and attention
             kernels only (not BN, activations or the optimizer), and counts the kernels as
             they run: CUBS plain's similarity runs on CUDA as the Taylor series' products
             and sums (common.cubs, _taylor_ratio_by_sums), which it does not count (a few
             MFLOP an image, against about 13 GFLOP for ResNet-18's forward + backward at
             64 px); only an out-of-range block runs a padded attention kernel (head dim
             1 zero-padded to 8 on CUDA), counted at the padded size.
    peak GiB torch.cuda.max_memory_allocated over the configuration (weights, optimizer
             state, activations; statistics reset per configuration).
With --with-loader DIR (a tiny-imagenet-200 folder, e.g. from
common.synthetic.make_tiny_imagenet; on any device), for each model's fastest configuration:
end-to-end images/s with the real common.loader.ImageLoader (backend auto, train
augmentation, --workers) and the share of the time blocked in next(loader). On a small
dataset every epoch restarts the loader, which counts as waiting.

Nothing here asserts on times. Run: python bench/bench_train.py [--quick] [--device cpu|cuda]
    [--models custom_cnn,resnet18] [--json out.json] [--with-loader DIR]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # allow `python bench/bench_train.py`

from common.cubs import cubs_resnet18  # noqa: E402
from common.engine import param_groups  # noqa: E402
from common.runtime import cuda_backend_settings  # noqa: E402
from common.flops import FLOP_FORMULAS  # noqa: E402
from common.models import CustomCNN, ResNet18  # noqa: E402

NUM_CLASSES = 200
IMAGE_SIZE = 64
LABEL_SMOOTHING = 0.1
LR, WEIGHT_DECAY = 0.1, 5e-4
COMPILE_EXTRA_WARMUP = 3
GIB = 2**30

MODELS: dict[str, Callable[[int], nn.Module]] = {
    "custom_cnn": lambda width: CustomCNN(num_classes=NUM_CLASSES, width=width),
    "resnet18": lambda width: ResNet18(num_classes=NUM_CLASSES, stem="cifar", width=width),
    "cubs_serial_plain": lambda width: cubs_resnet18(NUM_CLASSES, "cifar", "serial", "plain", width),
    "cubs_serial_plus": lambda width: cubs_resnet18(NUM_CLASSES, "cifar", "serial", "plus", width),
}

# Peak dense (no 2:4 sparsity) bf16 tensor-core FLOP/s; first matching pattern wins, so the
# specific H100 variants precede the generic one. Datasheets quote the sparse figure: 2x these.
PEAK_FLOPS: list[tuple[str, float, str]] = [
    (r"\bH200\b", 989e12, "H200 bf16 dense"),
    (r"\bH100\b.*\bPCIe\b", 756e12, "H100 PCIe bf16 dense"),
    (r"\bH100\b.*\bNVL\b", 835e12, "H100 NVL bf16 dense"),
    (r"\bH100\b", 989e12, "H100 SXM bf16 dense"),
    (r"\bA100\b", 312e12, "A100 bf16 dense"),
    (r"\bL4\b", 121e12, "L4 bf16 dense"),
    (r"\bT4\b", 65e12, "T4 fp16 dense (no bf16 tensor cores)"),
]


# ---------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """One combination of speed options; bf16 is None where it does not apply (CPU)."""

    channels_last: bool
    bf16: bool | None
    compile: bool

    def columns(self) -> tuple[str, str, str]:
        """Table cells for channels_last, bf16 and compile."""
        def onoff(flag: bool | None) -> str:
            return "n/a" if flag is None else ("on" if flag else "off")
        return onoff(self.channels_last), onoff(self.bf16), onoff(self.compile)


def make_configs(cuda: bool, compile_allowed: bool) -> list[Config]:
    """Every combination of the options available on this device, eager ones first."""
    bf16_choices: tuple[bool | None, ...] = (False, True) if cuda else (None,)
    compile_choices = (False, True) if compile_allowed else (False,)
    return [Config(cl, bf16, comp)
            for comp, bf16, cl in itertools.product(compile_choices, bf16_choices, (False, True))]


# ---------------------------------------------------------------- one training step
def make_batch(batch_size: int, device: torch.device, channels_last: bool,
               seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random B x 3 x 64 x 64 images (in the given memory format) and B labels, on `device`."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    images = images.to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor,
               labels: Tensor, bf16: bool) -> Tensor:
    """forward (+ bf16 autocast on CUDA), label-smoothed CE, backward, optimizer step."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(bf16)):
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=LABEL_SMOOTHING)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """What time_steps measured."""

    step_s: float  # median over windows of (window time / steps)
    window_step_s: list[float]
    first_step_s: float  # includes compilation for compiled models


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, steps: int,
               windows: int) -> Timing:
    """Run `warmup` (>= 1) untimed steps, then `windows` timed windows of `steps` steps."""
    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    per_step = []
    for _ in range(windows):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        per_step.append((time.perf_counter() - t0) / steps)
    return Timing(statistics.median(per_step), per_step, first)


# ---------------------------------------------------------------- FLOPs and MFU
@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one training step, split at loss.backward()."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def count_step_flops(model: nn.Module, images: Tensor, labels: Tensor,
                     label_smoothing: float = LABEL_SMOOTHING) -> FlopCount:
    """FLOPs of one eager training step's forward (model + CE) and backward.

    Counted by torch.utils.flop_counter.FlopCounterMode (matmul / conv / attention kernels;
    one multiply-add = 2 FLOPs). The backward computes input gradients only where needed:
    for the first layer of a network (input without requires_grad) only the weight gradient,
    so e.g. nn.Linear at batch B counts 2*B*in*out forward and 2*B*in*out backward, or twice
    that backward when `images` requires grad. The model's gradients are cleared afterwards.
    """
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as forward:
        loss = F.cross_entropy(model(images).float(), labels, label_smoothing=label_smoothing)
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as backward:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return FlopCount(forward.get_total_flops(), backward.get_total_flops())


def peak_flops_for(device_name: str) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, description) of a GPU by name; (None, "unknown peak") if unlisted.

    A MIG slice gets "unknown peak": it has only part of the GPU's compute.
    """
    if "MIG" in device_name:
        return None, "unknown peak (MIG slice)"
    for pattern, peak, label in PEAK_FLOPS:
        if re.search(pattern, device_name):
            return peak, label
    return None, "unknown peak"


def mfu(flops_per_step: int | None, step_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s / peak FLOP/s (None when either is unknown)."""
    if not flops_per_step or peak is None or step_s <= 0:
        return None
    return flops_per_step / step_s / peak


# ---------------------------------------------------------------- benchmarks
@dataclass
class Result:
    """One table row / JSON entry: a model under one configuration, synthetic inputs."""

    model: str
    channels_last: bool
    bf16: bool | None
    compile: bool
    batch_size: int
    images_per_s: float | None = None
    step_ms: float | None = None
    window_step_ms: list[float] = field(default_factory=list)
    first_step_s: float | None = None
    flops_per_step: int | None = None
    achieved_tflops: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    error: str | None = None


@dataclass
class LoaderResult:
    """End-to-end figures of a model's fastest configuration fed by ImageLoader."""

    model: str
    channels_last: bool
    bf16: bool | None
    compile: bool
    batch_size: int
    backend: str = ""
    steps: int = 0
    images_per_s: float | None = None
    synthetic_images_per_s: float | None = None
    data_wait_share: float | None = None
    error: str | None = None


def _build(name: str, width: int, device: torch.device, channels_last: bool,
           compile_model: bool) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(model, the module to call (compiled or not), optimizer), seeded for repeatability."""
    torch.manual_seed(0)
    model = MODELS[name](width).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(param_groups(model, WEIGHT_DECAY), lr=LR, momentum=0.9, nesterov=True)
    return model, (torch.compile(model) if compile_model else model), optimizer


def _release(device: torch.device, compiled: bool) -> None:
    """Free the previous configuration's memory (and compiled graphs) before the next."""
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_flops(name: str, width: int, batch_size: int, device: torch.device) -> int:
    """FLOPs of one training step of model `name` at `batch_size` (eager, fp32, counted once)."""
    model, _, _ = _build(name, width, device, channels_last=False, compile_model=False)
    images, labels = make_batch(batch_size, device, channels_last=False)
    try:
        return count_step_flops(model, images, labels).total
    finally:
        del model, images, labels
        _release(device, compiled=False)


def bench_config(name: str, cfg: Config, args: argparse.Namespace, device: torch.device,
                 flops: int | None, peak: float | None) -> Result:
    """Synthetic-input throughput of model `name` under `cfg`."""
    result = Result(name, cfg.channels_last, cfg.bf16, cfg.compile, args.batch_size,
                    flops_per_step=flops)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model, train_model, optimizer = _build(name, args.width, device, cfg.channels_last, cfg.compile)
        images, labels = make_batch(args.batch_size, device, cfg.channels_last)
        warmup = args.warmup + (COMPILE_EXTRA_WARMUP if cfg.compile else 0)
        timing = time_steps(lambda: train_step(train_model, optimizer, images, labels, bool(cfg.bf16)),
                            device, warmup, args.steps, args.windows)
    except Exception as error:  # noqa: BLE001 - e.g. OOM or a compiler failure: report, go on
        result.error = _describe(error)
        return result
    finally:
        model = train_model = optimizer = images = labels = None  # noqa: F841
        _release(device, cfg.compile)
    result.step_ms = timing.step_s * 1e3
    result.window_step_ms = [t * 1e3 for t in timing.window_step_s]
    result.first_step_s = timing.first_step_s
    result.images_per_s = args.batch_size / timing.step_s
    if flops:
        result.achieved_tflops = flops / timing.step_s / 1e12
    result.mfu = mfu(flops, timing.step_s, peak)
    if cuda:
        result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / GIB
    return result


def _describe(error: Exception) -> str:
    """One-line summary of an exception for the table and the JSON file."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _endless(loader: Any) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of epoch 0, 1, 2, ... of an ImageLoader, without end."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def bench_with_loader(best: Result, args: argparse.Namespace, device: torch.device) -> LoaderResult:
    """End-to-end images/s of `best`'s model and configuration fed by the real ImageLoader.

    The data wait share is the time blocked in next(loader) over the total time of the
    timed steps (warm-up and compile steps excluded; the device is synchronised at both ends).
    """
    from common.datasets import load_tiny_imagenet
    from common.loader import ImageLoader, LoaderSettings

    out = LoaderResult(best.model, best.channels_last, best.bf16, best.compile, best.batch_size,
                       synthetic_images_per_s=best.images_per_s)
    model = train_model = optimizer = None
    try:
        splits = load_tiny_imagenet(args.with_loader, holdout_per_class=0)
        loader = ImageLoader(splits.train.files, splits.train.labels,
                             LoaderSettings(batch_size=args.batch_size,
                                            train=True, image_size=IMAGE_SIZE, device=device,
                                            workers=args.workers, backend="auto"))
        if len(loader) == 0:
            raise ValueError(f"{len(splits.train)} training images in {args.with_loader}: "
                             f"not one full batch of {args.batch_size}")
        out.backend = loader.backend
        model, train_model, optimizer = _build(best.model, args.width, device, best.channels_last,
                                               best.compile)
        batches = _endless(loader)

        def step() -> float:
            t0 = time.perf_counter()
            images, labels = next(batches)
            waited = time.perf_counter() - t0
            images = images.to(device, non_blocking=True)
            if best.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            train_step(train_model, optimizer, images, labels.to(device, non_blocking=True),
                       bool(best.bf16))
            return waited

        for _ in range(args.warmup + (COMPILE_EXTRA_WARMUP if best.compile else 0)):
            step()
        out.steps = args.steps * args.windows
        synchronize(device)
        t0 = time.perf_counter()
        wait = sum(step() for _ in range(out.steps))
        synchronize(device)
        total = time.perf_counter() - t0
    except Exception as error:  # noqa: BLE001 - report and go on with the other models
        out.error = _describe(error)
        return out
    finally:
        model = train_model = optimizer = None  # noqa: F841
        _release(device, best.compile)
    out.images_per_s = out.steps * args.batch_size / total
    out.data_wait_share = wait / total
    return out


# ---------------------------------------------------------------- output
def _fmt(value: float | None, spec: str) -> str:
    """format(value, spec), or "-" for a missing or non-finite value."""
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def table_header(cuda: bool) -> str:
    """Column titles matching table_line."""
    head = f"{'model':<18} {'ch_last':>7} {'bf16':>5} {'compile':>7} {'images/s':>10} {'step ms':>9}"
    return head + (f" {'MFU %':>6} {'peak GiB':>8}" if cuda else "")


def table_line(r: Result, cuda: bool) -> str:
    """One aligned row: model, options, images/s, step ms (and MFU %, peak GiB on CUDA)."""
    cl, bf16, comp = Config(r.channels_last, r.bf16, r.compile).columns()
    line = f"{r.model:<18} {cl:>7} {bf16:>5} {comp:>7} "
    if r.error:
        return line + f"failed: {r.error}"
    line += f"{_fmt(r.images_per_s, '10.1f')} {_fmt(r.step_ms, '9.2f')}"
    if cuda:
        line += f" {_fmt(None if r.mfu is None else 100 * r.mfu, '6.1f'):>6} {_fmt(r.peak_mem_gib, '8.2f')}"
    return line


def loader_line(r: LoaderResult) -> str:
    """End-to-end row for one model's fastest configuration."""
    cl, bf16, comp = Config(r.channels_last, r.bf16, r.compile).columns()
    line = f"{r.model:<18} {cl:>7} {bf16:>5} {comp:>7} "
    if r.error:
        return line + f"failed: {r.error}"
    return line + (f"{_fmt(r.images_per_s, '10.1f')} end-to-end ({r.backend}), "
                   f"{_fmt(r.synthetic_images_per_s, '.1f')} synthetic, "
                   f"data wait {_fmt(100 * r.data_wait_share, '.1f')}% of step time")


# ---------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line and fill the device-dependent defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, help="default 256 on CUDA, 16 on CPU")
    p.add_argument("--steps", type=int, help="timed steps per window (default 20 CUDA / 3 CPU)")
    p.add_argument("--windows", type=int, help="timed windows, median taken (default 5 / 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10 / 2; "
                   f"+{COMPILE_EXTRA_WARMUP} when compiled)")
    p.add_argument("--width", type=int, default=64, help="model width w (64 in the scripts)")
    p.add_argument("--quick", action="store_true", help="fewer steps and windows")
    p.add_argument("--compile-on-cpu", action="store_true", help="also time torch.compile on CPU")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the GPU for MFU "
                   "(default: from the device name)")
    p.add_argument("--with-loader", metavar="DIR", type=Path,
                   help="tiny-imagenet-200 folder: also time the real ImageLoader")
    p.add_argument("--workers", type=int, default=4, help="loader workers with --with-loader")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's; 1 is "
                   "steadier on a busy machine)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU")
    cuda = args.device.startswith("cuda")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    args.models = args.models.split(",")
    if args.quick:
        defaults = {"steps": 5, "windows": 3, "warmup": 3} if cuda else {"steps": 2, "windows": 2, "warmup": 1}
    else:
        defaults = {"steps": 20, "windows": 5, "warmup": 10} if cuda else {"steps": 3, "windows": 3, "warmup": 2}
    defaults["batch_size"] = 256 if cuda else 16
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "steps", "windows", "warmup", "width", "threads"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints the table, returns 0 (1 if any configuration failed)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    """main() after parsing: the table, the loader rows, the JSON file."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        cuda_backend_settings()  # the scripts' kernel choices (no autotuning, TF32 convolutions only, SDPA)
        device_name = torch.cuda.get_device_name(device)
        if args.peak_tflops:
            peak, peak_label = args.peak_tflops * 1e12, "--peak-tflops"
        else:
            peak, peak_label = peak_flops_for(device_name)
    else:
        device_name = f"CPU ({torch.get_num_threads()} intra-op threads)"
        peak, peak_label = None, "n/a on CPU"
    configs = make_configs(cuda, compile_allowed=not args.no_compile and (cuda or args.compile_on_cpu))

    print(f"torch {torch.__version__}, {device_name}; batch {args.batch_size}, width {args.width}, "
          f"{IMAGE_SIZE}x{IMAGE_SIZE} input, {NUM_CLASSES} classes; median of {args.windows} windows "
          f"x {args.steps} steps after {args.warmup} warm-up")
    if cuda:
        peak_text = f"{peak / 1e12:.0f} TFLOP/s ({peak_label})" if peak else peak_label
        print(f"MFU peak: {peak_text}")
    elif not args.compile_on_cpu:
        print("compile on CPU: not timed (pass --compile-on-cpu)")
    print(table_header(cuda), flush=True)

    results: list[Result] = []
    loader_results: list[LoaderResult] = []
    for name in args.models:
        try:
            flops: int | None = model_flops(name, args.width, args.batch_size, device)
        except Exception as error:  # noqa: BLE001 - MFU then stays unknown
            print(f"{name}: FLOP count failed ({type(error).__name__}: {error})")
            flops = None
        model_results = []
        for cfg in configs:
            model_results.append(bench_config(name, cfg, args, device, flops, peak))
            print(table_line(model_results[-1], cuda), flush=True)
        results.extend(model_results)
        if args.with_loader:
            timed = [r for r in model_results if r.images_per_s]
            if timed:
                loader_results.append(
                    bench_with_loader(max(timed, key=lambda r: r.images_per_s), args, device))
    if loader_results:
        print(f"end-to-end with ImageLoader ({args.with_loader}), fastest configuration per model:")
        for lr in loader_results:
            print(loader_line(lr), flush=True)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "torch": torch.__version__, "device": str(device), "device_name": device_name,
            "batch_size": args.batch_size, "width": args.width, "image_size": IMAGE_SIZE,
            "num_classes": NUM_CLASSES, "steps": args.steps, "windows": args.windows,
            "warmup": args.warmup, "peak_flops": peak, "peak_source": peak_label,
            "results": [asdict(r) for r in results],
            "loader": [asdict(r) for r in loader_results],
        }, indent=2) + "\n")
    failed = any(r.error for r in results) or any(r.error for r in loader_results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
