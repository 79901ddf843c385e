"""Scoring networks: holdout and test passes, embeddings, a finished classifier run's one
test of best.pt (results.json), and `--evaluate PATH`.

    evaluate_classifier(model, loader, rt)   CE loss, top-1, top-5 over every image once
    embed(model, loader, rt)                 N x D embeddings in the loader's order (T4)
    holdout_scorer(holdout, rt, diagnose)    engine.fit's per-epoch evaluation (T1-T4 Phase A)
    test_best(model, loaders, fitted, ...)   best.pt -> test once -> results.json (T1-T3)
    classifier_checkpoint / retrieval_checkpoint   --evaluate PATH of T1-T3 / T4

`--evaluate PATH` scores a saved checkpoint on the test split, without training: one entry
for the four scripts. A script loads the checkpoint, then builds its data, model and
checkpoint "meta" exactly as for training (the same flags, so `--smoke --out <run>` finds
the same generated data and settings), then hands them here instead of to the training loop:

    load PATH (weights_only) -> refuse another task / model / placement (its meta), before
    the data is read -> build the data -> refuse other classes -> load the weights
    -> score(model) on the test split -> print, write eval.json

Nothing else is written: last.pt, best.pt and results.json stay as they are. The model is
evaluated the way training's final test pass evaluated it (eval mode, the same device,
autocast dtype and memory layout, not compiled), so on the same device, loader and CPU
thread count the figures equal the run's results.json to the last digit
(tests/test_evaluate.py).
"""
from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import runtime, schema
from common.checkpoint import (INFERENCE_KEYS, CheckpointError, check_compatible, load_checkpoint,
                               load_model_state)
from common.files import write_json
from common.models import EmbeddingNet, count_parameters
from common.runtime import Runtime, all_reduce_sums, autocast, broadcast_from_main, describe_device, to_device

Score = Callable[[torch.nn.Module], dict[str, Any]]


