"""`--evaluate PATH`: score a saved checkpoint on the test split, without training.

One entry for the four scripts. A script builds its data, model and checkpoint "meta"
exactly as for training (the same flags, so `--smoke --out <run>` finds the same generated
data and settings), then hands them here instead of to the training loop:

    load PATH (weights_only) -> refuse another task / model / placement (its meta)
    -> load the weights -> score(model) on the test split -> print, write eval.json

Nothing else is written: last.pt, best.pt and results.json stay as they are. The model is
evaluated the way training's final test pass evaluated it (eval mode, the same device,
autocast dtype and memory layout, not compiled), so on the same device, loader and CPU
thread count the figures equal the run's results.json to the last digit
(tests/test_evaluate.py).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common import engine, runtime, schema
from common.checkpoint import (INFERENCE_KEYS, CheckpointError, check_compatible, load_checkpoint,
                               load_model_state)
from common.files import write_json
from common.runtime import describe_device

Score = Callable[[torch.nn.Module], dict[str, Any]]


def load(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint path, its contents). A run folder stands for its best.pt. Takes a training
    checkpoint or the archive's inference one (checkpoint.INFERENCE_KEYS); refuses a file
    that is neither (e.g. a bare state dict)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or not set(INFERENCE_KEYS) <= ck.keys():
        raise CheckpointError(f"{path} is not a checkpoint written by these scripts (it lacks the "
                              f"'model', 'meta' and 'epoch' entries); pass a best.pt or last.pt")
    return path, ck


def evaluate_checkpoint(model: torch.nn.Module, saved: tuple[Path, dict[str, Any]],
                        meta: schema.CheckpointMeta, rt: runtime.Runtime, score: Score,
                        loader: str) -> dict[str, Any]:
    """Load `saved` (from `load`) into `model` if its meta agrees with `meta`, then
    score(model); writes eval.json beside the checkpoint (rank 0) and returns its contents.

    meta: what this invocation's flags say the model is; every schema.ModelMeta key (task,
    model, classes, placement, ...) that the checkpoint also records must be equal. loader: the backend used
    ("dali" / "torch"), recorded because the figures are exact only for the same one."""
    path, ck = saved
    network = {k: v for k, v in meta.items() if k in schema.keys(schema.ModelMeta)}
    try:  # the network must match; the training recipe (batch size, seed, ...) need not
        check_compatible(ck["meta"], network, path)
    except CheckpointError as err:  # its advice (--fresh, another --out) is for training
        raise CheckpointError(str(err).removesuffix(" Use another --out, or --fresh to start over.")
                              + " --evaluate needs the flags the checkpoint was trained with "
                              "(the same script, --smoke, --width, --placement, ...).") from None
    load_model_state(model, ck["model"], path)
    model.to(rt.device)
    if rt.cuda:  # as engine.fit left the model that training's test pass scored
        model.to(memory_format=torch.channels_last)
    figures = score(model)
    report = {"checkpoint": str(path), "epoch": ck["epoch"], **ck["meta"], **figures,
              "device": describe_device(rt), "loader": loader}
    if rt.is_main:
        write_json(report, path.parent / "eval.json")
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in figures.items())
        print(f"{path} (epoch {ck['epoch']}): {shown}\nwrote {path.parent / 'eval.json'}")
    return report


def classifier_checkpoint(model: torch.nn.Module, path: str | Path, meta: schema.CheckpointMeta,
                          test_loader, rt: runtime.Runtime) -> dict[str, Any]:
    """T1-T3: test top-1 / top-5 (and loss) of a classifier checkpoint, under the names
    results.json uses."""
    def score(m: torch.nn.Module) -> dict[str, Any]:
        test = engine.evaluate_classifier(m, test_loader, rt)
        return {"test_acc": test["acc"], "test_top5": test["top5"], "test_loss": test["loss"],
                "test_images": test["n"]}
    return evaluate_checkpoint(model, load(path), meta, rt, score, test_loader.backend)


def _fmt(value: Any) -> str:
    if isinstance(value, dict):  # Recall@K
        return " ".join(f"R@{k} {v:.4f}" for k, v in value.items())
    return f"{value:.4f}" if isinstance(value, float) else str(value)
