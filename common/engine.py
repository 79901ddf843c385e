"""The training loop, in torchvision's shape (references/classification/train.py): one
epoch in `train_one_epoch`, the epochs in `fit`. The script builds what it trains with:

    net = engine.for_training(model, rt, compile=cfg.compile, mode=cfg.compile_mode)
    optimizer, scheduler = engine.optimizer_and_schedule(model, cfg, steps_per_epoch=len(loader))
    scaler = engine.grad_scaler(rt)
    fitted = engine.fit(net, loader, loss_fn, optimizer, scheduler, scaler, evaluate, cfg, out, rt, meta)

`fit` trains until `cfg.epochs` or early stopping and leaves in `out/`:
    last.pt        full state after every epoch (and on SIGINT/SIGTERM, mid-epoch)
    best.pt        the same state at the best holdout score
    metrics.jsonl  one record per epoch (train/holdout loss and accuracy, lr, time, images/s)
Rerunning the same command continues from last.pt (common/checkpoint.RunCheckpoints); a
finished run is not retrained. A signal ends the loop with errors.Interrupted after last.pt
is saved; cli.run exits with 128 + the signal's number.

Choices: the LR is set per step, linear warmup then cosine decay to zero: warmup keeps the
large-batch early steps stable, cosine needs no tuning of decay points and ends at a small
LR where the holdout score peaks. Autocast in bf16 on GPUs with bf16 tensor cores, else fp16
with a GradScaler (runtime.setup_runtime picks); channels_last and torch.compile on CUDA.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from common.checkpoint import RunCheckpoints, RunProgress
from common.errors import Interrupted, UserError
from common.files import write_text
from common.runtime import Runtime, all_reduce_sums, autocast, broadcast_from_main, describe_device, to_device
from common.schema import CheckpointMeta, FitConfig

# (outputs, labels) -> mean loss; outputs in fp32: B x classes logits, or B x D embeddings
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- what the script builds
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The optimiser's two groups: weight decay on weights (conv, linear: ndim > 1, the gates'
    projections included), none on biases, norms and the plus blocks' gate scale gamma (0-d
    and 1-d tensors), which decay would only pull towards 0."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear from 1/warmup to 1 over `warmup_steps`, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def optimizer_and_schedule(model: torch.nn.Module, cfg: FitConfig, steps_per_epoch: int
                           ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The recipe's optimiser on param_groups(model, cfg.weight_decay): SGD with Nesterov
    momentum 0.9, or AdamW (cfg.optimizer); and its schedule, stepped once per batch:
    warmup_cosine over cfg.epochs, warming up for cfg.warmup_epochs (at least one step)."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    elif cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        raise ValueError(f"cfg.optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    total, warmup = cfg.epochs * steps_per_epoch, max(1, round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
    return optimizer, scheduler


@dataclass
class TrainModel:
    """The network as the loop steps it."""
    module: torch.nn.Module  # the network itself: checkpoints hold its state
    step: torch.nn.Module  # what each training step calls: compiled and/or DDP-wrapped
    eager: torch.nn.Module  # uncompiled (DDP-wrapped under DDP): redone steps run it
    graphs: bool = False  # replayed as CUDA graphs: each step marks its start
    redo_check: Callable[[], bool] | None = None  # see for_training


def for_training(model: torch.nn.Module, rt: Runtime, compile: bool = False, mode: str = "default",
                 redo_check: Callable[[], bool] | None = None) -> TrainModel:
    """`model` on rt.device (channels_last on CUDA), in DDP under torchrun, torch.compile'd
    if `compile`. mode "reduce-overhead" replays each step as CUDA graphs, in one process
    only (under DDP the graphs would have to capture its all-reduce: not tried).

    redo_check: called after each compiled step's backward pass; True means the compiled
    step was not exact (cubs.range_check), and the step is recomputed in eager mode before
    the optimiser uses its gradients (exact_redo_steps in metrics.jsonl). Dropped when not
    compiling: eager steps branch exactly."""
    model.to(rt.device)
    if rt.cuda:
        model.to(memory_format=torch.channels_last)
    eager = model
    if rt.world_size > 1:
        eager = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.cuda else None)
    graphs = compile and mode == "reduce-overhead" and rt.world_size == 1
    if not compile:
        return TrainModel(model, eager, eager)
    step = torch.compile(eager, mode="reduce-overhead" if graphs else "default")
    return TrainModel(model, step, eager, graphs, redo_check)


def grad_scaler(rt: Runtime) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; a no-op scaler for bf16 and fp32."""
    return torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)