def load(path: str | Path, network: schema.ModelMeta | None = None) -> tuple[Path, dict[str, Any]]:
    """(checkpoint path, its contents). A run folder stands for its best.pt. Takes a training
    checkpoint or the archive's inference one (checkpoint.INFERENCE_KEYS); refuses a file
    that is neither (e.g. a bare state dict).

    network: the ModelMeta keys a script knows from its flags alone (task, model, width, ...);
    a checkpoint that disagrees is refused now, before the dataset is read or downloaded.
    evaluate_checkpoint checks the rest (num_classes) once the data is there."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():  # say what the folder does hold
            runs = sorted(p.parent.name for p in path.glob("*/best.pt"))
            held = (f"its run folders: {', '.join(runs)}" if runs else
                    f"it has {path / 'last.pt'} (a run stopped before its first holdout score)"
                    if (path / "last.pt").is_file() else "no last.pt and no run folder holding a best.pt either")
            raise CheckpointError(f"--evaluate {path}: this folder holds no best.pt; {held}")
        path = path / "best.pt"
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or not set(INFERENCE_KEYS) <= ck.keys():
        raise CheckpointError(f"{path} is not a checkpoint written by these scripts (it lacks the "
                              f"'model', 'meta' and 'epoch' entries); pass a best.pt or last.pt")
    if network:
        check_network((path, ck), network)
    return path, ck


def check_network(saved: tuple[Path, dict[str, Any]], meta: schema.CheckpointMeta) -> None:
    """Refuse `saved` (from `load`) unless its meta has every ModelMeta key of `meta` with the
    same value (checkpoint.check_compatible): the network must match; the training recipe
    (batch size, seed, ...) need not."""
    path, ck = saved
    network = {k: v for k, v in meta.items() if k in schema.keys(schema.ModelMeta)}
    try:
        check_compatible(ck["meta"], network, path)
    except CheckpointError as err:  # its advice (--fresh, another --out) is for training
        raise CheckpointError(str(err).removesuffix(" Use another --out, or --fresh to start over.")
                              + " --evaluate needs the flags the checkpoint was trained with "
                              "(the same script, --smoke, --width, --placement, ...).") from None


def evaluate_checkpoint(model: torch.nn.Module, saved: tuple[Path, dict[str, Any]],
                        meta: schema.CheckpointMeta, rt: runtime.Runtime, score: Score,
                        loader: str) -> dict[str, Any]:
    """Load `saved` (from `load`) into `model` if its meta agrees with `meta`, then
    score(model); writes eval.json beside the checkpoint (rank 0) and returns its contents.

    meta: what this invocation's flags say the model is; every schema.ModelMeta key of it
    (task, model, classes, placement, ...) must be in the checkpoint's meta, with the same
    value (checkpoint.check_compatible). loader: the backend used
    ("dali" / "torch" / "cache"), recorded because the figures are exact only for the same one."""
    path, ck = saved
    check_network(saved, meta)
    load_model_state(model, ck["model"], path)
    model.to(rt.device)
    if rt.cuda:  # as engine.for_training left the model that training's test pass scored
        model.to(memory_format=torch.channels_last)
    figures = score(model)
    report = {"checkpoint": str(path), "epoch": ck["epoch"], **ck["meta"], **figures,
              "device": describe_device(rt), "loader": loader}
    if rt.is_main:  # the figures first: a read-only folder (an unzipped archive) loses none of them
        print(f"{path} (epoch {ck['epoch']}): " + "  ".join(f"{k} {_fmt(v)}" for k, v in figures.items()))
        try:
            write_json(report, path.parent / "eval.json")
            print(f"wrote {path.parent / 'eval.json'}")
        except OSError as err:
            print(f"eval.json not written beside the checkpoint ({err.strerror}: {path.parent})")
    return report


def classifier_checkpoint(model: torch.nn.Module, saved: tuple[Path, dict[str, Any]],
                          meta: schema.CheckpointMeta, test_loader, rt: runtime.Runtime) -> dict[str, Any]:
    """T1-T3: test top-1 / top-5 (and loss) of `saved` (from `load`), under the names
    results.json uses."""
    return evaluate_checkpoint(model, saved, meta, rt,
                               lambda m: classifier_test_scores(m, test_loader, rt), test_loader.backend)


def classifier_test_scores(model: torch.nn.Module, test_loader, rt: runtime.Runtime) -> dict[str, Any]:
    """evaluate_classifier on the test split, under results.json's names: test_acc,
    test_top5, test_loss, test_images."""
    test = evaluate_classifier(model, test_loader, rt)
    return {"test_acc": test["acc"], "test_top5": test["top5"], "test_loss": test["loss"],
            "test_images": test["n"]}


def retrieval_checkpoint(model: torch.nn.Module, saved: tuple[Path, dict[str, Any]],
                         meta: schema.CheckpointMeta, test_loader, rt: runtime.Runtime,
                         embedding_dim: int) -> dict[str, Any]:
    """T4: Recall@K on the test split of `saved` (from `load`), a Phase A checkpoint (the
    classifier's pooled features, as Phase A reports them) or a Phase B one (the
    `embedding_dim`-d EmbeddingNet on `model`); the checkpoint's meta says which."""
    from common.recall import KS, recall_at_k  # T4 only: T1-T3 need no retrieval code
    phase_b = saved[1]["meta"].get("phase") == "b"
    if phase_b:
        model = EmbeddingNet(model, dim=embedding_dim)
        meta = {**meta, "phase": "b", "embedding_dim": embedding_dim}

    def score(m: torch.nn.Module) -> dict[str, Any]:
        return {"test_recall": recall_at_k(*embed(m, test_loader, rt, features=not phase_b), ks=KS)}
    return evaluate_checkpoint(model, saved, meta, rt, score, test_loader.backend)


def fmt_recall(recall: dict[int, float]) -> str:
    """Recall@K as T4 and --evaluate print it: R@1 0.4271  R@2 0.5781  ..."""
    return "  ".join(f"R@{k} {v:.4f}" for k, v in recall.items())


