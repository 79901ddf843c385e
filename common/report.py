"""The report command and REPORT.md: everything the task scripts wrote under a runs folder.

    python -m common.report runs                    # -> runs/REPORT.md, runs/report_figures/
    python -m common.report runs --out REPORT.md    # -> ./REPORT.md, ./report_figures/

Inputs, found anywhere under the runs folder (generated `smoke_data/` folders are skipped):
    results.json     T1/T2/T3 classifier runs ("task": t1/t2/t3) and T4 ("task": t4)
    metrics.jsonl    one record per epoch (a folder with it, or with a last.pt, but no
                     results.json is unfinished)
    placements.json  T3's comparison of placements (selection by holdout, at-par check)
    curves.png, placements.png, retrieval.png   copied into report_figures/
Output: REPORT.md with relative links to report_figures/ (copied figures plus combined
curves drawn here), and REPORT.pdf next to it: at most two A4 pages, one run per task
(common/report_pdf.py, drawn with reportlab, so no LaTeX or pandoc is needed).

    python -m common.report runs --archive Assignment2.zip     # + the submission archive

writes the report, then one zip with the code, the report and each task's best model
(common/archive.py). Smoke runs are refused unless --allow-smoke is given.

What is shown: each model's architecture (counts of conv / linear / BatchNorm layers,
CUBS attention blocks and squeeze-excitation gates, parameters, forward GFLOPs for one image
at the run's input size), the T1/T2/T3 results table, T3's placement comparison quoted from
placements.json, T4's Recall@K before/after metric learning with the chance level and the
mining comparison, training curves, and the training recipe taken from each run's args.
A task without a finished run says what it has instead: a results.json that cannot be read
(named, with the file), unfinished runs (with the epochs logged), else "not run yet"; runs
made with --smoke are labelled as such.

Number formats: common/formats.py (accuracies to 4 decimals, point differences to 2 with a
sign, parameter counts exact); every result is copied from the JSON files and only rounded.
Computed, not read from JSON (and labelled so): layer counts, rebuilt-model parameter counts
and GFLOPs (common/architecture.py), and the random-resized-crop area range
(common/recipes.py, from common/schema.py's RANDOM_AREA, which the loader uses).

The report's modules import one way only, from this one down: report imports report_pdf and
archive; report and report_pdf import architecture and recipes; runs_folder (collect,
choose_runs), which all but recipes use, imports none of them.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from common import archive
from common.architecture import Summaries, architectures
from common.errors import UserError
from common.files import STALE_TEMP_S, atomic_file, remove_stale_temps, write_text
from common.formats import (fmt_1, fmt_acc, fmt_count, fmt_epochs, fmt_gflops, fmt_points,
                            fmt_setting, table)
from common.networks import model_name
from common.placements import comparison_lines
from common.plots import plot_classifier_curves, plot_retrieval_curves, runs_loss_note
from common.recipes import classifier_recipe, embedding_recipe, random_area
from common.report_pdf import PDF_FIGURES, write_pdf
from common.runs_folder import NOT_RUN, SMOKE_BANNER, TASKS, Run, RunsFolder, collect, folder_task, task_note

FIGURES = "report_figures"


# ---------------------------------------------------------------- markdown helpers
def smoke_note(runs: Sequence[Run]) -> list[str]:
    smoke = [r.name for r in runs if r.smoke]
    if not smoke:
        return []
    return [f"> **SMOKE: {SMOKE_BANNER}** ({', '.join(f'`{s}`' for s in smoke)}).", ""]


class Figures:
    """Copies / writes figures into report_figures/ and returns Markdown image links."""

    def __init__(self, report: Path) -> None:
        self.base = report.parent
        self.folder = self.base / FIGURES
        self.folder.mkdir(parents=True, exist_ok=True)
        self.linked: set[str] = set()  # file names in `folder` that REPORT.md shows
        self.shows: dict[str, str] = {}  # file name in `folder` -> "RUN/FILE" it was given for

    def path(self, name: str) -> Path:
        return self.folder / name

    def name(self, run_name: str, file: str) -> str:
        """figure_name(run_name, file), unique in this report: runs "a/b" and "a__b" (or
        "." and "root") would share a name, and one figure would overwrite the other; the
        second one to ask gets "-2" before the extension (in the report's fixed order)."""
        base, n = figure_name(run_name, file), 1
        name = base
        while self.shows.setdefault(name, f"{run_name}/{file}") != f"{run_name}/{file}":
            n += 1
            name = f"{Path(base).stem}-{n}{Path(base).suffix}"
        return name

    def link(self, path: Path, alt: str) -> list[str]:
        rel = Path(os.path.relpath(path, self.base)).as_posix()
        if path.parent == self.folder:
            self.linked.add(path.name)
        alt = alt.replace("[", "(").replace("]", ")")  # a run folder's name is in it
        return [f"![{alt}]({rel})", ""]

    def remove_unlinked(self) -> list[str]:
        """Delete the figures an earlier report wrote that this one no longer shows (a run
        deleted since), so they cannot pass for current ones; returns their names. Only
        names this module gives figures (RUN__FILE.png, classifiers_holdout.png) are
        touched: any other file in the folder is not the report's."""
        ours = lambda name: name.endswith(".png") and ("__" in name or name == "classifiers_holdout.png")  # noqa: E731
        stale = sorted(p.name for p in self.folder.iterdir()
                       if p.is_file() and ours(p.name) and p.name not in self.linked)
        for name in stale:
            (self.folder / name).unlink()
        # and a killed report's half-written figures (atomic_file's temps), unless being written
        remove_stale_temps(self.folder, sorted({t.name[1:].rsplit(".", 2)[0] for t in self.folder.glob(".*.tmp")
                                                if ours(t.name[1:].rsplit(".", 2)[0])}), STALE_TEMP_S)
        return stale

    def copy(self, src: Path, name: str, alt: str) -> list[str]:
        if not src.is_file():
            return [f"*{src.name} not found in `{src.parent}`.*", ""]
        dst = self.path(name)
        with atomic_file(dst) as tmp:
            shutil.copyfile(src, tmp)
        return self.link(dst, alt)


def figure_name(run_name: str, file: str) -> str:
    # A run at the folder's root is "." (its phases "./phase_a"): "root", not a hidden file.
    # Only letters, digits, "." "_" "-": a space or ")" in a folder's name would end the
    # Markdown link (a space is no link at all in CommonMark, a ")" ends its path).
    parts = ("root" if part == "." else re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in run_name.split("/"))
    return f"{'__'.join(parts)}__{file}"


# ---------------------------------------------------------------- sections
def section_status(runs: RunsFolder) -> list[str]:
    rows = []
    for task, title in TASKS.items():
        found, note = runs.of_task(task), task_note(runs, task)
        # Its finished runs, then the folders the note names (an unreadable results.json, an
        # unfinished run): "not run yet" only where the task left nothing at all.
        folders = [r.name for r in found] + runs.unreadable_of(task) + [n for n, _ in runs.unfinished_of(task)]
        status = note or NOT_RUN
        if found:
            kinds = sorted({"SMOKE" if r.smoke else "real" for r in found})
            status = f"finished ({len(found)} run{'s' * (len(found) > 1)}: {', '.join(kinds)})" + (
                f"; {note}" if note else "")
        rows.append([task.upper(), title, status, ", ".join(f"`{n}`" for n in folders) or "-"])
    lines = ["## Status", ""] + table(["task", "what", "status", "results in"], rows)
    if runs.unfinished:
        phases = any(folder_task(n) == "t4" and n.rsplit("/", 1)[-1].startswith("phase_")
                     for n, _ in runs.unfinished)
        lines += ["Unfinished runs (metrics.jsonl but no results.json yet; rerun the same command to "
                  "resume from last.pt)" + (". T4 writes its results.json in the folder above its phase "
                                            "folders once its last phase is done, so a phase listed here "
                                            "may have run all its epochs" if phases else "") + ":", ""]
        lines += table(["folder", "epochs logged", "last holdout score"],
                       [[f"`{n}`", len(h), _last_score(h)] for n, h in runs.unfinished])
    return lines


def _last_score(history: list[dict]) -> str:
    if not history:
        return "n/a"
    last = history[-1]
    for key in ("holdout_acc", "holdout_r1"):
        if key in last:
            return f"{key} {fmt_acc(last[key])} (epoch {last.get('epoch', '?')})"
    return "n/a"


def section_architectures(summaries: Summaries) -> list[str]:
    lines = ["## Architectures", ""]
    if not summaries:
        return lines + [f"No finished run: {NOT_RUN}.", ""]
    rows = []
    for run, phase, a in summaries:
        params_key = "embedding_params" if phase == "b" else "params"
        if a is None:
            rows.append([run.label, model_name(run.results)] + ["n/a"] * 9)
            continue
        rows.append([run.label, a.label, f"3 x {a.input_size} x {a.input_size}", a.conv,
                     a.linear, a.batchnorm, a.attention, a.se_gates,
                     fmt_count(run.results.get(params_key)), fmt_count(a.params),
                     fmt_gflops(a.flops)])
    lines += table(["run", "model", "input", "conv", "linear", "BatchNorm", "CUBS attention blocks",
                    "SE gates", "params (results.json)", "params (rebuilt)", "GFLOPs / image"], rows)
    lines += ["Layer counts, rebuilt parameter counts and GFLOPs are computed by this report from "
              "the model rebuilt with the run's settings (GFLOPs: one forward pass of one image, "
              "torch.utils.flop_counter, multiply-add = 2 FLOPs; conv, matmul and attention kernels only, "
              "elementwise work is not counted; the plain CUBS blocks' Taylor-series similarity "
              "is counted as the batched matmuls of eager mode). "
              "CUBS attention blocks counts Block 1 and Block 2 modules (two per residual block).",
              ""]
    return lines


def section_classifiers(runs: RunsFolder) -> list[str]:
    lines = ["## T1 / T2 / T3: Tiny ImageNet classification", ""]
    for task in ("t1", "t2", "t3"):
        if not runs.of_task(task):
            lines.append(f"- {TASKS[task]}: **{task_note(runs, task) or NOT_RUN}**")
    if lines[-1].startswith("- "):
        lines.append("")
    if not runs.classifiers:
        return lines
    lines += smoke_note(runs.classifiers)
    rows = [[r.label, r.task.upper(), r.results.get("model", "?"),
             "SMOKE" if r.smoke else "real",
             fmt_acc(r.results.get("test_acc")), fmt_acc(r.results.get("test_top5")),
             fmt_acc(r.results.get("holdout_acc")), fmt_acc(r.results.get("holdout_top5")),
             fmt_count(r.results.get("params")), fmt_epochs(r.results),
             fmt_setting(r.results.get("stopped_early")), fmt_1(r.results.get("train_time_s")),
             fmt_1(r.results.get("images_per_s")), r.results.get("device", "n/a")]
            for r in runs.classifiers]
    lines += table(["run", "task", "model", "kind", "test top-1", "test top-5", "holdout top-1",
                    "holdout top-5", "params", "best epoch / epochs run", "stopped early",
                    "train time (s)", "train images/s", "device"], rows)
    lines += ["Test accuracy is measured once, with the weights of the best holdout epoch; the "
              "holdout columns are that epoch's holdout scores.", ""]
    return lines


def section_placements(runs: RunsFolder, figs: Figures) -> list[str]:
    lines = ["## T3: placement comparison", ""]
    if not runs.placements:
        t3 = runs.of_task("t3")
        note = ("T3 runs exist but no readable placements.json compares them yet (t3_cubs.py "
                "writes it after its last run)" if t3 else task_note(runs, "t3") or NOT_RUN)
        return lines + [f"**{note}**.", ""]
    for name, c in runs.placements:
        lines += placement_block(runs, name, c, figs)
    return lines


def placement_block(runs: RunsFolder, name: str, c: dict, figs: Figures) -> list[str]:
    folder = runs.root / name
    members = runs.placement_runs(name)
    lines = [f"### `{name}/placements.json`", ""] + smoke_note(members)
    lines += comparison_lines(c)
    if c.get("runs") or c.get("vanilla"):  # with neither, t3_cubs.py draws no figure
        lines += figs.copy(folder / "placements.png", figs.name(name, "placements.png"),
                           "holdout (selects) and test accuracy per run; the selected run hatched")
    return lines


def section_retrieval(runs: RunsFolder, figs: Figures) -> list[str]:
    lines = ["## T4: Cars196 retrieval, Recall@K before and after metric learning", ""]
    if not runs.retrievals:
        return lines + [f"**{task_note(runs, 't4') or NOT_RUN}**.", ""]
    for run in runs.retrievals:
        lines += retrieval_block(run, figs)
    return lines


def retrieval_block(run: Run, figs: Figures) -> list[str]:
    r = run.results
    a, b = r.get("phase_a") or {}, r.get("phase_b") or {}
    lines = [f"### `{run.name}`", ""] + smoke_note([run])
    lines += [f"Network: CUBS-ResNet-18, placement {r.get('placement')}, variant {r.get('variant')}; "
              f"init {r.get('init')}" + (f" from `{r['init_source']}` ({r.get('init_loaded')} tensors "
                                         f"loaded, {len(r.get('init_skipped') or [])} skipped)"
                                         if r.get("init_source") else "") + ". "
              f"Train: {r.get('train_images')} images of {r.get('train_classes')} classes; "
              f"test: {r.get('test_images')} images of {r.get('test_classes')} unseen classes. "
              f"Device: {r.get('device')}.", ""]
    before, after = a.get("test_recall") or {}, b.get("test_recall") or {}
    ks = sorted(set(before) | set(after), key=int)
    rows = [[k, fmt_acc(before.get(k)), fmt_acc(after.get(k)),
             fmt_points(100 * (after[k] - before[k])) if k in before and k in after else "n/a"]
            for k in ks]
    lines += table(["K", "Recall@K before (Phase A)", f"Recall@K after (Phase B, {b.get('mining')})",
                    "change (points)"], rows)
    lines += [f"Recall@1 chance level: **{fmt_acc(r.get('recall_at_1_chance'))}** (probability that "
              f"a random other test image has the query's class).", "",
              f"Phase A (classifier, cross-entropy): holdout top-1 {fmt_acc(a.get('holdout_acc'))}, "
              f"best epoch / epochs run {fmt_epochs(a)}, train time {fmt_1(a.get('train_time_s'))} s. "
              f"Phase B (Multi-Similarity, {b.get('mining')} mining): holdout Recall@1 "
              f"{fmt_acc(b.get('holdout_r1'))}, best epoch / epochs run {fmt_epochs(b)}, train time "
              f"{fmt_1(b.get('train_time_s'))} s.", ""]
    lines += mining_lines(r)
    lines += figs.copy(run.path / "retrieval.png", figs.name(run.name, "retrieval.png"),
                       "test queries and their nearest neighbours (green: same class)")
    return lines


def mining_lines(r: dict) -> list[str]:
    entries = r.get("mining_comparison") or []
    main = (r.get("phase_b") or {}).get("mining")
    if len(entries) < 2:
        return ["Mining comparison: not run (use `--compare-mining`).", ""]
    ks = sorted({k for e in entries for k in (e.get("test_recall") or {})}, key=int)
    rows = [[e.get("mining") + (" (main)" if e.get("mining") == main else "")]
            + [fmt_acc((e.get("test_recall") or {}).get(k)) for k in ks]
            + [fmt_acc(e.get("holdout_r1")), fmt_epochs(e), fmt_1(e.get("train_time_s"))]
            for e in entries]
    return ["Mining comparison (Phase B from the same Phase A weights):", ""] + table(
        ["mining"] + [f"R@{k}" for k in ks] + ["holdout R@1", "best epoch / epochs run",
                                               "train time (s)"], rows)


# ---------------------------------------------------------------- curves
def histories(runs: Sequence[Run]) -> dict[str, list[dict]]:
    """Run label -> its metrics.jsonl records: what plot_classifier_curves draws."""
    return {r.label: r.history for r in runs}


def section_curves(runs: RunsFolder, figs: Figures) -> list[str]:
    lines = ["## Training curves", ""]
    if not runs.classifiers and not runs.retrievals:
        return lines + [f"No finished run: {NOT_RUN}.", ""]
    if plot_classifier_curves(histories(runs.classifiers), figs.path("classifiers_holdout.png"),
                              loss_note=runs_loss_note(r.loss_recipe for r in runs.classifiers)):
        lines += ["T1 / T2 / T3 together (holdout top-1 per epoch, left; train and holdout "
                  "loss, right):", ""]
        lines += figs.link(figs.path("classifiers_holdout.png"), "holdout accuracy and loss per epoch")
    for run in runs.retrievals:
        name = figs.name(run.name, "phases.png")
        if plot_retrieval_curves(run.phases, figs.path(name)):
            lines += [f"T4 `{run.name}`, Phase A and Phase B:", ""]
            lines += figs.link(figs.path(name), "T4 holdout scores per epoch")
    lines += ["Per-run curves (loss and accuracy / recall per epoch, as written by each run):", ""]
    for run in runs.classifiers:
        lines += [f"**{run.label}**", ""]
        lines += figs.copy(run.path / "curves.png", figs.name(run.name, "curves.png"),
                           f"{run.name} curves")
    for run in runs.retrievals:
        for phase in run.phases:
            lines += [f"**{run.label} / {phase}**", ""]
            lines += figs.copy(run.path / phase / "curves.png",
                               figs.name(f"{run.name}/{phase}", "curves.png"),
                               f"{run.name}/{phase} curves")
    return lines


def recipe_table(named: Sequence[tuple[str, dict[str, str]]]) -> list[str]:
    """Rows = settings, one column per group of runs sharing the same recipe."""
    groups: list[tuple[list[str], dict[str, str]]] = []
    for name, recipe in named:
        for names, other in groups:
            if other == recipe:
                names.append(name)
                break
        else:
            groups.append(([name], recipe))
    keys = list(dict.fromkeys(k for _, rec in groups for k in rec))
    return table(["setting"] + [", ".join(names) for names, _ in groups],
                 [[k] + [rec.get(k, "-") for _, rec in groups] for k in keys])


def section_strategies(runs: RunsFolder) -> list[str]:
    lines = ["## Training strategies (from each run's args)", ""]
    if not runs.classifiers and not runs.retrievals:
        return lines + [f"No finished run: {NOT_RUN}.", ""]
    area = random_area()
    if runs.classifiers:
        lines += ["Classifiers (T1 / T2 / T3): label-smoothed cross-entropy; the best holdout "
                  "epoch's weights are tested once.", ""]
        lines += recipe_table([(r.label, classifier_recipe(r.args, area)) for r in runs.classifiers])
    for run in runs.retrievals:
        lines += [f"T4 `{run.label}`, Phase A (classifier on the train classes):", ""]
        lines += recipe_table([(run.label, classifier_recipe(run.args, area))])
        lines += [f"T4 `{run.label}`, Phase B (metric learning):", ""]
        lines += recipe_table([(run.label, embedding_recipe(run.results))])
    lines += [f"The crop area range ({area}) is RANDOM_AREA (common/schema.py), the loader's, "
              "not stored in results.json.", ""]
    return lines


# ---------------------------------------------------------------- the report
def render(runs: RunsFolder, summaries: Summaries, figs: Figures) -> str:
    all_runs = runs.classifiers + runs.retrievals
    lines = ["# Report", "",
             f"Built by `python -m common.report` from `{runs.root}`. Numbers are copied from the "
             "runs' JSON files and rounded: accuracies, recalls and chance levels to 4 decimals, "
             "differences to 2 decimals in percentage points, times to 1 decimal (seconds); "
             "parameter counts are exact.", ""]
    if any(r.smoke for r in all_runs):
        lines += [f"> **WARNING: this report contains SMOKE runs ({SMOKE_BANNER}).** They are "
                  "marked SMOKE below.", ""]
    lines += section_status(runs)
    lines += section_architectures(summaries)
    lines += section_classifiers(runs)
    lines += section_placements(runs, figs)
    lines += section_retrieval(runs, figs)
    lines += section_curves(runs, figs)
    lines += section_strategies(runs)
    if runs.problems:
        lines += ["## Problems while reading", ""] + [f"- {p}" for p in runs.problems] + [""]
    return "\n".join(lines).rstrip() + "\n"


def build_report(runs_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write REPORT.md (and its figures) and REPORT.pdf next to it; returns the REPORT.md path."""
    runs_dir = Path(runs_dir)
    out = Path(out) if out else runs_dir / "REPORT.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = collect(runs_dir)
    summaries = architectures(runs)  # rebuilds every model: once, for both reports
    figs = Figures(out)
    write_text(out, render(runs, summaries, figs))
    for name in PDF_FIGURES:  # drawn again below if their run is still there
        (figs.folder / name).unlink(missing_ok=True)
    write_pdf(runs, summaries, out.with_suffix(".pdf"), figs.folder)
    stale = figs.remove_unlinked()  # after both are written: a failed report removes nothing
    if stale:
        print(f"removed {len(stale)} figure(s) of runs no longer in {runs_dir} from {figs.folder}: "
              f"{', '.join(stale)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m common.report",
                                description="Write REPORT.md and REPORT.pdf from the runs folder, "
                                            "and optionally the submission archive.")
    p.add_argument("runs", nargs="?", default="runs", help="the runs folder to read (default: runs)")
    p.add_argument("--out", default=None, help="report path (default: <runs>/REPORT.md); the PDF "
                                               "(same name, .pdf) and report_figures/ go next to it")
    p.add_argument("--archive", default=None, metavar="ZIP",
                   help="also write the submission archive (code, report, best models), "
                        "e.g. Assignment2.zip")
    p.add_argument("--allow-smoke", action="store_true",
                   help="let the archive include smoke runs (refused by default)")
    return p


def main(argv: list[str] | None = None) -> Path:
    """Command line. A user error (e.g. smoke runs in an archive) ends it with one `error:`
    line and exit status 1, without a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if Path(args.runs).exists() and not Path(args.runs).is_dir():
        parser.error(f"{args.runs} is a file: expected the runs folder the task scripts wrote into")
    if not Path(args.runs).is_dir():
        parser.error(f"runs folder not found: {args.runs}")
    if args.out and Path(args.out).suffix.lower() != ".md":  # the PDF is written beside it, as .pdf
        parser.error(f"--out {args.out}: expected the Markdown report's path, ending in .md "
                     f"(the PDF, of the same name, and report_figures/ go next to it)")
    for flag, path in (("--out", args.out), ("--archive", args.archive)):
        if path and Path(path).is_dir():
            parser.error(f"{flag} {path} is a folder: give a file name in it, e.g. "
                         f"{Path(path) / ('REPORT.md' if flag == '--out' else 'Assignment2.zip')}")
        blocking = next((parent for parent in Path(path or ".").parents if parent.is_file()), None)
        if path and blocking:  # found now, not after the report is written
            parser.error(f"{flag} {path}: {blocking} is a file, so nothing can be written inside it")
    if args.archive:
        try:  # '..zip' would unzip into the current folder
            archive.top_folder(Path(args.archive))
        except archive.ArchiveError as err:
            parser.error(f"--archive {args.archive}: {err}")
        if Path(args.archive).suffix.lower() != ".zip":  # it is a zip, whatever its name
            parser.error(f"--archive {args.archive}: expected the zip's path, ending in .zip")
    try:
        if args.archive:  # refuse before spending time on the report
            archive.check_runs(collect(args.runs), args.allow_smoke)
        out = build_report(args.runs, args.out)
        print(f"wrote {out} and {out.with_suffix('.pdf')}")
        if args.archive:
            archive.build_archive(args.runs, out, args.archive, args.allow_smoke)
    except UserError as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # e.g. a read-only runs folder; the report's files are written atomically
        if err.filename is None:
            raise
        sys.exit(f"error: {err.strerror.lower()}: {err.filename} (--out and --archive choose where "
                 f"the report and the archive are written)")
    return out


if __name__ == "__main__":
    main()
