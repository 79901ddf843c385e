"""common/plots.py: what a person reads on the figures (titles, keys, tick labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from common import plots


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the plot functions draw, kept open for inspection."""
    kept = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    yield kept
    monkeypatch.undo()
    for fig in kept:
        plots.plt.close(fig)


@pytest.mark.parametrize("meta, title", [
    ({"task": "t1", "model": "custom_cnn"}, "T1: our CNN (CustomCNN)"),
    ({"task": "t2", "model": "resnet18"}, "T2: ResNet-18"),
    ({"task": "t3", "model": "cubs_resnet18_reverse_plus", "placement": "reverse", "variant": "plus"},
     "T3: CUBS-ResNet-18 (reverse, plus)"),
    ({"task": "t4", "model": "cubs_resnet18_serial_plain", "placement": "serial", "variant": "plain"},
     "T4 Phase A: CUBS-ResNet-18 (serial, plain), classifier (cross-entropy)"),
    ({"task": "t4", "model": "cubs_resnet18_serial_plain", "placement": "serial", "variant": "plain",
      "phase": "b", "mining": "ms"}, "T4 Phase B: CUBS-ResNet-18 (serial, plain), Multi-Similarity loss, ms mining"),
    ({"task": "t4", "model": "cubs_resnet18_serial_plain", "placement": "serial", "variant": "plain",
      "phase": "b", "mining": "none"}, "T4 Phase B: CUBS-ResNet-18 (serial, plain), Multi-Similarity loss, no mining"),
])
def test_run_titles_are_words(meta: dict, title: str) -> None:
    assert plots.run_title(meta) == title


def test_recall_curves_are_named_recall_and_log_ticks_read_as_plain_numbers(figures: list, tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 0.9 - 0.05 * e, "holdout_r1": 0.3 + 0.1 * e, "lr": 0.1}
               for e in range(1, 5)]
    plots.plot_curves(history, tmp_path / "curves.png", "T4 Phase B")
    ax_loss, ax_score = figures[0].axes
    assert (ax_score.get_title(), ax_score.get_ylabel()) == ("Recall@1", "Recall@1")
    assert [t.get_text() for t in ax_score.get_legend().get_texts()] == ["holdout Recall@1"]
    figures[0].canvas.draw()
    lo, hi = ax_loss.get_ylim()  # less than a decade: matplotlib labels minor ticks here
    shown = {loc: label.get_text() for minor in (False, True)
             for loc, label in zip(ax_loss.yaxis.get_ticklocs(minor=minor), ax_loss.get_yticklabels(minor=minor))
             if lo <= loc <= hi and label.get_text()}
    assert len(shown) >= 2
    for loc, text in shown.items():  # plain numbers: '0.8', not '8x10^-1'
        assert float(text) == pytest.approx(loc, rel=1e-3), text
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_classifier_curves_keep_the_accuracy_panel(figures: list, tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.2 * e, "holdout_acc": 0.2 * e,
                "holdout_top5": 0.3 * e} for e in (1, 2, 3)]
    plots.plot_curves(history, tmp_path / "curves.png")
    ax_score = figures[0].axes[1]
    assert ax_score.get_title() == "accuracy"
    assert [t.get_text() for t in ax_score.get_legend().get_texts()] == [
        "holdout accuracy", "holdout top-5 accuracy", "train accuracy"]


def test_bars_mark_the_highlight_and_say_so(figures: list, tmp_path: Path) -> None:
    title = "CUBS placements (selected by holdout accuracy), a title longer than the figure is wide"
    plots.plot_bars(["serial\nplain", "reverse\nplain"], [0.5, 0.4], tmp_path / "bars.png",
                    ylabel="test accuracy", title=title, highlight="reverse\nplain")
    ax = figures[0].axes[0]
    normal, chosen = ax.patches[:2]
    assert chosen.get_facecolor() == to_rgba("tab:orange") and chosen.get_hatch() == "//"
    assert normal.get_facecolor() == to_rgba("tab:blue") and not normal.get_hatch()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["selected", "other"]
    assert ax.get_title().replace("\n", " ") == title and "\n" in ax.get_title()  # wrapped, not cut off
    assert [t.get_fontweight() for t in ax.get_xticklabels()] == ["normal", "bold"]


def test_retrieval_grid_has_a_title_and_a_key(figures: list, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    matches = np.array([[True, False], [False, True]])
    plots.plot_retrieval(rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8),
                         rng.integers(0, 255, (2, 2, 8, 8, 3), dtype=np.uint8), matches,
                         tmp_path / "retrieval.png", title="Phase B embedding")
    fig = figures[0]
    assert fig._suptitle.get_text() == "Phase B embedding"
    key = fig.legends[0]
    assert [t.get_text() for t in key.get_texts()] == ["same class as the query", "another class"]
    assert [p.get_edgecolor() for p in key.get_patches()] == [to_rgba("limegreen"), to_rgba("red")]
    borders = [next(iter(ax.spines.values())).get_edgecolor() for ax in fig.axes[1:3]]
    assert borders == [to_rgba("limegreen"), to_rgba("red")]


def test_report_curves_draw_one_line_per_run_on_whole_epochs(figures: list, tmp_path: Path) -> None:
    history = lambda n: [{"epoch": e, "holdout_acc": 0.1 * e, "train_loss": 2.0 / e}  # noqa: E731
                         for e in range(1, n + 1)]
    assert not plots.plot_classifier_curves({"t1": []}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists() and not figures  # nothing drawn
    assert plots.plot_classifier_curves({"t1": history(5), "t2": history(3), "t3": []},
                                        tmp_path / "classifiers.png")
    for ax in figures[0].axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["t1", "t2"]
        assert all(float(tick).is_integer() for tick in ax.get_xticks())


def test_report_phase_b_curves_keep_equal_scores_apart(figures: list, tmp_path: Path) -> None:
    same = [{"epoch": e, "holdout_r1": 0.5} for e in (1, 2)]
    phases = {"phase_a": [{"epoch": 1, "holdout_acc": 0.4}], "phase_b_ms": same, "phase_b_hard": same}
    assert plots.plot_retrieval_curves(phases, tmp_path / "phases.png")
    ax_a, ax_b = figures[0].axes[:2]
    assert [t.get_text() for t in ax_a.get_legend().get_texts()] == ["phase_a"]
    assert [t.get_text() for t in ax_b.get_legend().get_texts()] == ["phase_b_ms", "phase_b_hard"]
    ms, hard = ax_b.lines
    assert ms.get_marker() != hard.get_marker() and ms.get_markersize() > hard.get_markersize()
    assert not plots.plot_retrieval_curves({}, tmp_path / "empty.png")
