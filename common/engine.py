"""The training loop shared by every task: schedule, precision, checkpoints, resume, DDP.

`fit(model, loader, step_fn, evaluate, cfg, out, rt, meta)` trains until `cfg.epochs` or
early stopping and leaves in `out/`:
    last.pt        full state after every epoch (and on SIGINT/SIGTERM, mid-epoch)
    best.pt        the same state at the best holdout score
    metrics.jsonl  one record per epoch (train/holdout loss and accuracy, lr, time, images/s)
    curves.png     loss and accuracy per epoch
Rerunning the same command continues from last.pt (a Colab disconnect loses at most the
current epoch); a finished run is not retrained.

Choices: SGD with Nesterov momentum (AdamW selectable); the LR is set per step, linear warmup
then cosine decay to zero — warmup keeps the large-batch early steps stable, cosine needs no
tuning of decay points and ends at a small LR where the holdout score peaks. On CUDA:
autocast in bf16 (same range as fp32, so no loss scaler) on GPUs that have bf16 tensor cores
(compute capability 8.0+: A100, L4, H100, ...), else fp16 with a GradScaler (T4, V100: their
fused attention kernels refuse bf16); channels_last, torch.compile (no cuDNN autotuning).
On CPU: fp32, eager.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common.checkpoint import (CheckpointError, check_compatible, load_checkpoint, load_model_state,
                               rng_state, save_checkpoint, set_rng_state)
from common.errors import UserError
from common.files import previous_path, write_text
from common.plots import plot_curves, run_title
from common.runtime import Runtime, all_reduce_sums, autocast, broadcast_from_main, to_device
from common.schema import CheckpointMeta, FitConfig


# ---------------------------------------------------------------- optimisation
def make_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on biases, norms and gates (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"--optimizer must be sgd or adamw, got {name!r}")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear from 1/warmup to 1 over `warmup_steps`, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class EarlyStopping:
    """Stop when the holdout score has not improved by `min_delta` for `patience` epochs."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best_score, self.best_epoch, self.bad_epochs = -math.inf, -1, 0

    def update(self, score: float, epoch: int) -> bool:
        """Record `score` of `epoch`; True if it is a new best."""
        if score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]


# ---------------------------------------------------------------- steps and evaluation
StepFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def classification_step(label_smoothing: float = 0.0) -> StepFn:
    """(model, images, labels) -> (mean label-smoothed CE, number of correct top-1)."""
    def step(model, images, labels):
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        return loss, (logits.argmax(1) == labels).sum()
    return step


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, loader, rt: Runtime) -> dict[str, float]:
    """Plain CE loss, top-1 and top-5 accuracy over every image of every shard exactly once."""
    model.eval()
    loss = top1 = top5 = n = 0.0
    for images, labels in loader.epoch():
        images = to_device(images, rt)
        with autocast(rt):
            logits = model(images).float()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (top[:, 0] == labels).sum().item()
        top5 += (top == labels[:, None]).any(1).sum().item()
        n += len(labels)
    loss, top1, top5, n = all_reduce_sums([loss, top1, top5, n], rt)
    return {"loss": loss / n, "acc": top1 / n, "top5": top5 / n, "n": int(n)}


# ---------------------------------------------------------------- the loop
class NonFiniteLoss(UserError, RuntimeError):
    pass