class EarlyStopping:
    """Stop when the holdout score has not improved by more than `min_delta` for `patience`
    epochs. The best epoch (best.pt) is the highest score whatever min_delta: min_delta only
    decides which improvements reset the patience, counted from the score that last did."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best_score, self.best_epoch, self.bad_epochs = -math.inf, -1, 0
        self.reference = -math.inf  # the score of the last improvement by more than min_delta

    def update(self, score: float, epoch: int) -> bool:
        """Record `score` of `epoch`; True if it is the best so far."""
        if score > self.reference + self.min_delta:
            self.reference, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]
        # Checkpoints from before the two were kept apart: the best score was the reference.
        self.reference = state.get("reference", self.best_score)


class NonFiniteLoss(UserError, RuntimeError):
    pass


# ---------------------------------------------------------------- one epoch
def train_one_epoch(net: TrainModel, loader, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: torch.amp.GradScaler, *, rt: Runtime, epoch: int,
                    start: int = 0, so_far: dict[str, float] | None = None, grad_clip: float = 0.0,
                    top1: bool = True, signals: list[int] | None = None,
                    epochs: int = 0) -> dict[str, Any]:
    """Train one epoch from batch `start` on (`so_far`: the sums of its batches before it,
    from a mid-epoch resume); returns its metrics.jsonl statistics. top1: count the correct
    top-1 predictions (classifiers; train_acc). A signal in `signals` (on any DDP rank)
    raises Interrupted with the sums so far, for last.pt."""
    meter = _Meter(rt, so_far, top1)
    net.module.train()
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    bar = tqdm(total=len(loader), initial=start, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
               disable=not (rt.is_main and _interactive()), mininterval=2, dynamic_ncols=True)
    builds_before, step, redone, first_step_s = len(loader.build_times), start, 0, None
    graphs_before, step_end, slowest_step_s = _compiled_graphs(), meter.elapsed(), 0.0
    # The LR of the step before this call (a resumed epoch whose last batch was done reports it)
    lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](max(0, scheduler.last_epoch - 1))
    # A redone step must start from the buffers the compiled pass found: its forward pass
    # has updated BatchNorm's running statistics already (with NaN, past the series' range).
    buffers = list(net.module.buffers()) if net.redo_check is not None else []
    saved = [b.clone() for b in buffers]
    for images, labels in meter.timed(loader.epoch(epoch, start)):
        images, labels = to_device(images, rt), labels.to(rt.device, non_blocking=True)
        if buffers:
            torch._foreach_copy_(saved, buffers)  # one launch for all of them
        if net.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(rt):
            outputs = net.step(images)
            loss = loss_fn(outputs.float(), labels)
        # Read now: a CUDA graph replay (the next step) reuses the buffer `outputs` lives in.
        correct = (outputs.argmax(1) == labels).sum() if top1 else None
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if net.redo_check is not None and _agree_any(net.redo_check(), rt):
            optimizer.zero_grad(set_to_none=True)  # the compiled step was not exact: redo it
            torch._foreach_copy_(buffers, saved)
            with autocast(rt):
                outputs = net.eager(images)
                loss = loss_fn(outputs.float(), labels)
            correct = (outputs.argmax(1) == labels).sum() if top1 else None
            scaler.scale(loss).backward()
            redone += 1
        if grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(net.module.parameters(), grad_clip)
        scaler.step(optimizer)  # skipped (and the scale lowered) if fp16 gradients overflowed
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]  # this step's: the epoch reports its last step's
        scheduler.step()
        meter.add(loss, correct, len(labels))
        step += 1
        if step == start + 1:  # start-up cost (loader build, compile) in view
            first_step_s = meter.elapsed(sync=True)
        step_start, step_end = step_end, meter.elapsed()
        slowest_step_s = max(slowest_step_s, step_end - step_start)
        bar.update(1)
        signum = _stop_requested(step, meter, signals or [], rt, epoch, bar)
        if signum:
            bar.close()
            raise Interrupted(signum, epoch, step, meter.sums(every_rank=True))
    bar.close()
    return {**meter.epoch_stats(epoch, step), "lr": lr,
            # this process's first step (its first batch's wait included) and the loader
            # builds (DALI pipelines, the device cache) it waited for
            "first_step_s": first_step_s, "loader_builds_s": loader.build_times[builds_before:],
            # a one-time stall inside the epoch (a recompile, a CUDA graph recording) shows in
            # its slowest step (host time, its data wait included) and in the graphs compiled
            "slowest_step_s": slowest_step_s,
            **({"compiled_graphs": _compiled_graphs() - graphs_before}
               if net.step is not net.eager else {}),
            **({"exact_redo_steps": redone} if net.redo_check is not None else {}),
            # a CUDA graph replay allocates nothing: its activations live in the graphs' pool,
            # which counts as reserved memory only, so peak_mem_gib leaves them out there
            **({"peak_mem_gib": torch.cuda.max_memory_allocated(rt.device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(rt.device) / 2**30} if rt.cuda else {})}


def _compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far, recompiles included."""
    from torch._dynamo.utils import counters  # Dynamo's own tally; no public equivalent
    return counters["stats"]["unique_graphs"]


