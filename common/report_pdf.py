"""REPORT.pdf: the report on at most two A4 pages, drawn with reportlab (no LaTeX, no pandoc).

    from common.report_pdf import write_pdf        # called by common.report.build_report
    runs = collect("runs")                         # common/runs_folder.py
    write_pdf(runs, architectures(runs), Path("runs/REPORT.pdf"), Path("runs/report_figures"))

Why reportlab: it is a pure-Python wheel on PyPI (installs on any student machine and on
Colab without a TeX distribution), maintained since 2000, and lays out paragraphs, tables and
images itself (platypus), so the page count is known before anything is written.

What the two pages hold, for ONE run per task (runs_folder.choose_runs: real runs before smoke
runs, the script's default folder first; REPORT.md lists every run):
    1 networks       a line per network (layer counts, parameters and GFLOPs of the rebuilt
                     model) and a drawing of the three CUBS placements
    2 results        the headline figure of every task; a task without a finished run says
                     what it has instead (an unreadable results.json, an unfinished run), else
                     "not run yet" (Chosen.words)
    3 T3 placements  the comparison from placements.json, the at-par check, plus vs plain
    4 curves         holdout score and training loss per epoch (metrics.jsonl)
    5 T4 retrieval   Recall@K before / after metric learning, every mining strategy, the
                     chance level, and the retrieval picture
    6 strategies     augmentation, schedule, early stopping, hard mining, our variant, all
                     read from the runs' args
Every number is the JSON value in common/formats.py's formats (accuracies and recalls to 4
decimals), and every table names the file and keys it came from, relative to the runs
folder. Figures are drawn at the size they print, so their text is readable at 100 %.
"""
from __future__ import annotations

import datetime as _dt
import html
import io
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image as PILImage
from reportlab.graphics.shapes import Circle, Drawing, Line, Polygon, Rect, String
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import cm, inch
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (Flowable, Image, KeepTogether, Paragraph, SimpleDocTemplate,
                                Spacer, Table, TableStyle)

from common.architecture import Architecture, Summaries
from common.files import atomic_file
from common.formats import fmt_1, fmt_acc, fmt_count, fmt_epochs, fmt_gflops, fmt_points, fmt_setting
from common.placements import at_par_lines, other_recipe_lines, selection_lines, table_rows
from common.plots import RETRIEVAL_FONT_PT, plot_classifier_curves, plot_retrieval_curves, runs_loss_note
from common.recipes import classifier_recipe, embedding_recipe, random_area
from common.recall import KS
from common.runs_folder import NOT_RUN, SMOKE_BANNER, TASKS, Chosen, Run, RunsFolder, choose_runs, selected_folder

MAX_PAGES = 2
MARGIN = 1.3 * cm
WIDTH = A4[0] - 2 * MARGIN  # usable width, 18.4 cm
# Shrink factors for the figures, tried in turn until the report fits on MAX_PAGES pages.
FIGURE_SCALES = (1.0, 0.9, 0.8, 0.7, 0.62, 0.55)
# The figures drawn for REPORT.pdf, into report_figures/ (embedded in the PDF, kept to look at)
PDF_FIGURES = ("pdf_classifier_curves.png", "pdf_t4_curves.png", "pdf_retrieval.jpg")

BODY = ParagraphStyle("body", fontName="Helvetica", fontSize=8.5, leading=10.4)
SMALL = ParagraphStyle("small", parent=BODY, fontSize=7.5, leading=9.0)
CELL = ParagraphStyle("cell", parent=BODY, fontSize=7.5, leading=8.8)
HEAD = ParagraphStyle("head", parent=CELL, fontName="Helvetica-Bold")
TITLE = ParagraphStyle("title", parent=BODY, fontName="Helvetica-Bold", fontSize=14, leading=17)
H2 = ParagraphStyle("h2", parent=BODY, fontName="Helvetica-Bold", fontSize=10.5, leading=13,
                    spaceBefore=5, spaceAfter=2, keepWithNext=1)  # never last on a page
WARN = ParagraphStyle("warn", parent=BODY, textColor=colors.HexColor("#b00000"),
                      fontName="Helvetica-Bold")


