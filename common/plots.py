"""Figures: training curves written next to each run's results, the report's combined
curves of several runs, bar charts, retrieval grids."""
from __future__ import annotations

import math
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: Colab, CI, servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.textpath import TextToPath  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402

from common.files import atomic_file  # noqa: E402


def plot_curves(history: Sequence[dict], path: str | Path, title: str = "", loss_note: str = "") -> None:
    """Loss (left) and accuracy / recall (right) per epoch from metrics.jsonl records.

    Plots every numeric key ending in `_loss` on the left and `_acc`, `_top5` or `_r1` on
    the right, so classifier and retrieval runs share one function; the right panel is
    named after what it holds. loss_note: a line under the loss panel's title
    (smoothed_loss_note).
    """
    epochs = [h["epoch"] for h in history]
    keys = sorted({k for h in history for k, v in h.items() if isinstance(v, (int, float))})
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    scores = []
    for k in keys:
        values = [h.get(k, np.nan) for h in history]
        split, _, metric = k.rpartition("_")
        # As the report's figures: one colour per quantity, holdout dashed, train solid; and
        # holdout's open circles, so that one epoch's two points (no line yet) differ too.
        holdout = split == "holdout"
        style = dict(marker="o" if holdout else ".", fillstyle="none" if holdout else "full",
                     label=metric_label(k), linestyle="--" if holdout else "-",
                     color=f"C{([*_SCORES].index(metric) if metric in _SCORES else 0) % 10}")
        if metric == "loss":
            ax_loss.plot(epochs, values, **style)
        elif metric in _SCORES and split:
            ax_acc.plot(epochs, values, **style)
            scores.append("Recall@1" if metric == "r1" else "accuracy")
    ax_loss.set(xlabel="epoch")
    title_with_note(ax_loss, "loss", loss_note)
    loss_axis(ax_loss)
    score_name = " / ".join(dict.fromkeys(scores)) or "accuracy"
    ax_acc.set(xlabel="epoch", ylabel=score_name, title=score_name)
    if title:
        fig.suptitle(title)
    finish_epoch_axes(fig, [ax_loss, ax_acc], path, dpi=110)


def plot_classifier_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                           figsize: tuple[float, float] = (11, 4), dpi: int = 100,
                           loss_note: str = "") -> bool:
    """Holdout top-1 (left) and loss (right: train solid, holdout dashed; loss_axis) per epoch
    of several classifier runs on one figure, one colour per name of `histories` (name -> its
    metrics.jsonl records; past 10 names the colours repeat), with one key right of both
    panels. loss_note: a line under the loss panel's title. Runs can have equal curves (the
    smoke runs of T3's six placements): each run has its own open marker (run_style), and
    each later run's markers and lines are drawn a little smaller over the earlier ones', so
    that every run stays visible.

    Returns False, and draws nothing, if no run has a record. figsize is in inches: REPORT.pdf
    draws its figures at the size they print, so that their text is readable at 100 %."""
    histories = {name: h for name, h in histories.items() if h}
    if not histories:
        return False
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=figsize, layout="constrained")
    runs = []
    for index, (name, history) in enumerate(histories.items()):
        style = run_style(index)
        epochs = [h.get("epoch") for h in history]
        series = lambda key: [h.get(key, math.nan) for h in history]  # noqa: E731
        ax_acc.plot(epochs, series("holdout_acc"), label=name, **style)
        ax_loss.plot(epochs, series("train_loss"), label=f"{name} train loss", **style)
        ax_loss.plot(epochs, series("holdout_loss"), label=f"{name} holdout loss", **{**style, "linestyle": "--"})
        runs.append(Line2D([], [], label=name, **style))
    ax_acc.set(xlabel="epoch", ylabel="holdout top-1", title="holdout accuracy")
    # The title, not the key, says which line style is which: the key holds one entry per run.
    ax_loss.set(xlabel="epoch")
    title_with_note(ax_loss, "loss: train solid, holdout dashed", loss_note)
    loss_axis(ax_loss)
    finish_epoch_axes(fig, [ax_acc, ax_loss], path, dpi, key=runs)
    return True


# One per run, in turn. 7 markers and matplotlib's 10 colours: no two of 70 runs share both.
RUN_MARKERS = ("o", "s", "^", "D", "v", "x", "+")