class _Meter:
    """One epoch's running sums (loss, correct, images, time, data wait), on top of those
    of its batches before a mid-epoch resume. Loss and correct stay on the device (float64)
    so that a step does not wait for them."""

    def __init__(self, rt: Runtime, so_far: dict[str, float] | None, top1: bool) -> None:
        self.rt = rt
        self.before = dict(so_far or {"loss": 0.0, "correct": 0.0, "n": 0.0, "time": 0.0, "wait": 0.0})
        if rt.rank > 0:  # last.pt's sums are every rank's (sums(every_rank=True)), counted by rank 0
            self.before.update(loss=0.0, correct=0.0, n=0.0)
        self.loss = torch.zeros((), device=rt.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=rt.device, dtype=torch.float64)
        self.counted_correct = top1  # not from the sums: 0 correct so far is a count too
        self.n = self.wait = 0.0
        self.t0 = time.perf_counter()

    def timed(self, batches: Iterator) -> Iterator:
        """The batches, timing the wait for each (data_wait_share)."""
        while True:
            t = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            yield batch

    def add(self, loss: torch.Tensor, correct: torch.Tensor | None, n: int) -> None:
        self.loss += loss.detach() * n
        if correct is not None:
            self.correct += correct
        self.n += n

    def elapsed(self, sync: bool = False) -> float:
        if sync and self.rt.cuda:
            torch.cuda.synchronize(self.rt.device)  # queued GPU work belongs to this time
        return time.perf_counter() - self.t0

    def sums(self, every_rank: bool = False) -> dict[str, float]:
        """This epoch's sums so far. every_rank: loss, correct and n summed over the DDP ranks
        (a collective: every rank calls it), as last.pt stores them ("partial"); time and wait
        stay this rank's."""
        b = self.before
        s = {"loss": b["loss"] + self.loss.item(), "n": b["n"] + self.n,
             "correct": b["correct"] + self.correct.item(), "time": b["time"] + self.elapsed(),
             "wait": b["wait"] + self.wait}
        if every_rank and self.rt.world_size > 1:
            s["loss"], s["correct"], s["n"] = all_reduce_sums([s["loss"], s["correct"], s["n"]], self.rt)
        return s

    def epoch_stats(self, epoch: int, step: int) -> dict[str, float]:
        """train_loss (and train_acc) over every rank's images, and the epoch's time."""
        elapsed = self.elapsed(sync=True)
        s = self.sums()
        loss, correct, n = all_reduce_sums([s["loss"], s["correct"], s["n"]], self.rt)
        _check_finite(loss, epoch, step)
        epoch_time = self.before["time"] + elapsed
        return {"train_loss": loss / n, **({"train_acc": correct / n} if self.counted_correct else {}),
                "epoch_time_s": epoch_time, "train_images": n,
                "images_per_s": n / max(1e-9, epoch_time),
                "data_wait_share": s["wait"] / max(1e-9, epoch_time)}