# ---------------------------------------------------------------- text helpers
def inline(md: str) -> str:
    """The Markdown the report's sentences use (**bold**, *italic*, `code`) as reportlab markup."""
    text = html.escape(md, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<i>\1</i>", text)
    return re.sub(r"`(.+?)`", r'<font name="Courier">\1</font>', text)


def para(md: str, style: ParagraphStyle = BODY) -> Paragraph:
    return Paragraph(inline(md), style)


def heading(text: str) -> Paragraph:
    return Paragraph(html.escape(text), H2)


def grid(header: Sequence[str], rows: Sequence[Sequence[object]],
         widths: Sequence[float]) -> Table:
    """A table with a bold header row and light rules; cells wrap inside their width."""
    data = [[Paragraph(inline(str(h)), HEAD) for h in header]]
    data += [[Paragraph(inline(str(v)), CELL) for v in row] for row in rows]
    scale = WIDTH / sum(widths)  # widths are relative: the table spans the page
    table = Table(data, colWidths=[w * scale for w in widths], repeatRows=1)
    table.setStyle(TableStyle([
        ("LINEABOVE", (0, 0), (-1, 0), 0.8, colors.black),
        ("LINEBELOW", (0, 0), (-1, 0), 0.5, colors.black),
        ("LINEBELOW", (0, -1), (-1, -1), 0.8, colors.black),
        ("ROWBACKGROUNDS", (0, 1), (-1, -1), [colors.white, colors.HexColor("#f2f2f2")]),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("TOPPADDING", (0, 0), (-1, -1), 1.2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 1.2),
        ("LEFTPADDING", (0, 0), (-1, -1), 2.5),
        ("RIGHTPADDING", (0, 0), (-1, -1), 2.5),
    ]))
    return table


def source(text: str) -> Paragraph:
    """The line under a table that traces its numbers to the JSON file and keys."""
    return para(f"Source: {text}", SMALL)


def json_path(run: Run) -> str:
    """<run folder>/results.json, relative to the runs folder, as the tables cite it. Plain
    text, not Courier: a path wider than its table cell would be split inside a word."""
    return "results.json" if run.name == "." else f"{run.name}/results.json"


def recalls(values: dict | None) -> list[str]:
    """Recall@1, 2, 4, 8 at the report's precision ('n/a' where the JSON lacks one)."""
    values = values or {}
    return [fmt_acc(values.get(str(k))) for k in KS]  # JSON keys are strings


def run_label(run: Run) -> str:
    return f"{run.name} **(SMOKE)**" if run.smoke else run.name


# ---------------------------------------------------------------- 1 networks
NETWORK_TEXT = {
    "t1": "our CNN: a stem, then 4 stages of MixBlocks (chained 3x3 conv-BN-ReLU units whose "
          "outputs and input are concatenated and fused by a 1x1 conv) with squeeze-excitation "
          "gates; no residual additions",
    "t2": "ResNet-18 (BasicBlock x [2, 2, 2, 2]), CIFAR stem (3x3 stride 1, no max-pool), "
          "random init",
    "t3": "ResNet-18 with CUBS Block 1 (channel attention) and Block 2 (spatial attention) on "
          "the residual branch of each of the 8 BasicBlocks",
    "t4": "the T3 network with the ImageNet stem; Phase A: classifier on the train classes, "
          "Phase B: linear embedding, L2-normalised",
}


def network_line(task: str, run: Run | None, arch: Architecture | None, missing: str = NOT_RUN) -> Paragraph:
    """One line per network: what it is, then the rebuilt model's counts; without a run,
    `missing` (Chosen.words: not run yet, unfinished, unreadable results)."""
    title = TASKS[task].split(" (")[0]
    if run is None:
        return para(f"**{title}**: **{missing}**.")
    r = run.results
    what = NETWORK_TEXT[task]
    if task in ("t3", "t4"):
        what += f"; placement **{r.get('placement')}**, variant **{r.get('variant')}**"
    if task == "t4":
        what += f" ({fmt_setting(run.args.get('embedding_dim'))}-d)"
    counts = "model not rebuilt"
    if arch is not None:
        extra = "".join(f", {n} {kind}" for n, kind in ((arch.attention, "CUBS blocks"),
                                                        (arch.se_gates, "SE gates")) if n)
        counts = (f"{arch.conv} conv, {arch.linear} linear{extra}; {fmt_count(arch.params)} "
                  f"parameters; {fmt_gflops(arch.flops)} GFLOPs per {arch.input_size} px image")
    return para(f"**{title}** ({run_label(run)}): {what}. {counts}.")


def arrow(d: Drawing, x1: float, y1: float, x2: float, y2: float) -> None:
    """A line from (x1, y1) to (x2, y2) with a small filled head at the end."""
    d.add(Line(x1, y1, x2, y2, strokeWidth=0.7))
    dx, dy = x2 - x1, y2 - y1
    n = (dx * dx + dy * dy) ** 0.5 or 1.0
    ux, uy = dx / n, dy / n
    d.add(Polygon([x2, y2, x2 - 4 * ux - 2 * uy, y2 - 4 * uy + 2 * ux,
                   x2 - 4 * ux + 2 * uy, y2 - 4 * uy - 2 * ux],
                  fillColor=colors.black, strokeColor=None))


def block(d: Drawing, x: float, y: float, name: str) -> None:
    """A CUBS block box, 48 x 12 pt, its lower left corner at (x, y)."""
    fill = colors.HexColor("#dbe8f7" if name.startswith("B1") else "#fbe3c9")
    d.add(Rect(x, y, 48, 12, fillColor=fill, strokeWidth=0.6))
    d.add(String(x + 24, y + 3.5, name, fontName="Helvetica", fontSize=MIN_FIGURE_FONT, textAnchor="middle"))


def placements_drawing() -> Drawing:
    """The three CUBS placements (serial, reverse, parallel) as a small vector figure; its
    text at MIN_FIGURE_FONT, the smallest any figure of the PDF prints."""
    d = Drawing(200, 120)
    small = dict(fontName="Helvetica", fontSize=MIN_FIGURE_FONT)
    d.add(String(0, 112, "Placements, in each BasicBlock after the 2nd BN, before (+):", **small))
    b1, b2 = "B1 channel", "B2 spatial"
    for y, label, first, second in ((90, "serial", b1, b2), (70, "reverse", b2, b1)):
        d.add(String(0, y + 3.5, label, fontName="Helvetica-Bold", fontSize=MIN_FIGURE_FONT))
        d.add(String(38, y + 3.5, "x", **small))
        arrow(d, 44, y + 6, 56, y + 6)
        block(d, 56, y, first)
        arrow(d, 104, y + 6, 116, y + 6)
        block(d, 116, y, second)
        arrow(d, 164, y + 6, 176, y + 6)
        d.add(String(179, y + 3.5, "y", **small))
    y = 34  # parallel: x feeds both blocks, their outputs are added
    d.add(String(0, y + 3.5, "parallel", fontName="Helvetica-Bold", fontSize=MIN_FIGURE_FONT))
    d.add(String(38, y + 3.5, "x", **small))
    arrow(d, 44, y + 6, 62, y + 17)
    arrow(d, 44, y + 6, 62, y - 5)
    block(d, 62, y + 11, b1)
    block(d, 62, y - 11, b2)
    d.add(Circle(136, y + 6, 5, fillColor=colors.white, strokeWidth=0.6))
    d.add(String(136, y + 3.6, "+", fontName="Helvetica", fontSize=7, textAnchor="middle"))
    arrow(d, 110, y + 17, 131.5, y + 8.5)
    arrow(d, 110, y - 5, 131.5, y + 3.5)
    arrow(d, 141, y + 6, 170, y + 6)
    d.add(String(173, y + 3.5, "y", **small))
    d.add(String(0, 10, "serial B2(B1(x)), reverse B1(B2(x)), parallel B1(x)+B2(x);", **small))
    d.add(String(0, 2, "the plus variant's parallel: B1(x)+B2(x)-x (the identity at init)", **small))
    return d


def section_networks(summaries: Summaries, chosen: Chosen) -> list[Flowable]:
    found = {(r.name, phase): a for r, phase, a in summaries}
    lines = []
    for task, run in chosen.runs.items():
        phase = "b" if task == "t4" else ""
        arch = found.get((run.name, phase)) if run else None
        lines += [network_line(task, run, arch, chosen.words(task)), Spacer(1, 2)]
    lines.append(para("Counts are computed from the model rebuilt with the run's settings "
                      "(GFLOPs: one forward pass, multiply-add = 2 FLOPs).", SMALL))
    layout = Table([[lines, placements_drawing()]], colWidths=[WIDTH - 7.3 * cm, 7.3 * cm])
    layout.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"),
                                ("LEFTPADDING", (0, 0), (-1, -1), 0),
                                ("RIGHTPADDING", (0, 0), (0, 0), 8)]))
    return [heading("1  Networks"), layout]


