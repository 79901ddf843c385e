"""Where a training step's time goes on a GPU, inside the real loop. One command, < 7 minutes.

    python bench/gpu_diagnose.py [--steps 40] [--batch 256] [--seconds 420] [--out DIR]
    python bench/gpu_diagnose.py --device cpu --steps 3 --batch 4 --width 8   # a dry run

Runs common.engine.fit (the loop every script runs: autocast, channels_last, compile,
checkpoints, a holdout pass with the scripts' diagnostics) on an in-memory loader of random 64 px images already on the
GPU, so no step waits for data and the figures are the model's and the loop's alone:
  range_check   cubs.range_check under CUDA graphs: the flag follows in- and out-of-range
                inputs, and in range the compiled block equals eager (first: it is cheap)
  t3_compiled   T3 serial plain (common/cubs.py), torch.compile, as t3_cubs.py trains it:
                each plain block checks the Taylor range with a torch.cond
  t3_graphs     the same with mode="reduce-overhead": each step replayed as CUDA graphs, the
                range check deferred to one read per step (cubs.range_check), as
                t3_cubs.py --compile-mode reduce-overhead
  t2_compiled   T2's ResNet-18, compiled: the reference
  t2_graphs     the same as CUDA graphs
  t1_compiled   T1's CustomCNN, compiled (its first step includes the compile)
  t1_graphs     the same as CUDA graphs
  profile       torch.profiler over 5 steps of the compiled T3 model (default mode): GPU busy
                time and kernel launches per step, and the top 15 kernels (--device cpu: CPU op
                self times and op calls)
Per-step times come from CUDA events recorded at each step's start (no extra syncs).
TORCH_LOGS=recompiles,graph_breaks is set before torch loads: any recompile or graph break
is printed. Parts run in the order above until --seconds is spent (each part's expected
cost is checked first). Writes DIR/summary.json and prints a table.
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_LOGS", "recompiles,graph_breaks")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cubs, engine, runtime  # noqa: E402
from common.cubs import cubs_resnet18  # noqa: E402
from common.diagnostics import diagnostics  # noqa: E402
from common.models import CustomCNN, ResNet18  # noqa: E402

# Seconds a part is expected to need on an H200 (compiles dominate); a part starts only
# when that much of --seconds is left.
EXPECTED_S = {"range_check": 30, "t3_compiled": 100, "t3_graphs": 100, "t2_compiled": 40, "t2_graphs": 40,
              "t1_compiled": 60, "t1_graphs": 60, "profile": 15}


class HostEvent:
    """torch.cuda.Event's record / elapsed_time on the host clock, for --device cpu."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, other: "HostEvent") -> float:
        return (other.t - self.t) * 1000


def new_event(rt):
    return torch.cuda.Event(enable_timing=True) if rt.cuda else HostEvent()


def sync(rt) -> None:
    if rt.cuda:
        torch.cuda.synchronize()


class MemoryLoader:
    """engine.fit's loader interface over fixed random batches already on the device."""

    def __init__(self, batches: int, batch: int, device: torch.device, classes: int = 200) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        self.images = torch.randn(4, batch, 3, 64, 64, device=device, generator=g)
        self.labels = torch.randint(0, classes, (4, batch), device=device, generator=g)
        self.batches, self.build_times = batches, []
        self.files = [""] * batches * batch
        self.on_step = None

    def __len__(self) -> int:
        return self.batches

    def epoch(self, epoch: int = 0, start: int = 0):
        for i in range(start, self.batches):
            if self.on_step is not None:  # each step starts when its batch arrives
                self.on_step()
            yield self.images[i % 4], self.labels[i % 4]


