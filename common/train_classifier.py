"""Train a classifier, pick its best epoch on the holdout, test it once.

Shared by T1, T2 and T3 (one call per placement); T4's Phase A uses fit_classifier and
load_best. The script passes what to train (model, loaders, step, FitConfig, meta); this
module runs engine.fit, scores each epoch on the holdout, and touches the test split exactly
once, after training, with the weights of the best holdout epoch (best.pt).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common import engine, runtime
from common.checkpoint import CheckpointError, load_checkpoint, load_model_state
from common.diagnostics import diagnostics, has_residual_blocks
from common.evaluate import classifier_checkpoint
from common.files import write_json
from common.models import count_parameters
from common.runtime import describe_device
from common.schema import CheckpointMeta, ClassifierResults
from common.task_data import Loaders


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def fit_classifier(model: torch.nn.Module, loaders: Loaders, step: engine.StepFn,
                   cfg: engine.FitConfig, rt: runtime.Runtime, meta: CheckpointMeta,
                   out: str | Path, redo_check: Callable[[], bool] | None = None) -> dict[str, Any]:
    """engine.fit of `step` on loaders.train, scored by holdout top-1 accuracy.

    ResNets (T2, T3) also log common.diagnostics for the first holdout batch each epoch.
    redo_check: see engine.fit (T3: cubs.range_check)."""
    batch: list[tuple[torch.Tensor, torch.Tensor]] = []

    def evaluate(m: torch.nn.Module) -> dict[str, Any]:
        metrics: dict[str, Any] = prefixed(engine.evaluate_classifier(m, loaders.holdout, rt), "holdout")
        if has_residual_blocks(m):
            if not batch:  # a whole pass (a loader's epoch is never left half-read), which
                # must not move the RNG that training draws from
                with torch.random.fork_rng(devices=[rt.device] if rt.cuda else []):
                    for images, labels in loaders.holdout.epoch():
                        if not batch:
                            batch.append((runtime.to_device(images, rt), labels.to(rt.device)))
            metrics["diagnostics"] = diagnostics(m, *batch[0])
        return metrics

    return engine.fit(model, loaders.train, step, evaluate, cfg, out, rt, meta, redo_check=redo_check)


def load_best(model: torch.nn.Module, out: str | Path, best_epoch: int | None = None) -> dict[str, Any]:
    """Load out/best.pt's weights into `model` and return that epoch's metrics record.

    best_epoch (1-based) is the epoch fit() selected; best.pt must hold it, or the scores
    reported would belong to other weights."""
    path = Path(out) / "best.pt"
    ck = load_checkpoint(path)
    if best_epoch is not None and ck["epoch"] != best_epoch:
        raise CheckpointError(f"{path} holds epoch {ck['epoch']}, but the best holdout epoch is "
                              f"{best_epoch}. --fresh starts over.")
    load_model_state(model, ck["model"], path)
    return ck["history"][-1]


def train_and_test(model: torch.nn.Module, loaders: Loaders, step: engine.StepFn,
                   cfg: engine.FitConfig, rt: runtime.Runtime, meta: CheckpointMeta,
                   out: str | Path, flags: dict[str, Any],
                   evaluate_only: str | Path | None = None,
                   redo_check: Callable[[], bool] | None = None) -> ClassifierResults | dict[str, Any]:
    """fit -> load best.pt -> evaluate on test -> write results.json (rank 0); returns it,
    or {"finished": False} when the run stopped early on purpose (--stop-after-epoch).
    `flags`: every command-line value, recorded in results.json.

    evaluate_only (--evaluate PATH): no training; test that checkpoint instead and return
    its figures (common/evaluate.py: eval.json beside it, nothing else written)."""
    if evaluate_only:
        return classifier_checkpoint(model, evaluate_only, meta, loaders.test, rt)
    out = Path(out)
    params = count_parameters(model)
    if rt.is_main:
        print(f"{meta['model']}: {params / 1e6:.2f}M parameters, {len(loaders.train.files)} train / "
              f"{len(loaders.holdout.files)} holdout / {len(loaders.test.files)} test images, "
              f"device {rt.device}, loader {loaders.train.backend}")
    fitted = fit_classifier(model, loaders, step, cfg, rt, meta, out, redo_check)
    if not fitted["finished"]:
        return {"finished": False}
    best_record = load_best(model, out, fitted["best_epoch"])
    test = engine.evaluate_classifier(model, loaders.test, rt)
    results = ClassifierResults(
        **meta, params=params,
        test_acc=test["acc"], test_top5=test["top5"], test_loss=test["loss"], test_images=test["n"],
        holdout_acc=best_record["holdout_acc"], holdout_top5=best_record["holdout_top5"],
        best_epoch=fitted["best_epoch"], epochs_run=fitted["epochs_run"],
        stopped_early=fitted["stopped_early"], train_time_s=fitted["train_time_s"],
        images_per_s=fitted["images_per_s"], device=describe_device(rt),
        loader=loaders.train.backend, finished=True, args=flags)
    if rt.is_main:
        write_json(results, out / "results.json")
        print(f"test accuracy {test['acc']:.4f} (top-5 {test['top5']:.4f}) with best.pt from epoch "
              f"{fitted['best_epoch']} (holdout {best_record['holdout_acc']:.4f}); "
              f"wrote {out / 'results.json'}")
    return results
