"""common/plots.py: what a person reads on the figures (titles, keys, tick labels)."""

from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.text import Text
from PIL import Image

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


def test_curves_png_draws_on_the_final_call_and_at_most_every_every_s_before(monkeypatch, tmp_path: Path) -> None:
    clock, drawn = [100.0], []
    monkeypatch.setattr(plots, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(plots, "plot_curves", lambda history, path, title, note="": drawn.append((len(history), path)))
    draw = plots.curves_png(tmp_path, {"task": "t2"}, every_s=30.0)
    history = []
    for t in (110.0, 129.9, 130.0, 140.0, 159.0):  # epoch ends: 10, 29.9, 30, 40 and 59 s in
        clock[0] = t
        history.append({"epoch": len(history) + 1})
        draw(history, False)
    assert [n for n, _ in drawn] == [3]  # 30 s after the start; the next is due at 160 s
    clock[0] = 160.5
    draw(history, True)  # fit's final call: drawn whatever the time
    draw(history, True)  # those epochs are already drawn
    assert [n for n, _ in drawn] == [3, 5] and {p for _, p in drawn} == {tmp_path / "curves.png"}
    # start: T3 makes its drawer at the first epoch's end, timed from before its first epoch.
    late = plots.curves_png(tmp_path, {"task": "t3"}, start=clock[0] - 31.0)
    late(history[:1], False)
    assert [n for n, _ in drawn] == [3, 5, 1]


def test_classifier_curves_keep_the_accuracy_panel(figures: list, tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.2 * e, "holdout_acc": 0.2 * e,
                "holdout_top5": 0.3 * e} for e in (1, 2, 3)]
    plots.plot_curves(history, tmp_path / "curves.png")
    ax_score = figures[0].axes[1]
    assert ax_score.get_title() == "accuracy"
    assert [t.get_text() for t in ax_score.get_legend().get_texts()] == [
        "holdout accuracy", "holdout top-5 accuracy", "train accuracy"]


