"""Where and how a run computes: device, DDP process group, seeding, autocast, shard sums.

    rt = setup_runtime("auto", seed)     # Runtime(device, rank, world_size, amp_dtype)
    with autocast(rt): ...               # bf16 / fp16 on CUDA, a no-op on CPU
    all_reduce_sums([correct, n], rt)    # totals over every rank
    broadcast_from_main(model, rt)       # rank 0's weights and buffers on every rank
    main_first(rt, work)                 # work() on rank 0 while the others wait
    to_device(images, rt)                # B x 3 x H x W on the run's device (channels_last on CUDA)
    leave_process_group()                # at the end of a run (cli.run calls it)

Kept apart from the training loop (engine.py) so that the data path needs neither the loop
nor its plots.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from common.errors import ConfigError, UserError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None  # autocast dtype; None = fp32 throughout

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def cuda_backend_settings() -> None:
    """The CUDA kernel choices every script trains with (bench/bench_train.py measures with
    them too)."""
    # No cuDNN autotuning: on an H200 (2026-12-04, bench/gpu_diagnose.py) it made T1's
    # first step take 9.4 s instead of 0.03 s, and the steps after it were no faster.
    torch.backends.cudnn.benchmark = False
    # No TF32 matmuls (PyTorch's default, set in case a notebook changed it): training runs
    # its matmuls in bf16 / fp16 under autocast, so the fp32 ones are those the code keeps
    # fp32 on purpose, the MS loss's and Recall@K's similarities, where TF32's 10-bit
    # mantissas would err by about 1e-4 in S. cuDNN's fp32 convolutions may use TF32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    # Attention kernels, chosen here rather than in traced code (an sdpa_kernel context
    # inside a compiled graph bypasses AOTAutograd's cache): no math backend, which would
    # store the L x L matrix, so a shape no fused kernel takes raises; no cuDNN attention,
    # which has returned wrong results on Hopper (pytorch #138522).
    torch.backends.cuda.enable_math_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def setup_runtime(device: str = "auto", seed: int = 0) -> Runtime:
    """Pick the device, join the torchrun process group if there is one, seed every RNG."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but torch sees no GPU; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    # torch parses mps, xpu, meta, cpu:1, ...: these scripts run on a CPU or CUDA GPUs only.
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index is not None):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    amp_dtype = None
    if dev.type == "cuda":
        if world_size > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif dev.index is None:  # "cuda": the current GPU, named, so every later call agrees
            dev = torch.device("cuda", torch.cuda.current_device())
        # Before the process group: NCCL and every cuda call without a device use this GPU.
        torch.cuda.set_device(dev)
        cuda_backend_settings()
        amp_dtype = torch.bfloat16 if torch.cuda.get_device_capability(dev) >= (8, 0) else torch.float16
        if rank == 0:
            print(f"{torch.cuda.get_device_name(dev)}: autocast "
                  f"{'bf16' if amp_dtype == torch.bfloat16 else 'fp16 with loss scaling'}")
    if world_size > 1:
        # Long timeout: rank 0 may spend minutes downloading the dataset while the others wait.
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))
    seed_everything(seed + rank)
    return Runtime(dev, rank, world_size, amp_dtype)


def leave_process_group() -> None:
    """End a finished run's torchrun process group, if it joined one: a barrier, then
    destroy_process_group.

    A rank that exits straight after a collective can abort (SIGABRT, "terminate called
    without an active exception"): gloo's worker thread drops the finished all-gather's
    tensors, whose release needs the GIL, while the interpreter shuts down, and torchrun then
    reports a finished (or signalled) run as failed (17 of 60 two-process CPU runs ending in
    all_gather_object, 2026-12-07). After the barrier the last collective holds no Python
    tensor; destroy_process_group is NCCL's documented ending too."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        barrier = dist.barrier(async_op=True)
        while not barrier.is_completed():  # polled: Ctrl-C still reaches Python meanwhile
            time.sleep(0.05)
        barrier.wait()
    except RuntimeError as err:  # a rank failed (torchrun stops the others), or the timeout
        print(f"rank {dist.get_rank()}: the other ranks did not all reach the end "
              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})", file=sys.stderr)
        return
    dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sums(values: list[float], rt: Runtime) -> list[float]:
    """Sum per-rank totals (counts, summed losses): shards differ in size, so never average means."""
    if rt.world_size == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64,
                     device=rt.device if rt.cuda else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def main_first(rt: Runtime, work: Callable[[], object]) -> None:
    """work() on rank 0 (a download, a data check, a folder lock) while the other ranks wait;
    then all go on. If it raises, rank 0 raises it and every other rank a UserError that
    points to it: a plain barrier left them a backend traceback ("Connection closed by
    peer") under rank 0's one-line error."""
    if rt.world_size == 1:
        work()
        return
    error = None
    if rt.is_main:
        try:
            work()
        except Exception as err:  # raised below, once the others know
            error = err
    failed = torch.tensor([float(error is not None)], device=rt.device if rt.cuda else "cpu")
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # also the barrier
    any_failed = failed.item()  # on every rank: NCCL's all_reduce only queues the work
    if error is not None:
        raise error
    if any_failed:
        raise UserError(f"rank 0 stopped with the error above, so rank {rt.rank} stops too")


def broadcast_from_main(module: torch.nn.Module, rt: Runtime) -> None:
    """Give every rank rank 0's parameters and buffers, in place.

    DDP keeps the parameters equal, but each rank's BatchNorm running statistics move with
    its own batches after DDP's buffer broadcast at the start of each forward; an
    evaluation that each rank runs on its own shard must first take rank 0's (the weights
    that best.pt holds), or the shards are scored by different models."""
    if rt.world_size == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def autocast(rt: Runtime):
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32,
                          enabled=rt.amp_dtype is not None)


def to_device(images: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Images to the run's device, channels_last on CUDA (as the model)."""
    images = images.to(rt.device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if rt.cuda else images


def describe_device(rt: Runtime) -> str:
    """What results.json records as the device, e.g. 'NVIDIA H100 x4' or 'cpu'."""
    name = torch.cuda.get_device_name(rt.device) if rt.cuda else "cpu"
    return f"{name} x{rt.world_size}" if rt.world_size > 1 else name