def _stop_requested(step: int, meter: _Meter, signals: list[int], rt: Runtime, epoch: int,
                    bar) -> int:
    """Every 25 steps (every step in one process once a signal came) the ranks agree on
    whether to stop: acting on a local signal or NaN alone would leave the other ranks
    waiting in their next all-reduce. Returns the signal to stop for (0: go on). Raises
    NonFiniteLoss if any rank's loss is."""
    if step % 25 and not (rt.world_size == 1 and signals):
        return 0
    s = meter.sums()
    seen_loss = s["loss"] / max(1, s["n"])
    stop, finite = _agree(signals[0] if signals else 0, math.isfinite(seen_loss), rt)
    if not finite:  # here, or on another rank: then this rank reports it as nan
        bad_loss = seen_loss if not math.isfinite(seen_loss) else math.nan
        _check_finite(bad_loss, epoch, step)
    bar.set_postfix(loss=f"{seen_loss:.3f}", acc=f"{s['correct'] / max(1, s['n']):.3f}",
                    img_s=f"{s['n'] / max(1e-9, s['time']):.0f}")
    return stop


# ---------------------------------------------------------------- the epochs
def fit(net: TrainModel, loader, loss_fn: LossFn, optimizer: torch.optim.Optimizer, scheduler,
        scaler: torch.amp.GradScaler, evaluate: Callable[[torch.nn.Module], dict[str, Any]],
        cfg: FitConfig, out: str | Path, rt: Runtime, meta: CheckpointMeta, *,
        score_key: str = "holdout_acc", top1: bool = True, flag_names: dict[str, str] | None = None,
        on_epoch: Callable[[list[dict], bool], None] | None = None) -> dict[str, Any]:
    """Train `net` epoch by epoch, resuming from `out` (see the module docstring); returns
    {best_epoch, best_score, epochs_run, train_time_s, images_per_s, history, stopped_early,
    finished}. evaluate(model) -> {score_key: ..., ...} after each epoch; on_epoch(history,
    final): rank 0, e.g. to draw curves.png; after each epoch's metrics.jsonl (final False),
    and once with final True when this call stops training: the run finished (before
    last.pt records it) or stopped early (a signal, an error, --stop-after-epoch); flag_names:
    RunCheckpoints'."""
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)
    run = RunCheckpoints(Path(out), rt, meta, asdict(cfg), flag_names, model=net.module, optimizer=optimizer,
                         scheduler=scheduler, scaler=scaler, early_stopping=stopper)
    with run.held(), _recorded_signals() as signals:
        if cfg.fresh:
            run.discard()
        progress = RunProgress() if cfg.fresh else run.resume()
        if not progress.finished:  # what this process trains, it describes (a re-report keeps it)
            progress.device = describe_device(rt)
        epochs_here = 0
        try:
            while not progress.finished:
                if progress.epoch >= cfg.epochs or stopper.should_stop:
                    progress.finished = True
                    # Again (a kill after an epoch's last.pt may have missed its metrics), and
                    # before last.pt records the finish: a rerun after a kill between comes back here.
                    _write_metrics(progress.history, run, rt, on_epoch, True)
                    run.save(progress, run.last)
                    break
                if cfg.stop_after_epoch is not None and epochs_here >= cfg.stop_after_epoch:
                    break
                # Under DDP the steps agree on a signal every 25 steps only: an epoch of fewer
                # steps (T4 on 3+ GPUs), or a signal after its last 25th, stops here, saved.
                _stop_if_signalled(signals, progress, run, cfg, rt)
                t0 = time.perf_counter()
                try:
                    stats = train_one_epoch(net, loader, loss_fn, optimizer, scheduler, scaler, rt=rt,
                                            epoch=progress.epoch, start=progress.step,
                                            so_far=progress.partial, grad_clip=cfg.grad_clip,
                                            top1=top1, signals=signals, epochs=cfg.epochs)
                except Interrupted as stop:
                    _check_finite_weights(net.module, stop.epoch, stop.step)
                    progress.step, progress.partial = stop.step, stop.partial
                    progress.train_time_s += time.perf_counter() - t0
                    run.save(progress, run.last)
                    if rt.is_main:
                        print(f"\n{stop.name}: saved {run.last} at epoch {stop.epoch + 1}, "
                              f"batch {stop.step}; {_how_to_go_on(cfg)}", flush=True)
                    raise
                progress.train_time_s += time.perf_counter() - t0
                _check_finite_weights(net.module, progress.epoch, len(loader))
                epochs_here += 1
                t_eval = time.perf_counter()
                metrics = _evaluate_as_one(evaluate, net.module, rt)
                improved = stopper.update(metrics[score_key], progress.epoch)
                record = {"epoch": progress.epoch + 1, **stats, **metrics,
                          "eval_time_s": time.perf_counter() - t_eval,  # the GPU trains none of it
                          "includes_compile": cfg.compile and epochs_here == 1}
                progress.history.append(record)
                progress.epoch, progress.step, progress.partial = progress.epoch + 1, 0, None
                # best.pt before last.pt: last.pt is the commit point, and the best epoch it
                # records must already be on disk in best.pt when a kill comes between the two.
                run.save(progress, *([run.best] if improved else []), run.last)
                _write_metrics(progress.history, run, rt, on_epoch, False)
                if rt.is_main:
                    print(_epoch_line(record, cfg.epochs, improved), flush=True)
                    if stopper.should_stop and progress.epoch < cfg.epochs:  # not at the planned end
                        print(f"early stopping: {score_key} has not improved for {cfg.patience} epochs "
                              f"(best {stopper.best_score:.4f} at epoch {stopper.best_epoch + 1})")
            # A signal during the last holdout pass or save is seen by no training step: stop
            # here, with everything saved, instead of going on to the test pass or the next run.
            _stop_if_signalled(signals, progress, run, cfg, rt)
        finally:
            # Stopped before the end (a signal, --stop-after-epoch, an error): curves.png
            # still shows every epoch saved, whatever on_epoch skipped before.
            if not progress.finished and progress.history and rt.is_main and on_epoch is not None:
                on_epoch(progress.history, True)
    return _summary(progress, stopper, cfg.epochs)


