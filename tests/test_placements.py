"""common/placements.py: T3's comparison of finished placement runs (selection by holdout, the
at-par rule against vanilla ResNet-18, plus vs plain) and its Markdown, on hand-written
results.json files."""
import json
import os
import time
import shutil
from pathlib import Path

import pytest

from common import placements
from common.placements import at_par_lines, compare_runs, comparison_lines, write_comparison

SETUP = {"num_classes": 10, "width": 16, "image_size": 32}


RECIPE = {"epochs": 60, "lr": 0.2, "seed": 0, "width": 16, "image_size": 32, "smoke": False,
          "d": 512, "gate_init": 3.0}


def _results(out: Path, placement: str, variant: str, holdout: float, test: float, **args) -> None:
    """One finished T3 run's results.json, as t3_cubs.py writes it (the keys compare_runs reads)."""
    folder = out / f"{placement}_{variant}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "placement": placement, "variant": variant, "holdout_acc": holdout, "test_acc": test,
        "test_top5": 0.9, "params": 1234, "best_epoch": 2, "epochs_run": 3, **SETUP,
        "args": {**RECIPE, "out": str(out), "placement": placement, "variant": variant, **args}}))


def _vanilla(path: Path, test: float, args: dict | None = None, **setup) -> Path:
    t2_args = {k: v for k, v in RECIPE.items() if k not in ("d", "gate_init")}
    path.write_text(json.dumps({"task": "t2", "model": "resnet18", "test_acc": test, "holdout_acc": 0.5,
                                "test_top5": 0.8, "params": 11_000_000,
                                "best_epoch": 3, "epochs_run": 4, **SETUP, **setup,
                                "args": {**t2_args, **(args or {})}}))
    return path


def test_recipe_flags_are_every_flag_that_changes_what_a_run_computes():
    # Kept in step with the schema: a new training setting must be compared too.
    from dataclasses import fields
    from common.checkpoint import _PROCESS_ONLY
    from common.schema import DataRecipe, FitConfig
    training = {f.name for f in fields(FitConfig)} - _PROCESS_ONLY
    data = set(DataRecipe.__annotations__) - {"data"}  # the dataset's fingerprint, not a flag
    assert set(placements.COMPARED_FLAGS) == training | data | {"image_size", "width", "smoke"}


@pytest.mark.parametrize("damage", ["cut", "list", "no_holdout"])
def test_an_unreadable_results_json_is_left_out_and_named(tmp_path, damage):
    # A copy cut short on a cloud drive ended t3_cubs.py with a JSONDecodeError (or a
    # KeyError) after its own runs had finished.
    _results(tmp_path, "serial", "plain", 0.60, 0.6)
    _results(tmp_path, "reverse", "plain", 0.90, 0.9)
    path = tmp_path / "reverse_plain" / "results.json"
    text = path.read_text()
    path.write_text({"cut": text[:100], "list": "[1, 2]",
                     "no_holdout": json.dumps({k: v for k, v in json.loads(text).items() if k != "holdout_acc"})}[damage])
    c = compare_runs(tmp_path, tmp_path / "no_t2.json", RECIPE)
    assert [r["placement"] for r in c["runs"]] == ["serial"] and c["selected"]["placement"] == "serial"
    assert [r["run"] for r in c["other_recipe"]] == ["reverse_plain"]
    assert "- reverse_plain: its results.json is cut short or no T3 result" in "\n".join(comparison_lines(c))


def test_an_unfinished_run_is_named_not_silently_absent(tmp_path):
    _results(tmp_path, "serial", "plain", 0.60, 0.6)
    (tmp_path / "parallel_plain").mkdir()
    (tmp_path / "parallel_plain" / "last.pt").write_bytes(b"a run stopped in its second epoch")
    c = compare_runs(tmp_path, tmp_path / "no_t2.json", RECIPE)
    assert c["selected"]["placement"] == "serial"
    assert c["other_recipe"] == [{"run": "parallel_plain", "differences": [
        "not finished (last.pt, no results.json yet): rerun its command to go on"]}]


def test_a_t2_run_folder_stands_for_its_results_json(tmp_path):
    _results(tmp_path, "serial", "plain", 0.60, 0.6)
    (tmp_path / "t2").mkdir()
    _vanilla(tmp_path / "t2" / "results.json", 0.61)
    c = compare_runs(tmp_path, tmp_path / "t2", RECIPE)
    assert c["vanilla"]["source"] == str(tmp_path / "t2" / "results.json") and c["at_par"] is not None