# ---------------------------------------------------------------- 2 results
def classifier_row(task: str, run: Run | None, selected: bool = False, missing: str = NOT_RUN) -> list[str]:
    if run is None:
        return [task.upper(), f"**{missing}**", "", "", "", "", ""]
    r = run.results
    name = run_label(run) + (" (selected)" if selected else "")
    # T3's model name repeats the placement and variant that its folder name already gives.
    model = "cubs_resnet18" if task == "t3" else r.get("model", "?")
    return [task.upper(), f"{name}: {model}", "test top-1 / top-5",
            f"{fmt_acc(r.get('test_acc'))} / {fmt_acc(r.get('test_top5'))}",
            f"top-1 {fmt_acc(r.get('holdout_acc'))}", fmt_epochs(r),
            f"{json_path(run)}: test_acc, test_top5, holdout_acc"]


def retrieval_rows(run: Run | None, missing: str = NOT_RUN) -> list[list[str]]:
    if run is None:
        return [["T4", f"**{missing}**", "", "", "", "", ""]]
    r = run.results
    a, b = r.get("phase_a") or {}, r.get("phase_b") or {}
    return [["T4", f"{run_label(run)}: before (Phase A classifier features)", "R@1/2/4/8",
             " / ".join(recalls(a.get("test_recall"))), f"top-1 {fmt_acc(a.get('holdout_acc'))}",
             fmt_epochs(a), f"{json_path(run)}: phase_a"],
            ["T4", f"{run_label(run)}: after (Multi-Similarity, {b.get('mining')} mining)",
             "R@1/2/4/8", " / ".join(recalls(b.get("test_recall"))),
             f"R@1 {fmt_acc(b.get('holdout_r1'))}", fmt_epochs(b),
             f"{json_path(run)}: phase_b"]]


