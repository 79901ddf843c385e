"""Each run's training recipe in words, from the args its results.json stores: the settings
that REPORT.md's strategy tables and REPORT.pdf's strategy paragraph quote.

    classifier_recipe(run.args, random_area())   # {"augmentation": ..., "peak LR": ...}
    embedding_recipe(t4_results)                 # T4 Phase B: {"loss": ..., "mining": ...}

One value is not in results.json: the random-resized-crop area range, a code default
(common/schema.py's RANDOM_AREA, which the loader uses), quoted by random_area().
"""
from __future__ import annotations

from typing import Any

from common.formats import fmt_setting
from common.schema import RANDOM_AREA


def random_area() -> str:
    """The loader's random-resized-crop area range (a code default, not in results.json)."""
    lo, hi = RANDOM_AREA
    return f"{lo:g}-{hi:g}"


def epochs(n: Any) -> str:
    """'1 epoch', '0.5 epochs', '8 epochs' (n as results.json stores it; None: 'n/a')."""
    if n is None:
        return fmt_setting(n)
    return f"{fmt_setting(n)} epoch" + ("" if n == 1 else "s")


def optimiser(name: Any) -> str:
    return {"sgd": "SGD, Nesterov momentum", "adamw": "AdamW"}.get(name, fmt_setting(name))


def classifier_recipe(args: dict, area: str) -> dict[str, str]:
    jitter = args.get("color_jitter") or 0.0
    return {
        "augmentation": (f"random-resized-crop to {fmt_setting(args.get('image_size'))} px "
                         f"(area {area} of the image), random horizontal flip, "
                         + (f"colour jitter ±{fmt_setting(jitter)} (brightness, contrast, saturation)"
                            if jitter else "no colour jitter")),
        "optimiser": optimiser(args.get("optimizer")),
        "peak LR": fmt_setting(args.get("lr")),
        "schedule": f"linear warmup {epochs(args.get('warmup_epochs'))}, then cosine decay",
        "weight decay": f"{fmt_setting(args.get('weight_decay'))} (not on biases, norms, gamma)",
        "label smoothing": fmt_setting(args.get("label_smoothing")),
        "batch size": f"{fmt_setting(args.get('batch_size'))} per process",
        "epochs (max)": fmt_setting(args.get("epochs")),
        "early stopping": (f"patience {epochs(args.get('patience'))} "
                           f"(min delta {fmt_setting(args.get('min_delta'))})"),
        "holdout": f"{fmt_setting(args.get('holdout_per_class'))} train images per class",
        "gradient clipping": fmt_setting(args.get("grad_clip")) if args.get("grad_clip") else "off",
        "width": fmt_setting(args.get("width")),
        "dropout": fmt_setting(args.get("dropout")) if "dropout" in args else "-",
        "seed": fmt_setting(args.get("seed")),
        "smoke run": fmt_setting(bool(args.get("smoke"))),
    }


def embedding_recipe(r: dict) -> dict[str, str]:
    args = r.get("args") or {}
    return {
        "init": fmt_setting(r.get("init")) + (f" ({r['init_source']})" if r.get("init_source") else ""),
        "loss": (f"Multi-Similarity: alpha {fmt_setting(args.get('alpha'))}, beta "
                 f"{fmt_setting(args.get('beta'))}, lambda {fmt_setting(args.get('lam'))}, "
                 f"epsilon {fmt_setting(args.get('epsilon'))}"),
        "mining": fmt_setting(args.get("mining")) + (" (+ all others compared)"
                                                     if args.get("compare_mining") else ""),
        "batches (P x K)": (f"{fmt_setting(args.get('classes_per_batch'))} classes x "
                            f"{fmt_setting(args.get('images_per_class'))} images"),
        "embedding": f"{fmt_setting(args.get('embedding_dim'))}-d linear, L2-normalised",
        "optimiser": optimiser(args.get("embed_optimizer")),
        "LR": fmt_setting(args.get("embed_lr")),
        "weight decay": fmt_setting(args.get("embed_weight_decay")) + decoupled_decay(args),
        "epochs (max)": fmt_setting(args.get("embed_epochs")),
        "early stopping": f"patience {epochs(args.get('patience'))} on holdout Recall@1",
    }


def decoupled_decay(args: dict) -> str:
    """AdamW's decay is decoupled from the gradient: each step shrinks a weight by the
    fraction lr x wd, which the report states, since 1e-4 with an LR of 1e-4 (T4's Phase B)
    is 1e-8 a step, practically no decay. "" for another optimiser or missing values."""
    lr, wd = args.get("embed_lr"), args.get("embed_weight_decay")
    if args.get("embed_optimizer") != "adamw" or not all(isinstance(v, (int, float)) for v in (lr, wd)):
        return ""
    return f" (AdamW, decoupled: each step shrinks a weight by lr x wd = {lr * wd:.2g})"
