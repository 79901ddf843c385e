"""Cost of the CUBS blocks: our similarity vs the materialised one, and CUBS-ResNet-18 training steps.

1. CUBS Block 2 forward + backward on B x 64 x 64 x 64 (N = 4096 positions), with "ours"
   (similarity_attention: the Taylor path, docs/cubs.md) vs naive_similarity_attention
   (stores the B x N x N matrix).
   Each variant runs in a fresh subprocess. Peak memory:
     CPU:  rise of the process's peak resident set size (ru_maxrss) from after setup
           (imports, block, input) to after the runs: everything the runs allocated at
           their worst moment, allocator overheads included.
     CUDA: torch.cuda.max_memory_allocated minus memory allocated before the runs.
2. One training step (forward, cross-entropy, backward, SGD step) on 64x64 images, cifar
   stem, 200 classes: ResNet18 vs cubs_resnet18 serial plain / plus, taking turns step by
   step, and serial plain with its similarity replaced by an O(L) stand-in (the blocks'
   gating and projections alone). CUDA: bf16 autocast, batch 256, and the rise of torch.cuda.max_memory_allocated
   during a step (activations, gradients, temporaries; not the resident weights).

3. --profile: where serial plain's extra step time goes. torch.profiler over 5 steps of each
   model; the ops whose self time per step (CPU, or CUDA kernels on a GPU) grew most from
   ResNet-18 to CUBS serial plain.

Times are medians. Run: python -m bench.bench_cubs [--quick] [--device cpu|cuda] [--threads N]
[--all-keys] [--profile]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # allow `python bench/bench_cubs.py`

from bench.machine import load_note  # noqa: E402
from common import cubs  # noqa: E402
from common.cubs import CUBSBlock2, CUBSBlock2Plus, cubs_resnet18  # noqa: E402
from common.models import ResNet18  # noqa: E402
from tests.reference import naive_similarity_attention  # noqa: E402

MIB = 2**20


class NaiveCUBSBlock2(CUBSBlock2):
    """CUBSBlock2 with the materialised B x N x N similarity (same weights, same maths)."""

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = F.relu(self.qkv(x)).flatten(2).unbind(1)
        return x * torch.sigmoid(naive_similarity_attention(q, k, v)).view(b, 1, h, w)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], object], device: torch.device, runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def block2_worker(kind: str, device: torch.device, batch: int, runs: int) -> dict:
    """Runs in its own process so that its peak memory is its own."""
    torch.manual_seed(0)
    block = (CUBSBlock2 if kind == "ours" else NaiveCUBSBlock2)(64).to(device)
    x = torch.randn(batch, 64, 64, 64, device=device, requires_grad=True)

    def step() -> None:
        block(x).sum().backward()

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    seconds = median_seconds(step, device, runs)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"seconds": seconds, "peak_bytes": peak}


def run_block2_in_subprocess(kind: str, device: torch.device, batch: int, runs: int) -> dict:
    command = [sys.executable, "-m", "bench.bench_cubs", "--worker", kind, "--device", device.type,
               "--batch", str(batch), "--runs", str(runs), "--threads", str(torch.get_num_threads())]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_train_step(model: nn.Module, device: torch.device, batch: int) -> Callable[[], None]:
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 64, 64, generator=generator).to(device)
    labels = torch.randint(0, 200, (batch,), generator=generator).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def round_robin_step_times(
    steps: dict[str, Callable[[], None]], device: torch.device, runs: int
) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    """Seconds of each step, per model (runs entries each), and CUDA peak rise during a step.

    Models take turns step by step, so a load change on a shared machine hits all of them
    and the per-round ratios stay comparable.
    """
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, int] = {name: 0 for name in steps}
    for _ in range(runs):
        for name, step in steps.items():
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - before)
    return times, {name: peaks[name] if device.type == "cuda" else None for name in steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer runs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--all-keys", action="store_true",
                        help="also time plus with keys at all N positions (slow on CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile 5 steps of resnet18 and serial plain: the ops that grew most")
    parser.add_argument("--worker", choices=("ours", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        print(json.dumps(block2_worker(args.worker, device, args.batch, args.runs)))
        return

    cuda = device.type == "cuda"
    block_batch, block_runs = (2, 2) if args.quick else (8, 3)
    step_batch = 256 if cuda else (4 if args.quick else 8)
    step_runs = 7 if args.quick else 9  # medians of 3 spread by 0.1x from run to run on 2 cores
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {load_note()}"
          + (f", {torch.cuda.get_device_name(device)}" if cuda else ""))

    print(f"\nCUBS Block 2 forward+backward, C=64, 64x64 (N=4096), batch {block_batch}, "
          f"median of {block_runs} runs, each variant in a fresh process")
    results = {kind: run_block2_in_subprocess(kind, device, block_batch, block_runs) for kind in ("ours", "naive")}
    memory_label = "peak allocated" if cuda else "peak RSS rise"
    for kind, result in results.items():
        print(f"  {kind:5s}  {result['seconds'] * 1000:9.1f} ms   {memory_label} {result['peak_bytes'] / MIB:8.1f} MiB")
    time_ratio = results["naive"]["seconds"] / results["ours"]["seconds"]
    memory_ratio = results["naive"]["peak_bytes"] / max(results["ours"]["peak_bytes"], 1)
    print(f"  naive/ours time    {time_ratio:6.1f}x   (goal >= 10x on CPU)")
    print(f"  naive/ours memory  {memory_ratio:6.1f}x   (goal >= 3x on CPU)")

    print(f"\nTraining step, 64x64, cifar stem, 200 classes, batch {step_batch}"
          + (", bf16 autocast" if cuda else "") + f", median of {step_runs} steps after 1 warm-up, models taking turns")
    models: dict[str, Callable[[], nn.Module]] = {
        "resnet18": lambda: ResNet18(num_classes=200),
        "cubs serial plain": lambda: cubs_resnet18(200, placement="serial", variant="plain"),
        "cubs serial plus": lambda: cubs_resnet18(200, placement="serial", variant="plus"),
    }
    if args.all_keys:
        models["cubs serial plus, all-N keys"] = _plus_with_all_position_keys
    goal = 1.3 if cuda else 1.5
    steps = {}
    for name, build in models.items():
        torch.manual_seed(0)
        steps[name] = make_train_step(build(), device, step_batch)
    # What the plain blocks cost without their similarity: where the rest of the ratio is.
    torch.manual_seed(0)
    steps["cubs serial plain, stand-in"] = _with_stand_in_similarity(make_train_step(
        cubs_resnet18(200, placement="serial", variant="plain"), device, step_batch))
    times, peaks = round_robin_step_times(steps, device, step_runs)
    vanilla = times["resnet18"]
    for name, seconds in times.items():
        median = statistics.median(seconds)
        line = f"  {name:29s} {median * 1000:9.1f} ms"
        if name != "resnet18":
            ratios = [s / v for s, v in zip(seconds, vanilla)]  # same round, same machine load
            line += (f"  {median / statistics.median(vanilla):5.2f}x (per-round ratios "
                     f"{min(ratios):.2f}-{max(ratios):.2f}"
                     + (f"; goal <= {goal}x" + ("; issue 20: <= 1.15x" if name == "cubs serial plain"
                                                and not cuda else "") if "stand-in" not in name else "")
                     + ")")
        if peaks[name] is not None:
            line += f"   peak rise during a step {peaks[name] / MIB:8.1f} MiB"
        print(line)
    if args.profile:
        print_profile_difference(steps["resnet18"], steps["cubs serial plain"], device)


def print_profile_difference(vanilla: Callable[[], None], cubs_step: Callable[[], None],
                             device: torch.device, steps: int = 5, top: int = 12) -> None:
    """Self time per step of each op (CPU) or kernel (CUDA), CUBS serial plain minus ResNet-18:
    the `top` largest differences. Self times, so nested ops are not counted twice. The two
    models take turns, one profiled step each, as the timed steps do."""
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    per_step: dict[str, dict[str, float]] = {"resnet18": {}, "cubs serial plain": {}}
    for _ in range(steps):
        for name, step in (("resnet18", vanilla), ("cubs serial plain", cubs_step)):
            with torch.profiler.profile(activities=activities) as prof:
                step()
                synchronize(device)
            for e in prof.key_averages():
                per_step[name][e.key] = per_step[name].get(e.key, 0.0) + getattr(e, attr) / steps / 1000  # ms
    a, b = per_step["resnet18"], per_step["cubs serial plain"]
    total_a, total_b = sum(a.values()), sum(b.values())
    print(f"\nProfile, {steps} steps each ({'CUDA kernel' if device.type == 'cuda' else 'CPU op'} self "
          f"time per step): resnet18 {total_a:.1f} ms, cubs serial plain {total_b:.1f} ms "
          f"({total_b / total_a:.2f}x); the {top} largest differences:")
    for diff, key in sorted(((b.get(k, 0.0) - a.get(k, 0.0), k) for k in a.keys() | b.keys()), reverse=True)[:top]:
        print(f"  {diff:+8.2f} ms  {key[:70]:70s} ({a.get(key, 0.0):.2f} -> {b.get(key, 0.0):.2f})")


def _with_stand_in_similarity(step: Callable[[], None]) -> Callable[[], None]:
    """`step` with similarity_attention replaced, during the step only, by v + q * mean(k):
    O(L), the same inputs and outputs, gradients to q, k and v, no similarity cost."""
    def stand_in_step() -> None:
        real = cubs.similarity_attention
        cubs.similarity_attention = lambda q, k, v, out_of_range=None: v + q * k.mean(1, keepdim=True)
        try:
            step()
        finally:
            cubs.similarity_attention = real
    return stand_in_step


def _plus_with_all_position_keys() -> nn.Module:
    # The plus Block 2 as first specified (keys at every position), to show why keys are pooled.
    model = cubs_resnet18(200, placement="serial", variant="plus")
    for m in model.modules():
        if isinstance(m, CUBSBlock2Plus):
            m.kv_grid = None
    return model


if __name__ == "__main__":
    main()