def _stop_if_signalled(signals: list[int], progress: RunProgress, run: RunCheckpoints, cfg: FitConfig,
                       rt: Runtime) -> None:
    """Between epochs, with everything saved: raise Interrupted if any rank got a signal."""
    if signum := _agree(signals[0] if signals else 0, True, rt)[0]:
        stop = Interrupted(signum, progress.epoch, progress.step, progress.partial or {})
        new_run = progress.epoch == progress.step == 0 and not progress.finished
        if rt.is_main and new_run:  # a signal before the first epoch of a new run
            print(f"\n{stop.name}: stopped before the first epoch, nothing saved yet; rerun the same "
                  f"command to start", flush=True)
        elif rt.is_main:  # (resumed from last.pt, or from an older file where last.pt was lost)
            state = "the finished run" if progress.finished else f"epoch {progress.epoch}"
            print(f"\n{stop.name}: stopped with {state} saved in {run.out}; {_how_to_go_on(cfg)}", flush=True)
        raise stop


def _how_to_go_on(cfg: FitConfig) -> str:
    # Rerunning a command that holds --fresh (a notebook cell, say) would delete what was saved.
    return ("rerun the command without --fresh to resume" if cfg.fresh
            else "rerun the same command to resume")


def _evaluate_as_one(evaluate, model: torch.nn.Module, rt: Runtime) -> dict[str, Any]:
    """Each rank scores its holdout shard with rank 0's weights and BatchNorm statistics
    (those best.pt and last.pt hold); rank 0's figures decide for every rank, or early
    stopping could deadlock."""
    broadcast_from_main(model, rt)
    metrics = evaluate(model)
    if rt.world_size > 1:
        shared = [metrics]
        dist.broadcast_object_list(shared, src=0)
        metrics = shared[0]
    return metrics


