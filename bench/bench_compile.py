"""torch.compile (inductor, CPU) of every network a script trains: compile time and the
distance to eager, forward + backward. The CI tests build two CUBS residual blocks (serial plain, parallel plus)
and a MixBlock under inductor and capture the whole networks with Dynamo (tests/test_gpu_paths.py);
whole-network inductor builds take 13-97 s each on 2 cores (all ten: 10 min on 2026-11-29,
this project's 2-core VM, fresh cache), so they are here.

    python bench/bench_compile.py [--width 8] [--size 32] [--batch 2] [--only cubs_serial_plain]

Prints per network: first compiled forward+backward (compilation included), the median of
STEPS later compiled steps, the median of STEPS eager steps after an untimed one (the first
eager call pays one-off costs: 0.25 s against 0.008 s later, resnet18_cifar, 2-core VM, 2026-12-07),
and the relative L2 distance of output and input gradient.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.cubs import PLACEMENTS, VARIANTS, cubs_resnet18  # noqa: E402
from common.models import CustomCNN, EmbeddingNet, ResNet18  # noqa: E402

STEPS = 5  # timed steps of each, after the first


def networks(width: int) -> dict[str, torch.nn.Module]:
    nets: dict[str, torch.nn.Module] = {
        "custom_cnn": CustomCNN(10, width=width),
        "resnet18_cifar": ResNet18(10, stem="cifar", width=width),
        # T4's: CUBS-ResNet-18 with the ImageNet stem (serial plain, its default without T3),
        # as Phase A's classifier and inside Phase B's embedding
        "t4_cubs_imagenet": cubs_resnet18(10, stem="imagenet", width=width, d=64),
        "t4_embedding_net": EmbeddingNet(cubs_resnet18(10, stem="imagenet", width=width, d=64), dim=16),
    }
    for placement in PLACEMENTS:
        for variant in VARIANTS:
            nets[f"cubs_{placement}_{variant}"] = cubs_resnet18(10, placement=placement, variant=variant,
                                                                width=width, d=64)
    return nets


def step(model: torch.nn.Module, x: torch.Tensor, readout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(output, input gradient, seconds) of one forward + backward."""
    x = x.clone().requires_grad_()
    start = time.perf_counter()
    out = model(x)
    (out * readout).sum().backward()
    return out.detach(), x.grad, time.perf_counter() - start


def median_seconds(model: torch.nn.Module, x: torch.Tensor, readout: torch.Tensor) -> float:
    return statistics.median(step(model, x, readout)[2] for _ in range(STEPS))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--only", nargs="*", help="network names (default: all)")
    args = p.parse_args()
    names = list(networks(8))
    if set(args.only or ()) - set(names):
        p.error(f"--only: no network named {', '.join(sorted(set(args.only) - set(names)))}; "
                f"the networks are {', '.join(names)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, width {args.width}, "
          f"{args.size}x{args.size}, batch {args.batch}, fullgraph=True, inductor")
    print(f"{'network':22s} {'compile+1st s':>13s} {'compiled s':>10s} {'eager s':>8s} {'out dist':>9s} {'grad dist':>9s}")
    for name, model in networks(args.width).items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        model.eval()  # batch-2 BatchNorm statistics are not what is measured here
        x = torch.randn(args.batch, 3, args.size, args.size)
        readout = torch.randn(model(x).shape)
        out_e, grad_e, _ = step(model, x, readout)
        eager_s = median_seconds(model, x, readout)
        compiled = torch.compile(model, fullgraph=True)
        out_c, grad_c, first_s = step(compiled, x, readout)
        later_s = median_seconds(compiled, x, readout)
        print(f"{name:22s} {first_s:13.1f} {later_s:10.3f} {eager_s:8.3f} "
              f"{relative(out_c, out_e):9.1e} {relative(grad_c, grad_e):9.1e}", flush=True)


if __name__ == "__main__":
    main()