def test_gate_init_is_compared_between_plain_runs_only(tmp_path):
    # Plus blocks have no gate logit: a plus run's --gate-init (or the plain runs' beside it)
    # must not split the comparison, or one variant's runs vanish from it.
    _results(tmp_path, "serial", "plain", 0.60, 0.6)
    _results(tmp_path, "serial", "plus", 0.70, 0.7, gate_init=None)
    c = compare_runs(tmp_path, tmp_path / "no_t2.json", RECIPE)
    assert [r["variant"] for r in c["runs"]] == ["plain", "plus"] and not c["other_recipe"]
    assert c["best_overall"]["variant"] == "plus" and c["plus_vs_plain"]
    # the --gate-init pytorch ablation's command: the plain run at 3.0 is another experiment
    c = compare_runs(tmp_path, tmp_path / "no_t2.json", {**RECIPE, "gate_init": None})
    assert [r["variant"] for r in c["runs"]] == ["plus"] and c["selected"] is None
    assert c["other_recipe"] == [{"run": "serial_plain", "differences": ["gate_init 3.0 instead of None"]}]


def test_runs_of_another_recipe_are_left_out_and_named(tmp_path):
    # An earlier short trial of reverse (5 epochs) beside today's 60-epoch runs: its better
    # holdout score must not win the selection, and it must not vanish silently either.
    _results(tmp_path, "serial", "plain", 0.60, 0.6)
    _results(tmp_path, "reverse", "plain", 0.90, 0.9, epochs=5, gate_init=0.0)
    _results(tmp_path, "parallel", "plain", 0.70, 0.7)
    c = compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", 0.61), RECIPE)
    assert [r["placement"] for r in c["runs"]] == ["serial", "parallel"]
    assert c["selected"]["placement"] == "parallel" and c["best_overall"]["placement"] == "parallel"
    assert c["other_recipe"] == [{"run": "reverse_plain",
                                  "differences": ["epochs 5 instead of 60", "gate_init 0.0 instead of 3.0"]}]
    assert c["at_par"]["holds"]  # vanilla has the same recipe
    text = "\n".join(comparison_lines(c))
    assert "- reverse_plain: epochs 5 instead of 60, gate_init 0.0 instead of 3.0" in text
    # Without a recipe (a placements.json of an older version, the report), nothing is left out.
    assert len(compare_runs(tmp_path, tmp_path / "no_t2.json")["runs"]) == 3


def test_an_at_par_check_against_a_t2_result_that_changed_since_says_so(tmp_path):
    _results(tmp_path, "serial", "plain", 0.7, 0.6)
    c = compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", 0.61), RECIPE)
    assert not any("out of date" in line for line in at_par_lines(c))
    _vanilla(tmp_path / "t2.json", 0.65)  # T2 rerun after T3 finished
    assert (f"**This check is out of date:** `{tmp_path / 't2.json'}` now reports vanilla test top-1 "
            f"0.6500. Rerun the t3_cubs.py command (finished runs are not retrained) to redo it.") in at_par_lines(c)


def test_the_out_of_date_check_reads_t2_where_t3_read_it_not_from_the_reports_folder(tmp_path, monkeypatch):
    # t3_cubs.py gets --vanilla-results runs/t2/results.json, relative to where it runs; the
    # report may be built elsewhere, beside another runs/t2/results.json.
    (tmp_path / "project" / "runs" / "t2").mkdir(parents=True)
    (tmp_path / "elsewhere" / "runs" / "t2").mkdir(parents=True)
    _results(tmp_path / "project" / "runs" / "t3", "serial", "plain", 0.7, 0.6)
    monkeypatch.chdir(tmp_path / "project")
    _vanilla(Path("runs/t2/results.json"), 0.61)
    c = compare_runs(Path("runs/t3"), Path("runs/t2/results.json"), RECIPE)
    monkeypatch.chdir(tmp_path / "elsewhere")
    _vanilla(Path("runs/t2/results.json"), 0.30)  # another project's T2
    assert not any("out of date" in line for line in at_par_lines(c))
    _vanilla(tmp_path / "project" / "runs" / "t2" / "results.json", 0.65)
    assert any("`runs/t2/results.json` now reports vanilla test top-1 0.6500" in line for line in at_par_lines(c))
    (tmp_path / "project" / "runs" / "t2" / "results.json").write_text("{ cut")  # unreadable: no crash
    assert not any("out of date" in line for line in at_par_lines(c))