def test_bars_group_the_series_mark_the_highlight_and_say_so(figures: list, tmp_path: Path) -> None:
    title = "CUBS placements (selected by holdout accuracy), a title longer than the figure is wide"
    series = {"holdout": [0.5, 0.6, 0.55], "test": [0.45, 0.4, 0.7]}
    plots.plot_bars(["serial\nplain", "reverse\nplain", "vanilla"], series, tmp_path / "bars.png",
                    ylabel="top-1 accuracy", title=title, highlight="reverse\nplain")
    ax = figures[0].axes[0]
    bars = ax.patches[:6]  # the holdout bars, then the test bars
    assert [b.get_height() for b in bars] == [0.5, 0.6, 0.55, 0.45, 0.4, 0.7]
    assert [b.get_facecolor() for b in bars] == [to_rgba("tab:blue")] * 3 + [to_rgba("tab:orange")] * 3
    assert [b.get_hatch() or "" for b in bars] == ["", "//", ""] * 2  # the highlighted group, both bars
    centres = [b.get_x() + b.get_width() / 2 for b in bars]
    assert centres[0] < centres[3] < centres[1] < centres[4] < centres[2] < centres[5]  # side by side
    assert [t.get_text() for t in ax.texts] == ["0.5000", "0.6000", "0.5500", "0.4500", "0.4000", "0.7000"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["holdout", "test", "selected"]
    assert ax.get_title().replace("\n", " ") == title and "\n" in ax.get_title()  # wrapped, not cut off
    assert [t.get_text() for t in ax.get_xticklabels()] == ["serial\nplain", "reverse\nplain", "vanilla"]
    assert [t.get_fontweight() for t in ax.get_xticklabels()] == ["normal", "bold", "normal"]


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
    assert [ax.get_title() for ax in fig.axes[:3]] == ["query", "#1", "#2"]


def test_retrieval_grid_prints_its_text_at_80_percent_of_the_report_body(figures: list,
                                                                        tmp_path: Path) -> None:
    """T4's grid (6 queries, 8 neighbours, 96 x 72 thumbnails, its long title) as REPORT.pdf
    prints it: at its own size, so every text prints at the size it was drawn."""
    from common import report_pdf
    rng = np.random.default_rng(0)
    path = tmp_path / "retrieval.png"
    plots.plot_retrieval(rng.integers(0, 255, (6, 72, 96, 3), dtype=np.uint8),
                         rng.integers(0, 255, (6, 8, 72, 96, 3), dtype=np.uint8),
                         rng.random((6, 8)) > 0.5, path,
                         title="T4 retrieval with the Phase B embedding (Multi-Similarity loss, ms "
                               "mining): 6 random test queries (classes unseen in training) and "
                               "their 8 nearest test images by cosine similarity")
    sizes = [t.get_fontsize() for t in figures[0].findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert len(sizes) >= 12  # title, 9 column titles, 2 key entries
    assert min(sizes) == plots.RETRIEVAL_FONT_PT
    with Image.open(path) as im:
        natural = im.width / im.info["dpi"][0] * 72
    assert natural <= report_pdf.WIDTH
    assert report_pdf.retrieval_width(path, 1.0) == pytest.approx(natural)
    for scale in report_pdf.FIGURE_SCALES:  # shrunk with the other figures, down to a limit
        printed = min(sizes) * report_pdf.retrieval_width(path, scale) / natural
        assert printed >= 0.8 * report_pdf.BODY.fontSize - 1e-9, scale


def key_outside_the_panels(fig) -> list[str]:
    """The figure's one key: its texts, after checking that it covers no panel and lies
    inside the figure (a key wider than the figure is cut off)."""
    fig.canvas.draw()
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    box = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and 0 <= box.y0
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_report_curves_draw_one_line_per_run_on_whole_epochs(figures: list, tmp_path: Path) -> None:
    history = lambda n: [{"epoch": e, "holdout_acc": 0.1 * e, "train_loss": 2.0 / e,  # noqa: E731
                          "holdout_loss": 60.0 if e == 1 else 2.5 / e} for e in range(1, n + 1)]
    assert not plots.plot_classifier_curves({"t1": []}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists() and not figures  # nothing drawn
    assert plots.plot_classifier_curves({"t1": history(5), "t2": history(3), "t3": []},
                                        tmp_path / "classifiers.png")
    fig = figures[0]
    assert key_outside_the_panels(fig) == ["t1", "t2"]
    assert "train solid, holdout dashed" in fig.axes[1].get_title()
    for ax in fig.axes:
        assert all(float(tick).is_integer() for tick in ax.get_xticks())
    ax_acc, ax_loss = fig.axes
    assert [line.get_label() for line in ax_acc.lines] == ["t1", "t2"]
    assert list(ax_acc.lines[0].get_ydata()) == [h["holdout_acc"] for h in history(5)]
    losses = {line.get_label(): line for line in ax_loss.lines}
    assert sorted(losses) == ["t1 holdout loss", "t1 train loss", "t2 holdout loss", "t2 train loss"]
    assert list(losses["t1 holdout loss"].get_ydata()) == [h["holdout_loss"] for h in history(5)]
    assert losses["t1 holdout loss"].get_linestyle() == "--"
    assert losses["t1 holdout loss"].get_color() == losses["t1 train loss"].get_color() \
        != losses["t2 train loss"].get_color()
    assert ax_loss.get_yscale() == "log"


def test_report_phase_b_curves_keep_equal_scores_apart(figures: list, tmp_path: Path) -> None:
    same = [{"epoch": e, "holdout_r1": 0.5, "train_loss": 1.0} for e in (1, 2)]
    phase_a = [{"epoch": 1, "holdout_acc": 0.4, "train_acc": 0.9, "train_loss": 1.0}]
    phases = {"phase_a": phase_a, "phase_b_ms": same, "phase_b_hard": same}
    assert plots.plot_retrieval_curves(phases, tmp_path / "phases.png")
    ax_a, ax_b = figures[0].axes[:2]
    # the key sits below the panels: it cannot hide a Phase B line (it hid phase_b_none)
    assert key_outside_the_panels(figures[0]) == ["phase_a", "phase_b_ms", "phase_b_hard"]
    ms, hard = ax_b.lines
    assert list(ax_a.lines[0].get_ydata()) == [0.4] and list(ms.get_ydata()) == [0.5, 0.5]  # the holdout keys
    assert ms.get_marker() != hard.get_marker() and ms.get_markersize() > hard.get_markersize()
    assert len({ax_a.lines[0].get_color(), ms.get_color(), hard.get_color()}) == 3  # one key
    assert not plots.plot_retrieval_curves({}, tmp_path / "empty.png")


def test_a_key_of_long_run_names_stays_inside_the_figure(figures: list, tmp_path: Path) -> None:
    names = ["t1 (SMOKE)", "t2 (SMOKE)"] + [f"t3/{p}_{v} (SMOKE)" for p in ("serial", "reverse", "parallel")
                                            for v in ("plain", "plus")]
    history = [{"epoch": e, "holdout_acc": 0.1 * e, "train_loss": 2.0 / e, "holdout_loss": 2.2 / e}
               for e in (1, 2)]
    assert plots.plot_classifier_curves({n: history for n in names}, tmp_path / "c.png",
                                        figsize=(7.2, 2.4))
    assert key_outside_the_panels(figures[0]) == names
    panels = [ax.get_window_extent().height / figures[0].dpi for ax in figures[0].axes]
    assert min(panels) > 1.2  # inches: the key took its room below the 2.4 asked for, not theirs


@pytest.mark.parametrize("lo, hi", [(0.8, 2.3), (0.5, 60.0), (0.95, 1.05), (1.6, 1.7), (0.01, 10.0),
                                    (2.0, 2.3), (3.0, 2.9e15), (1e-3, 1e9)])
def test_log_axes_get_three_to_seven_plain_labels(lo: float, hi: float, figures: list) -> None:
    ticks = plots.log_ticks(lo, hi)
    assert 3 <= len(ticks) <= 7 and ticks == sorted(set(ticks))
    assert all(lo <= t <= hi for t in ticks)
    fig, ax = plots.plt.subplots()
    ax.plot([1, 2], [lo, hi])
    plots.log_axis(ax)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    shown = [(loc, label.get_text()) for loc, label in zip(ax.get_yticks(), ax.get_yticklabels())
             if low <= loc <= high and label.get_text()]
    assert len(shown) >= 3
    for loc, text in shown:  # plain numbers: '0.8', not '8x10^-1'
        assert float(text) == pytest.approx(loc, rel=1e-3), text
    assert not any(label.get_text() for label in ax.get_yticklabels(minor=True))
    plots.plt.close(fig)


def test_a_png_is_replaced_atomically(tmp_path: Path, monkeypatch) -> None:
    # A kill mid-write must leave the old figure whole: a finished run never redraws it.
    from matplotlib.figure import Figure
    from PIL import Image
    from common.plots import plot_bars
    path = tmp_path / "bars.png"
    plot_bars(["a", "b"], {"acc": [0.2, 0.4]}, path, ylabel="acc", title="first")
    before = path.read_bytes()

    def killed(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(Figure, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        plot_bars(["a", "b"], {"acc": [0.3, 0.1]}, path, ylabel="acc", title="second")
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["bars.png"]
    with Image.open(path) as image:
        image.load()


@pytest.mark.parametrize("lo, hi", [(1.5363316092342028, 2.2964260055750954), (0.488, 0.545), (1.2, 1.5),
                                    (0.95, 1.05), (2.0, 2.3), (1.6, 1.7), (0.999, 1.001)])
def test_narrow_log_axes_get_ticks_that_do_not_crowd_each_other(lo: float, hi: float) -> None:
    # Round ticks of the first pass stayed beside the evenly spaced ones: "2" and "2.01".
    ticks = plots.log_ticks(lo, hi)
    assert 3 <= len(ticks) <= 7 and all(lo <= t <= hi for t in ticks)
    gaps = [math.log(b / a) for a, b in zip(ticks, ticks[1:])]
    assert min(gaps) > 0.1 * math.log(hi / lo), ticks


def test_loss_panels_say_the_train_loss_is_label_smoothed_and_its_floor(figures: list, tmp_path: Path) -> None:
    import torch
    import torch.nn.functional as F
    # The floor is the loss of predicting the smoothed target itself: its entropy.
    for classes in (10, 200):
        target = torch.full((1, classes), 0.1 / classes)
        target[0, 0] += 0.9
        floor = F.cross_entropy(target.log(), torch.tensor([0]), label_smoothing=0.1).item()
        assert plots.smoothed_loss_note(0.1, classes) == \
            f"train: label smoothing 0.1, never below {floor:.2f}; holdout: plain"
    assert plots.smoothed_loss_note(0.1, 200) == "train: label smoothing 0.1, never below 0.85; holdout: plain"
    assert plots.smoothed_loss_note(0.0, 200) == ""
    history = [{"epoch": 1, "train_loss": 1.2, "holdout_loss": 0.9, "holdout_acc": 0.5}]
    plots.curves_png(tmp_path, {"task": "t2", "model": "resnet18", "label_smoothing": 0.1,
                                "num_classes": 200})(history, True)
    head, note = figures[-1].axes[0].get_title().split("\n", 1)  # the note wrapped to the panel's width
    assert head == "loss" and " ".join(note.split()) == "train: label smoothing 0.1, never below 0.85; holdout: plain"
    assert note.splitlines()[-1] == "holdout: plain", note  # not "...; holdout:" / "plain"
    plots.curves_png(tmp_path, {"task": "t4", "phase": "b", "label_smoothing": 0.1, "num_classes": 98})(
        [{"epoch": 1, "train_loss": 0.3, "holdout_r1": 0.5}], True)
    assert figures[-1].axes[0].get_title() == "loss"  # Phase B's loss is the MS loss
    assert plots.runs_loss_note([(0.1, 200), (0.1, 200)]) == plots.smoothed_loss_note(0.1, 200)
    assert plots.runs_loss_note([(0.1, 200), (0.0, 200)]) == \
        "train: label-smoothed as each run's recipe says; holdout: plain"
    assert plots.runs_loss_note([(0.0, 200), (0.0, 10)]) == ""
    plots.plot_classifier_curves({"a": history}, tmp_path / "c.png", loss_note="note")
    assert figures[-1].axes[1].get_title() == "loss: train solid, holdout dashed\nnote"


def test_more_than_ten_runs_never_share_a_colour_and_marker(figures: list, tmp_path: Path) -> None:
    history = [{"epoch": e, "holdout_acc": 0.1 * e, "train_loss": 1.0 / e, "holdout_loss": 1.1 / e} for e in (1, 2)]
    plots.plot_classifier_curves({f"run{i}": history for i in range(23)}, tmp_path / "c.png")
    lines = figures[-1].axes[0].lines
    assert len({(line.get_color(), line.get_marker()) for line in lines}) == len(lines) == 23


def test_runs_with_equal_curves_stay_visible_beside_each_other(figures: list, tmp_path: Path) -> None:
    # The six T3 smoke runs can log the same curves: drawn with one marker and one width,
    # the last one drawn hid the others.
    same = [{"epoch": e, "holdout_acc": 0.5, "train_loss": 1.0, "holdout_loss": 1.2} for e in (1, 2)]
    names = [f"t3/{p}_{v}" for p in ("serial", "reverse", "parallel") for v in ("plain", "plus")]
    assert plots.plot_classifier_curves({n: same for n in names}, tmp_path / "c.png")
    ax_acc, ax_loss = figures[-1].axes
    for lines in (ax_acc.lines, ax_loss.lines[0::2], ax_loss.lines[1::2]):  # holdout acc, train and holdout loss
        assert len({line.get_marker() for line in lines}) == 6
        sizes, widths = [line.get_markersize() for line in lines], [line.get_linewidth() for line in lines]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 6  # each later one inside the last
        assert widths == sorted(widths, reverse=True) and len(set(widths)) == 6
        assert {line.get_fillstyle() for line in lines} == {"none"}  # open: the ones below show through
    assert [line.get_linestyle() for line in ax_loss.lines[:2]] == ["-", "--"]  # train solid, holdout dashed
    key = figures[-1].legends[0].legend_handles
    assert [(h.get_marker(), h.get_markersize()) for h in key] == \
        [(line.get_marker(), line.get_markersize()) for line in ax_acc.lines]  # the key shows each run's


def test_bar_labels_have_the_tables_four_decimals(figures: list, tmp_path: Path) -> None:
    # One holdout image of 2,000 is 0.0005: three decimals showed two runs as a tie.
    plots.plot_bars(["serial", "reverse"], {"holdout": [1161 / 2000, 1162 / 2000]}, tmp_path / "b.png",
                    "top-1", highlight="reverse")
    assert [t.get_text() for t in figures[-1].axes[0].texts] == ["0.5805", "0.5810"]


def test_curves_plot_each_record_at_its_own_epoch(figures: list, tmp_path: Path) -> None:
    # A resumed run's records start past epoch 1: the x axis is the records' epoch, not their index.
    history = [{"epoch": e, "train_loss": 1.0 / e, "holdout_acc": 0.1 * e} for e in (3, 4, 5)]
    plots.plot_curves(history, tmp_path / "curves.png")
    for ax in figures[0].axes:
        assert [list(line.get_xdata()) for line in ax.lines] == [[3, 4, 5]]


def test_bar_values_print_inside_the_axes(figures: list, tmp_path: Path) -> None:
    plots.plot_bars(["a", "b"], {"holdout": [0.2, 0.9], "test": [0.3, 0.85]}, tmp_path / "b.png", "top-1")
    ax = figures[-1].axes[0]
    figures[-1].canvas.draw()
    top = ax.get_window_extent().y1
    assert ax.get_ylim()[1] > 0.9
    assert all(t.get_window_extent().y1 <= top for t in ax.texts), [t.get_text() for t in ax.texts]


def test_a_key_taller_than_its_figure_gets_more_columns(figures: list, tmp_path: Path) -> None:
    # about 1.45 lines of height per entry: 4 in at 7 pt holds 28 entries a column
    assert [plots.key_columns(n, 4.0, 7) for n in (1, 28, 29, 56, 57)] == [1, 1, 2, 2, 3]
    assert plots.key_columns(20, 2.0, "medium") == 3  # 9 rows at the default 10 pt
    history = [{"epoch": e, "holdout_acc": 0.1 * e, "train_loss": 1.0 / e, "holdout_loss": 1.1 / e} for e in (1, 2)]
    names = [f"r{i}" for i in range(30)]
    assert plots.plot_classifier_curves({n: history for n in names}, tmp_path / "c.png", figsize=(11, 2.4))
    assert key_outside_the_panels(figures[-1]) == names  # every entry, none cut off at the foot


def test_log_ticks_take_the_finest_steps_that_fit() -> None:
    assert plots.log_ticks(1.5, 7.0) == [1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # 7 fit: no coarser steps
    assert plots.log_ticks(1.0, 7.0) == [1.0, 2.0, 3.0, 5.0, 7.0]  # 8 do not


def test_a_loss_note_of_no_classifier_is_empty() -> None:
    # REPORT.md and REPORT.pdf ask for it before drawing the curves of a folder with T4 only
    assert plots.runs_loss_note([]) == ""


def test_retrieval_grid_marks_each_neighbour_by_its_class(monkeypatch, tmp_path: Path) -> None:
    import torch
    drawn = {}
    monkeypatch.setattr(plots, "plot_retrieval", lambda q, n, matches, path, title="": drawn.update(
        q=q, n=n, matches=matches, title=title))
    files = []
    for i in range(5):
        files.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 6), (40 * i, 0, 0)).save(files[-1])
    labels = torch.tensor([0, 0, 1, 1, 2])
    angles = torch.tensor([0.0, 0.1, 1.5, 1.6, 3.0])  # each pair of a class side by side
    embeddings = torch.stack([angles.cos(), angles.sin()], dim=1)
    plots.retrieval_grid(embeddings, labels, files, tmp_path / "r.png", seed=0, embedding="E")
    matches = drawn["matches"]
    assert matches.shape == (5, 4) and drawn["n"].shape[:2] == (5, 4)  # k: every other image of 5
    # the query's own class: the nearest one for classes 0 and 1, no neighbour for class 2
    picks = [int(q[0, 0, 0]) // 40 for q in drawn["q"]]  # each image's own shade of red
    assert sorted(picks) == [0, 1, 2, 3, 4]
    for row, pick in zip(matches, picks):
        assert list(row) == ([True, False, False, False] if pick < 4 else [False] * 4), (pick, row)
    assert "their 4 nearest test images" in drawn["title"]


def title_and_key_apart(fig) -> None:
    """The loss panel's title lies inside the figure, left of the figure's key if it has one,
    and no wider than its panel plus a margin (a long note ran into the key)."""
    fig.canvas.draw()
    ax_loss = [ax for ax in fig.axes if ax.get_title().startswith("loss")][0]
    title, panel = ax_loss.title.get_window_extent(), ax_loss.get_window_extent()
    assert 0 <= title.x0 and title.x1 <= fig.bbox.x1 and title.y1 <= fig.bbox.y1
    assert title.width <= 1.1 * panel.width, (title.width, panel.width)
    if fig.legends:
        assert title.x1 <= fig.legends[0].get_window_extent().x0


@pytest.mark.parametrize("style, figsize, size", [({}, (11, 4), 10), ({}, (9, 3.5), 10),  # 12 pt titles: 10
                                                  ({"axes.titlesize": 8, "legend.fontsize": 7}, (7.24, 2.1), 8)])
def test_a_loss_note_wraps_inside_its_panel_and_clear_of_the_key(style, figsize, size, figures, tmp_path) -> None:
    names = ["t1 (SMOKE)", "t2 (SMOKE)"] + [f"t3/{p}_{v} (SMOKE)" for p in ("serial", "reverse", "parallel")
                                            for v in ("plain", "plus")]
    history = [{"epoch": e, "holdout_acc": 0.1 * e, "train_loss": 2.0 / e, "holdout_loss": 40.0 / e ** 3}
               for e in (1, 2, 3)]
    note = plots.smoothed_loss_note(0.1, 200)
    with plots.plt.rc_context(style):
        plots.plot_classifier_curves({n: history for n in names}, tmp_path / "c.png", figsize=figsize,
                                     loss_note=note)
        plots.plot_curves(history, tmp_path / "one.png", "T2: ResNet-18", note)
        for fig in figures:
            title_and_key_apart(fig)
            title = [ax.title for ax in fig.axes if ax.get_title().startswith("loss")][0]
            assert " ".join(title.get_text().split("\n", 1)[1].split()) == note  # every word kept
            assert title.get_fontsize() == size  # the panels' title size, up to 10 pt


@pytest.mark.parametrize("losses, scale, label", [((0.72, 0.68, 0.70, 0.65), "linear", "loss"),
                                                  ((2.3, 1.2, 0.9, 0.7), "log", "loss (log scale)"),
                                                  ((44.0, 2.0, 1.5, 1.3), "log", "loss (log scale)"),
                                                  ((0.5, 0.0, 0.2, 0.1), "linear", "loss")])
def test_loss_panels_are_log_scale_only_where_the_losses_span_a_wide_range(losses, scale, label, figures,
                                                                          tmp_path) -> None:
    history = [{"epoch": e, "train_loss": v, "holdout_r1": 0.5} for e, v in enumerate(losses, 1)]
    plots.plot_curves(history, tmp_path / "c.png")
    ax_loss = figures[-1].axes[0]
    assert (ax_loss.get_yscale(), ax_loss.get_ylabel()) == (scale, label)
    assert plots.LOG_LOSS_SPAN == 3.0  # 0.72 / 0.65 is narrow, 2.3 / 0.7 wide; 0 cannot be on a log axis


def test_run_curves_draw_holdout_dashed_and_train_solid_in_one_colour_per_quantity(figures, tmp_path) -> None:
    history = [{"epoch": e, "train_loss": 2.0 / e, "holdout_loss": 2.2 / e, "train_acc": 0.1 * e,
                "holdout_acc": 0.09 * e, "holdout_top5": 0.3 * e, "lr": 0.1} for e in (1, 2)]
    plots.plot_curves(history, tmp_path / "c.png", "T2: ResNet-18")
    ax_loss, ax_acc = figures[-1].axes
    lines = {line.get_label(): line for ax in (ax_loss, ax_acc) for line in ax.lines}
    assert sorted(lines) == ["holdout accuracy", "holdout loss", "holdout top-5 accuracy", "train accuracy",
                             "train loss"]
    assert {k: lines[k].get_linestyle() for k in lines} == {
        "holdout accuracy": "--", "holdout loss": "--", "holdout top-5 accuracy": "--",
        "train accuracy": "-", "train loss": "-"}
    assert lines["train loss"].get_color() == lines["holdout loss"].get_color()
    assert lines["train accuracy"].get_color() == lines["holdout accuracy"].get_color() \
        != lines["holdout top-5 accuracy"].get_color()


def test_one_epoch_curves_have_a_whole_epoch_tick_and_holdout_points_apart_from_train(figures, tmp_path) -> None:
    # After a run's first epoch the x axis spans 0.945-1.055: MaxNLocator's default fell back
    # to fractional ticks (0.96, 0.98, ...), and with no line yet only the markers tell the
    # holdout point from the train point of the same colour.
    history = [{"epoch": 1, "train_loss": 2.0, "holdout_loss": 2.2, "train_acc": 0.1, "holdout_acc": 0.09}]
    plots.plot_curves(history, tmp_path / "c.png", "T2: ResNet-18")
    fig = figures[-1]
    fig.canvas.draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        assert [t for t in ax.get_xticks() if low <= t <= high] == [1.0]
        lines = {line.get_label().split()[0]: line for line in ax.lines}
        assert (lines["holdout"].get_marker(), lines["holdout"].get_fillstyle()) != \
            (lines["train"].get_marker(), lines["train"].get_fillstyle())