def section_results(chosen: Chosen) -> list[Flowable]:
    rows = [classifier_row("t1", chosen.runs["t1"], missing=chosen.words("t1")),
            classifier_row("t2", chosen.runs["t2"], missing=chosen.words("t2")),
            classifier_row("t3", chosen.runs["t3"], selected=chosen.placements is not None
                           and chosen.placements[1].get("selected") is not None, missing=chosen.words("t3"))]
    if chosen.placements is not None and chosen.runs["t3"] is None:  # T3's comparison was made
        selected = selected_folder(*chosen.placements)
        rows[2][1] = (f"**selected run missing**: {selected} (see NOT REPORTED above)" if selected
                      else "**no run selected** (see 3)")
    rows += retrieval_rows(chosen.runs["t4"], chosen.words("t4"))
    table = grid(["task", "run: model", "test metric", "value", "holdout", "best epoch / run",
                  "source (file: keys)"], rows, [0.55, 2.7, 1.2, 3.0, 1.3, 0.85, 3.4])
    t4_test = f" T4 test: {t4_test_classes(chosen.runs['t4'])}, never seen in training." if chosen.runs["t4"] else ""
    note = para("Tiny ImageNet's labelled val split is our test split, evaluated once with the "
                f"weights of the best holdout epoch.{t4_test} Accuracies and recalls are the JSON "
                "values rounded to 4 decimals.", SMALL)
    return [heading("2  Results"), table, Spacer(1, 2), note]


def t4_test_classes(t4: Run | None) -> str:
    """'classes 99-196' of Cars196, from T4's results.json (the split by class id puts the
    first train_classes in training, the rest in test): a smoke run's generated set has fewer."""
    r = t4.results if t4 is not None else {}
    train, test = r.get("train_classes"), r.get("test_classes")
    if isinstance(train, int) and isinstance(test, int):
        return f"classes {train + 1}-{train + test}"
    return "classes 99-196"


# ---------------------------------------------------------------- 3 placements
def section_placements(chosen: Chosen) -> list[Flowable]:
    out: list[Flowable] = [heading("3  T3: placement comparison (selection by holdout accuracy)")]
    if chosen.placements is None:
        if chosen.runs["t3"] is not None:  # runs of an unfinished comparison: said as REPORT.md says it
            return out + [para("**T3 runs exist but no placements.json compares them yet** (t3_cubs.py "
                               "writes it after its last run; rerun it to finish the comparison).")]
        return out + [para(f"**{chosen.words('t3')}** (no placements.json: run `t3_cubs.py "
                           f"--placement all`).")]
    name, c = chosen.placements
    rows = table_rows(c)  # the rows of placements.md and REPORT.md
    table = grid(["placement", "variant", "holdout top-1", "test top-1", "test top-5", "params",
                  "best epoch / run", "selection"], rows, [2.4, 1.0, 1.2, 1.2, 1.2, 1.4, 1.2, 1.2])
    file = "placements.json" if name == "." else f"{name}/placements.json"
    out += [table, source(f"{file}: runs, selected, vanilla, at_par, plus_vs_plain.")]
    # The same sentences as REPORT.md, so the two documents cannot disagree.
    out += [para(line) for line in selection_lines(c) + at_par_lines(c) + other_recipe_lines(c) if line]
    pairs = c.get("plus_vs_plain") or []
    out.append(para("Our variant (plus) against plain, same placement and seed: " + (
        "; ".join(f"{p.get('placement')} {fmt_points(p.get('gain_points'))} points test top-1 "
                  f"({fmt_acc(p.get('plain_test_acc'))} -> {fmt_acc(p.get('plus_test_acc'))})"
                  for p in pairs) if pairs else "not run (train with `--variant both`)") + "."))
    return out


