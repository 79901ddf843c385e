"""T3's comparison of CUBS placements: which finished run is selected, whether it is at par
with vanilla ResNet-18, and how the plus variant does against plain; and its one Markdown
rendering, shared by placements.md (t3_cubs.py) and REPORT.md / REPORT.pdf (common/report.py).

    c = compare_runs(Path("runs/t3"), Path("runs/t2/results.json"))
    write_comparison(c, Path("runs/t3"))   # placements.json, placements.md, placements.png
    comparison_lines(c)                    # the Markdown of placements.md, as lines

The placement is selected by HOLDOUT accuracy among the plain runs, never by test accuracy;
equal holdout scores go to the earlier placement of the specification (serial, reverse,
parallel).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.cubs import PLACEMENTS, VARIANTS
from common.files import STALE_TEMP_S, remove_files, remove_stale_temps, write_json, write_text
from common.formats import fmt_acc, fmt_count, fmt_epochs, fmt_points, table
from common.plots import plot_bars
from common.schema import RECIPE_FLAGS

AT_PAR_POINTS = 2.0  # the assignment: at most 2 points below vanilla ResNet-18
# The flags (results.json "args") that set what a T2 or T3 run computes; the others steer the
# process or name the run. Runs that differ in one are different experiments: never compared.
COMPARED_FLAGS = RECIPE_FLAGS + ("seed", "smoke")
CUBS_FLAGS = ("d", "gate_init")  # T3 only: not compared with T2
PLAIN_ONLY = ("gate_init",)  # the plain blocks' gates: not compared for plus runs, which have none
# What the comparison reads of each run's results.json: one without them is left out, named.
ROW_KEYS = ("placement", "variant", "holdout_acc", "test_acc", "test_top5", "params", "best_epoch",
            "epochs_run", "num_classes", "width", "image_size")
TABLE_HEADER = ["placement", "variant", "holdout top-1", "test top-1", "test top-5", "params",
                "best epoch / epochs run", "selection"]


def recipe_differences(args: Mapping[str, Any], reference: Mapping[str, Any],
                       flags: tuple[str, ...] = COMPARED_FLAGS + CUBS_FLAGS) -> list[str]:
    """The recipe flags in which `args` differ from `reference` (both a results.json's
    "args"), as "epochs 5 instead of 60"; flags missing from `reference` are not compared."""
    return [f"{k} {args.get(k)} instead of {reference[k]}" for k in flags
            if k in reference and args.get(k) != reference[k]]


def compare_runs(out: Path, vanilla_path: Path, recipe: Mapping[str, Any] | None = None,
                 processes_now: int | None = None) -> dict:
    """Compare every finished run under `out` (its <placement>_<variant>/results.json, those
    folder names only) and,
    if `vanilla_path` holds a T2 result of the same setup and recipe, check the at-par rule.

    recipe: the args of the command that compares (t3_cubs.py's); a run trained with other
    recipe flags is listed under "other_recipe" and neither compared nor selected. So, when
    `processes_now` (this command's process count) is given, is a run trained by another
    number of processes than most of the others (--batch-size is per process: another global
    batch and step count)."""
    runs, other_recipe = _comparable_runs(out, recipe, processes_now)
    rows = [{k: r[k] for k in ROW_KEYS} | {"processes": processes(r)} for r in runs]
    # max() keeps the first of equal scores: list in the spec's order, so ties go to serial,
    # then reverse, then parallel (and plain before plus).
    rows.sort(key=spec_order)
    selected, best_overall = select(rows)
    comparison = {"selected_by": "holdout_acc", "tie_break": " > ".join(PLACEMENTS),
                  "runs": rows, "selected": selected,
                  "best_overall": best_overall, "vanilla": None, "at_par": None,
                  "plus_vs_plain": [], "other_recipe": other_recipe}
    by_key = {(r["placement"], r["variant"]): r for r in rows}
    for placement in PLACEMENTS:
        if (placement, "plain") in by_key and (placement, "plus") in by_key:
            a, b = by_key[placement, "plain"], by_key[placement, "plus"]
            comparison["plus_vs_plain"].append({
                "placement": placement, "plain_test_acc": a["test_acc"],
                "plus_test_acc": b["test_acc"],
                "gain_points": 100 * (b["test_acc"] - a["test_acc"])})

    if vanilla_path.is_dir():  # T2's run folder stands for its results.json, as for --evaluate
        vanilla_path = vanilla_path / "results.json"
    vanilla = _read_json(vanilla_path) if vanilla_path.is_file() else None
    if vanilla_path.is_file() and not isinstance(vanilla, dict):  # not JSON, or a list, say
        vanilla = {"task": "not a results.json", "model": None}
    not_t2 = vanilla and (vanilla.get("task"), vanilla.get("model")) != ("t2", "resnet18")
    same_setup = vanilla and selected and all(vanilla.get(k) == selected[k]
                                              for k in ("num_classes", "width", "image_size"))
    # The at-par rule compares two networks trained the same way, not two recipes.
    other_t2_recipe = recipe_differences(vanilla.get("args", {}), recipe or {}, COMPARED_FLAGS) if vanilla else []
    other_processes = vanilla and selected and processes(vanilla) != selected["processes"]
    if not_t2:  # e.g. T1's results.json, trained with T2's recipe and width
        comparison["vanilla_note"] = (f"{vanilla_path} is not a T2 ResNet-18 result (task "
                                      f"{vanilla.get('task')}, model {vanilla.get('model')}): not compared")
        same_setup = False
    elif vanilla and selected and not same_setup:
        comparison["vanilla_note"] = (f"{vanilla_path} was trained in another setup "
                                      f"(classes/width/image size differ): not compared")
    elif other_processes:  # --batch-size is per process: another global batch and step count
        comparison["vanilla_note"] = (f"{vanilla_path} was trained by {processes(vanilla)} process(es), "
                                      f"the selected run by {selected['processes']}; --batch-size is per "
                                      f"process, so the recipes differ: not compared")
        same_setup = False
    elif vanilla and other_t2_recipe:
        comparison["vanilla_note"] = (f"{vanilla_path} was trained with another recipe than "
                                      f"these runs ({', '.join(other_t2_recipe)}): not compared")
        same_setup = False
    elif not vanilla:
        comparison["vanilla_note"] = (f"no T2 result at {vanilla_path}: run t2_resnet18.py first, "
                                      f"or name its results.json with --vanilla-results")
    if same_setup and selected:
        comparison["vanilla"] = {"test_acc": vanilla["test_acc"], "holdout_acc": vanilla["holdout_acc"],
                                 **{k: vanilla[k] for k in ("test_top5", "params", "best_epoch",
                                                            "epochs_run") if k in vanilla},
                                 "source": str(vanilla_path), "source_abs": str(vanilla_path.resolve())}
        gap = 100 * (vanilla["test_acc"] - selected["test_acc"])
        # Rounded first: 100 * (0.60 - 0.58) is 2.0000000000000018 in floats, and a gap of
        # exactly 2 points meets the rule (accuracies are counts over at most 10^4 images).
        comparison["at_par"] = {"holds": round(gap, 9) <= AT_PAR_POINTS, "points_below_vanilla": gap,
                                "rule": f"selected CUBS test accuracy >= vanilla - {AT_PAR_POINTS} points"}
    return comparison


# The folders t3_cubs.py trains into, in the specification's order
RUN_FOLDERS = tuple(f"{p}_{v}" for p in PLACEMENTS for v in VARIANTS)


def spec_order(run: Mapping[str, Any]) -> tuple[int, int]:
    """Sort key of a run (its placement and variant): the specification's order, serial,
    reverse, parallel, and plain before plus; anything else last."""
    placement, variant = run.get("placement"), run.get("variant")
    return (PLACEMENTS.index(placement) if placement in PLACEMENTS else len(PLACEMENTS),
            VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS))


def select(runs: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """(selected, best_overall) of finished runs (results.json or its rows: placement,
    variant, holdout_acc): the plain run of the highest holdout accuracy, and the run of the
    highest over both variants; equal scores go to the earlier run in spec_order."""
    ordered = sorted(runs, key=spec_order)
    best = lambda rs: max(rs, key=lambda r: r.get("holdout_acc", -1.0)) if rs else None  # noqa: E731 (first of equals)
    return best([r for r in ordered if r.get("variant") == "plain"]), best(ordered)


def _comparable_runs(out: Path, recipe: Mapping[str, Any] | None, processes_now: int | None
                     ) -> tuple[list[dict], list[dict]]:
    """(results.json of the runs in `out` trained with `recipe` and `processes_now` processes,
    [{"run": folder, "differences": [...]}] of the others)."""
    found, unreadable = [], []
    # The folders t3_cubs.py trains into, by name: a copy such as serial_plain_old/ is no run
    # of this comparison (it would add a second serial plain row).
    for path in [out / folder / "results.json" for folder in RUN_FOLDERS]:
        if not path.is_file() and (path.parent / "last.pt").is_file():  # stopped, or still training
            unreadable.append({"run": path.parent.name, "differences": [
                "not finished (last.pt, no results.json yet): rerun its command to go on"]})
        if path.is_file():
            run = _read_json(path)
            if not isinstance(run, dict) or not all(k in run for k in ROW_KEYS):  # a copy cut short, say
                unreadable.append({"run": path.parent.name, "differences": [
                    "its results.json is cut short or no T3 result (rerun that run's command to rewrite it)"]})
                continue
            flags = tuple(k for k in COMPARED_FLAGS + CUBS_FLAGS
                          if run.get("variant") == "plain" or k not in PLAIN_ONLY)
            found.append((path.parent.name, run, recipe_differences(run.get("args", {}), recipe or {}, flags)))
    # One process count: the one most runs of this recipe share (a finished run re-reported
    # by another count keeps its own), ties to this command's.
    counts = Counter(processes(run) for _, run, differences in found if not differences)
    tied = [n for n, k in counts.items() if k == max(counts.values(), default=0)]
    reference = processes_now if processes_now in tied or not tied else min(tied)
    runs, other_recipe = [], list(unreadable)  # "other_recipe": every run left out, with why
    for name, run, differences in found:
        if processes_now is not None and processes(run) != reference:
            differences = differences + [f"trained by {processes(run)} process(es) instead of {reference}"]
        if differences:
            other_recipe.append({"run": name, "differences": differences})
        else:
            runs.append(run)
    return runs, other_recipe


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def processes(results: Mapping[str, Any]) -> int:
    """The number of processes (DDP ranks) a run trained with, from its results.json "device"
    as runtime.describe_device writes it ("NVIDIA H100 x4"; one process: no suffix)."""
    name, _, count = str(results.get("device", "")).rpartition(" x")
    return int(count) if name and count.isdigit() else 1


def write_comparison(c: Mapping[str, Any], out: Path) -> None:
    """placements.json, placements.md and placements.png in `out`; prints the Markdown."""
    text = "\n".join(comparison_lines(c)).rstrip() + "\n"
    remove_stale_temps(out, ("placements.json", "placements.md", "placements.png"), STALE_TEMP_S)  # a kill's
    write_json(c, out / "placements.json")
    write_text(out / "placements.md", text)
    names = [f"{r['placement']}\n{r['variant']}" for r in c["runs"]]
    runs = c["runs"] + ([c["vanilla"]] if c["vanilla"] else [])
    if c["vanilla"]:
        names.append("vanilla\nResNet-18")
    series = {"holdout (selects)": [r["holdout_acc"] for r in runs], "test": [r["test_acc"] for r in runs]}
    sel = c["selected"]
    if names:  # no run compared (every one trained another way) and no vanilla: no figure
        plot_bars(names, series, out / "placements.png", ylabel="top-1 accuracy",
                  title="CUBS placements (selected by holdout accuracy)",
                  highlight=f"{sel['placement']}\n{sel['variant']}" if sel else None)
    else:
        remove_files(out, ("placements.png",))  # an earlier comparison's would pass for this one
    print(text, end="")


# ---------------------------------------------------------------- the one rendering
def comparison_lines(c: Mapping[str, Any]) -> list[str]:
    """The comparison as Markdown lines: the table of runs (and vanilla ResNet-18), the
    selected placement, the at-par check and plus vs plain. `c` is a placements.json."""
    return (table(TABLE_HEADER, table_rows(c)) + selection_lines(c) + at_par_lines(c)
            + plus_vs_plain_lines(c) + other_recipe_lines(c))


def _key(r: Mapping[str, Any]) -> tuple[Any, Any]:
    return r.get("placement"), r.get("variant")


def table_rows(c: Mapping[str, Any]) -> list[list[str]]:
    """One row per run under TABLE_HEADER, then vanilla ResNet-18 if it was compared."""
    selected = c.get("selected")
    rows = [[r.get("placement"), r.get("variant"), fmt_acc(r.get("holdout_acc")),
             fmt_acc(r.get("test_acc")), fmt_acc(r.get("test_top5")), fmt_count(r.get("params")),
             fmt_epochs(r), "**selected**" if selected and _key(r) == _key(selected) else ""]
            for r in c.get("runs", [])]
    vanilla = c.get("vanilla")
    if vanilla:
        rows.append(["vanilla ResNet-18 (T2)", "-", fmt_acc(vanilla.get("holdout_acc")),
                     fmt_acc(vanilla.get("test_acc")), fmt_acc(vanilla.get("test_top5")),
                     fmt_count(vanilla.get("params")), fmt_epochs(vanilla), "reference"])
    return rows


def selection_lines(c: Mapping[str, Any]) -> list[str]:
    """The selected placement, any holdout tie and how it was broken, and the best run over
    all variants when that is not the selected one."""
    selected = c.get("selected")
    if not selected:
        return ["No plain-variant run: no placement selected.", ""]
    tied = [r.get("placement") for r in c.get("runs", []) if r.get("variant") == "plain"
            and r.get("holdout_acc") == selected.get("holdout_acc")]
    tie = (f" ({', '.join(tied)} tie on holdout; ties go in the order "
           f"{c.get('tie_break', ' > '.join(PLACEMENTS))})" if len(tied) > 1 else "")
    lines = [f"Selected by holdout accuracy: **{selected.get('placement')}**{tie}, "
             f"{selected.get('variant')} variant: holdout top-1 {fmt_acc(selected.get('holdout_acc'))}, "
             f"test top-1 {fmt_acc(selected.get('test_acc'))} (test accuracy never selects).", ""]
    best = c.get("best_overall") or {}
    if best and _key(best) != _key(selected):
        lines += [f"Best run over all variants by holdout: {best.get('placement')} "
                  f"({best.get('variant')}), holdout top-1 {fmt_acc(best.get('holdout_acc'))}, "
                  f"test top-1 {fmt_acc(best.get('test_acc'))}.", ""]
    return lines


def at_par_lines(c: Mapping[str, Any]) -> list[str]:
    """The at-par verdict with the gap to vanilla ResNet-18, or why it was not checked."""
    at_par, vanilla = c.get("at_par"), c.get("vanilla") or {}
    if not at_par:
        note = c.get("vanilla_note", "no vanilla ResNet-18 result or no selected placement")
        return [f"**At-par check: not made** ({note}).", ""]
    verdict = "holds" if at_par.get("holds") else "does NOT hold"
    gap = float(at_par.get("points_below_vanilla", 0.0))
    lines = [f"**At-par check: {verdict}.** Rule: {at_par.get('rule')}. The selected design is "
             f"{abs(gap):.2f} points {'below' if gap >= 0 else 'above'} vanilla ResNet-18 "
             f"(vanilla test top-1 {fmt_acc(vanilla.get('test_acc'))} from "
             f"`{vanilla.get('source', '?')}`).", ""]
    # T2 rerun after T3 finished: this verdict is of the earlier T2 result. The absolute
    # path: "source" is relative to where t3_cubs.py ran, not to where the report is built.
    source = Path(vanilla["source_abs"]) if vanilla.get("source_abs") else None
    try:
        now = json.loads(source.read_text()).get("test_acc") if source and source.is_file() else None
    except (OSError, ValueError, AttributeError):  # unreadable now: the report lists such files
        now = None
    if now is not None and now != vanilla.get("test_acc"):
        lines += [f"**This check is out of date:** `{vanilla.get('source')}` now reports vanilla test top-1 "
                  f"{fmt_acc(now)}. Rerun the t3_cubs.py command (finished runs are not "
                  f"retrained) to redo it.", ""]
    return lines


def plus_vs_plain_lines(c: Mapping[str, Any]) -> list[str]:
    """Test accuracy of the plus variant against plain, per placement trained with both."""
    pairs = c.get("plus_vs_plain") or []
    if not pairs:
        return ["Plus vs plain: not run (train with `--variant both`).", ""]
    return ["Plus vs plain (same placement, same seed and recipe):", ""] + table(
        ["placement", "plain test top-1", "plus test top-1", "gain (points)"],
        [[p.get("placement"), fmt_acc(p.get("plain_test_acc")), fmt_acc(p.get("plus_test_acc")),
          fmt_points(p.get("gain_points"))] for p in pairs])


def other_recipe_lines(c: Mapping[str, Any]) -> list[str]:
    """The runs in the folder that were left out: trained with another recipe."""
    left_out = c.get("other_recipe") or []
    if not left_out:
        return []
    return ["Left out of this comparison (trained with another recipe than the runs above, unfinished, "
            "or unreadable):", ""] + [
        f"- {r.get('run')}: {', '.join(r.get('differences', []))}" for r in left_out] + [""]