def timed_fit(name: str, model: torch.nn.Module, mode: str | None, args, rt) -> dict:
    """engine.fit for 2 epochs, compiled in `mode` (None: eager); per-step milliseconds from
    CUDA events at each step start."""
    loader = MemoryLoader(args.steps, args.batch, rt.device)
    events: list = []

    def step_start():
        event = new_event(rt)
        event.record()
        events.append(event)
    loader.on_step = step_start

    def evaluate(m):
        # channels_last on CUDA only, as the scripts: on the CPU (torch 2.14.1) the backward
        # pass of a channels_last 1x1 stride-2 conv with 8 -> 16 channels (ResNet-18's first
        # shortcut at --width 8) corrupts the heap.
        images = runtime.to_device(loader.images[0][:64], rt)
        m.eval()
        with torch.no_grad(), runtime.autocast(rt):
            m(images)
        # As the scripts' holdout scorer: gate statistics and branch gradient norms, eager,
        # between the compiled epochs (an H200 run of T3 as CUDA graphs was 2.2x slower in
        # its second epoch than after the compile in its first; this is what ran in between).
        diagnostics(m, images, loader.labels[0][:64])
        return {"holdout_acc": 0.0}

    cfg = engine.FitConfig(epochs=2, lr=0.05, warmup_epochs=1, patience=10, compile=mode is not None,
                           compile_mode=mode or "default", fresh=True)
    t0 = time.perf_counter()
    # As t3_cubs.py: the range check deferred to one read per step under CUDA graphs only;
    # compiled otherwise, each plain block keeps its torch.cond.
    redo_check = cubs.range_check(model) if mode == "reduce-overhead" else None
    net = engine.for_training(model, rt, cfg.compile, cfg.compile_mode, redo_check=redo_check)
    optimizer, scheduler = engine.optimizer_and_schedule(model, cfg, len(loader))
    with tempfile.TemporaryDirectory() as out:
        fitted = engine.fit(net, loader, torch.nn.CrossEntropyLoss(label_smoothing=0.1), optimizer,
                            scheduler, engine.grad_scaler(rt), evaluate, cfg, out, rt,
                            {"task": "diagnose", "model": name})
    wall = time.perf_counter() - t0
    sync(rt)
    ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    second = ms[args.steps:]  # the gaps between epoch 2's step starts
    median = statistics.median(second)
    history = fitted["history"]
    return {"wall_s": round(wall, 1), "epoch_s": [round(h["epoch_time_s"], 2) for h in history],
            "first_step_s": [h["first_step_s"] for h in history],
            "first_steps_ms": [round(x, 1) for x in ms[:5]],
            "epoch2_step_ms_median": round(median, 2),
            "epoch2_step_ms_p90": round(sorted(second)[int(0.9 * len(second))], 2),
            "images_per_s": round(args.batch / median * 1000),
            "exact_redo_steps": [h.get("exact_redo_steps") for h in history],
            "compiled_graphs": [h.get("compiled_graphs") for h in history],
            "slowest_step_s": [round(h["slowest_step_s"], 3) for h in history],
            "peak_mem_gib": round(history[-1].get("peak_mem_gib", float("nan")), 2),
            # reserved: what a CUDA graph replay uses is in it, not in the allocated peak
            "peak_reserved_gib": round(history[-1].get("peak_reserved_gib", float("nan")), 2)}


def range_check_under_graphs(rt) -> list[dict]:
    """A CUBSBlock2 compiled as CUDA graphs, trained on inputs whose logits are in range
    (scale 0.01) and far out of it (scale 100): what range_check reports after each step,
    and the compiled output's largest distance to eager."""
    torch.manual_seed(0)
    block = cubs.CUBSBlock2(64).to(rt.device)
    check = cubs.range_check(block)
    compiled = torch.compile(block, mode="reduce-overhead" if rt.cuda else "default")
    x = torch.rand(8, 64, 32, 32, device=rt.device)
    rows = []
    for scale in (0.01, 100.0, 0.01, 100.0, 0.01):
        # As engine.fit steps: a new step, forward, backward, the check.
        torch.compiler.cudagraph_mark_step_begin()
        # without it, backward adds into the last replay's .grad, which the graphs' memory
        # has overwritten (a RuntimeError under CUDA graphs; engine.fit zeroes them too)
        block.zero_grad(set_to_none=True)
        out = compiled(x * scale)
        out.float().sum().backward()
        flagged = check()
        got = out.detach().clone()  # before anything else runs: graph outputs are reused
        with torch.no_grad():
            eager = block(x * scale)
        rows.append({"scale": scale, "flagged": flagged,
                     "max_abs_vs_eager": (got - eager).abs().max().item()})
    return rows