def run_style(index: int) -> dict[str, Any]:
    """The line style of the index-th run of a combined curves figure: its colour, its open
    marker, and a marker size and line width that shrink with the index (to 55 %), so that a
    later run drawn over an earlier one with the same values leaves the earlier one's larger
    marker and wider line around its own, as plot_retrieval_curves does for tied mining runs."""
    shrink = max(0.55, 1.25 - 0.1 * index)
    return dict(color=f"C{index % 10}", marker=RUN_MARKERS[index % len(RUN_MARKERS)], fillstyle="none",
                markersize=plt.rcParams["lines.markersize"] * shrink,
                linewidth=plt.rcParams["lines.linewidth"] * shrink)


def smoothed_loss_note(label_smoothing: float, num_classes: int | None) -> str:
    """What a loss panel must say when the train loss is label-smoothed cross-entropy and the
    holdout loss plain: the first cannot fall below the entropy of the smoothed targets
    (0.85 for 200 classes at 0.1), the second can reach 0, so a train curve above the
    holdout one is no sign of underfitting. "" without smoothing."""
    if not label_smoothing:
        return ""
    note = f"train: label smoothing {label_smoothing:g}"
    if num_classes and num_classes > 1:
        right = 1 - label_smoothing + label_smoothing / num_classes
        wrong = label_smoothing / num_classes
        floor = -(right * math.log(right) + (num_classes - 1) * wrong * math.log(wrong))
        note += f", never below {floor:.2f}"
    return note + "; holdout: plain"


def runs_loss_note(recipes: Iterable[tuple[float, int | None]]) -> str:
    """smoothed_loss_note for a figure of several runs, from each run's (label_smoothing,
    num_classes): theirs if all runs share them, else a note that each run's recipe says."""
    distinct = set(recipes)
    if len(distinct) == 1:
        return smoothed_loss_note(*distinct.pop())
    return "train: label-smoothed as each run's recipe says; holdout: plain" if any(
        smoothing for smoothing, _ in distinct) else ""


def plot_retrieval_curves(phases: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                          figsize: tuple[float, float] = (11, 4), dpi: int = 100) -> bool:
    """T4 per epoch: Phase A holdout top-1 (left, the "phase_a" records) and Phase B holdout
    Recall@1 (right, one line per other name, e.g. "phase_b_ms"), with one key right of both
    panels. False if `phases` is empty."""
    if not phases:
        return False
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=figsize, layout="constrained")
    # Mining runs can score identically (small holdouts): distinct colours, markers and
    # dashes, and a slight shrink per line, keep every one of them visible.
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-")]
    b_index = 0
    for index, (name, history) in enumerate(phases.items()):
        epochs = [h.get("epoch") for h in history]
        colour = f"C{index % 10}"  # one colour per name across both panels: one key
        if name == "phase_a":
            ax_a.plot(epochs, [h.get("holdout_acc", math.nan) for h in history], marker=".",
                      color=colour, label=name)
        else:
            marker, dashes = styles[b_index % len(styles)]
            ax_b.plot(epochs, [h.get("holdout_r1", math.nan) for h in history], marker=marker,
                      linestyle=dashes, markersize=8 - 1.5 * b_index, fillstyle="none",
                      color=colour, label=name)
            b_index += 1
    ax_a.set(xlabel="epoch", ylabel="holdout top-1", title="Phase A (classifier)")
    ax_b.set(xlabel="epoch", ylabel="holdout Recall@1", title="Phase B (Multi-Similarity)")
    finish_epoch_axes(fig, [ax_a, ax_b], path, dpi, key=ax_a.lines + ax_b.lines)
    return True


def finish_epoch_axes(fig: Figure, axes: Sequence[Axes], path: str | Path, dpi: int,
                       key: Sequence[Any] | None = None) -> None:
    """The end of every per-epoch figure: whole-number epoch ticks, a light grid, the legend;
    then lay out, save and close.

    key: the entries of one legend for the whole figure, drawn right of the panels, where it
    can hide no line (a legend inside a panel covered curves wherever the panel had no empty
    corner) and costs width rather than the height a page is short of; the figure must use
    the constrained layout. Without it, each axis that has lines gets its own legend
    (plot_curves)."""
    for ax in axes:
        # Epochs are whole numbers; min_n_ticks=1: after one epoch the axis spans 0.95-1.05,
        # where the default (2) falls back to fractional ticks.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if key is None and ax.lines:
            ax.legend(fontsize=8)
    if key is not None:
        size = plt.rcParams["legend.fontsize"]
        fig.legend(handles=list(key), loc="outside right upper", fontsize=size,
                   ncols=key_columns(len(key), fig.get_figheight(), size))
        fig.draw_without_rendering()  # the constrained layout places the panels beside the key
        _wrap_title_notes(fig, axes)  # and lays them out again when saved
    else:
        fig.tight_layout()
        if _wrap_title_notes(fig, axes):
            fig.tight_layout()  # room for the wrapped lines
    save_png(fig, path, dpi=dpi)