def fit(model: torch.nn.Module, loader, step_fn: StepFn,
        evaluate: Callable[[torch.nn.Module], dict[str, float]], cfg: FitConfig,
        out: str | Path, rt: Runtime, meta: CheckpointMeta,
        score_key: str = "holdout_acc", redo_check: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train `model` (see module docstring); returns {best_epoch, best_score, epochs_run,
    train_time_s, images_per_s, history, stopped_early, finished}.

    redo_check: called after each compiled step's backward pass; True means the compiled
    step was not exact (cubs.range_check), and the step is recomputed in eager mode before
    the optimiser uses its gradients (counted as exact_redo_steps in metrics.jsonl)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(rt.device)
    if rt.cuda:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps))
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)
    # fp16 gradients underflow without loss scaling; disabled (a no-op) for bf16 and fp32.
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    state = {"epoch": 0, "step": 0, "partial": None, "history": [], "finished": False,
             "train_time_s": 0.0}

    last, best = out / "last.pt", out / "best.pt"
    resume = None if cfg.fresh else _resume_point(out, rt.is_main)
    if resume is not None:
        source, ck = resume
        check_compatible(ck["meta"], meta, source)
        _check_same_recipe(ck["config"], asdict(cfg), source)
        load_model_state(model, ck["model"], source)
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        stopper.load_state_dict(ck["early_stopping"])
        if ck.get("scaler") and scaler.is_enabled():  # empty when saved without fp16
            scaler.load_state_dict(ck["scaler"])
        # One RNG state per rank (each rank draws its own dropout / augmentation stream);
        # resuming on another number of processes reuses them round-robin.
        saved_rng = ck["rng"] if isinstance(ck["rng"], list) else [ck["rng"]]  # pre-DDP-fix files
        set_rng_state(saved_rng[rt.rank % len(saved_rng)])
        state = {k: ck[k] for k in state}
        if rt.is_main:
            _check_best_checkpoint(best, ck, source)
            where = "finished run" if state["finished"] else \
                f"epoch {state['epoch'] + 1}, batch {state['step']}"
            print(f"resuming from {source} ({where}); --fresh starts over")

    def checkpoint(*paths: Path) -> None:
        """Write the full state to each path in turn (last.pt keeps its predecessor)."""
        rng = [rng_state()]
        if rt.world_size > 1:
            rng = [None] * rt.world_size
            dist.all_gather_object(rng, rng_state())
        if rt.is_main:
            full = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "early_stopping": stopper.state_dict(), "rng": rng,
                    "meta": meta, "config": asdict(cfg), **state}
            for path in paths:
                save_checkpoint(full, path, keep_previous=path == last)
        if rt.world_size > 1:
            dist.barrier()  # nobody reads best.pt / last.pt before rank 0 has written it

    train_model = model
    if rt.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.cuda else None)
    eager_model = train_model
    # CUDA graphs under DDP would have to capture its gradient all-reduce: not tried, so
    # DDP runs compile in the default mode.
    graphs = cfg.compile and cfg.compile_mode == "reduce-overhead" and rt.world_size == 1
    if cfg.compile:
        train_model = torch.compile(train_model, mode="reduce-overhead" if graphs else "default")
    else:
        redo_check = None  # eager steps branch exactly

    stop_signal = []
    handlers = {s: signal.signal(s, lambda signum, _: stop_signal.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    epochs_this_process = 0
    try:
        while not state["finished"]:
            epoch = state["epoch"]
            if epoch >= cfg.epochs or stopper.should_stop:
                state["finished"] = True
                checkpoint(last)
                if rt.is_main:  # a kill after the last epoch's last.pt may have missed it
                    _write_metrics(state["history"], out, meta)
                break
            if cfg.stop_after_epoch is not None and epochs_this_process >= cfg.stop_after_epoch:
                break
            _train_epoch((train_model, eager_model, redo_check, graphs), model, loader, step_fn, optimizer,
                         scheduler, scaler, cfg, rt, state, stop_signal, checkpoint, last)
            epochs_this_process += 1
            # Each rank scores its holdout shard: with rank 0's BatchNorm statistics, those of
            # the weights that best.pt and last.pt hold.
            broadcast_from_main(model, rt)
            metrics = evaluate(model)
            if rt.world_size > 1:  # one decision for all ranks, or early stopping can deadlock
                shared = [metrics]
                dist.broadcast_object_list(shared, src=0)
                metrics = shared[0]
            improved = stopper.update(metrics[score_key], epoch)
            record = {"epoch": epoch + 1, **state.pop("epoch_stats"), **metrics,
                      "includes_compile": cfg.compile and epochs_this_process == 1}
            state["history"].append(record)
            state.update(epoch=epoch + 1, step=0, partial=None)
            # best.pt before last.pt: last.pt is the commit point, and the best epoch it
            # records must already be on disk in best.pt when a kill comes between the two.
            checkpoint(*([best] if improved else []), last)
            if rt.is_main:
                _write_metrics(state["history"], out, meta)
                print(_epoch_line(record, cfg.epochs, improved), flush=True)
                if stopper.should_stop:
                    print(f"early stopping: {score_key} has not improved for {cfg.patience} "
                          f"epochs (best {stopper.best_score:.4f} at epoch {stopper.best_epoch + 1})")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)

    history = state["history"]
    # Leave the epochs that include torch.compile's compilation out of the throughput.
    timed = [h for h in history if not h.get("includes_compile")] or history
    return {"best_epoch": stopper.best_epoch + 1, "best_score": stopper.best_score,
            "epochs_run": len(history), "train_time_s": state["train_time_s"],
            "images_per_s": sum(h["train_images"] for h in timed)
                            / max(1e-9, sum(h["epoch_time_s"] for h in timed)),
            "stopped_early": stopper.should_stop and len(history) < cfg.epochs,
            "history": history, "finished": state["finished"]}


# FitConfig fields that only steer this process, not what the run computes.
_PROCESS_ONLY = {"compile", "compile_mode", "fresh", "stop_after_epoch"}


def _check_same_recipe(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Resuming with another LR, epoch count, ... would silently splice two recipes."""
    diffs = [f"{k} {saved.get(k)} (now {v})" for k, v in current.items()
             if k not in _PROCESS_ONLY and saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} was trained with " + ", ".join(diffs) + ". Rerun with "
                              "the flags that set those to resume, --fresh to start over, or "
                              "use another --out.")


def _train_epoch(train_models, model, loader, step_fn, optimizer, scheduler, scaler, cfg, rt,
                 state, stop_signal, checkpoint, last_path) -> None:
    """One epoch from batch state['step'] on; leaves its statistics in state['epoch_stats'].
    train_models: (the model to step, its eager form, redo_check or None, CUDA graphs?)."""
    train_model, eager_model, redo_check, graphs = train_models
    epoch, start = state["epoch"], state["step"]
    p = state["partial"] or {"loss": 0.0, "correct": 0.0, "n": 0.0, "time": 0.0, "wait": 0.0}
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
    correct_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
    n = wait = 0.0
    redone = 0
    model.train()
    if rt.cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    bar = tqdm(total=len(loader), initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not (rt.is_main and _interactive()), leave=False, mininterval=2,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    builds_before = len(loader.build_times)
    batches = loader.epoch(epoch, start)
    step, correct, first_step_s = start, None, None
    while True:
        t_wait = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        wait += time.perf_counter() - t_wait
        images = to_device(images, rt)
        labels = labels.to(rt.device, non_blocking=True)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(rt):
            loss, correct = step_fn(train_model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if redo_check is not None and _agree_any(redo_check(), rt):
            optimizer.zero_grad(set_to_none=True)
            with autocast(rt):
                loss, correct = step_fn(eager_model, images, labels)
            scaler.scale(loss).backward()
            redone += 1
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)  # skipped (and the scale lowered) if fp16 gradients overflowed
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * len(labels)
        if correct is not None:
            correct_sum += correct
        n += len(labels)
        step += 1
        if step == start + 1:  # start-up cost (loader build, compile) in view
            if rt.cuda:
                torch.cuda.synchronize(rt.device)
            first_step_s = time.perf_counter() - t0
        bar.update(1)
        # Every 25 steps (every step on one process once a signal came) the ranks agree on
        # whether to stop: acting on a local signal or NaN alone would leave the other ranks
        # waiting in their next all-reduce.
        stop = False
        if step % 25 == 0 or (rt.world_size == 1 and stop_signal):
            seen_loss = (p["loss"] + loss_sum.item()) / max(1, p["n"] + n)
            stop, finite = _agree(bool(stop_signal), math.isfinite(seen_loss), rt)
            if not finite:  # here, or (nan) on another rank
                _check_finite(seen_loss if not math.isfinite(seen_loss) else math.nan, epoch, step,
                              last_path)
            elapsed = p["time"] + time.perf_counter() - t0
            bar.set_postfix(loss=f"{seen_loss:.3f}",
                            acc=f"{(p['correct'] + correct_sum.item()) / max(1, p['n'] + n):.3f}",
                            img_s=f"{(p['n'] + n) / max(1e-9, elapsed):.0f}")
        if stop:
            bar.close()
            state["step"] = step
            state["partial"] = {"loss": p["loss"] + loss_sum.item(), "n": p["n"] + n,
                                "correct": p["correct"] + correct_sum.item(),
                                "time": p["time"] + time.perf_counter() - t0,
                                "wait": p["wait"] + wait}
            state["train_time_s"] += time.perf_counter() - t0
            checkpoint(last_path)
            signum = stop_signal[0] if stop_signal else signal.SIGTERM  # another rank's signal
            if rt.is_main:
                print(f"\n{signal.Signals(signum).name}: saved {last_path} at epoch {epoch + 1}, "
                      f"batch {step}; rerun the same command to resume", flush=True)
            sys.exit(128 + signum)
    bar.close()
    if rt.cuda:
        torch.cuda.synchronize(rt.device)  # queued GPU work belongs to this epoch's time
    elapsed = time.perf_counter() - t0
    state["train_time_s"] += elapsed
    loss_total, correct_total, n_total = all_reduce_sums(
        [p["loss"] + loss_sum.item(), p["correct"] + correct_sum.item(), p["n"] + n], rt)
    _check_finite(loss_total, epoch, step, last_path)
    epoch_time = p["time"] + elapsed
    state["epoch_stats"] = {
        "train_loss": loss_total / n_total,
        **({"train_acc": correct_total / n_total} if correct is not None or p["correct"] else {}),
        "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": epoch_time,
        "train_images": n_total, "images_per_s": n_total / max(1e-9, epoch_time),
        "data_wait_share": (p["wait"] + wait) / max(1e-9, epoch_time),
        # this process's first step (its first batch's wait included) and the loader
        # builds (DALI pipelines, the device cache) it waited for
        "first_step_s": first_step_s, "loader_builds_s": loader.build_times[builds_before:],
        **({"exact_redo_steps": redone} if redo_check is not None else {}),
        **({"peak_mem_gib": torch.cuda.max_memory_allocated(rt.device) / 2**30} if rt.cuda else {})}


def _agree(stop: bool, finite: bool, rt: Runtime) -> tuple[bool, bool]:
    """(any rank wants to stop, every rank's loss is finite)."""
    if rt.world_size == 1:
        return stop, finite
    flags = torch.tensor([float(stop), float(not finite)], device=rt.device if rt.cuda else "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), not bool(flags[1])


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


def _check_finite(loss: float, epoch: int, step: int, last: Path) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"training loss became {loss} in epoch {epoch + 1} by batch {step}; "
                            f"stopped without saving. The last good checkpoint is {last} "
                            f"(if any). Try a lower --lr or --grad-clip 1.0.")


def _resume_point(out: Path, verbose: bool) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable full state among last.pt, last.prev.pt and best.pt, or None for
    a new run. A damaged last.pt falls back to the others, saying so; best.pt holds the
    same full state as last.pt had at the best epoch."""
    last = out / "last.pt"
    paths = [p for p in (last, previous_path(last), out / "best.pt") if p.exists()]
    if not paths:
        return None
    readable, problems = [], []
    for path in paths:
        try:
            readable.append((path, load_checkpoint(path)))
        except CheckpointError as err:  # printed below: nothing is skipped silently
            problems.append(str(err))
    if not readable:
        raise CheckpointError("no usable checkpoint to resume from: " + "; ".join(problems)
                              + ". --fresh starts over (or use another --out).")
    # max() keeps the first of equal keys: last.pt, then last.prev.pt, then best.pt.
    source, ck = max(readable, key=lambda r: (r[1]["finished"], r[1]["epoch"], r[1]["step"]))
    if verbose and (problems or source != last):
        print("; ".join(problems + [f"resuming from {source} (epoch {ck['epoch']} done)"]))
    return source, ck


def _check_best_checkpoint(best: Path, ck: dict[str, Any], source: Path) -> None:
    """best.pt must hold the best holdout epoch that the resumed state records. Runs written
    before best.pt came first could miss it (killed between the two writes): when the
    resumed state is that very epoch's end, it is copied to best.pt; otherwise the test
    score would silently come from other weights, so the run is refused."""
    best_epoch = ck["early_stopping"]["best_epoch"] + 1  # 1-based; 0 = none yet
    if best_epoch == 0:
        return
    on_disk = load_checkpoint(best)["epoch"] if best.exists() else None
    if on_disk == best_epoch:
        return
    if ck["epoch"] == best_epoch and ck["partial"] is None:
        save_checkpoint(ck, best)
        print(f"repaired {best}: it held epoch {on_disk}, the best holdout epoch is "
              f"{best_epoch}, whose state {source} holds")
        return
    raise CheckpointError(f"{best} holds epoch {on_disk} but the run's best holdout epoch is "
                          f"{best_epoch}, whose weights are no longer on disk. --fresh starts over.")


def _write_metrics(history: list[dict], out: Path, meta: CheckpointMeta) -> None:
    write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    plot_curves(history, out / "curves.png", run_title(meta))


def _epoch_line(r: dict, epochs: int, improved: bool) -> str:
    held = " ".join(f"{k.removeprefix('holdout_')} {v:.4f}" for k, v in r.items()
                    if k.startswith("holdout_") and isinstance(v, float))
    acc = f" acc {r['train_acc']:.4f}" if "train_acc" in r else ""
    return (f"epoch {r['epoch']}/{epochs}  train loss {r['train_loss']:.4f}{acc}"
            f"  | holdout {held}  | lr {r['lr']:.4g}  {r['epoch_time_s']:.1f}s "
            f"{r['images_per_s']:.0f} img/s{'  *best' if improved else ''}")


@torch.no_grad()
def embed(model: torch.nn.Module, loader, rt: Runtime,
          features: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every image of `loader` in order with `model` in eval mode (its `.features`
    with features=True, e.g. a classifier's pooled features).

    Returns (N x D float32 embeddings, N int64 labels) on rt.device, N = every image of
    the loader's file list, in that order. Under DDP each rank embeds its shard of it (every
    world_size-th image) with rank 0's weights, and the shards are all-gathered: each image
    is embedded once, not once per rank, and every rank returns the whole set.
    """
    model.eval()
    fn = model.features if features else model
    if rt.world_size == 1:
        return _embed_batches(fn, loader, rt)
    broadcast_from_main(model, rt)  # e.g. a network initialised per rank, not yet under DDP
    shard = _shard_of(loader, rt)
    mine = shard.batches(0)
    index = torch.from_numpy(np.concatenate(mine)) if mine else torch.zeros(0, dtype=torch.long)
    emb, labels = _embed_batches(fn, shard, rt) if mine else (None, None)
    parts: list[Any] = [None] * rt.world_size
    dist.all_gather_object(parts, (index, None if emb is None else emb.cpu(),
                                   None if labels is None else labels.cpu()))
    n = len(loader.files)
    got = [p for p in parts if p[1] is not None]
    order = torch.cat([p[0] for p in got])
    if len(order) != n or not torch.equal(order.sort().values, torch.arange(n)):
        raise RuntimeError(f"embed: the ranks' shards cover {len(order)} of {n} images")
    out = torch.empty(n, got[0][1].shape[1], dtype=torch.float32)
    out_labels = torch.empty(n, dtype=torch.long)
    out[order] = torch.cat([p[1] for p in got])
    out_labels[order] = torch.cat([p[2] for p in got])
    return out.to(rt.device), out_labels.to(rt.device)


def _embed_batches(fn, loader, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    outputs, labels = [], []
    for images, y in loader.epoch():
        with autocast(rt):
            outputs.append(fn(to_device(images, rt)).float())
        labels.append(y.to(rt.device))
    return torch.cat(outputs), torch.cat(labels)


_shards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shard_of(loader, rt: Runtime):
    """This rank's evaluation shard of `loader`'s whole file list: a loader of the same kind
    and settings, kept per loader so that a DALI pipeline is built once, not per call."""
    key = (rt.rank, rt.world_size)
    cached = _shards.get(loader)
    if cached is None or cached[0] != key:
        shard = type(loader)(loader.files, loader.labels, batch_size=loader.batch_size,
                             train=False, image_size=loader.image_size, device=loader.device,
                             eval_resize=loader.eval_resize, workers=loader.workers,
                             backend=loader.backend, shard_id=rt.rank, num_shards=rt.world_size,
                             reader_processes=loader.reader_processes)
        cached = _shards[loader] = (key, shard)
    return cached[1]
