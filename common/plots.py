"""Figures: training curves written next to each run's results, the report's combined
curves of several runs, bar charts, retrieval grids."""
from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: Colab, CI, servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import LogFormatterSciNotation, MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


def plot_mean_curves(curves: dict[str, list[list[float]]], path: str | Path, ylabel: str,
                     title: str, reference: str | None = None) -> None:
    """One line per name: the mean over its runs (e.g. seeds) per epoch, shaded from the
    lowest to the highest run. curves[name] is a list of runs, each a list of per-epoch
    values; the `reference` name is drawn thick and black."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in curves.items():
        values = np.array(runs, dtype=float)
        epochs = np.arange(1, values.shape[1] + 1)
        style = {"color": "black", "linewidth": 2.5} if name == reference else {}
        line, = ax.plot(epochs, values.mean(0), marker=".", label=f"{name} ({len(runs)} runs)", **style)
        if len(runs) > 1:
            ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    ax.set(xlabel="epoch", ylabel=ylabel, title="\n".join(textwrap.wrap(title, 70)))
    _finish_epoch_axes(fig, [ax], path, dpi=120)


def plot_curves(history: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Loss (left) and accuracy / recall (right) per epoch from metrics.jsonl records.

    Plots every numeric key ending in `_loss` on the left and `_acc`, `_top5` or `_r1` on
    the right, so classifier and retrieval runs share one function; the right panel is
    named after what it holds.
    """
    epochs = [h["epoch"] for h in history]
    keys = sorted({k for h in history for k, v in h.items() if isinstance(v, (int, float))})
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    scores = []
    for k in keys:
        values = [h.get(k, np.nan) for h in history]
        if k.endswith("_loss"):
            ax_loss.plot(epochs, values, marker=".", label=metric_label(k))
        elif k.rpartition("_")[2] in _SCORES and "_" in k:
            ax_acc.plot(epochs, values, marker=".", label=metric_label(k))
            scores.append("Recall@1" if k.endswith("_r1") else "accuracy")
    # Log scale: an early holdout loss far above the rest (BatchNorm statistics not yet
    # settled after a few steps) would otherwise flatten every other curve.
    ax_loss.set(xlabel="epoch", ylabel="loss (log scale)", title="loss", yscale="log")
    for axis_formatter in (ax_loss.yaxis.set_major_formatter, ax_loss.yaxis.set_minor_formatter):
        axis_formatter(_PlainLogFormatter(labelOnlyBase=False))
    score_name = " / ".join(dict.fromkeys(scores)) or "accuracy"
    ax_acc.set(xlabel="epoch", ylabel=score_name, title=score_name)
    if title:
        fig.suptitle(title)
    _finish_epoch_axes(fig, [ax_loss, ax_acc], path, dpi=110)


def plot_classifier_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                           figsize: tuple[float, float] = (11, 4), dpi: int = 100) -> bool:
    """Holdout top-1 (left) and train loss (right) per epoch of several classifier runs on one
    figure, one line per name of `histories` (name -> its metrics.jsonl records).

    Returns False, and draws nothing, if no run has a record. figsize is in inches: REPORT.pdf
    draws its figures at the size they print, so that their text is readable at 100 %."""
    histories = {name: h for name, h in histories.items() if h}
    if not histories:
        return False
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=figsize)
    for name, history in histories.items():
        epochs = [h.get("epoch") for h in history]
        ax_acc.plot(epochs, [h.get("holdout_acc", math.nan) for h in history], marker=".", label=name)
        ax_loss.plot(epochs, [h.get("train_loss", math.nan) for h in history], marker=".", label=name)
    ax_acc.set(xlabel="epoch", ylabel="holdout top-1", title="holdout accuracy")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss (label-smoothed CE)")
    _finish_epoch_axes(fig, [ax_acc, ax_loss], path, dpi, legend_size=7)
    return True


def plot_retrieval_curves(phases: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                          figsize: tuple[float, float] = (11, 4), dpi: int = 100) -> bool:
    """T4 per epoch: Phase A holdout top-1 (left, the "phase_a" records) and Phase B holdout
    Recall@1 (right, one line per other name, e.g. "phase_b_ms"). False if `phases` is empty."""
    if not phases:
        return False
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=figsize)
    # Mining runs can score identically (small holdouts): distinct markers and dashes, and a
    # slight shrink per line, keep every one of them visible.
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-")]
    b_index = 0
    for name, history in phases.items():
        epochs = [h.get("epoch") for h in history]
        if name == "phase_a":
            ax_a.plot(epochs, [h.get("holdout_acc", math.nan) for h in history], marker=".", label=name)
        else:
            marker, dashes = styles[b_index % len(styles)]
            ax_b.plot(epochs, [h.get("holdout_r1", math.nan) for h in history], marker=marker,
                      linestyle=dashes, markersize=8 - 1.5 * b_index, fillstyle="none", label=name)
            b_index += 1
    ax_a.set(xlabel="epoch", ylabel="holdout top-1", title="Phase A (classifier)")
    ax_b.set(xlabel="epoch", ylabel="holdout Recall@1", title="Phase B (Multi-Similarity)")
    _finish_epoch_axes(fig, [ax_a, ax_b], path, dpi, legend_size=7)
    return True