def test_a_vanilla_run_of_another_recipe_is_not_compared(tmp_path):
    _results(tmp_path, "serial", "plain", 0.7, 0.6)
    c = compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", 0.9, {"lr": 0.1, "seed": 1}), RECIPE)
    assert c["vanilla"] is None and c["at_par"] is None
    assert c["vanilla_note"] == (f"{tmp_path / 't2.json'} was trained with another recipe than these runs "
                                 f"(lr 0.1 instead of 0.2, seed 1 instead of 0): not compared")


def test_selection_is_by_holdout_among_plain_runs_and_ties_go_in_spec_order(tmp_path):
    # Test accuracy never selects (parallel has the best); plus is never the selected placement.
    for placement, variant, holdout, test in (("parallel", "plain", 0.70, 0.95), ("serial", "plus", 0.90, 0.50),
                                              ("reverse", "plain", 0.70, 0.60), ("serial", "plain", 0.65, 0.99)):
        _results(tmp_path, placement, variant, holdout, test)
    c = compare_runs(tmp_path, tmp_path / "no_t2.json")
    assert [(r["placement"], r["variant"]) for r in c["runs"]] == [
        ("serial", "plain"), ("serial", "plus"), ("reverse", "plain"), ("parallel", "plain")]
    assert (c["selected"]["placement"], c["selected"]["variant"]) == ("reverse", "plain")
    assert (c["best_overall"]["placement"], c["best_overall"]["variant"]) == ("serial", "plus")
    text = "\n".join(comparison_lines(c))
    assert "**reverse** (reverse, parallel tie on holdout; ties go in the order serial > reverse > parallel)" in text
    assert "Best run over all variants by holdout: serial (plus)" in text
    assert c["at_par"] is None and "run t2_resnet18.py first" in c["vanilla_note"]
    assert "--vanilla-results" in c["vanilla_note"]  # T2 may have written elsewhere (--out)
    assert "**At-par check: not made** (no T2 result at" in text


def test_a_t2_result_without_top5_or_epochs_shows_n_a_not_none(tmp_path):
    _results(tmp_path, "serial", "plain", 0.7, 0.6)
    t2 = _vanilla(tmp_path / "t2.json", 0.61)
    t2.write_text(json.dumps({k: v for k, v in json.loads(t2.read_text()).items()
                              if k not in ("test_top5", "params", "best_epoch", "epochs_run")}))  # older T2
    row = placements.table_rows(compare_runs(tmp_path, t2))[-1]
    assert row[0] == "vanilla ResNet-18 (T2)" and row[4:7] == ["n/a", "n/a", "n/a/n/a"]


@pytest.mark.parametrize("vanilla_test, selected_test, holds", [
    (0.615, 0.6, True), (0.625, 0.6, False), (0.59, 0.6, True),
    (0.60, 0.58, True),  # exactly 2 points, though 100 * (0.60 - 0.58) > 2 in floats
    (0.6002, 0.58, False)])
def test_at_par_rule_allows_two_points_below_vanilla(tmp_path, vanilla_test, selected_test, holds):
    _results(tmp_path, "serial", "plain", 0.7, selected_test)
    c = compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", vanilla_test))
    gap = 100 * (vanilla_test - selected_test)
    assert c["at_par"]["holds"] == holds and c["at_par"]["points_below_vanilla"] == pytest.approx(gap)
    assert c["vanilla"]["test_acc"] == vanilla_test
    assert {k: c["vanilla"][k] for k in ("test_top5", "params", "best_epoch", "epochs_run")} == \
        {"test_top5": 0.8, "params": 11_000_000, "best_epoch": 3, "epochs_run": 4}  # T2's whole row
    text = "\n".join(comparison_lines(c))
    assert f"**At-par check: {'holds' if holds else 'does NOT hold'}.**" in text
    assert f"{abs(gap):.2f} points {'below' if gap >= 0 else 'above'} vanilla ResNet-18" in text
    assert placements.table_rows(c)[-1][0] == "vanilla ResNet-18 (T2)"


def test_the_at_par_check_is_of_the_selected_plain_run_even_when_a_plus_run_holds_out_better(tmp_path):
    """The assignment's at-par rule is about the CUBS blocks as specified (the selected plain
    placement); a plus run with a better holdout is best_overall, not what the rule judges."""
    _results(tmp_path, "serial", "plain", 0.60, 0.55)
    _results(tmp_path, "serial", "plus", 0.90, 0.65)
    c = compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", 0.60))
    assert c["at_par"]["points_below_vanilla"] == pytest.approx(5.0) and not c["at_par"]["holds"]


