"""Figures written next to the results: training curves, bar charts, retrieval grids."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: Colab, CI, servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(history: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Loss (left) and accuracy / recall (right) per epoch from metrics.jsonl records.

    Plots every numeric key ending in `_loss` on the left and `_acc`, `_top5` or `_r1` on
    the right, so classifier and retrieval runs share one function.
    """
    epochs = [h["epoch"] for h in history]
    keys = sorted({k for h in history for k, v in h.items() if isinstance(v, (int, float))})
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k in keys:
        values = [h.get(k, np.nan) for h in history]
        if k.endswith("_loss"):
            ax_loss.plot(epochs, values, marker=".", label=k)
        elif k.endswith(("_acc", "_top5", "_r1")):
            ax_acc.plot(epochs, values, marker=".", label=k)
    # Log scale: an early holdout loss far above the rest (BatchNorm statistics not yet
    # settled after a few steps) would otherwise flatten every other curve.
    ax_loss.set(xlabel="epoch", ylabel="loss (log scale)", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy / recall", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(names: Sequence[str], values: Sequence[float], path: str | Path, ylabel: str,
              title: str = "", highlight: str | None = None) -> None:
    """One bar per name with its value printed on top; `highlight` is drawn in another colour."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    colours = ["tab:orange" if n == highlight else "tab:blue" for n in names]
    bars = ax.bar(names, values, color=colours)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v:.3f}",
                ha="center", va="bottom", fontsize=9)
    ax.set(ylabel=ylabel, title=title, ylim=(0, max(1e-9, max(values)) * 1.15))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_retrieval(query_images: np.ndarray, neighbour_images: np.ndarray,
                   matches: np.ndarray, path: str | Path) -> None:
    """Grid: one row per query (first column), then its top-k neighbours.

    query_images: Q x H x W x 3 uint8; neighbour_images: Q x k x H x W x 3 uint8;
    matches: Q x k bool, drawn as a green (same class) or red (other class) border.
    """
    q, k = matches.shape
    fig, axes = plt.subplots(q, k + 1, figsize=(1.5 * (k + 1), 1.5 * q), squeeze=False)
    for i in range(q):
        axes[i, 0].imshow(query_images[i])
        axes[i, 0].set_title("query", fontsize=8)
        for j in range(k):
            ax = axes[i, j + 1]
            ax.imshow(neighbour_images[i, j])
            colour = "limegreen" if matches[i, j] else "red"
            for side in ax.spines.values():
                side.set(color=colour, linewidth=4)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