def save_png(fig: Figure, path: str | Path, **savefig_kw: Any) -> None:
    """fig as a PNG at `path`, atomically (a kill mid-write leaves the old file), then closed."""
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", **savefig_kw)  # the temp name does not end in .png
    finally:
        plt.close(fig)


def key_columns(entries: int, height_in: float, fontsize: float | str) -> int:
    """Columns a key of `entries` lines needs to stay within `height_in`: a key taller than
    its figure is cut off at the foot (about 1.45 lines of height per entry)."""
    points = fontsize if isinstance(fontsize, (int, float)) else 10.0
    rows = max(1, int(height_in * 72 / (1.45 * points)))
    return math.ceil(entries / rows)


def title_with_note(ax: Axes, title: str, note: str) -> None:
    """A panel's title with a note line under it (smoothed_loss_note), both at the axes'
    title size up to 10 pt. finish_epoch_axes wraps the note to the panel's width once the
    layout has placed the panels: a note wider than its panel ran into the key beside it."""
    if not note:
        ax.set_title(title)
        return
    font = FontProperties(size=plt.rcParams["axes.titlesize"])
    ax.set_title(f"{title}\n{note}", fontsize=min(font.get_size_in_points(), 10.0))


def _wrap_title_notes(fig: Figure, axes: Sequence[Axes]) -> bool:
    """Each panel title's note (the text after its first line) refilled to the panel's
    width as laid out: measured in the title's font, less 10 % for lines of wider letters;
    a note too wide breaks after each "; " first, so no clause is split across lines needlessly.
    Whether any panel had a note."""
    noted = False
    for ax in axes:
        head, _, note = ax.get_title().partition("\n")
        if note:
            note = " ".join(note.split())
            width = ax.get_window_extent().width * 72 / fig.dpi  # points
            note_width = TextToPath().get_text_width_height_descent(
                note, ax.title.get_fontproperties(), ismath=False)[0]
            chars = max(20, int(0.9 * len(note) * width / note_width))
            if len(note) > chars:  # a line per clause first ("train: ...;" / "holdout: plain"), each filled
                note = ";\n".join(textwrap.fill(clause, chars) for clause in note.split("; "))
            ax.title.set_text(f"{head}\n{note}")
            noted = True
    return noted


# A loss panel whose losses span more than this factor gets a log axis (loss_axis).
LOG_LOSS_SPAN = 3.0


def loss_axis(ax: Axes) -> None:
    """The y axis of a panel of losses, labelled: a log scale (log_axis) where the plotted
    losses span more than LOG_LOSS_SPAN, since an early holdout loss far above the rest
    (BatchNorm statistics not yet settled after a few steps) would flatten every other
    curve; linear where they span less, as a log axis over so narrow a range looks linear
    anyway but gets uneven rounded ticks (Phase B's MS loss: 0.71, 0.68, 0.66)."""
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.lines] or [np.array([])])
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() > LOG_LOSS_SPAN * values.min():
        ax.set_ylabel("loss (log scale)")
        log_axis(ax)
    else:
        ax.set_ylabel("loss")