@pytest.mark.parametrize("setup", [dict(width=64), dict(image_size=64), dict(num_classes=100)],
                         ids=["width", "image_size", "num_classes"])
def test_a_vanilla_run_of_another_setup_is_not_compared(tmp_path, setup):
    _results(tmp_path, "serial", "plain", 0.7, 0.6)
    c = compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", 0.9, **setup))
    assert c["vanilla"] is None and c["at_par"] is None
    assert "trained in another setup" in c["vanilla_note"]
    assert all(row[0] != "vanilla ResNet-18 (T2)" for row in placements.table_rows(c))


def test_the_selection_names_a_tie_only_when_there_is_one(tmp_path):
    _results(tmp_path, "serial", "plain", 0.7, 0.6)
    _results(tmp_path, "reverse", "plain", 0.6, 0.65)
    text = "\n".join(comparison_lines(compare_runs(tmp_path, tmp_path / "no_t2.json")))
    assert "Selected by holdout accuracy: **serial**, plain variant" in text and "tie on holdout" not in text


def test_plus_vs_plain_pairs_each_placement_trained_with_both(tmp_path):
    for placement, variant, test in (("serial", "plain", 0.60), ("serial", "plus", 0.625), ("reverse", "plain", 0.5)):
        _results(tmp_path, placement, variant, 0.7, test)
    c = compare_runs(tmp_path, tmp_path / "no_t2.json")
    [pair] = c["plus_vs_plain"]
    assert pair["placement"] == "serial" and pair["gain_points"] == pytest.approx(2.5)
    assert any(line.startswith("| serial | 0.6000 | 0.6250 | +2.50") for line in comparison_lines(c))


def test_without_a_plain_run_nothing_is_selected(tmp_path):
    _results(tmp_path, "serial", "plus", 0.7, 0.6)
    c = compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", 0.6))
    assert c["selected"] is None and c["at_par"] is None
    assert "No plain-variant run: no placement selected." in comparison_lines(c)
    assert "Plus vs plain: not run (train with `--variant both`)." in comparison_lines(c)


def test_write_comparison_writes_the_json_the_markdown_and_the_figure(tmp_path, capsys, monkeypatch):
    _results(tmp_path, "serial", "plain", 0.7, 0.6)
    _results(tmp_path, "parallel", "plain", 0.72, 0.58)
    c = compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", 0.61))
    drawn = {}
    draw = placements.plot_bars
    monkeypatch.setattr(placements, "plot_bars", lambda *a, **kw: drawn.update(a=a, kw=kw) or draw(*a, **kw))
    killed = tmp_path / ".placements.png.k1.tmp"  # what a kill mid-write left an hour ago
    killed.write_bytes(b"half a png")
    os.utime(killed, (time.time() - 3600,) * 2)
    write_comparison(c, tmp_path)
    assert not killed.exists()
    # The figure shows the score that selects (holdout) beside the test score, vanilla too.
    names, series = drawn["a"][:2]
    assert names == ["serial\nplain", "parallel\nplain", "vanilla\nResNet-18"]
    assert series == {"holdout (selects)": [0.7, 0.72, 0.5], "test": [0.6, 0.58, 0.61]}
    assert drawn["kw"]["highlight"] == "parallel\nplain"
    assert json.loads((tmp_path / "placements.json").read_text()) == c
    markdown = (tmp_path / "placements.md").read_text()
    assert markdown == "\n".join(comparison_lines(c)).rstrip() + "\n" == capsys.readouterr().out
    assert (tmp_path / "placements.png").stat().st_size > 0


@pytest.mark.parametrize("task, model", [("t1", "custom_cnn"), ("t3", "cubs_resnet18_serial_plain")])
def test_the_vanilla_result_must_be_t2s_resnet18(tmp_path, task, model):
    """T1 trains with T2's recipe and width, and a T3 run has the same setup too: named as
    vanilla, either would pass for ResNet-18 in the at-par check."""
    _results(tmp_path, "serial", "plain", 0.60, 0.60)
    c = compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", 0.10, task=task, model=model), RECIPE)
    assert c["at_par"] is None and c["vanilla"] is None
    assert c["vanilla_note"] == (f"{tmp_path / 't2.json'} is not a T2 ResNet-18 result (task {task}, "
                                 f"model {model}): not compared")
    assert compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", 0.10), RECIPE)["at_par"]["holds"]