# ---------------------------------------------------------------- 4 curves
def figure(path: Path, width: float) -> Flowable:
    """An image scaled to `width` points (aspect kept), or a note if it cannot be read."""
    try:
        w, h = ImageReader(str(path)).getSize()
    except Exception:  # noqa: BLE001 - a broken figure must not stop the report
        return para(f"*{path.name} could not be read.*", SMALL)
    return Image(str(path), width=width, height=width * h / w)


def photo(src: Path, dst: Path, width: float) -> Path:
    """A JPEG copy of a picture at 200 dpi for `width` points: the retrieval grid is photos,
    and embedding its full-size PNG would make the PDF megabytes larger for nothing."""
    try:
        with PILImage.open(src) as im:
            im = im.convert("RGB")
            pixels = round(width / inch * 200)
            if im.width > pixels:
                im = im.resize((pixels, round(im.height * pixels / im.width)), PILImage.LANCZOS)
            with atomic_file(dst) as tmp:  # as every file written here
                im.save(tmp, "JPEG", quality=90)
    except OSError:  # unreadable: figure() says so in the PDF
        return src
    return dst


# The smallest text a figure may print at: 80 % of the body text, so that a figure reads
# like the page around it (tests/test_report.py checks every figure the PDF holds).
MIN_FIGURE_FONT = 0.8 * BODY.fontSize


def draw(plot: Callable[..., bool], path: Path, height_in: float) -> bool:
    """Run one of plots.py's curve functions at the printed size (full page width, given
    height), with fonts sized for print (MIN_FIGURE_FONT and up)."""
    style = {"font.size": 7.5, "axes.titlesize": 8, "axes.labelsize": 7.5, "xtick.labelsize": 7,
             "ytick.labelsize": 7, "legend.fontsize": 7, "lines.markersize": 4}
    with plt.rc_context(style):
        return plot(path, figsize=(WIDTH / inch, height_in), dpi=200)


def captioned(picture: Flowable, caption: str) -> Flowable:
    """A figure with its caption, never split across a page break (an orphaned caption at
    the top of the next page reads as belonging to whatever follows it)."""
    return KeepTogether([picture, para(caption, SMALL)])


def section_curves(runs: RunsFolder, chosen: Chosen, figures: Path,
                   scale: float) -> list[Flowable]:
    out: list[Flowable] = [heading("4  Training curves (metrics.jsonl of each run)")]
    classifiers = [r for r in (chosen.runs["t1"], chosen.runs["t2"]) if r]
    if chosen.placements is not None:  # every run of the comparison, not just the winner
        compared = {f"{r.get('placement')}_{r.get('variant')}" for r in chosen.placements[1].get("runs", [])}
        classifiers += [r for r in runs.placement_runs(chosen.placements[0]) if r.path.name in compared]
    elif chosen.runs["t3"]:
        classifiers.append(chosen.runs["t3"])
    height = 2.1 * scale
    path = figures / PDF_FIGURES[0]
    # The loss note goes in the caption: at print size it took the loss panel's title to
    # three lines, and the panels are short already.
    note = runs_loss_note(r.loss_recipe for r in classifiers)
    if draw(lambda p, **kw: plot_classifier_curves(curve_names(classifiers), p, **kw), path, height):
        caption = CAPTIONS["classifier_curves"] + (
            " " + note.replace("train:", "Train loss:").replace("holdout:", "holdout loss:") + "." if note else "")
        out.append(captioned(figure(path, WIDTH), caption))
    else:
        out.append(no_curves(chosen, ("t1", "t2", "t3")))
    t4 = chosen.runs["t4"]
    path = figures / PDF_FIGURES[1]
    if t4 and draw(lambda p, **kw: plot_retrieval_curves(t4.phases, p, **kw), path, height):
        out.append(captioned(figure(path, WIDTH), CAPTIONS["t4_curves"]))
    else:
        out.append(no_curves(chosen, ("t4",)))
    return out


def no_curves(chosen: Chosen, tasks: Sequence[str]) -> Paragraph:
    """The line in place of a curve figure that drew nothing: for each task, why (Chosen.words:
    not run yet, unfinished, unreadable results), or that its run logged no epoch."""
    why = {t: chosen.words(t) if chosen.runs.get(t) is None else "no epochs in metrics.jsonl" for t in tasks}
    return para("; ".join(f"{t.upper()}: **{words}**" for t, words in why.items()) + ".")