def _summary(progress: RunProgress, stopper: EarlyStopping, epochs: int) -> dict[str, Any]:
    history = progress.history
    # Leave the epochs that include torch.compile's compilation out of the throughput.
    timed = [h for h in history if not h.get("includes_compile")] or history
    return {"best_epoch": stopper.best_epoch + 1, "best_score": stopper.best_score,
            "epochs_run": len(history), "train_time_s": progress.train_time_s,
            "images_per_s": sum(h["train_images"] for h in timed)
                            / max(1e-9, sum(h["epoch_time_s"] for h in timed)),
            "stopped_early": stopper.should_stop and len(history) < epochs,
            "history": history, "finished": progress.finished, "device": progress.device or None}


@contextmanager
def _recorded_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM append their number to the list instead of ending the process:
    the loop saves last.pt at its next check."""
    signals: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, _: signals.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signals
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _agree(signum: int, finite: bool, rt: Runtime) -> tuple[int, bool]:
    """(the signal a rank got, 0 if none, the same on every rank; every rank's loss is finite)."""
    if rt.world_size == 1:
        return signum, finite
    flags = torch.tensor([float(signum), float(not finite)], device=rt.device if rt.cuda else "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), not bool(flags[1])


def _agree_any(flag: bool, rt: Runtime) -> bool:
    """Whether any rank's flag is set: DDP ranks must redo a step together."""
    if rt.world_size == 1:
        return flag
    flags = torch.tensor([float(flag)], device=rt.device if rt.cuda else "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0])


def _interactive() -> bool:
    """Progress bars only where someone watches them (a terminal or a notebook), not in logs."""
    return sys.stderr.isatty() or "COLAB_RELEASE_TAG" in os.environ or "JPY_PARENT_PID" in os.environ


def _check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(_not_finite(f"training loss became {loss}", epoch, step))


def _check_finite_weights(model: torch.nn.Module, epoch: int, step: int) -> None:
    """Before a save: a step whose loss was finite can still have had non-finite gradients
    (without a GradScaler to skip it, in bf16 or fp32), and the loss check would see them
    only in the next step's loss, after last.pt and best.pt held them. One host sync."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]  # BN statistics too
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise NonFiniteLoss(_not_finite("the weights or BatchNorm statistics became non-finite",
                                        epoch, step))


def _not_finite(what: str, epoch: int, step: int) -> str:
    # The learning rate and clipping are part of the recipe, which a resume must keep.
    return (f"{what} in epoch {epoch + 1} by batch {step}; stopped without saving, so last.pt "
            f"in --out (if any) still holds the last good epoch. Train again with a lower "
            f"learning rate or --grad-clip 1.0, adding --fresh (or another --out to keep this run).")


def _write_metrics(history: list[dict], run: RunCheckpoints, rt: Runtime,
                   on_epoch: Callable[[list[dict], bool], None] | None, final: bool) -> None:
    if rt.is_main:
        write_text(run.out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        if on_epoch is not None:
            on_epoch(history, final)


def _epoch_line(r: dict, epochs: int, improved: bool) -> str:
    held = " ".join(f"{k.removeprefix('holdout_')} {v:.4f}" for k, v in r.items()
                    if k.startswith("holdout_") and isinstance(v, float))
    acc = f" acc {r['train_acc']:.4f}" if "train_acc" in r else ""
    return (f"epoch {r['epoch']}/{epochs}  train loss {r['train_loss']:.4f}{acc}"
            f"  | holdout {held}  | lr {r['lr']:.4g}  {r['epoch_time_s']:.1f}s "
            f"{r['images_per_s']:.0f} img/s{'  *best' if improved else ''}")