def test_only_the_folders_t3_trains_into_are_compared(tmp_path):
    """A copy of a run folder (serial_plain_old/) is no second serial plain run: it must not
    win the selection, nor add a row."""
    _results(tmp_path, "serial", "plain", 0.60, 0.60)
    _results(tmp_path, "reverse", "plain", 0.50, 0.50)
    shutil.copytree(tmp_path / "serial_plain", tmp_path / "serial_plain_old")
    results = tmp_path / "serial_plain_old" / "results.json"
    results.write_text(results.read_text().replace('"holdout_acc": 0.6', '"holdout_acc": 0.98'))
    c = compare_runs(tmp_path, tmp_path / "no_t2.json", RECIPE)
    assert [(r["placement"], r["holdout_acc"]) for r in c["runs"]] == [("serial", 0.60), ("reverse", 0.50)]
    assert c["selected"]["holdout_acc"] == 0.60


def test_a_vanilla_run_of_another_process_count_is_not_compared(tmp_path):
    """--batch-size is per process: T2 under torchrun on 4 GPUs trained with 4 times the global
    batch and a quarter of the steps, another recipe than a one-process T3."""
    _results(tmp_path, "serial", "plain", 0.60, 0.60)
    c = compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", 0.61, device="NVIDIA H100 80GB HBM3 x4"), RECIPE)
    assert c["at_par"] is None and c["selected"]["processes"] == 1
    assert c["vanilla_note"] == (f"{tmp_path / 't2.json'} was trained by 4 process(es), the selected run "
                                 f"by 1; --batch-size is per process, so the recipes differ: not compared")
    assert compare_runs(tmp_path, _vanilla(tmp_path / "t2.json", 0.61, device="cpu"), RECIPE)["at_par"]["holds"]
    assert [placements.processes({"device": d}) for d in ("cpu x2", "NVIDIA H100 x4", "cpu", "", "a x b")] \
        == [2, 4, 1, 1, 1]


def test_t3_runs_of_another_process_count_than_the_comparing_command_are_not_compared(tmp_path):
    # A placement trained by 2 processes (another global batch and step count) was ranked
    # against one trained by 1, and could be selected.
    _results(tmp_path, "serial", "plain", 0.60, 0.60)
    _results(tmp_path, "reverse", "plain", 0.70, 0.65)
    results = tmp_path / "reverse_plain" / "results.json"
    results.write_text(json.dumps({**json.loads(results.read_text()), "device": "cpu x2"}))
    c = compare_runs(tmp_path, tmp_path / "no_t2.json", RECIPE, processes_now=1)
    assert [r["placement"] for r in c["runs"]] == ["serial"] and c["selected"]["placement"] == "serial"
    assert c["other_recipe"] == [{"run": "reverse_plain", "differences": ["trained by 2 process(es) instead of 1"]}]
    two = compare_runs(tmp_path, tmp_path / "no_t2.json", RECIPE, processes_now=2)
    assert [r["placement"] for r in two["runs"]] == ["reverse"]
    # A one-process rerun after a torchrun T3 re-reports runs that keep their count (2): they
    # are compared with each other, not left out for the rerun's count (which emptied the table).
    results = tmp_path / "serial_plain" / "results.json"
    results.write_text(json.dumps({**json.loads(results.read_text()), "device": "cpu x2"}))
    rerun = compare_runs(tmp_path, tmp_path / "no_t2.json", RECIPE, processes_now=1)
    assert [r["placement"] for r in rerun["runs"]] == ["serial", "reverse"] and rerun["other_recipe"] == []
    assert rerun["selected"]["placement"] == "reverse" and rerun["selected"]["processes"] == 2


def test_a_comparison_without_any_run_writes_no_figure_and_does_not_crash(tmp_path, capsys):
    _results(tmp_path, "serial", "plain", 0.60, 0.60, lr=0.3)  # another recipe: not compared
    (tmp_path / "placements.png").write_bytes(b"an earlier comparison's figure")
    c = compare_runs(tmp_path, tmp_path / "no_t2.json", RECIPE)
    assert c["runs"] == [] and c["selected"] is None
    write_comparison(c, tmp_path)  # plot_bars raised on an empty chart
    assert not (tmp_path / "placements.png").exists()
    assert json.loads((tmp_path / "placements.json").read_text()) == c