def curve_names(runs: Sequence[Run]) -> dict[str, list[dict]]:
    """Run name -> its metrics.jsonl records, for the curves' key. "(SMOKE)" is added only
    where smoke and real runs are shown together: when all are smoke, the header's banner
    says so once, and eight long names would make a key taller than the panels."""
    mixed = len({run.smoke for run in runs}) > 1
    return {run.label if mixed else run.name: run.history for run in runs}


# Each figure's caption (the retrieval one continues with the mining it shows).
CAPTIONS = {
    "classifier_curves": "T1 / T2 / T3: holdout top-1 (left) and loss (right: train solid, "
                         "holdout dashed) per epoch.",
    "t4_curves": "T4: Phase A holdout top-1 (left) and Phase B holdout Recall@1 per mining "
                 "strategy (right) per epoch.",
    "retrieval": "Test queries (left column) and their 8 nearest neighbours with the main "
                 "embedding",
}


# ---------------------------------------------------------------- 5 retrieval
def section_retrieval(chosen: Chosen, figures: Path, scale: float) -> list[Flowable]:
    out: list[Flowable] = [heading("5  T4: Cars196 retrieval on unseen classes, mining comparison")]
    run = chosen.runs["t4"]
    if run is None:
        return out + [para(f"**{chosen.words('t4')}**.")]
    r = run.results
    a, main = r.get("phase_a") or {}, (r.get("phase_b") or {}).get("mining")
    out.append(para(
        f"{run_label(run)}: init {r.get('init')}; train {r.get('train_images')} images of "
        f"{r.get('train_classes')} classes, test {r.get('test_images')} images of "
        f"{r.get('test_classes')} unseen classes; every test image queries all the others "
        f"(cosine). Device: {r.get('device')}."))
    rows = [["before: Phase A classifier features (cross-entropy)"] + recalls(a.get("test_recall"))
            + [f"top-1 {fmt_acc(a.get('holdout_acc'))}", fmt_epochs(a),
               fmt_1(a.get("train_time_s"))]]
    for e in r.get("mining_comparison") or []:
        label = f"after: Multi-Similarity, {e.get('mining')} mining" + (
            " (**main**)" if e.get("mining") == main else "")
        rows.append([label] + recalls(e.get("test_recall"))
                    + [f"R@1 {fmt_acc(e.get('holdout_r1'))}", fmt_epochs(e),
                       fmt_1(e.get("train_time_s"))])
    rows.append(["chance (random other test image of the same class)",
                 fmt_acc(r.get("recall_at_1_chance")), "", "", "", "", "", ""])
    out += [grid(["embedding", "R@1", "R@2", "R@4", "R@8", "holdout", "best epoch / run",
                  "train time (s)"], rows, [4.2, 0.9, 0.9, 0.9, 0.9, 1.2, 1.0, 1.0]),
            source(f"{json_path(run)}: phase_a, mining_comparison (phase_b = the main one), "
                   "recall_at_1_chance.")]
    if len(r.get("mining_comparison") or []) < 2:
        out.append(para("Mining comparison: not run (use `--compare-mining`)."))
    width = retrieval_width(run.path / "retrieval.png", scale)
    picture = figure(photo(run.path / "retrieval.png", figures / PDF_FIGURES[2], width), width)
    out += [Spacer(1, 3), captioned(picture, f"{CAPTIONS['retrieval']} ({main} mining); green "
                                             "border: same class, red: another class.")]
    return out


def retrieval_width(png: Path, scale: float) -> float:
    """Where the retrieval grid prints, in points. A grid drawn for print (plots.plot_retrieval:
    its PNG's dpi gives a width that fits the page) prints at its own size times the figure
    scale, but never below MIN_FIGURE_FONT / RETRIEVAL_FONT_PT of it, so that its smallest
    text stays at MIN_FIGURE_FONT or larger. An older, poster-sized grid is scaled to 12.5 cm
    (x the figure scale) as before."""
    try:
        with PILImage.open(png) as im:
            dpi = im.info.get("dpi", (0, 0))[0]
            natural = im.width / dpi * inch if dpi else math.inf
    except OSError:  # unreadable: figure() says so in the PDF
        natural = math.inf
    if natural > WIDTH:
        return 12.5 * cm * scale
    return natural * max(scale, MIN_FIGURE_FONT / RETRIEVAL_FONT_PT)


# ---------------------------------------------------------------- 6 strategies
def by_task(values: dict[str, str]) -> str:
    """'T1, T2: a; T3: b', or just 'a' when every task used the same value."""
    groups: dict[str, list[str]] = {}
    for task, value in values.items():
        groups.setdefault(value, []).append(task.upper())
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{', '.join(tasks)}: {value}" for value, tasks in groups.items())