def profile_compiled(model: torch.nn.Module, args, rt) -> dict:
    """5 training steps of a compiled model as t3_cubs.py compiles it by default (each plain
    block's torch.cond): wall and GPU-busy milliseconds per step, kernels per step, the top
    15 kernels by time."""
    from torch.profiler import ProfilerActivity, profile
    model.train()  # as engine.fit trains it (its last holdout pass left it in eval mode)
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = runtime.to_device(torch.randn(args.batch, 3, 64, 64), rt)
    y = torch.randint(0, 200, (args.batch,), device=rt.device)

    def train_step():
        with runtime.autocast(rt):
            loss = torch.nn.functional.cross_entropy(compiled(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_step()
    sync(rt)
    activity = ProfilerActivity.CUDA if rt.cuda else ProfilerActivity.CPU
    t0 = time.perf_counter()
    with profile(activities=[activity]) as prof:
        for _ in range(5):
            train_step()
        sync(rt)
    wall_ms = (time.perf_counter() - t0) * 1000 / 5
    time_of = (lambda e: e.device_time_total) if rt.cuda else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if time_of(e) > 0]
    total = sum(time_of(e) for e in events)
    top = sorted(events, key=time_of, reverse=True)[:15]
    return {"wall_ms_per_step": round(wall_ms, 2), "busy_ms_per_step": round(total / 5 / 1000, 2),
            "kernels_per_step": sum(e.count for e in events) // 5,
            "top": [{"kernel": e.key[:90], "share": round(time_of(e) / total, 4),
                     "ms_per_step": round(time_of(e) / 5 / 1000, 3), "calls_per_step": e.count // 5}
                    for e in top]}


def without_nan(value):
    """`value` with every float NaN or infinity (nested in dicts and lists) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="steps per epoch")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=64, help="networks' first-stage width (64: the scripts')")
    p.add_argument("--seconds", type=float, default=420, help="start no part after this")
    p.add_argument("--parts", default=",".join(EXPECTED_S), help="comma-separated subset of the parts")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_diagnose")))
    p.add_argument("--device", default="cuda", help="cuda; cpu = a dry run of this script's code")
    args = p.parse_args()
    unknown = sorted(set(args.parts.split(",")) - set(EXPECTED_S))
    if unknown:  # before any GPU time is spent on the parts that are spelled right
        p.error(f"--parts: no part named {', '.join(unknown)}; the parts are {', '.join(EXPECTED_S)}")
    if args.steps < 2:
        p.error(f"--steps must be >= 2 (each part times the steps after the first), got {args.steps}")
    if args.device != "cpu" and not torch.cuda.is_available():
        sys.exit("gpu_diagnose needs a CUDA GPU (--device cpu for a dry run)")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rt = runtime.setup_runtime(args.device, 0)
    if not rt.cuda:  # the CPU dry run: fp32, as the scripts there
        rt.amp_dtype = None
        # Inductor's C++ builds of whole networks crash in the backward pass on the
        # development VM (torch 2.14.1; vanilla ResNet-18 too), and a GPU runs Triton
        # kernels anyway: the dry run compiles to aot_eager (Dynamo and AOTAutograd only).
        compile_ = torch.compile
        torch.compile = lambda model, mode=None, **kw: compile_(model, backend="aot_eager", **kw)
    summary: dict = {"device": torch.cuda.get_device_name() if rt.cuda else "cpu", "torch": torch.__version__,
                     "batch": args.batch, "steps_per_epoch": args.steps, "parts": {}}

    def due(part: str) -> bool:
        if part not in args.parts.split(","):
            return False
        left = args.seconds - (time.perf_counter() - start)
        if left < EXPECTED_S[part]:
            summary["parts"][part] = f"skipped: {left:.0f} s left of --seconds {args.seconds:.0f}"
            print(f"[diagnose] {part} skipped ({left:.0f} s left)", flush=True)
            return False
        print(f"[diagnose] {part} ({time.perf_counter() - start:.0f} s in)", flush=True)
        return True

    def save() -> None:  # NaN (no figure) as null: strict JSON readers refuse NaN
        (args.out / "summary.json").write_text(json.dumps(without_nan(summary), indent=1, allow_nan=False))

    def run_part(part: str, fn) -> None:
        """One part; an exception (a compiler error, say) is recorded and the next part runs."""
        if not due(part):
            return
        try:
            summary["parts"][part] = fn()
        except Exception as err:  # noqa: BLE001  the diagnosis reports every failure it meets
            summary["parts"][part] = f"failed: {type(err).__name__}: {str(err)[:2000]}"
            print(f"[diagnose] {part} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
        save()

    def fresh(build):
        torch.manual_seed(0)
        return build(200, width=args.width)

    run_part("range_check", lambda: range_check_under_graphs(rt))
    t3 = fresh(cubs_resnet18)
    run_part("t3_compiled", lambda: timed_fit("cubs_serial_plain", t3, "default", args, rt))
    run_part("t3_graphs", lambda: timed_fit("cubs_serial_plain", fresh(cubs_resnet18), "reduce-overhead", args, rt))
    run_part("t2_compiled", lambda: timed_fit("resnet18", fresh(ResNet18), "default", args, rt))
    run_part("t2_graphs", lambda: timed_fit("resnet18", fresh(ResNet18), "reduce-overhead", args, rt))
    run_part("t1_compiled", lambda: timed_fit("custom_cnn", fresh(CustomCNN), "default", args, rt))
    run_part("t1_graphs", lambda: timed_fit("custom_cnn", fresh(CustomCNN), "reduce-overhead", args, rt))
    run_part("profile", lambda: profile_compiled(t3.to(rt.device), args, rt))
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    save()

    parts = summary["parts"]
    print(f"\n{summary['device']}, torch {summary['torch']}, batch {args.batch}, "
          f"{args.steps} steps per epoch, in-memory data")
    print(f"{'run':16s} {'step ms':>8s} {'p90':>7s} {'img/s':>8s} {'epoch1 s':>9s} {'epoch2 s':>9s} "
          f"{'GiB alloc/resv':>14s} {'slowest s (2)':>13s} {'graphs (2)':>10s}")
    for name in ("t2_compiled", "t2_graphs", "t3_compiled", "t3_graphs", "t1_compiled", "t1_graphs"):
        r = parts.get(name)
        if isinstance(r, dict):
            print(f"{name:16s} {r['epoch2_step_ms_median']:8.2f} {r['epoch2_step_ms_p90']:7.2f} "
                  f"{r['images_per_s']:8d} {r['epoch_s'][0]:9.1f} {r['epoch_s'][1]:9.2f} "
                  f"{r['peak_mem_gib']:6.2f} / {r.get('peak_reserved_gib', float('nan')):5.2f} "
                  f"{r['slowest_step_s'][-1]:13.3f} {r['compiled_graphs'][-1]!s:>10s}")
    for t3, t2 in (("t3_compiled", "t2_compiled"), ("t3_graphs", "t2_graphs"), ("t3_graphs", "t2_compiled")):
        if isinstance(parts.get(t3), dict) and isinstance(parts.get(t2), dict):
            print(f"{t3} / {t2} step time: "
                  f"{parts[t3]['epoch2_step_ms_median'] / parts[t2]['epoch2_step_ms_median']:.2f}x")
    if isinstance(parts.get("range_check"), list):
        print("range_check under CUDA graphs (scale, flagged, max |compiled - eager|): "
              + "; ".join(f"{r['scale']} {r['flagged']} {r['max_abs_vs_eager']:.2e}" for r in parts["range_check"]))
    if isinstance(parts.get("profile"), dict):
        prof = parts["profile"]
        unit, calls = ("GPU", "kernels") if rt.cuda else ("CPU op self", "ops")  # the CPU dry run profiles ops
        print(f"compiled T3 profile: {prof['wall_ms_per_step']} ms per step, {unit} time "
              f"{prof['busy_ms_per_step']} ms, {prof['kernels_per_step']} {calls} per step; top {calls} "
              f"(share of {unit} time, ms per step, calls per step):")
        for row in prof["top"]:
            print(f"  {row['share']:6.1%} {row['ms_per_step']:8.3f} {row['calls_per_step']:5d}  {row['kernel']}")
    print(f"wrote {args.out / 'summary.json'} in {summary['wall_s']} s")


if __name__ == "__main__":
    main()