def _fmt(value: Any) -> str:
    if isinstance(value, dict):  # Recall@K
        return fmt_recall(value)
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- passes over a split
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


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def holdout_scorer(holdout, rt: Runtime,
                   diagnose: Callable[..., dict] | None = None) -> Score:
    """engine.fit's evaluation: holdout_loss, holdout_acc, holdout_top5 (and with `diagnose`,
    e.g. common.diagnostics.diagnostics, its figures on the first holdout batch)."""
    batch: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score(m: torch.nn.Module) -> dict[str, Any]:
        metrics: dict[str, Any] = prefixed(evaluate_classifier(m, holdout, rt), "holdout")
        if diagnose is not None:
            if not batch:  # a whole pass (a loader's epoch is never left half-read), which
                # must not move the RNG that training draws from
                with torch.random.fork_rng(devices=[rt.device] if rt.cuda else []):
                    for images, labels in holdout.epoch():
                        if not batch:
                            batch.append((to_device(images, rt), labels.to(rt.device)))
            metrics["diagnostics"] = diagnose(m, *batch[0])
        return metrics
    return score


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
        return _finite(*_embed_batches(fn, loader, rt), loader.files)
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
    return _finite(out.to(rt.device), out_labels.to(rt.device), loader.files)


def _finite(embeddings: torch.Tensor, labels: torch.Tensor, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, labels), or an error naming the images whose embedding holds inf or NaN:
    in Recall@K such a row would be every query's nearest neighbour."""
    bad = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(files)} images got an embedding with inf or NaN, first: "
                           f"{files[bad[0]]} (under fp16 autocast, on a GPU without bf16, a feature can "
                           f"overflow); no Recall@K is computed from them")
    return embeddings, labels


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
        shard = type(loader)(loader.files, loader.labels, dataclasses.replace(
            loader.settings, train=False, backend=loader.backend, shard_id=rt.rank,
            num_shards=rt.world_size))
        cached = _shards[loader] = (key, shard)
    return cached[1]


# ---------------------------------------------------------------- a finished classifier run
def load_best(model: torch.nn.Module, out: str | Path, best_epoch: int) -> dict[str, Any]:
    """Load out/best.pt's weights into `model` and return that epoch's metrics record.

    best_epoch (1-based) is the epoch fit() selected; best.pt must hold it, or the scores
    reported would belong to other weights."""
    path = Path(out) / "best.pt"
    ck = load_checkpoint(path)
    if ck["epoch"] != best_epoch:
        raise CheckpointError(f"{path} holds epoch {ck['epoch']}, but the best holdout epoch is "
                              f"{best_epoch}. --fresh starts over.")
    load_model_state(model, ck["model"], path)
    return ck["history"][-1]


def test_best(model: torch.nn.Module, loaders, fitted: dict[str, Any], meta: schema.CheckpointMeta,
              out: str | Path, rt: Runtime,
              flags: dict[str, Any]) -> schema.ClassifierResults | dict[str, Any]:
    """After engine.fit: load best.pt (the best holdout epoch), test it once, write
    results.json (rank 0) and return it; {"finished": False} when the run stopped early on
    purpose (--stop-after-epoch). `flags`: every command-line value, kept in results.json."""
    if not fitted["finished"]:
        return {"finished": False}
    out = Path(out)
    best_record = load_best(model, out, fitted["best_epoch"])
    test = classifier_test_scores(model, loaders.test, rt)
    results = schema.ClassifierResults(
        **meta, params=count_parameters(model), **test, holdout_acc=best_record["holdout_acc"], holdout_top5=best_record["holdout_top5"],
        best_epoch=fitted["best_epoch"], epochs_run=fitted["epochs_run"],
        stopped_early=fitted["stopped_early"], train_time_s=fitted["train_time_s"],
        images_per_s=fitted["images_per_s"], device=fitted.get("device") or describe_device(rt),
        loader=loaders.train.backend, finished=True, args=flags)
    if rt.is_main:
        write_json(results, out / "results.json")
        print(f"test accuracy {test['test_acc']:.4f} (top-5 {test['test_top5']:.4f}) with best.pt from epoch "
              f"{fitted['best_epoch']} (holdout {best_record['holdout_acc']:.4f}); "
              f"wrote {out / 'results.json'}")
    return results


def announce(name: str, model: torch.nn.Module, loaders, rt: Runtime) -> None:
    """One line before training: the network, its size, the data and where it runs."""
    if rt.is_main:
        print(f"{name}: {count_parameters(model) / 1e6:.2f}M parameters, "
              f"{len(loaders.train.files)} train / {len(loaders.holdout.files)} holdout / "
              f"{len(loaders.test.files)} test images, device {rt.device}, loader {loaders.train.backend}")