def classifier_strategies(chosen: Chosen) -> list[str]:
    runs = {t: r for t, r in chosen.runs.items() if r is not None}
    if not runs:
        return [f"Classifier training: **{NOT_RUN}**."]
    area = random_area()
    recipes = {t: classifier_recipe(r.args, area) for t, r in runs.items()}

    def pick(key: str) -> str:
        return by_task({t: recipe[key] for t, recipe in recipes.items()})

    # T4's classifier is its Phase A; its Phase B has its own line (hard mining).
    stops = ", ".join(f"{t.upper()} {fmt_epochs(r.results)}" if t != "t4" else
                      f"T4 Phase A {fmt_epochs(r.results.get('phase_a') or {})}"
                      for t, r in runs.items())
    return [
        f"**Augmentation** (train only): {pick('augmentation')}.",
        f"**Schedule**: {pick('optimiser')}, peak LR {pick('peak LR')}; "
        f"{pick('schedule')} to zero, per step; weight decay {pick('weight decay')}; label "
        f"smoothing {pick('label smoothing')}; batch {pick('batch size')}; epochs at most: "
        f"{pick('epochs (max)')}.",
        f"**Early stopping** on the holdout score ({pick('holdout')} held out of train): "
        f"{pick('early stopping')}; the best holdout epoch's weights are tested once. Best "
        f"epoch / epochs run: {stops}.",
    ]


def mining_strategy(chosen: Chosen) -> str:
    run = chosen.runs["t4"]
    if run is None:
        return f"**Hard mining** (T4): **{chosen.words('t4')}**."
    recipe = embedding_recipe(run.results)
    entries = run.results.get("mining_comparison") or []
    scores = [e.get("holdout_r1") or 0.0 for e in entries]
    best = [e.get("mining") for e, v in zip(entries, scores) if v == max(scores)]
    verdict = ""
    if len(entries) > 1:  # ties are common on small holdouts: name every best one
        verdict = (f" Best by holdout R@1 ({fmt_acc(max(scores))}): {', '.join(best)}"
                   + (" (tied)." if len(best) > 1 else "."))
    return (f"**Hard mining** (T4 Phase B): {recipe['loss']}; pairs mined with "
            f"{recipe['mining']} on class-balanced batches of {recipe['batches (P x K)']}. "
            "none = all pairs, ms = the MS paper's mining, hard = hardest positive and negative "
            "per anchor, semihard = ours (negatives in a band around the hardest positive)."
            f"{verdict} {recipe['optimiser']}, LR {recipe['LR']}, {recipe['early stopping']}.")


def variant_strategy(chosen: Chosen) -> str:
    pairs = (chosen.placements[1].get("plus_vs_plain") or []) if chosen.placements else []
    result = ("; ".join(f"{p.get('placement')}: {fmt_points(p.get('gain_points'))} test "
                        "points over plain" for p in pairs)
              if pairs else "not run (`--variant both`)")
    return ("**Our variant** (CUBS plus): identity-preserving gates y = x (1 + tanh(gamma) "
            "(2 sigmoid(.) - 1)) with gamma = 0 at init, so the network starts exactly as ResNet-18, and "
            f"multi-head similarity (4 heads of 8 dims). Result: {result}.")


def section_strategies(chosen: Chosen) -> list[Flowable]:
    items = classifier_strategies(chosen) + [mining_strategy(chosen), variant_strategy(chosen)]
    t4 = chosen.runs["t4"]
    if t4 is not None:
        items.append("**T4 initialisation**: " + embedding_recipe(t4.results)["init"]
                     + " (Phase A), Phase B from the Phase A weights.")
    return [heading("6  Training strategies (from each run's args)")] + [
        Paragraph(inline(item), BODY, bulletText="\u2022") for item in items]


# ---------------------------------------------------------------- the document
def header(runs: RunsFolder, chosen: Chosen) -> list[Flowable]:
    shown = [r for r in chosen.runs.values() if r is not None]
    if chosen.placements:
        shown += [r for r in runs.placement_runs(chosen.placements[0]) if r not in shown]
    others = [r.name for r in runs.classifiers + runs.retrievals if r not in shown]
    if len(others) > 6:  # the header stays two lines however full the folder is
        others = others[:6] + [f"{len(others) - 6} more"]
    out = [Paragraph("Recognition and retrieval: Tiny ImageNet and Cars196", TITLE),
           para(f"Built by `python -m common.report` from `{runs.root}` on "
                f"{_dt.date.today().isoformat()}. One run per task (real before smoke); "
                + (f"REPORT.md also lists {', '.join(others)}." if others
                   else "REPORT.md has the full tables."), SMALL)]
    smoke = sorted(r.name for r in shown if r.smoke)
    if smoke:
        out.append(Paragraph(html.escape(f"SMOKE: {SMOKE_BANNER} ({', '.join(smoke)})."), WARN))
    left_out = _not_reported(runs)
    if left_out:
        out.append(Paragraph(html.escape(f"NOT REPORTED: {left_out}."), WARN))
    return out