def log_axis(ax: Axes, most: int = 7) -> None:
    """Log-scale y axis with at least three plain-number labels ('0.8', not '8x10^-1').

    Log scale because an early holdout loss far above the rest (BatchNorm statistics not yet
    settled) would otherwise flatten every other curve; our own ticks because matplotlib's
    label only powers of ten and a few minor ticks, which leaves a loss axis spanning less
    than a decade with one or two labels."""
    ax.set_yscale("log")
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_locator(FixedLocator(log_ticks(lo, hi, most)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(lo, hi)  # the fixed ticks must not widen the axis


def log_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Between 3 and `most` round values in [lo, hi] (0 < lo < hi) for a log axis: 1-2-5 style
    steps per decade, as fine as fit (over more than `most` decades, every k-th power of
    ten); across a very narrow range, evenly spaced (in log) values at the fewest
    significant digits that keep them distinct."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for mantissas in ((1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 5, 7), (1, 2, 5), (1, 3), (1,)):
        ticks = [float(f"{m * 10.0 ** e:.3g}") for e in decades for m in mantissas
                 if lo <= m * 10.0 ** e <= hi]
        if len(ticks) <= most:
            break
    else:  # more than `most` decades (a diverged loss of 1e15): every k-th power of ten
        ticks = ticks[::math.ceil(len(ticks) / most)]
    if len(ticks) >= 3:
        return ticks
    # Too narrow: three values at a quarter, half and three quarters of the (log) range, at
    # the fewest digits that keep them apart, and any round value above that crowds none.
    span = math.log(hi / lo)
    for digits in (2, 3, 4, 6):
        even = [float(f"{v:.{digits}g}") for v in np.geomspace(lo, hi, 5)[1:-1]]
        if all(lo <= t <= hi for t in even) and min(math.log(b / a) for a, b in zip(even, even[1:])) > 0.15 * span:
            break
    return sorted(set(even) | {t for t in ticks if min(abs(math.log(t / e)) for e in even) > 0.15 * span})


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


BAR_COLOURS = ("tab:blue", "tab:orange", "tab:green")


def plot_bars(names: Sequence[str], series: Mapping[str, Sequence[float]], path: str | Path,
              ylabel: str, title: str = "", highlight: str | None = None) -> None:
    """A group of bars per name, one bar per series (e.g. holdout and test accuracy, each in
    its colour, with a key), each value printed on top. The group named `highlight` is
    hatched with a black edge and a bold name, and the key says what that means."""
    width = max(5.5, 1.6 + (0.9 + 0.4 * len(series)) * len(names))
    fig, ax = plt.subplots(figsize=(width, 3.8))
    chosen = [n == highlight for n in names]
    x, bar_width = np.arange(len(names)), 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        offsets = x + (i - (len(series) - 1) / 2) * bar_width
        bars = ax.bar(offsets, values, bar_width, color=BAR_COLOURS[i], label=label,
                      edgecolor=["black" if c else "none" for c in chosen], linewidth=1.5)
        for bar, v, c in zip(bars, values, chosen):
            bar.set_hatch("//" if c else None)
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v:.4f}", ha="center",
                    va="bottom", fontsize=8 if len(series) > 1 else 9, fontweight="bold" if c else "normal")
    ax.set_xticks(x, names)
    for label, c in zip(ax.get_xticklabels(), chosen):
        label.set_fontweight("bold" if c else "normal")
    top = max(max(values) for values in series.values())
    ax.set(ylabel=ylabel, ylim=(0, max(1e-9, top) * 1.3))
    if title:
        ax.set_title(_wrap(title, width, 12), fontsize=12)
    handles = [Patch(facecolor=colour, label=label) for colour, label in zip(BAR_COLOURS, series)]
    if any(chosen):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="selected"))
    if len(handles) > 1:
        ax.legend(handles=handles, loc="upper left", fontsize=8, ncols=len(handles))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=110, bbox_inches="tight")  # never cut off a long title or name


def _wrap(text: str, width_inches: float, fontsize: float) -> str:
    """`text` broken into lines that fit `width_inches` at `fontsize` (about 0.55 em per character)."""
    return textwrap.fill(text, max(20, int(width_inches * 72 / (0.55 * fontsize))))


# The retrieval grid is drawn for print: REPORT.pdf places it at its own size, or down to
# 80 % of it when the page is short (report_pdf.retrieval_width), so its text prints at
# 8.5 pt down to 6.8 pt: at least 80 % of the PDF's 8.5 pt body text. (Drawn at 13.5 inches
# and shrunk to 12.5 cm, as before, its labels printed at about 3 pt.)
RETRIEVAL_WIDTH_IN = 5.0
RETRIEVAL_FONT_PT = 8.5
RETRIEVAL_DPI = 300  # the thumbnails stay sharp in print