def _finish_epoch_axes(fig: Figure, axes: Sequence[Axes], path: str | Path, dpi: int,
                       legend_size: float = 8) -> None:
    """The end of every per-epoch figure: whole-number epoch ticks, a light grid and a legend
    on each axis that has lines; then lay out, save and close."""
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


_SCORES = {"acc": "accuracy", "top5": "top-5 accuracy", "r1": "Recall@1"}


def metric_label(key: str) -> str:
    """'holdout_r1' -> 'holdout Recall@1', 'train_loss' -> 'train loss': legend text."""
    split, _, metric = key.rpartition("_")
    return f"{split.replace('_', ' ')} {_SCORES.get(metric, metric)}".strip()


def run_title(meta: dict) -> str:
    """A figure title from a run's checkpoint meta, in words: 'T4 Phase B: CUBS-ResNet-18
    (serial, plain), Multi-Similarity loss, ms mining' rather than 't4 cubs_resnet18_serial_plain b ms'."""
    model = str(meta.get("model", ""))
    if model.startswith("cubs_resnet18"):
        model = f"CUBS-ResNet-18 ({meta.get('placement', '?')}, {meta.get('variant', '?')})"
    else:
        model = {"resnet18": "ResNet-18", "custom_cnn": "our CNN (CustomCNN)"}.get(model, model)
    task = str(meta.get("task", "")).upper()
    if meta.get("phase") == "b":
        mining = meta.get("mining", "?")
        return (f"{task} Phase B: {model}, Multi-Similarity loss, "
                f"{'no' if mining == 'none' else mining} mining")
    if task == "T4":
        return f"{task} Phase A: {model}, classifier (cross-entropy)"
    return f"{task}: {model}" if task else model


class _PlainLogFormatter(LogFormatterSciNotation):
    """Labels the ticks matplotlib's log axis would label, as plain numbers: '0.76', not
    '7.6x10^-1' (a loss axis usually spans less than a decade)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:.3g}" if super().__call__(x, pos) else ""


def plot_bars(names: Sequence[str], values: Sequence[float], path: str | Path, ylabel: str,
              title: str = "", highlight: str | None = None,
              highlight_label: str = "selected") -> None:
    """One bar per name with its value printed on top. The bar named `highlight` is drawn in
    another colour, hatched, with a bold name, and a legend says what that means."""
    width = max(5.5, 1.6 + 1.3 * len(names))
    fig, ax = plt.subplots(figsize=(width, 3.8))
    chosen = [n == highlight for n in names]
    bars = ax.bar(names, values, color=["tab:orange" if c else "tab:blue" for c in chosen],
                  edgecolor=["black" if c else "none" for c in chosen], linewidth=1.5)
    for bar, v, c in zip(bars, values, chosen):
        bar.set_hatch("//" if c else None)
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v:.3f}",
                ha="center", va="bottom", fontsize=9, fontweight="bold" if c else "normal")
    for label, c in zip(ax.get_xticklabels(), chosen):
        label.set_fontweight("bold" if c else "normal")
    ax.set(ylabel=ylabel, ylim=(0, max(1e-9, max(values)) * 1.3))
    if title:
        ax.set_title(_wrap(title, width, 12), fontsize=12)
    if any(chosen):
        ax.legend(handles=[Patch(facecolor="tab:orange", edgecolor="black", hatch="//", label=highlight_label),
                           Patch(facecolor="tab:blue", label="other")],
                  loc="upper left", fontsize=8, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # never cut off a long title or name
    plt.close(fig)


def _wrap(text: str, width_inches: float, fontsize: float) -> str:
    """`text` broken into lines that fit `width_inches` at `fontsize` (about 0.55 em per character)."""
    return textwrap.fill(text, max(20, int(width_inches * 72 / (0.55 * fontsize))))


def plot_retrieval(query_images: np.ndarray, neighbour_images: np.ndarray,
                   matches: np.ndarray, path: str | Path, title: str = "") -> None:
    """Grid: one row per query (first column), then its top-k neighbours, nearest first.

    query_images: Q x H x W x 3 uint8; neighbour_images: Q x k x H x W x 3 uint8;
    matches: Q x k bool, drawn as a green (same class) or red (other class) border, with
    a key below the grid.
    """
    q, k = matches.shape
    width = 1.5 * (k + 1)
    fig, axes = plt.subplots(q, k + 1, figsize=(width, 1.5 * q + 0.9), squeeze=False)
    for i in range(q):
        axes[i, 0].imshow(query_images[i])
        axes[i, 0].set_ylabel("query", fontsize=8)
        for j in range(k):
            ax = axes[i, j + 1]
            ax.imshow(neighbour_images[i, j])
            colour = MATCH_COLOURS[bool(matches[i, j])]
            for side in ax.spines.values():
                side.set(color=colour, linewidth=4)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j in range(k):
        axes[0, j + 1].set_title(f"neighbour {j + 1}", fontsize=8)
    if title:
        fig.suptitle(_wrap(title, width, 11), fontsize=11)
    fig.legend(handles=[Patch(facecolor="none", edgecolor=MATCH_COLOURS[True], linewidth=3,
                              label="same class as the query"),
                        Patch(facecolor="none", edgecolor=MATCH_COLOURS[False], linewidth=3,
                              label="another class")],
               loc="lower center", ncols=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


MATCH_COLOURS = {True: "limegreen", False: "red"}