def _not_reported(runs: RunsFolder) -> str:
    """Runs in the folder that no table shows: unfinished ones, and the problems collect()
    met (unreadable files, a placements.json whose selected run is gone); a task that has
    only those says so below (Chosen.words). "" if there are none."""
    parts = []
    if runs.unfinished:
        names = [name for name, _ in runs.unfinished]
        parts.append("unfinished (no results.json yet; rerun the command to "
                     f"finish): {', '.join(names[:6])}" + (f" and {len(names) - 6} more" if len(names) > 6 else ""))
    if runs.problems:
        n = len(runs.problems)
        parts.append(f"{n} problem{'s' if n > 1 else ''} reading the runs folder (REPORT.md lists "
                     f"{'them' if n > 1 else 'it'})")
    return "; ".join(parts)


def story(runs: RunsFolder, summaries: Summaries, figures: Path, scale: float) -> list[Flowable]:
    chosen = choose_runs(runs)
    return (header(runs, chosen) + section_networks(summaries, chosen) + section_results(chosen)
            + section_placements(chosen) + section_curves(runs, chosen, figures, scale)
            + section_retrieval(chosen, figures, scale) + section_strategies(chosen))


def footer(canvas: Canvas, doc: SimpleDocTemplate) -> None:
    canvas.saveState()
    canvas.setFont("Helvetica", 7)
    canvas.drawRightString(A4[0] - MARGIN, MARGIN / 2, f"REPORT.pdf, page {doc.page}")
    canvas.restoreState()


class _Document(SimpleDocTemplate):
    """SimpleDocTemplate that notes the height left empty at the foot of each page."""

    def handle_pageBegin(self) -> None:
        self.empty_feet: list[float] = getattr(self, "empty_feet", [])
        super().handle_pageBegin()

    def handle_pageEnd(self) -> None:
        self.empty_feet.append(self.frame._y - self.frame._y1p)  # points below the last flowable
        super().handle_pageEnd()


def render(runs: RunsFolder, summaries: Summaries, figures: Path,
           scale: float) -> tuple[bytes, int, float]:
    """The PDF's bytes, its page count, and the empty height (points) at the foot of page 1."""
    buffer = io.BytesIO()
    doc = _Document(buffer, pagesize=A4, leftMargin=MARGIN, rightMargin=MARGIN,
                    topMargin=MARGIN, bottomMargin=MARGIN, title="Report", author="common.report")
    doc.build(story(runs, summaries, figures, scale), onFirstPage=footer, onLaterPages=footer)
    return buffer.getvalue(), doc.page, doc.empty_feet[0]


# Page 1 may end this much above its bottom margin: more reads as a layout fault (the
# figure that did not fit moved to page 2 and left a hole).
MAX_EMPTY_FOOT = 2.5 * cm


def write_pdf(runs: RunsFolder, summaries: Summaries, pdf: Path, figures: Path) -> Path:
    """Write REPORT.pdf (atomically); figures drawn for it go to `figures`.

    Tries the figure scales from the largest down and takes the first that fits on MAX_PAGES
    pages without a hole at the foot of page 1 (a curve figure too tall for the room left
    there moves to page 2 whole, with its caption); else the fitting scale with the smallest
    hole. The figure files left in `figures` are those of the scale taken."""
    figures.mkdir(parents=True, exist_ok=True)
    fitting: dict[float, tuple[bytes, float]] = {}
    for scale in FIGURE_SCALES:
        data, pages, empty = render(runs, summaries, figures, scale)
        if pages <= MAX_PAGES:
            fitting[scale] = (data, empty)
            if empty <= MAX_EMPTY_FOOT:
                break
    if not fitting:  # cannot happen with the bounded content of one run per task; say so if it does
        print(f"warning: {pdf} has {pages} pages, more than {MAX_PAGES}")
        fitting[scale] = (data, empty)
    chosen = min(fitting, key=lambda s: (fitting[s][1] > MAX_EMPTY_FOOT, fitting[s][1] if
                                         fitting[s][1] > MAX_EMPTY_FOOT else -s))
    if chosen != scale:  # the figure files on disk are the last scale's: draw the chosen one's
        render(runs, summaries, figures, chosen)
    with atomic_file(pdf) as tmp:
        tmp.write_bytes(fitting[chosen][0])
    return pdf