def plot_retrieval(query_images: np.ndarray, neighbour_images: np.ndarray,
                   matches: np.ndarray, path: str | Path, title: str = "") -> None:
    """Grid: one row per query (first column), then its top-k neighbours, nearest first.

    query_images: Q x H x W x 3 uint8; neighbour_images: Q x k x H x W x 3 uint8;
    matches: Q x k bool, drawn as a green (same class) or red (other class) border, with
    a key below the grid. Columns #1-#k: the neighbours, nearest first. RETRIEVAL_WIDTH_IN
    wide, text RETRIEVAL_FONT_PT; laid out by hand in inches, so that the rows sit close
    whatever the title's length.
    """
    q, k = matches.shape
    h, w = query_images.shape[1:3]
    size = RETRIEVAL_FONT_PT
    line = size * 1.3 / 72  # inches per line of text
    gap = 0.07
    cell_w = (RETRIEVAL_WIDTH_IN - k * gap) / (k + 1)
    cell_h = cell_w * h / w
    title = _wrap(title, RETRIEVAL_WIDTH_IN, size) if title else ""
    top = (title.count("\n") + 1) * line + 0.05 if title else 0.0
    key = 2 * line
    rows_top = top + line + 0.03  # below the title and the column titles
    height = rows_top + q * cell_h + (q - 1) * gap + key
    fig = plt.figure(figsize=(RETRIEVAL_WIDTH_IN, height))
    axes = [[fig.add_axes(((j * (cell_w + gap)) / RETRIEVAL_WIDTH_IN,
                           1 - (rows_top + i * (cell_h + gap) + cell_h) / height,
                           cell_w / RETRIEVAL_WIDTH_IN, cell_h / height))
             for j in range(k + 1)] for i in range(q)]
    for i in range(q):
        axes[i][0].imshow(query_images[i], aspect="auto")
        for j in range(k):
            ax = axes[i][j + 1]
            ax.imshow(neighbour_images[i, j], aspect="auto")
            colour = MATCH_COLOURS[bool(matches[i, j])]
            for side in ax.spines.values():
                side.set(color=colour, linewidth=2.5)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("query", fontsize=size, pad=2)
    for j in range(k):  # "neighbour 1" does not fit a column at a readable size
        axes[0][j + 1].set_title(f"#{j + 1}", fontsize=size, pad=2)
    if title:
        fig.suptitle(title, fontsize=size, y=1 - 0.02 / height, va="top")
    fig.legend(handles=[Patch(facecolor="none", edgecolor=MATCH_COLOURS[True], linewidth=2.5,
                              label="same class as the query"),
                        Patch(facecolor="none", edgecolor=MATCH_COLOURS[False], linewidth=2.5,
                              label="another class")],
               loc="lower center", bbox_to_anchor=(0.5, 0.0), ncols=2, fontsize=size,
               frameon=False, borderaxespad=0.1)
    save_png(fig, path, dpi=RETRIEVAL_DPI, bbox_inches="tight", pad_inches=0.03)


MATCH_COLOURS = {True: "limegreen", False: "red"}


def curves_png(out: str | Path, meta: dict, every_s: float = 30.0,
               start: float | None = None) -> Callable[[Sequence[dict], bool], None]:
    """engine.fit's on_epoch: redraw out/curves.png from the history on fit's final call
    (unless it is already drawn), and while training once `every_s` seconds have passed
    since the last drawing, or since `start` (time.monotonic(); default: now). A drawing
    takes 0.2-0.3 s of CPU on a 2-core VM while the GPU waits: at that pace 3 % of T2's
    8.6 s epoch on an H200, and a third of a smoke run's epoch."""
    last, drawn = (time.monotonic() if start is None else start), -1  # drawn: epochs shown
    # T1-T3 and T4's Phase A train with label-smoothed cross-entropy; Phase B with its own loss.
    note = "" if meta.get("phase") == "b" else smoothed_loss_note(meta.get("label_smoothing", 0.0),
                                                                  meta.get("num_classes"))

    def draw(history: Sequence[dict], final: bool) -> None:
        nonlocal last, drawn
        if (final and len(history) != drawn) or time.monotonic() - last >= every_s:
            plot_curves(history, Path(out) / "curves.png", run_title(meta), note)
            last, drawn = time.monotonic(), len(history)
    return draw


def retrieval_grid(embeddings, labels, files: Sequence[str], path: str | Path, seed: int, embedding: str,
                   queries: int = 6) -> None:
    """T4's retrieval.png: a few random test queries and their top-8 neighbours by cosine
    similarity of `embeddings` (N x D, L2-normalised; green = same class of `labels`), as
    thumbnails of `files`; the title names the `embedding` the neighbours come from."""
    import torch
    from PIL import Image

    from common.recall import nearest_neighbours
    k = min(8, len(files) - 1)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(files), size=min(queries, len(files)), replace=False)
    nn_idx = nearest_neighbours(embeddings, k)[torch.as_tensor(picks, device=embeddings.device)].cpu()
    labels = labels.cpu()
    thumb = lambda i: np.asarray(Image.open(files[i]).convert("RGB").resize((96, 72)))  # noqa: E731
    plot_retrieval(np.stack([thumb(i) for i in picks]),
                   np.stack([[thumb(j) for j in row.tolist()] for row in nn_idx]),
                   (labels[nn_idx] == labels[torch.as_tensor(picks)][:, None]).numpy(), path,
                   title=f"T4 retrieval with {embedding}: {len(picks)} random test queries (classes "
                         f"unseen in training) and their {k} nearest test images by cosine similarity")
