"""common.report: REPORT.md and REPORT.pdf from a runs folder, and the submission archive.

Most checks run on a hand-made runs folder (JSON written here, tiny models), so they need no
training. One test builds the report from the four scripts' real smoke runs: the session
fixture `runs` of tests/conftest.py, or, to reuse smoke runs made earlier with the same
commands, the folder named by the environment variable REPORT_SMOKE_RUNS.

Every number checked is compared as text with the JSON value formatted at the report's
documented precision (common/formats.py docstring): 4 decimals for accuracies, recalls and
chance, +2 decimals for point differences, comma-grouped exact parameter counts.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pypdf import PdfReader

from matplotlib.figure import Figure
from matplotlib.text import Text
from reportlab.lib.units import cm
from reportlab.platypus import Image as PdfImage
from reportlab.platypus import SimpleDocTemplate, Spacer

from common import architecture, archive, plots, report, report_pdf, runs_folder
from common.cubs import RELU_BIAS_INIT, CUBSBlock2, CUBSBlock2Plus, cubs_resnet18, taylor_terms
from common.flops import forward_flops
from common.models import ResNet18, count_parameters
from common.networks import build_model

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- reading the Markdown back
def md_tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table as a list of {header: cell} rows."""
    lines, tables, i = text.splitlines(), [], 0
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]  # noqa: E731
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.fullmatch(r"\|(---\|)+", lines[i + 1]):
            header, i = split(lines[i]), i + 2
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, split(lines[i]))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def find_tables(text: str, *headers: str) -> list[list[dict[str, str]]]:
    found = [t for t in md_tables(text) if t and all(h in t[0] for h in headers)]
    assert found, f"no table with columns {headers}"
    return found


def acc(v: float) -> str:
    return f"{v:.4f}"


def run_name(cell: str) -> str:
    return cell.removesuffix(" (SMOKE)")


# ---------------------------------------------------------------- checks shared by both folders
def check_classifier_rows(text: str, root: Path) -> int:
    """Each T1/T2/T3 row of the results table equals its results.json; returns rows checked."""
    rows = {run_name(r["run"]): r for r in find_tables(text, "test top-1", "holdout top-5", "device")[0]}
    checked = 0
    for path in sorted(root.rglob("results.json")):
        r = json.loads(path.read_text())
        if r["task"] not in ("t1", "t2", "t3"):
            continue
        row = rows[path.parent.relative_to(root).as_posix()]
        assert row["test top-1"] == acc(r["test_acc"])
        assert row["test top-5"] == acc(r["test_top5"])
        assert row["holdout top-1"] == acc(r["holdout_acc"])
        assert row["holdout top-5"] == acc(r["holdout_top5"])
        assert row["params"] == f"{r['params']:,}"
        assert row["best epoch / epochs run"] == f"{r['best_epoch']}/{r['epochs_run']}"
        assert row["train time (s)"] == f"{r['train_time_s']:.1f}"
        assert row["device"] == r["device"]
        assert row["kind"] == ("SMOKE" if r["args"]["smoke"] else "real")
        assert row["run"].endswith("(SMOKE)") == bool(r["args"]["smoke"])
        checked += 1
    assert checked == len(rows)
    return checked


def check_placements(text: str, c: dict) -> None:
    """Placement table, selection, at-par verdict and plus-vs-plain quoted from placements.json."""
    table = find_tables(text, "placement", "variant", "selection")[0]
    rows = {(r["placement"], r["variant"]): r for r in table}
    for run in c["runs"]:
        row = rows[run["placement"], run["variant"]]
        assert row["holdout top-1"] == acc(run["holdout_acc"])
        assert row["test top-1"] == acc(run["test_acc"])
        assert row["test top-5"] == acc(run["test_top5"])
        assert row["params"] == f"{run['params']:,}"
        assert row["best epoch / epochs run"] == f"{run['best_epoch']}/{run['epochs_run']}"
        selected = (run["placement"], run["variant"]) == (c["selected"]["placement"],
                                                           c["selected"]["variant"])
        assert (row["selection"] == "**selected**") == selected
    if c["vanilla"]:
        row = rows["vanilla ResNet-18 (T2)", "-"]
        assert row["test top-1"] == acc(c["vanilla"]["test_acc"])
        assert row["holdout top-1"] == acc(c["vanilla"]["holdout_acc"])
        v = c["vanilla"]  # placements.json before 2026-12-06 held no top-5, params or epochs: n/a
        assert row["test top-5"] == (acc(v["test_top5"]) if "test_top5" in v else "n/a")
        assert row["params"] == (f"{v['params']:,}" if "params" in v else "n/a")
        assert row["best epoch / epochs run"] == f"{v.get('best_epoch', 'n/a')}/{v.get('epochs_run', 'n/a')}"
    s = c["selected"]
    assert c["selected_by"] == "holdout_acc"
    assert f"Selected by holdout accuracy: **{s['placement']}**" in text
    assert (f"{s['variant']} variant: holdout top-1 {acc(s['holdout_acc'])}, "
            f"test top-1 {acc(s['test_acc'])} (test accuracy never selects).") in text
    if c["at_par"]:
        verdict = "holds" if c["at_par"]["holds"] else "does NOT hold"
        assert f"**At-par check: {verdict}.**" in text
        assert ("does NOT hold" in text) != c["at_par"]["holds"]
        gap = c["at_par"]["points_below_vanilla"]
        assert f"{abs(gap):.2f} points {'below' if gap >= 0 else 'above'} vanilla" in text
        assert c["at_par"]["rule"] in text
    else:
        assert "**At-par check: not made**" in text
    if c["plus_vs_plain"]:
        pairs = {r["placement"]: r for r in find_tables(text, "plain test top-1", "gain (points)")[0]}
        for p in c["plus_vs_plain"]:
            row = pairs[p["placement"]]
            assert row["plain test top-1"] == acc(p["plain_test_acc"])
            assert row["plus test top-1"] == acc(p["plus_test_acc"])
            assert row["gain (points)"] == f"{p['gain_points']:+.2f}"
    else:
        assert "Plus vs plain: not run" in text


def check_retrieval(text: str, r: dict) -> None:
    """Recall@K before/after per K, chance level and the mining comparison."""
    table = find_tables(text, "K", "Recall@K before (Phase A)")[0]
    after_col = f"Recall@K after (Phase B, {r['phase_b']['mining']})"
    rows = {row["K"]: row for row in table}
    assert sorted(rows, key=int) == sorted(r["phase_a"]["test_recall"], key=int) == ["1", "2", "4", "8"]
    for k, before in r["phase_a"]["test_recall"].items():
        after = r["phase_b"]["test_recall"][k]
        assert rows[k]["Recall@K before (Phase A)"] == acc(before)
        assert rows[k][after_col] == acc(after)
        assert rows[k]["change (points)"] == f"{100 * (after - before):+.2f}"
    assert f"Recall@1 chance level: **{acc(r['recall_at_1_chance'])}**" in text
    mining = {row["mining"].removesuffix(" (main)"): row
              for row in find_tables(text, "mining", "R@1", "holdout R@1")[0]}
    assert sorted(mining) == sorted(m["mining"] for m in r["mining_comparison"])
    for m in r["mining_comparison"]:
        row = mining[m["mining"]]
        for k, v in m["test_recall"].items():
            assert row[f"R@{k}"] == acc(v)
        assert row["holdout R@1"] == acc(m["holdout_r1"])
        assert row["best epoch / epochs run"] == f"{m['best_epoch']}/{m['epochs_run']}"
    assert f"holdout Recall@1 {acc(r['phase_b']['holdout_r1'])}" in text
    assert f"holdout top-1 {acc(r['phase_a']['holdout_acc'])}" in text


def check_figures(text: str, report_path: Path) -> list[str]:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links
    for link in links:
        assert not Path(link).is_absolute() and link.startswith("report_figures/")
        assert (report_path.parent / link).is_file(), link
    return links


# ---------------------------------------------------------------- a hand-made runs folder
ARGS = {"data_dir": "./data", "epochs": 3, "batch_size": 16, "lr": 0.05, "weight_decay": 0.0005,
        "optimizer": "sgd", "warmup_epochs": 1.0, "label_smoothing": 0.1, "patience": 4,
        "min_delta": 0.0, "grad_clip": 0.0, "holdout_per_class": 5, "image_size": 32,
        "color_jitter": 0.4, "width": 8, "workers": 0, "backend": "torch", "device": "cpu",
        "compile": None, "seed": 0, "fresh": False, "no_download": False, "smoke": False,
        "stop_after_epoch": None}


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))


def history(n: int, key: str = "holdout_acc") -> str:
    return "".join(json.dumps({"epoch": e, "train_loss": 2.0 / e, "lr": 0.05, key: 0.1 * e}) + "\n"
                   for e in range(1, n + 1))


def classifier(task: str, model: str, test: float, holdout: float, **extra) -> dict:
    return {"task": task, "model": model, "num_classes": 5, "width": 8, "image_size": 32,
            "params": 123456, "test_acc": test, "test_top5": 0.912345, "test_loss": 1.0,
            "test_images": 50, "holdout_acc": holdout, "holdout_top5": 0.987654, "best_epoch": 2,
            "epochs_run": 3, "stopped_early": False, "train_time_s": 12.345, "images_per_s": 99.94,
            "device": "cpu", "loader": "torch", "finished": True, "args": dict(ARGS), **extra}


def make_runs(root: Path) -> dict:
    """T1 unfinished (metrics only), T2 real, T3 with placements.json, T4 a smoke run."""
    write(root / "t1" / "metrics.jsonl", history(2))
    t2 = classifier("t2", "resnet18", 0.456789, 0.51234)
    write(root / "t2" / "results.json", t2)
    write(root / "t2" / "metrics.jsonl", history(3))
    write(root / "t2" / "curves.png", b"png")
    t3_runs = []
    for placement, variant, test, holdout in (("serial", "plain", 0.40004, 0.55555),
                                              ("reverse", "plain", 0.43216, 0.61115),
                                              ("serial", "plus", 0.44449, 0.66665)):
        r = classifier("t3", f"cubs_resnet18_{placement}_{variant}", test, holdout,
                       placement=placement, variant=variant, d=64)  # plus needs 2+ tokens per head
        write(root / "t3" / f"{placement}_{variant}" / "results.json", r)
        write(root / "t3" / f"{placement}_{variant}" / "metrics.jsonl", history(3))
        write(root / "t3" / f"{placement}_{variant}" / "curves.png", b"png")
        t3_runs.append({k: r[k] for k in ("placement", "variant", "holdout_acc", "test_acc",
                                          "test_top5", "params", "best_epoch", "epochs_run")})
    placements = {
        "selected_by": "holdout_acc", "runs": t3_runs, "selected": t3_runs[1],
        "best_overall": t3_runs[2], "vanilla": {"test_acc": t2["test_acc"],
                                                "holdout_acc": t2["holdout_acc"],
                                                "source": "runs/t2/results.json"},
        "at_par": {"holds": False, "points_below_vanilla": 2.4629,
                   "rule": "selected CUBS test accuracy >= vanilla - 2.0 points"},
        "plus_vs_plain": [{"placement": "serial", "plain_test_acc": 0.40004,
                           "plus_test_acc": 0.44449, "gain_points": 4.445}]}
    write(root / "t3" / "placements.json", placements)
    write(root / "t3" / "placements.png", b"png")
    recall = lambda base: {k: min(1.0, base + 0.1 * i) for i, k in enumerate(["1", "2", "4", "8"])}  # noqa: E731
    mining = [{"mining": m, "test_recall": recall(b), "holdout_r1": b + 0.01, "best_epoch": 2,
               "epochs_run": 3, "train_time_s": 4.5} for m, b in (("ms", 0.41234), ("none", 0.35678))]
    t4 = {"task": "t4", "placement": "reverse", "variant": "plain", "init": "scratch",
          "test_images": 192, "test_classes": 8, "train_images": 150, "train_classes": 4,
          "recall_at_1_chance": 23 / 191,
          "phase_a": {"test_recall": recall(0.25555), "holdout_acc": 0.4321, "best_epoch": 3,
                      "epochs_run": 4, "train_time_s": 9.87},
          "phase_b": mining[0], "mining_comparison": mining, "device": "cpu", "loader": "torch",
          "finished": True,
          "args": {**ARGS, "smoke": True, "image_size": 32, "embedding_dim": 16, "mining": "ms",
                   "compare_mining": True, "alpha": 2.0, "beta": 50.0, "lam": 0.5, "epsilon": 0.1,
                   "classes_per_batch": 4, "images_per_class": 4, "embed_optimizer": "adamw",
                   "embed_lr": 0.001, "embed_weight_decay": 0.0001, "embed_epochs": 3}}
    write(root / "t4" / "results.json", t4)
    write(root / "t4" / "retrieval.png", b"png")
    for phase, key in (("phase_a", "holdout_acc"), ("phase_b_ms", "holdout_r1"),
                       ("phase_b_none", "holdout_r1")):
        write(root / "t4" / phase / "metrics.jsonl", history(3, key))
        write(root / "t4" / phase / "curves.png", b"png")
    return {"t2": t2, "placements": placements, "t4": t4}


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> tuple[Path, dict, Path, str]:
    root = tmp_path_factory.mktemp("handmade_runs")
    data = make_runs(root)
    out = report.build_report(root)
    return root, data, out, out.read_text()


def test_default_output_is_report_md_with_figures_next_to_it(handmade):
    root, _, out, text = handmade
    assert out == root / "REPORT.md"
    links = check_figures(text, out)
    names = {Path(link).name for link in links}
    assert {"classifiers_holdout.png", "t4__phases.png", "t3__placements.png", "t4__retrieval.png",
            "t2__curves.png", "t4__phase_b_none__curves.png"} <= names


def test_a_rebuilt_report_leaves_no_figure_of_a_deleted_run(tmp_path):
    make_runs(tmp_path)
    figures = tmp_path / "report_figures"
    figures.mkdir()
    (figures / "t1_deleted__curves.png").write_bytes(b"a run deleted since the last report")
    (figures / "notes.txt").write_text("not a figure: kept")
    (figures / "my_photo.jpg").write_bytes(b"the user's own image: not a name the report gives")
    out = report.build_report(tmp_path)
    linked = {Path(link).name for link in check_figures(out.read_text(), out)}
    left = {p.name for p in figures.iterdir()}
    assert "t1_deleted__curves.png" not in left and {"notes.txt", "my_photo.jpg"} <= left
    # every figure left is REPORT.md's, REPORT.pdf's (pdf_*) or the user's own
    assert {n for n in left if n.endswith((".png", ".jpg"))} == \
        linked | {n for n in left if n.startswith("pdf_")} | {"my_photo.jpg"}


def test_classifier_table_numbers_equal_the_json(handmade):
    root, _, _, text = handmade
    assert check_classifier_rows(text, root) == 4  # t2 + three t3 runs


def test_missing_and_unfinished_runs_are_not_invented(handmade):
    _, _, _, text = handmade
    status = {r["task"]: r for r in find_tables(text, "task", "status")[0]}
    # T1 was killed after 2 epochs: unfinished, as the table below says, not "not run yet"
    assert (status["T1"]["status"], status["T1"]["results in"]) == ("unfinished (2 epochs logged in t1)", "`t1`")
    assert status["T2"]["status"] == "finished (1 run: real)"
    assert status["T4"]["status"] == "finished (1 run: SMOKE)"
    assert "- T1 custom CNN (Tiny ImageNet): **unfinished (2 epochs logged in t1)**" in text
    unfinished = find_tables(text, "folder", "epochs logged")[0]
    assert unfinished == [{"folder": "`t1`", "epochs logged": "2",
                           "last holdout score": "holdout_acc 0.2000 (epoch 2)"}]
    # an unfinished T4 Phase B scores Recall@1
    assert report._last_score([{"epoch": 3, "holdout_r1": 0.41}]) == "holdout_r1 0.4100 (epoch 3)"
    assert "custom_cnn" not in text  # no T1 model summarised, no T1 row
    assert "## Problems while reading" not in text


def test_smoke_runs_are_labelled_and_real_ones_are_not(handmade):
    _, _, _, text = handmade
    assert runs_folder.SMOKE_BANNER == "smoke run on generated data, not a real result"
    assert f"> **WARNING: this report contains SMOKE runs ({runs_folder.SMOKE_BANNER}).**" in text
    t4 = text[text.index("## T4"):text.index("## Training curves")]
    assert f"**SMOKE: {runs_folder.SMOKE_BANNER}** (`t4`)" in t4
    classifiers = text[text.index("## T1 / T2 / T3"):text.index("## T3: placement")]
    assert "SMOKE: " not in classifiers  # T2 and T3 are real here


def test_placement_comparison_winner_and_two_point_check(handmade):
    _, data, _, text = handmade
    check_placements(text, data["placements"])
    best = data["placements"]["best_overall"]
    assert (f"Best run over all variants by holdout: serial (plus), holdout top-1 "
            f"{acc(best['holdout_acc'])}, test top-1 {acc(best['test_acc'])}.") in text


def test_recall_before_after_chance_and_mining(handmade):
    _, data, _, text = handmade
    check_retrieval(text, data["t4"])
    assert "| ms (main) |" in text


def test_architecture_rows_rebuild_the_models(handmade):
    _, _, _, text = handmade
    rows = {r["model"]: r for r in find_tables(text, "conv", "GFLOPs / image")[0]}
    resnet = rows["resnet18"]
    assert (resnet["conv"], resnet["linear"], resnet["CUBS attention blocks"]) == ("20", "1", "0")
    assert resnet["params (results.json)"] == "123,456"  # the JSON's value, as written
    assert resnet["params (rebuilt)"] == f"{sum(p.numel() for p in ResNet18(5, width=8).parameters()):,}"
    assert resnet["input"] == "3 x 32 x 32"
    cubs = rows["cubs_resnet18_reverse_plain"]
    assert (cubs["conv"], cubs["linear"], cubs["CUBS attention blocks"]) == ("28", "33", "16")
    built = cubs_resnet18(5, placement="reverse", width=8, d=64)
    assert cubs["params (rebuilt)"] == f"{sum(p.numel() for p in built.parameters()):,}"
    assert float(cubs["GFLOPs / image"]) > float(resnet["GFLOPs / image"]) > 0
    phase_a = rows["cubs_resnet18_reverse_plain (Phase A classifier)"]
    phase_b = rows["cubs_resnet18_reverse_plain (Phase B embedding)"]
    assert phase_a["params (results.json)"] == "n/a"  # T4 stores none: not invented
    assert int(phase_b["params (rebuilt)"].replace(",", "")) > int(phase_a["params (rebuilt)"].replace(",", ""))


def test_training_strategies_come_from_the_args(handmade):
    _, _, _, text = handmade
    table = find_tables(text, "setting")[0]  # runs with equal recipes share one column
    column = next(h for h in table[0] if h.split(", ")[0] == "t2")
    assert column == "t2, t3/reverse_plain, t3/serial_plain, t3/serial_plus"
    rows = {r["setting"]: {"t2": r[column]} for r in table}
    assert rows["peak LR"]["t2"] == "0.05"
    assert rows["weight decay"]["t2"].startswith("0.0005")
    assert rows["label smoothing"]["t2"] == "0.1"
    assert rows["batch size"]["t2"] == "16 per process"
    assert rows["early stopping"]["t2"] == "patience 4 epochs (min delta 0)"
    assert "colour jitter ±0.4" in rows["augmentation"]["t2"]
    assert rows["schedule"]["t2"] == "linear warmup 1 epoch, then cosine decay"  # singular for 1
    phase_a, phase_b = find_tables(text, "setting", "t4 (SMOKE)")  # T4 Phase A, then Phase B
    assert {r["setting"]: r["t4 (SMOKE)"] for r in phase_a}["peak LR"] == "0.05"
    rows_b = {r["setting"]: r["t4 (SMOKE)"] for r in phase_b}
    assert rows_b["loss"] == "Multi-Similarity: alpha 2, beta 50, lambda 0.5, epsilon 0.1"
    assert rows_b["batches (P x K)"] == "4 classes x 4 images"
    assert rows_b["LR"] == "0.001" and rows_b["optimiser"] == "AdamW"


def test_recipe_counts_of_epochs_read_as_english():
    from common.recipes import epochs
    assert [epochs(n) for n in (1, 1.0, 0.5, 8, None)] == \
        ["1 epoch", "1 epoch", "0.5 epochs", "8 epochs", "n/a"]


def test_empty_folder_says_not_run_yet_everywhere(tmp_path):
    out = report.build_report(tmp_path, tmp_path / "elsewhere" / "R.md")
    text = out.read_text()
    status = find_tables(text, "task", "status")[0]
    assert [r["status"] for r in status] == ["not run yet"] * 4
    assert "SMOKE" not in text and "![" not in text
    assert (tmp_path / "elsewhere" / "report_figures").is_dir()


def test_cli_imports_without_dali_and_honours_out(tmp_path):
    make_runs(tmp_path / "runs")
    (tmp_path / "runs" / "t4" / "results.json").unlink()  # keep the subprocess quick
    code = ("import sys; sys.modules['nvidia'] = None\n"
            "from common.report import main\n"
            f"main([{str(tmp_path / 'runs')!r}, '--out', {str(tmp_path / 'doc' / 'REPORT.md')!r}])\n"
            "assert not any(m.startswith('nvidia') and sys.modules[m] for m in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "doc" / "REPORT.md").read_text()
    check_figures(text, tmp_path / "doc" / "REPORT.md")
    # T4's phases are left without its results.json: unfinished runs, not "not run yet"
    assert ("## T4: Cars196 retrieval, Recall@K before and after metric learning\n\n**unfinished (3 epochs "
            "logged in t4/phase_a, 3 epochs logged in t4/phase_b_ms, 3 epochs logged in t4/phase_b_none)**.") in text
    assert not (tmp_path / "runs" / "REPORT.md").exists()
    assert pdf_text(tmp_path / "doc" / "REPORT.pdf")[0] <= 2


# ---------------------------------------------------------------- the real smoke runs
@pytest.fixture(scope="session")
def smoke_runs(request) -> Path:
    """$REPORT_SMOKE_RUNS if set (smoke runs made earlier), else test_scripts.py's `runs`."""
    reuse = os.environ.get("REPORT_SMOKE_RUNS")
    if reuse:
        assert (Path(reuse) / "t4" / "results.json").is_file(), f"incomplete smoke runs in {reuse}"
        return Path(reuse)
    return request.getfixturevalue("runs")


@pytest.fixture(scope="module")
def smoke_report(smoke_runs, tmp_path_factory) -> Path:
    """REPORT.md (+ REPORT.pdf, figures) of the four smoke runs, built once, outside the runs
    folder (which is left as is)."""
    return report.build_report(smoke_runs, tmp_path_factory.mktemp("smoke_report") / "REPORT.md")


def test_report_of_the_four_smoke_runs_quotes_every_number(smoke_runs, smoke_report):
    out = smoke_report
    text = out.read_text()
    assert check_classifier_rows(text, smoke_runs) == 5  # t1, t2 and three placements
    check_placements(text, json.loads((smoke_runs / "t3" / "placements.json").read_text()))
    check_retrieval(text, json.loads((smoke_runs / "t4" / "results.json").read_text()))
    links = check_figures(text, out)
    assert len(links) >= 1 + 1 + 1 + 5 + 5  # combined, T4 phases, retrieval, 5 + 5 curves
    status = {r["task"]: r["status"] for r in find_tables(text, "task", "status")[0]}
    assert status == {"T1": "finished (1 run: SMOKE)", "T2": "finished (1 run: SMOKE)",
                      "T3": "finished (3 runs: SMOKE)", "T4": "finished (1 run: SMOKE)"}
    assert not (smoke_runs / "REPORT.md").exists()
    assert "not run yet" not in text
    assert f"**WARNING: this report contains SMOKE runs ({runs_folder.SMOKE_BANNER}).**" in text
    for row in find_tables(text, "conv", "GFLOPs / image")[0]:  # rebuilt = trained model
        if row["params (results.json)"] != "n/a":
            assert row["params (rebuilt)"] == row["params (results.json)"], row
    assert "## Problems while reading" not in text


def test_flop_count_includes_the_fused_attention_and_leaves_out_elementwise_work():
    # 1 x 3 x 8 x 8 zero input, N = 64 positions. Plain Block 2: the 1x1 projection as the
    # CPU runs it, a 3 x 3 by 3 x 64 matmul (2*3*3*64 = 1152 FLOPs, bias not counted), plus
    # the eager Taylor similarity's two batched matmuls, (p x N)(N x 2) and (N x p)(p x 2):
    # 8*N*p, p = taylor_terms of the largest logit. On a zero input q, k, v are the
    # projection's biases, so the logit is q_bias * k_bias: 1 at init (p = 12), 2 with q's
    # bias doubled (p = 16).
    block = CUBSBlock2(3)
    assert forward_flops(block, 8) == 1152 + 8 * 64 * taylor_terms(RELU_BIAS_INIT ** 2) == 1152 + 8 * 64 * 12
    with torch.no_grad():
        block.qkv.bias[0] = 2 * RELU_BIAS_INIT
    assert forward_flops(block, 8) == 1152 + 8 * 64 * 16
    # Plus Block 2 runs the CPU fused attention kernel (FLOP_FORMULAS): 4 heads of 8 dims,
    # 64 queries over 8 x 8 = 64 keys: 2 * (2*64*64*8) * 4 = 524288, plus the convs
    # q 3 -> 32, kv 3 -> 64 (on 64 pooled cells), out 32 -> 1: 2*64*(3*32 + 3*64 + 32*1).
    assert forward_flops(CUBSBlock2Plus(3), 8) == 524288 + 2 * 64 * (3 * 32 + 3 * 64 + 32)


# ---------------------------------------------------------------- REPORT.pdf
def pdf_text(pdf: Path) -> tuple[int, str]:
    """(page count, every page's text with each run of white space made one space); checks
    that every page is A4 portrait."""
    reader = PdfReader(pdf)
    for page in reader.pages:
        assert (round(float(page.mediabox.width)), round(float(page.mediabox.height))) == (595, 842)
    return len(reader.pages), " ".join(" ".join(p.extract_text() for p in reader.pages).split())


def pdf_classifier_row(run: str, r: dict) -> str:
    """A results-table row as the PDF's text reads it: numbers, then the file they came from."""
    return (f"{acc(r['test_acc'])} / {acc(r['test_top5'])} top-1 {acc(r['holdout_acc'])} "
            f"{r['best_epoch']}/{r['epochs_run']} {run}/results.json: test_acc, test_top5, holdout_acc")


def check_pdf_retrieval(text: str, run: str, r: dict) -> None:
    """T4's table: before, every mining strategy, chance; all traced to <run>/results.json."""
    recalls = lambda e: " ".join(acc(e["test_recall"][k]) for k in "1248")  # noqa: E731
    a = r["phase_a"]
    assert (f"before: Phase A classifier features (cross-entropy) {recalls(a)} top-1 "
            f"{acc(a['holdout_acc'])} {a['best_epoch']}/{a['epochs_run']}") in text
    for m in r["mining_comparison"]:
        main = " (main)" if m["mining"] == r["phase_b"]["mining"] else ""
        assert (f"after: Multi-Similarity, {m['mining']} mining{main} {recalls(m)} R@1 "
                f"{acc(m['holdout_r1'])} {m['best_epoch']}/{m['epochs_run']}") in text
    assert f"chance (random other test image of the same class) {acc(r['recall_at_1_chance'])}" in text
    assert f"Source: {run}/results.json: phase_a, mining_comparison" in text


def check_pdf_placements(text: str, c: dict, where: str) -> None:
    for r in c["runs"]:
        mark = " selected" if (r["placement"], r["variant"]) == (c["selected"]["placement"],
                                                                c["selected"]["variant"]) else ""
        assert (f"{r['placement']} {r['variant']} {acc(r['holdout_acc'])} {acc(r['test_acc'])} "
                f"{acc(r['test_top5'])} {r['params']:,} {r['best_epoch']}/{r['epochs_run']}{mark}") in text
    assert f"Source: {where}/placements.json: runs, selected" in text


def test_build_model_rebuilds_every_smoke_network_with_its_parameter_count(smoke_runs):
    checked = 0
    for path in sorted(smoke_runs.rglob("results.json")):
        r = json.loads(path.read_text())
        assert count_parameters(build_model(r)) == r["params"], path
        if r["task"] == "t4":
            assert count_parameters(build_model(r, phase="b")) == r["embedding_params"]
        checked += 1
    assert checked == 6  # t1, t2, three placements, t4


def test_pdf_of_the_four_smoke_runs_fits_two_pages_and_quotes_the_json(smoke_runs, smoke_report):
    pdf = smoke_report.with_suffix(".pdf")
    pages, text = pdf_text(pdf)
    assert pages <= 2
    load = lambda name: json.loads((smoke_runs / name).read_text())  # noqa: E731
    placements = load("t3/placements.json")
    selected = f"t3/{placements['selected']['placement']}_{placements['selected']['variant']}"
    for run in ("t1", "t2", selected):
        assert pdf_classifier_row(run, load(f"{run}/results.json")) in text, run
    check_pdf_placements(text, placements, "t3")
    check_pdf_retrieval(text, "t4", load("t4/results.json"))
    for section in ("1 Networks", "2 Results", "3 T3: placement comparison", "4 Training curves",
                    "5 T4: Cars196 retrieval", "6 Training strategies"):
        assert section in text
    strategies = text[text.index("6 Training strategies"):]
    where = [strategies.find(s) for s in ("Augmentation (train only): ",
                                          "Schedule: SGD", "Early stopping on the holdout score",
                                          "Hard mining (T4 Phase B): Multi-Similarity",
                                          "Our variant (CUBS plus)")]
    assert -1 not in where and where == sorted(where)
    # The loss note is the curves' caption: in the figure it took the panel's title to 3 lines.
    assert re.search(r"holdout dashed\) per epoch\. Train loss: label smoothing 0\.1, never below "
                     r"\d\.\d\d; holdout loss: plain\.", text)
    assert "serial B2(B1(x)), reverse B1(B2(x)), parallel B1(x)+B2(x);" in text  # cubs.py's
    assert "the plus variant's parallel: B1(x)+B2(x)-x (the identity at init)" in text
    assert "gates y = x (1 + tanh(gamma) (2 sigmoid(.) - 1)) with gamma = 0 at init" in text  # cubs.py's
    banner = re.search(re.escape(f"SMOKE: {runs_folder.SMOKE_BANNER} (") + r"([^)]*)\)\.", text)
    shown = {"t1", "t2", "t4"} | {f"t3/{r['placement']}_{r['variant']}" for r in placements["runs"]}
    assert banner and banner.group(1).split(", ") == sorted(shown)  # every smoke run the PDF shows
    t4 = load("t4/results.json")  # the split by class id of the generated set, not Cars196's 99-196
    first, last = t4["train_classes"] + 1, t4["train_classes"] + t4["test_classes"]
    assert last < 99 and f"T4 test: classes {first}-{last}, never seen in training." in text
    assert report_pdf.t4_test_classes(None) == "classes 99-196"
    assert "not run yet" not in text and "could not be read" not in text  # every task ran
    assert "NOT REPORTED" not in text
    assert sum(len(p.images) for p in PdfReader(pdf).pages) == 3  # 2 curve figures + retrieval


def caption_pages(pdf: Path, figures: Path) -> dict[str, tuple[int, int]]:
    """Caption name (report_pdf.CAPTIONS) -> (page of its figure, page of its caption), the
    figure found by its pixels among each page's images."""
    reader = PdfReader(pdf)
    texts = [" ".join(page.extract_text().split()) for page in reader.pages]
    shown = [[image.image.convert("RGB") for image in page.images] for page in reader.pages]
    files = {"classifier_curves": "pdf_classifier_curves.png", "t4_curves": "pdf_t4_curves.png",
             "retrieval": "pdf_retrieval.jpg"}

    def same(a: Image.Image, b: Image.Image) -> bool:  # JPEG decoders differ by a few levels
        return a.size == b.size and np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() < 6

    found = {}
    for name, caption in report_pdf.CAPTIONS.items():
        with Image.open(figures / files[name]) as im:
            drawn = im.convert("RGB")
        figure_page = [i for i, images in enumerate(shown) if any(same(drawn, x) for x in images)]
        caption_page = [i for i, text in enumerate(texts) if " ".join(caption.split()) in text]
        assert len(figure_page) == 1 and len(caption_page) == 1, (name, figure_page, caption_page)
        found[name] = (figure_page[0], caption_page[0])
    return found


def test_every_pdf_caption_is_on_the_page_of_its_figure(smoke_report):
    pages = caption_pages(smoke_report.with_suffix(".pdf"), smoke_report.parent / "report_figures")
    assert set(pages) == {"classifier_curves", "t4_curves", "retrieval"}
    for name, (figure_page, caption_page) in pages.items():
        assert figure_page == caption_page, name


def test_the_placements_drawing_prints_its_text_at_80_percent_of_body_size_inside_it():
    from reportlab.graphics.shapes import String
    from reportlab.pdfbase.pdfmetrics import stringWidth
    d = report_pdf.placements_drawing()
    strings = [s for s in d.contents if isinstance(s, String)]
    assert len(strings) >= 15 and "B1 channel" in {s.text for s in strings}
    for s in strings:
        assert s.fontSize >= report_pdf.MIN_FIGURE_FONT, (s.text, s.fontSize)
        width = stringWidth(s.text, s.fontName, s.fontSize)
        left = s.x - {"start": 0, "middle": width / 2, "end": width}[s.textAnchor]
        assert 0 <= left and left + width <= d.width, s.text


def test_a_caption_moves_with_its_figure_past_a_page_break(tmp_path):
    picture = tmp_path / "figure.png"
    Image.new("RGB", (400, 200), "grey").save(picture)
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(buffer, topMargin=cm, bottomMargin=cm)
    # the figure fits on page 1 (the frame pads 6 pt above and below), its caption would not
    room = doc.height - 12 - 5 * cm - 4
    doc.build([Spacer(1, room), report_pdf.captioned(PdfImage(str(picture), 10 * cm, 5 * cm),
                                                     "Figure 1: the caption of this figure.")])
    reader = PdfReader(io.BytesIO(buffer.getvalue()))
    assert len(reader.pages) == 2
    assert [len(page.images) for page in reader.pages] == [0, 1]
    assert "Figure 1: the caption" in reader.pages[1].extract_text()


def visible_font_sizes(fig: Figure) -> list[float]:
    """The size of every piece of text a figure shows (titles, labels, ticks, legends)."""
    return [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def test_pdf_figures_print_their_text_at_80_percent_of_body_size_and_plot_holdout_loss(
        smoke_runs, tmp_path, monkeypatch):
    saved, placed = {}, {}
    save = plots.save_png

    def spy_save(fig, path, **kwargs):
        saved[Path(path).name] = (min(visible_font_sizes(fig)), fig.get_figwidth(), fig)
        return save(fig, path, **kwargs)

    place = report_pdf.figure

    def spy_place(path, width):
        placed[Path(path).name] = width
        return place(path, width)

    monkeypatch.setattr(plots, "save_png", spy_save)
    monkeypatch.setattr(report_pdf, "figure", spy_place)
    monkeypatch.setattr(report_pdf.plt, "close", lambda fig: None)  # keep them for reading
    report.build_report(smoke_runs, tmp_path / "REPORT.md")
    body = report_pdf.BODY.fontSize
    assert report_pdf.MIN_FIGURE_FONT == 0.8 * body == pytest.approx(6.8)
    for name in ("pdf_classifier_curves.png", "pdf_t4_curves.png"):
        smallest, width_in, _ = saved[name]
        printed = smallest * placed[name] / (width_in * 72)  # points on paper
        assert printed >= 0.8 * body, (name, printed)
    # the retrieval grid is T4's PNG (plots.plot_retrieval, tested in test_plots.py), printed
    # at the size it was drawn: its dpi and pixels give the width the PDF gives it
    with Image.open(smoke_runs / "t4" / "retrieval.png") as im:
        natural = im.width / im.info["dpi"][0] * 72
    printed = plots.RETRIEVAL_FONT_PT * placed["pdf_retrieval.jpg"] / natural
    assert printed >= 0.8 * body - 1e-9

    # the loss panel holds every run's holdout loss beside its training loss, on a log axis
    # with at least three labels
    fig = saved["pdf_classifier_curves.png"][2]
    ax_loss = fig.axes[1]
    assert ax_loss.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax_loss.lines}
    runs = runs_folder.collect(smoke_runs)
    chosen = runs_folder.choose_runs(runs)
    shown = [chosen.runs["t1"], chosen.runs["t2"], *runs.placement_runs(chosen.placements[0])]
    assert len(shown) == 5
    for run in shown:
        for kind, style in (("train", "-"), ("holdout", "--")):
            line = lines[f"{run.name} {kind} loss"]  # all smoke: the banner says so, not the key
            assert list(line.get_ydata()) == [h[f"{kind}_loss"] for h in run.history], run.label
            assert line.get_linestyle() == style
    lo, hi = ax_loss.get_ylim()
    labels = [t.get_text() for t, loc in zip(ax_loss.get_yticklabels(), ax_loss.get_yticks())
              if lo <= loc <= hi and t.get_text()]
    assert len(labels) >= 3, labels
    for fig in {id(f): f for _, _, f in saved.values()}.values():
        report_pdf.plt.close(fig)


def test_pdf_marks_missing_tasks_not_run(tmp_path):
    t2 = classifier("t2", "resnet18", 0.456789, 0.51234)
    write(tmp_path / "t2" / "results.json", t2)
    write(tmp_path / "t2" / "metrics.jsonl", history(3))
    pages, text = pdf_text(report.build_report(tmp_path).with_suffix(".pdf"))
    assert pages <= 2
    assert pdf_classifier_row("t2", t2) in text
    for task in ("T1", "T3", "T4"):  # the results table
        assert f"{task} not run yet" in text
    for title in ("T1 custom CNN", "T3 CUBS-ResNet-18 placements", "T4 Cars196 retrieval"):
        assert f"{title}: not run yet" in text  # the networks
    assert "T4: not run yet" in text and "5 T4: Cars196 retrieval on unseen classes, mining " \
        "comparison not run yet" in text
    assert "SMOKE" not in text and "NOT REPORTED" not in text
    # A killed T1 run and an unreadable T3 results.json: said at the top, not only "not run yet".
    write(tmp_path / "t1" / "metrics.jsonl", history(2))
    (tmp_path / "t3" / "serial_plain").mkdir(parents=True)
    (tmp_path / "t3" / "serial_plain" / "results.json").write_text("{ cut sho")
    pages, text = pdf_text(report.build_report(tmp_path).with_suffix(".pdf"))
    assert pages <= 2 and " ".join(text.split()).count("NOT REPORTED: unfinished (no results.json "
                                                       "yet; rerun the command to finish): t1; 1 problem "
                                                       "reading the runs folder (REPORT.md lists it).") == 1
    # ... and below, in the networks lines and the results rows: it said "not run yet" there
    text = " ".join(text.split())
    assert "T1 custom CNN: unfinished (2 epochs logged in t1)." in text
    assert "T1 unfinished (2 epochs logged in t1) T2" in text  # the results row
    assert "T3 CUBS-ResNet-18 placements: unreadable results: t3/serial_plain/results.json." in text
    assert "T3 unreadable results: t3/serial_plain/results.json T4" in text
    assert "T1 not run yet" not in text and "T3 not run yet" not in text


def test_the_report_takes_real_runs_before_smoke_ones_then_the_scripts_own_folder(tmp_path):
    import shutil
    make_runs(tmp_path)  # a real t2 and a real T3 comparison in t3
    write(tmp_path / "a_t2" / "results.json", classifier("t2", "resnet18", 0.3, 0.3))  # sorts first
    shutil.copytree(tmp_path / "t3", tmp_path / "t3_full")
    for path in (tmp_path / "t3").glob("*/results.json"):  # t3 becomes a smoke comparison
        write(path, {**json.loads(path.read_text()), "args": {**ARGS, "smoke": True}})
    chosen = runs_folder.choose_runs(runs_folder.collect(tmp_path))
    assert chosen.runs["t2"].name == "t2"  # both real: the script's default folder
    assert chosen.placements[0] == "t3_full"  # the real comparison, not the default folder's smoke one


def test_collect_reads_a_comparison_in_the_runs_root_and_skips_hidden_folders(tmp_path):
    t3 = classifier("t3", "cubs_resnet18_serial_plain", 0.4, 0.4, placement="serial", variant="plain")
    write(tmp_path / "serial_plain" / "results.json", t3)  # t3_cubs.py --out runs: the root
    write(tmp_path / "serial_plain" / "metrics.jsonl", '{"epoch": 1}\n\n{"epoch": 2}\n')  # a blank line
    pick = {"placement": "serial", "variant": "plain"}
    write(tmp_path / "placements.json", {"runs": [pick], "selected": pick})
    write(tmp_path / "a" / "results.json", classifier("t2", "resnet18", 0.3, 0.3))
    write(tmp_path / "b" / "results.json", classifier("t1", "custom_cnn", 0.2, 0.2))
    write(tmp_path / ".trash" / "results.json", classifier("t2", "resnet18", 0.9, 0.9))  # hidden: not a run
    write(tmp_path / "other" / "placements.json", [1, 2])  # not a comparison: named, no crash
    runs = runs_folder.collect(tmp_path)
    assert runs.problems == [f"{tmp_path / 'other' / 'placements.json'} is not T3's comparison (a JSON "
                             f"object): not reported"]
    assert [r.name for r in runs.classifiers] == ["b", "a", "serial_plain"]  # by task, then name
    assert runs.classifiers[2].history == [{"epoch": 1}, {"epoch": 2}]
    assert [name for name, _ in runs.placements] == ["."]
    assert runs_folder.choose_runs(runs).runs["t3"].name == "serial_plain"


def test_the_curves_key_marks_smoke_runs_only_beside_real_ones():
    def run(name, smoke):
        return runs_folder.Run(Path(name), name, {"task": "t2", "args": {"smoke": smoke}}, [{"epoch": 1}])
    mixed = [run("t2", False), run("smoke/t2", True)]
    assert list(report_pdf.curve_names(mixed)) == ["t2", "smoke/t2 (SMOKE)"]
    # all smoke: the header's banner says so once
    assert list(report_pdf.curve_names([run("t1", True), run("t2", True)])) == ["t1", "t2"]


def test_a_placements_json_whose_selected_run_is_gone_is_a_named_problem(tmp_path):
    data = make_runs(tmp_path)
    selected = data["placements"]["selected"]
    folder = f"t3/{selected['placement']}_{selected['variant']}"
    (tmp_path / folder / "results.json").unlink()  # deleted by hand after T3 finished
    runs = runs_folder.collect(tmp_path)
    assert runs_folder.choose_runs(runs).runs["t3"] is None
    assert runs.problems == [f"{tmp_path / 't3' / 'placements.json'} selects {folder}, which has no "
                             f"readable results.json: rerun t3_cubs.py (finished runs are not "
                             f"retrained) to redo the comparison"]
    _, text = pdf_text(report.build_report(tmp_path).with_suffix(".pdf"))
    assert "1 problem reading the runs folder (REPORT.md lists it)" in " ".join(text.split())
    assert f"T3 selected run missing: {folder} (see NOT REPORTED above)" in text  # not "not run yet"
    # the Networks line too (it said "not run yet" beside the finished T3 runs)
    assert runs_folder.choose_runs(runs).words("t3") == (f"selected run missing: {folder}; unfinished "
                                                        f"(3 epochs logged in {folder})")  # its last.pt stayed
    assert "not run yet" not in " ".join(text.split())


def test_without_a_placements_json_the_t3_run_shown_is_the_one_the_comparison_would_select(tmp_path):
    """t3_cubs.py writes placements.json after its last run: until then the PDF and the
    archive take the plain run of the best holdout accuracy (ties to the earlier placement of
    the specification), not the folder name that sorts first."""
    for placement, variant, holdout in (("parallel", "plain", 0.88), ("reverse", "plain", 0.90),
                                        ("serial", "plain", 0.90), ("serial", "plus", 0.95)):
        write(tmp_path / "t3" / f"{placement}_{variant}" / "results.json",
              classifier("t3", f"cubs_resnet18_{placement}_{variant}", 0.5, holdout,
                         placement=placement, variant=variant))
    assert runs_folder.choose_runs(runs_folder.collect(tmp_path)).runs["t3"].name == "t3/serial_plain"
    (tmp_path / "t3" / "serial_plain" / "results.json").unlink()
    assert runs_folder.choose_runs(runs_folder.collect(tmp_path)).runs["t3"].name == "t3/reverse_plain"


def test_pdf_t3_section_says_how_it_selected_and_marks_no_run_selected_when_none_was(tmp_path, monkeypatch):
    monkeypatch.setattr(architecture, "forward_flops", lambda model, size: 1e9)  # layout only: fast
    curves = []
    real_plot = report_pdf.plot_classifier_curves
    monkeypatch.setattr(report_pdf, "plot_classifier_curves",
                        lambda named, path, **kw: curves.append(list(named)) or real_plot(named, path, **kw))
    data = make_runs(tmp_path)
    c = data["placements"]
    # a short trial the comparison left out: neither in its table nor among its curves
    write(tmp_path / "t3" / "parallel_plain" / "results.json",
          classifier("t3", "cubs_resnet18_parallel_plain", 0.9, 0.9, placement="parallel", variant="plain"))
    write(tmp_path / "t3" / "parallel_plain" / "metrics.jsonl", history(1))
    write(tmp_path / "t3" / "placements.json",
          {**c, "other_recipe": [{"run": "parallel_plain", "differences": ["epochs 1 instead of 3"]}]})
    _, text = pdf_text(report.build_report(tmp_path).with_suffix(".pdf"))
    assert "Selected by holdout accuracy: reverse, plain variant: holdout top-1 0.6111" in text
    assert "parallel_plain: epochs 1 instead of 3" in text
    assert "t3/reverse_plain (selected)" in text
    assert not any("t3/parallel_plain" in name for name in curves[-1]), curves[-1]
    assert "t3/serial_plain" in curves[-1]
    # plus runs only: placements.json selects none; the run shown is the best overall, unmarked
    write(tmp_path / "t3" / "placements.json", {**c, "runs": [c["runs"][2]], "selected": None,
                                                "at_par": None, "plus_vs_plain": []})
    _, text = pdf_text(report.build_report(tmp_path).with_suffix(".pdf"))
    assert "No plain-variant run: no placement selected." in text
    assert "t3/serial_plus" in text and "(selected)" not in text


def test_pdf_t3_section_without_placements_json_says_the_comparison_is_unfinished(tmp_path, monkeypatch):
    # It said "not run yet" beside a results table that showed a finished T3 run.
    monkeypatch.setattr(architecture, "forward_flops", lambda model, size: 1e9)  # layout only: fast
    make_runs(tmp_path)
    (tmp_path / "t3" / "placements.json").unlink()
    _, text = pdf_text(report.build_report(tmp_path).with_suffix(".pdf"))
    assert ("3 T3: placement comparison (selection by holdout accuracy) T3 runs exist but no placements.json "
            "compares them yet (t3_cubs.py writes it after its last run; rerun it to finish the comparison).") in text
    for folder in ("t3", "t2"):
        shutil.rmtree(tmp_path / folder)
    _, text = pdf_text(report.build_report(tmp_path).with_suffix(".pdf"))
    assert "not run yet (no placements.json: run t3_cubs.py --placement all)" in text


def crowd(root: Path) -> dict:
    """make_runs plus everything a full real run can add: a finished T1, all six placements,
    the four mining strategies, a retrieval picture of the real size, and runs the PDF leaves
    to REPORT.md (a smoke copy of T2)."""
    data = make_runs(root)
    t1 = classifier("t1", "custom_cnn", 0.51111, 0.52222)
    write(root / "t1" / "results.json", t1)
    c = data["placements"]
    for placement, variant in (("parallel", "plain"), ("reverse", "plus"), ("parallel", "plus")):
        r = classifier("t3", f"cubs_resnet18_{placement}_{variant}", 0.3, 0.4, placement=placement,
                       variant=variant, d=64)
        write(root / "t3" / f"{placement}_{variant}" / "results.json", r)
        write(root / "t3" / f"{placement}_{variant}" / "metrics.jsonl", history(3))
        c["runs"].append({k: r[k] for k in c["runs"][0]})
    c["plus_vs_plain"] *= 3
    write(root / "t3" / "placements.json", c)
    t4 = data["t4"]
    t4["mining_comparison"] += [{**t4["mining_comparison"][1], "mining": m} for m in ("hard", "semihard")]
    write(root / "t4" / "results.json", t4)
    # t4_retrieval.py's size: plots.plot_retrieval draws 6 x (1 + 8) thumbnails for print
    Image.new("RGB", (1686, 1103), "white").save(root / "t4" / "retrieval.png", dpi=(300, 300))
    write(root / "smoke" / "t2" / "results.json",
          classifier("t2", "resnet18", 0.1, 0.1, args={**ARGS, "smoke": True}))
    return {**data, "t1": t1, "t4": t4}


def test_pdf_fits_two_pages_with_every_table_full(tmp_path, monkeypatch):
    monkeypatch.setattr(architecture, "forward_flops", lambda model, size: 1e9)  # layout only: fast
    data = crowd(tmp_path)
    pages, text = pdf_text(report.build_report(tmp_path).with_suffix(".pdf"))
    assert pages <= 2
    assert pdf_classifier_row("t1", data["t1"]) in text
    assert pdf_classifier_row("t2", data["t2"]) in text  # the real T2, not smoke/t2
    check_pdf_placements(text, data["placements"], "t3")
    check_pdf_retrieval(text, "t4", data["t4"])
    # section 2's T4 rows: Phase A before, Phase B after
    recalls = lambda e: " / ".join(acc(e["test_recall"][k]) for k in "1248")  # noqa: E731
    a, b = data["t4"]["phase_a"], data["t4"]["phase_b"]
    assert (f"before (Phase A classifier features) R@1/2/4/8 {recalls(a)} top-1 {acc(a['holdout_acc'])} "
            f"{a['best_epoch']}/{a['epochs_run']}") in text
    assert (f"after (Multi-Similarity, {b['mining']} mining) R@1/2/4/8 {recalls(b)} R@1 "
            f"{acc(b['holdout_r1'])} {b['best_epoch']}/{b['epochs_run']}") in text
    # section 6: T4's epochs are its Phase A's; the best mining by holdout R@1
    assert f"T4 Phase A {a['best_epoch']}/{a['epochs_run']}." in text
    scores = {m["mining"]: m["holdout_r1"] for m in data["t4"]["mining_comparison"]}
    best = [m for m, v in scores.items() if v == max(scores.values())]
    assert f"Best by holdout R@1 ({acc(max(scores.values()))}): {', '.join(best)}" in text
    assert "REPORT.md also lists smoke/t2." in text
    assert "not run" not in text and "could not be read" not in text  # plus vs plain too
    assert "NOT REPORTED" not in text


# ---------------------------------------------------------------- the submission archive
def test_archive_of_the_smoke_runs_holds_code_report_and_best_models(smoke_runs, smoke_report,
                                                                      tmp_path, capsys):
    dest = archive.build_archive(smoke_runs, smoke_report, tmp_path / "Assignment2.zip",
                                 allow_smoke=True)
    toc = capsys.readouterr().out.splitlines()
    assert sorted(tmp_path.iterdir()) == [dest]  # no temporary file left
    placements = json.loads((smoke_runs / "t3" / "placements.json").read_text())
    selected = f"t3/{placements['selected']['placement']}_{placements['selected']['variant']}"
    mining = json.loads((smoke_runs / "t4" / "results.json").read_text())["phase_b"]["mining"]
    models = {"t1/best.pt", "t1/results.json", "t2/best.pt", "t2/results.json",
              "t3/placements.json", f"{selected}/best.pt", f"{selected}/results.json",
              "t4/results.json", f"t4/phase_b_{mining}/best.pt"}
    report_files = {"REPORT.md", "REPORT.pdf"} | set(
        re.findall(r"!\[[^\]]*\]\(([^)]+)\)", smoke_report.read_text()))
    code = set(archive.code_files())
    assert {"README.md", "common/report.py", "t3_cubs.py", "requirements.txt"} <= code
    with zipfile.ZipFile(dest) as zf:
        assert zf.testzip() is None
        infos = {i.filename: i for i in zf.infolist()}
        assert set(infos) == {f"Assignment2/{n}" for n in
                              code | report_files | {f"runs/{m}" for m in models}}
        for name in models:
            info, src = infos[f"Assignment2/runs/{name}"], smoke_runs / name
            data = zf.read(info)
            if name.endswith(".json"):
                assert data == src.read_bytes()
                continue
            checkpoint = torch.load(io.BytesIO(data), weights_only=True)
            training = torch.load(src, weights_only=True)
            # the inference part only: no optimizer, scheduler, scaler or RNG state
            assert sorted(checkpoint) == ["epoch", "meta", "model"], name
            assert (checkpoint["epoch"], checkpoint["meta"]) == (training["epoch"], training["meta"])
            assert checkpoint["model"].keys() == training["model"].keys()
            for key, tensor in checkpoint["model"].items():
                assert torch.equal(tensor, training["model"][key]), (name, key)
            assert "optimizer" in training and "rng" in training  # the run keeps what resume needs
            model = build_model(checkpoint["meta"])  # Phase B: the EmbeddingNet
            parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            assert info.file_size <= 1.25 * parameter_bytes, (name, info.file_size, parameter_bytes)
            assert src.stat().st_size > 1.9 * parameter_bytes  # the training one: + momentum
        for name in report_files:
            assert infos[f"Assignment2/{name}"].file_size == (smoke_report.parent / name).stat().st_size
    for name, info in infos.items():  # the table of contents: every file with its size
        assert f"{archive.fmt_size(info.file_size):>10}  {name}" in toc
    assert toc[-1].startswith(f"{dest}: {len(infos)} files, ")
    assert f"T3: {selected} (SMOKE) (selected in t3/placements.json)" in toc  # --allow-smoke: marked
    assert f"T4: t4 (SMOKE), Phase B ({mining} mining)" in toc
    assert ("each best.pt in the archive: weights, meta and epoch only (--evaluate reads them); the "
            "training checkpoints in the runs folder keep what resuming needs") in toc


def test_archive_command_writes_report_and_zip_and_refuses_a_missing_model(tmp_path, capsys):
    runs = tmp_path / "runs"
    write(runs / "t2" / "results.json", classifier("t2", "resnet18", 0.456789, 0.51234))
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 2}, runs / "t2" / "best.pt")
    write(runs / "t1" / "metrics.jsonl", history(2))  # killed before it finished
    write(runs / "t2_old" / "results.json", "{truncated")  # a damaged file elsewhere
    dest = tmp_path / "out" / "Assignment2.zip"
    report.main([str(runs), "--archive", str(dest)])
    out = capsys.readouterr().out
    assert f"warning: could not read {runs / 't2_old' / 'results.json'}: " in out
    assert ("warning: unfinished run t1 (no results.json) is not in the archive: rerun its "
            "command to finish it") in out
    assert "warning: T1 unfinished (2 epochs logged in t1): no model of it in the archive" in out
    for task in ("T3", "T4"):
        assert f"warning: {task} not run: no model of it in the archive" in out
    with zipfile.ZipFile(dest) as zf:
        names = set(zf.namelist())
    assert {"Assignment2/REPORT.pdf", "Assignment2/REPORT.md", "Assignment2/README.md"} <= names
    assert {n for n in names if n.startswith("Assignment2/runs/")} == {
        "Assignment2/runs/t2/best.pt", "Assignment2/runs/t2/results.json"}
    before = dest.read_bytes()
    # A best.pt of another epoch than results.json reports (a run changed after it finished)
    # would pair those numbers with other weights in the zip: refused.
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 5}, runs / "t2" / "best.pt")
    with pytest.raises(SystemExit) as exit_:
        report.main([str(runs), "--archive", str(dest)])
    assert str(exit_.value.code).startswith(f"error: {runs / 't2' / 'best.pt'} holds epoch 5, but "
                                            f"results.json beside it reports the best epoch 2")
    assert dest.read_bytes() == before
    (runs / "t2" / "best.pt").unlink()
    (runs / "REPORT.md").unlink()
    with pytest.raises(SystemExit) as exit_:
        report.main([str(runs), "--archive", str(dest)])
    assert str(exit_.value.code).startswith("error: T2's best model ")
    assert dest.read_bytes() == before  # the old archive is untouched
    assert not (runs / "REPORT.md").exists()  # refused before the report was built


def test_archive_takes_t4s_phase_b_best_epoch_and_refuses_a_report_missing_a_figure(tmp_path):
    data = make_runs(tmp_path)
    selected = data["placements"]["selected"]
    for run in ("t2", f"t3/{selected['placement']}_{selected['variant']}", "t4/phase_b_ms"):
        write(tmp_path / run / "best.pt", b"checkpoint")
    files, _ = archive.model_files(runs_folder.choose_runs(runs_folder.collect(tmp_path)))
    epochs = {name: epoch for name, _, epoch, _ in files if name.endswith("best.pt")}
    # T4's results.json has no top-level best_epoch: its Phase B's is what best.pt must hold
    assert epochs == {"runs/t2/best.pt": 2, f"runs/t3/{selected['placement']}_{selected['variant']}/best.pt": 2,
                      "runs/t4/phase_b_ms/best.pt": data["t4"]["phase_b"]["best_epoch"]}
    write(tmp_path / "REPORT.md", "# Report\n\n![curves](report_figures/t2__curves.png)\n")
    write(tmp_path / "REPORT.pdf", b"%PDF")
    with pytest.raises(archive.ArchiveError, match="the report is incomplete, missing: .*t2__curves.png"):
        archive.report_files(tmp_path / "REPORT.md")


def test_archive_refuses_smoke_runs_with_one_error_line(tmp_path):
    make_runs(tmp_path / "runs")  # t4 is a smoke run
    dest = tmp_path / "A.zip"
    proc = subprocess.run([sys.executable, "-m", "common.report", str(tmp_path / "runs"),
                           "--archive", str(dest)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--allow-smoke" in lines[0]
    assert "smoke runs (generated data, not results): t4." in lines[0]
    assert not dest.exists() and not (tmp_path / "runs" / "REPORT.md").exists()


def test_write_zip_is_atomic(tmp_path):
    dest, present = tmp_path / "A.zip", tmp_path / "a.txt"
    dest.write_bytes(b"the previous archive")
    present.write_text("a")
    with pytest.raises(FileNotFoundError):
        archive.write_zip([("a.txt", present), ("b.txt", tmp_path / "missing.txt")], dest)
    assert dest.read_bytes() == b"the previous archive"
    assert sorted(tmp_path.iterdir()) == [dest, present]
    killed = tmp_path / ".A.zip.k1.tmp"  # a write killed an hour ago: as large as the zip
    killed.write_bytes(b"half a zip")
    os.utime(killed, (time.time() - 3600,) * 2)
    live = tmp_path / ".A.zip.live.tmp"  # another --archive writing now: not pulled away
    live.write_bytes(b"a zip being written")
    archive.write_zip([("A/a.txt", present)], dest)
    assert sorted(tmp_path.iterdir()) == [live, dest, present]


def test_zip_refuses_duplicate_names(tmp_path):
    with pytest.raises(ValueError, match=r"duplicate names in the archive: \['A/x'\]"):
        archive.write_zip([("A/x", b"1"), ("A/y", b"3"), ("A/x", b"2")], tmp_path / "a.zip")
    assert not (tmp_path / "a.zip").exists()


def test_a_rebuilt_report_removes_what_a_killed_one_left_half_written(tmp_path):
    make_runs(tmp_path)
    figures = tmp_path / "report_figures"
    figures.mkdir()
    killed = [figures / ".t2__curves.png.k1.tmp", figures / ".classifiers_holdout.png.k2.tmp"]
    for path in killed:
        path.write_bytes(b"half a png")
        os.utime(path, (time.time() - 3600,) * 2)
    users = figures / ".notes.txt.k3.tmp"  # not a name the report gives a figure
    users.write_text("x")
    os.utime(users, (time.time() - 3600,) * 2)
    report.build_report(tmp_path)
    assert not any(p.exists() for p in killed) and users.exists()


def test_code_files_without_git_are_the_package_files(tmp_path):
    for name in ("t1.py", "README.md", "requirements.txt", "common/x.py", "docs/a.md",
                 "common/__pycache__/x.pyc", "runs/t1/results.json", "data/wnids.txt",
                 ".hidden/x.py", "mine/REPORT.md", "model.pt"):
        write(tmp_path / name, "x")
    assert archive.code_files(tmp_path, exclude=(tmp_path / "mine",)) == [
        "README.md", "common/x.py", "docs/a.md", "requirements.txt", "t1.py"]


def test_recipe_rows_take_each_setting_from_its_own_flag():
    from common import recipes
    assert recipes.random_area() == "0.25-1"
    assert recipes.classifier_recipe({"grad_clip": 1.0}, "0.25-1")["gradient clipping"] == "1"
    assert recipes.classifier_recipe({"grad_clip": 0.0}, "0.25-1")["gradient clipping"] == "off"
    assert recipes.classifier_recipe({}, "0.25-1")["dropout"] == "-"  # T2, T3: no dropout flag
    assert recipes.classifier_recipe({"dropout": 0.2}, "0.25-1")["dropout"] == "0.2"
    args = {"mining": "hard", "compare_mining": True, "embed_lr": 1e-3, "lr": 0.1, "embed_weight_decay": 1e-4,
            "weight_decay": 5e-4, "embed_epochs": 4, "epochs": 10}
    phase_b = recipes.embedding_recipe({"args": args})
    assert (phase_b["mining"], phase_b["LR"], phase_b["weight decay"], phase_b["epochs (max)"]) == (
        "hard (+ all others compared)", "0.001", "0.0001", "4")
    assert recipes.embedding_recipe({"args": {"mining": "ms"}})["mining"] == "ms"
    # AdamW's decoupled decay: the report says how little T4's default (1e-4 at LR 1e-4) decays
    adamw = recipes.embedding_recipe({"args": {"embed_optimizer": "adamw", "embed_lr": 1e-4,
                                               "embed_weight_decay": 1e-4}})
    assert adamw["weight decay"] == "0.0001 (AdamW, decoupled: each step shrinks a weight by lr x wd = 1e-08)"


def test_a_t4_run_with_one_mining_has_no_comparison_table():
    one = {"mining_comparison": [{"mining": "hard", "test_recall": {"1": 0.5}}], "phase_b": {"mining": "hard"}}
    assert report.mining_lines(one) == ["Mining comparison: not run (use `--compare-mining`).", ""]


def test_t4_phase_b_folders_its_results_do_not_report_are_not_drawn_but_named(tmp_path):
    # A rerun without --compare-mining (or one cut short) leaves other phase_b_<mining>
    # folders: their curves were drawn beside a table that reports only the run's own.
    data = make_runs(tmp_path)
    t4 = {**data["t4"], "mining_comparison": [data["t4"]["phase_b"]]}  # ms only
    (tmp_path / "t4" / "results.json").write_text(json.dumps(t4))
    found = runs_folder.collect(tmp_path)
    assert list(found.retrievals[0].phases) == ["phase_a", "phase_b_ms"]
    assert [p for p in found.problems if "phase_b_none" in p] == [
        "t4/phase_b_none is not in t4/results.json: not reported (rerun t4_retrieval.py with that "
        "--mining or --compare-mining to report it)"]
    text = report.build_report(tmp_path).read_text()
    assert "t4/phase_b_none is not in t4/results.json" in text
    assert "phase_b_none__curves.png" not in text


def test_archive_refuses_a_runs_folder_without_a_finished_run(tmp_path):
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "metrics.jsonl").write_text("")
    with pytest.raises(archive.ArchiveError, match=f"^no finished run in {tmp_path}"):
        archive.check_runs(runs_folder.collect(tmp_path), allow_smoke=False)


def test_code_files_leave_out_a_tracked_file_deleted_since_the_commit(tmp_path):
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text("x = 1\n")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for command in (["init", "-q"], ["add", "a.py", "b.py"], ["commit", "-q", "-m", "two files"]):
        subprocess.run(git + command, cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "b.py").unlink()
    assert archive.code_files(tmp_path) == ["a.py"]


def test_untracked_warning_names_forgotten_code_but_not_the_report_written_into_the_repo(
        tmp_path, monkeypatch, capsys):
    """The "not tracked by git" warning names code a student forgot to `git add`, but not
    REPORT.md written (untracked) into the repository root: that one is in the archive."""
    repo, runs = tmp_path / "repo", tmp_path / "runs"
    write(repo / "a.py", "x = 1\n")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for command in (["init", "-q"], ["add", "a.py"], ["commit", "-q", "-m", "one file"]):
        subprocess.run(git + command, cwd=repo, check=True, capture_output=True)
    write(repo / "forgotten.py", "y = 2\n")  # never added
    write(repo / "REPORT.md", "# Report\n")  # the report, written into the repository root
    write(repo / "REPORT.pdf", b"%PDF")
    write(runs / "t2" / "results.json", classifier("t2", "resnet18", 0.456789, 0.51234))
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 2}, runs / "t2" / "best.pt")
    monkeypatch.setattr(archive, "REPO", repo)
    dest = archive.build_archive(runs, repo / "REPORT.md", tmp_path / "Assignment2.zip")
    warnings = [line for line in capsys.readouterr().out.splitlines() if "not tracked by git" in line]
    assert warnings == ["warning: 1 file(s) not tracked by git are not in the archive (git add "
                        "them to include them): forgotten.py"]
    with zipfile.ZipFile(dest) as zf:
        names = set(zf.namelist())
    assert {"Assignment2/a.py", "Assignment2/REPORT.md", "Assignment2/REPORT.pdf"} <= names
    assert "Assignment2/forgotten.py" not in names


@pytest.mark.parametrize("name", ["../secret.png", "A2/../../x", "/etc/passwd", "A2/runs/..\\x/best.pt",
                                  "A2\\..\\..\\x", "C:/x", "A2/C:x", "c:x"])
def test_zip_refuses_a_name_outside_its_folder(tmp_path, name):
    # Windows extractors split names on '\\' too, and a drive letter makes a name absolute there.
    with pytest.raises(archive.ArchiveError, match="archive names outside its folder"):
        archive.write_zip([("A2/REPORT.md", b"r"), (name, b"x")], tmp_path / "a.zip")
    assert not (tmp_path / "a.zip").exists()


def test_the_pdfs_retrieval_photo_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    src, dst = tmp_path / "retrieval.png", tmp_path / "figures" / "pdf_retrieval.jpg"
    Image.new("RGB", (400, 300), "white").save(src)

    def cut_short(self, fp, *args, **kwargs):  # a full disk (or a kill) mid-write
        Path(fp).write_bytes(b"\xff\xd8 half")
        raise OSError("No space left on device")
    monkeypatch.setattr(report_pdf.PILImage.Image, "save", cut_short)
    assert report_pdf.photo(src, dst, 200) == src  # the PDF then says the picture is unreadable
    assert not dst.exists() and list(dst.parent.iterdir()) == []
    monkeypatch.undo()
    assert report_pdf.photo(src, dst, 100) == dst and Image.open(dst).size == (278, 208)  # 200 dpi


def test_zip_stores_what_is_compressed_already_and_names_runs_without_dot_folders(tmp_path):
    dest = tmp_path / "a.zip"
    archive.write_zip([("runs/t1/best.pt", b"x" * 1000), ("runs/t1/curves.png", b"p" * 1000),
                       ("README.md", b"y" * 1000)], dest)
    with zipfile.ZipFile(dest) as z:
        kinds = {info.filename: info.compress_type for info in z.infolist()}
        assert z.read("runs/t1/best.pt") == b"x" * 1000
    assert kinds == {"runs/t1/best.pt": zipfile.ZIP_STORED, "runs/t1/curves.png": zipfile.ZIP_STORED,
                     "README.md": zipfile.ZIP_DEFLATED}
    assert archive._in_runs("./results.json") == "runs/results.json"  # the runs root is a run
    assert archive._in_runs("t1/best.pt") == "runs/t1/best.pt"


def test_architecture_counts_every_kind_of_layer_and_tells_input_sizes_apart(tmp_path):
    from common.models import CustomCNN
    def count(model, kind):
        return sum(isinstance(m, kind) for m in model.modules())
    t1_model = CustomCNN(5, width=8)
    t1 = architecture.summarise(t1_model, "t1", 32)
    assert (t1.conv, t1.se_gates, t1.attention) == (52, 8, 0)
    assert t1.batchnorm == count(t1_model, torch.nn.BatchNorm2d) > 0
    plus_model = cubs_resnet18(5, placement="serial", variant="plus", width=8, d=64)
    plus = architecture.summarise(plus_model, "plus", 32)
    assert plus.attention == 16 and plus.batchnorm == count(plus_model, torch.nn.BatchNorm2d) == 20
    # Two T2 runs that differ only in their image size: each row has its own input and FLOPs.
    for size in (32, 64):
        (tmp_path / f"t2_{size}").mkdir()
        (tmp_path / f"t2_{size}" / "results.json").write_text(json.dumps({
            "task": "t2", "model": "resnet18", "num_classes": 5, "width": 8, "image_size": size,
            "test_acc": 0.5, "holdout_acc": 0.5, "finished": True, "args": {"image_size": size, "width": 8}}))
    (_, _, small), (_, _, large) = architecture.architectures(runs_folder.collect(tmp_path))
    assert (small.input_size, large.input_size) == (32, 64)
    assert large.flops == pytest.approx(4 * small.flops, rel=0.01)  # 4x the pixels, convs only


def test_the_t4_section_names_only_t4s_unfinished_runs(tmp_path):
    for name in ("t1", "t4/phase_a"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.jsonl").write_text('{"epoch": 1}\n')
    lines = report.section_retrieval(runs_folder.collect(tmp_path), report.Figures(tmp_path / "REPORT.md"))
    assert lines[2] == "**unfinished (1 epoch logged in t4/phase_a)**."
    # The status table's note says why a phase folder is listed (T4's results.json is above it)
    status = "\n".join(report.section_status(runs_folder.collect(tmp_path)))
    assert ("resume from last.pt). T4 writes its results.json in the folder above its phase folders once "
            "its last phase is done, so a phase listed here may have run all its epochs:") in status
    (tmp_path / "t4" / "phase_a" / "metrics.jsonl").unlink()
    (tmp_path / "t4" / "phase_a").rmdir()
    assert "Unfinished runs (metrics.jsonl but no results.json yet; rerun the same command to resume from " \
           "last.pt):" in report.section_status(runs_folder.collect(tmp_path))  # only t1: no word of T4


def test_figure_names_of_a_run_at_the_runs_root_are_visible_and_alike():
    # t4_retrieval.py --out runs: the run is "." and its phases "./phase_a"; they were copied
    # as hidden files (".__phase_a__curves.png") beside root__retrieval.png.
    assert report.figure_name(".", "retrieval.png") == "root__retrieval.png"
    assert report.figure_name("./phase_a", "curves.png") == "root__phase_a__curves.png"
    assert report.figure_name("t4/phase_b_ms", "curves.png") == "t4__phase_b_ms__curves.png"


def test_runs_whose_figure_names_coincide_each_show_their_own_figure(tmp_path):
    # "x/t2" and "x__t2" both map to x__t2__curves.png, "." and "root" to root__*: each run
    # must still link its own curves.png, not the one copied over it.
    make_runs(tmp_path / "x")
    shutil.copytree(tmp_path / "x" / "t2", tmp_path / "x__t2")
    shutil.copytree(tmp_path / "x" / "t2", tmp_path / "root")
    for run in ("x/t2", "x__t2", "root"):
        (tmp_path / run / "curves.png").write_bytes(f"the curves of {run}".encode())
    write(tmp_path / "results.json", json.loads((tmp_path / "root" / "results.json").read_text()))
    (tmp_path / "curves.png").write_bytes(b"the curves of .")
    out = report.build_report(tmp_path, tmp_path / "doc" / "REPORT.md")
    links = dict(re.findall(r"!\[(\S+) curves\]\((\S+)\)", out.read_text()))
    assert {run: (out.parent / links[run]).read_text() for run in (".", "x/t2", "x__t2", "root")} == \
        {run: f"the curves of {run}" for run in (".", "x/t2", "x__t2", "root")}
    figs = report.Figures(tmp_path / "R.md")
    assert [figs.name(r, "curves.png") for r in ("a/b", "a__b", "a/b", "a__b__c", "a/b__c")] == \
        ["a__b__curves.png", "a__b__curves-2.png", "a__b__curves.png", "a__b__c__curves.png",
         "a__b__c__curves-2.png"]


def test_remove_unlinked_takes_every_figure_name_the_report_gives_and_nothing_else(tmp_path):
    figs = report.Figures(tmp_path / "REPORT.md")
    for name in ("classifiers_holdout.png", "t1__curves.png", "t2__curves.png", "photo.png", "pdf_x.png"):
        figs.path(name).write_bytes(b"png")
    figs.linked.add("t2__curves.png")
    assert figs.remove_unlinked() == ["classifiers_holdout.png", "t1__curves.png"]
    assert sorted(p.name for p in figs.folder.iterdir()) == ["pdf_x.png", "photo.png", "t2__curves.png"]


def test_a_comparison_without_runs_or_vanilla_has_no_figure_line(tmp_path):
    """t3_cubs.py draws no placements.png when no run was compared and there is no vanilla
    ResNet-18: the report says so in the table's place, not "placements.png not found"."""
    root = tmp_path / "runs"
    make_runs(root)
    c = json.loads((root / "t3" / "placements.json").read_text())
    write(root / "t3" / "placements.json", {**c, "runs": [], "selected": None, "best_overall": None,
                                            "vanilla": None, "at_par": None, "plus_vs_plain": []})
    (root / "t3" / "placements.png").unlink()
    text = report.build_report(root, tmp_path / "R.md").read_text()
    block = text[text.index("### `t3/placements.json`"):text.index("## T4")]
    assert "not found" not in block and "placements.png" not in block
    assert "t3__placements.png" not in os.listdir(tmp_path / "report_figures")


def test_pdf_says_t3_selected_no_run_when_its_comparison_chose_none(tmp_path):
    """A placements.json that selects nothing (every run trained another way, no plain run):
    T3 ran, so the results table says no run was selected, not "not run yet"."""
    root = tmp_path / "runs"
    make_runs(root)
    c = json.loads((root / "t3" / "placements.json").read_text())
    write(root / "t3" / "placements.json", {**c, "runs": [], "selected": None, "best_overall": None})
    _, text = pdf_text(report.build_report(root, tmp_path / "R.md").with_suffix(".pdf"))
    assert "T3 no run selected (see 3)" in text and "T3 not run yet" not in text
    # A comparison that selected a run whose folder is gone did select one.
    write(root / "t3" / "placements.json", c)
    shutil.rmtree(root / "t3" / f"{c['selected']['placement']}_{c['selected']['variant']}")
    _, text = pdf_text(report.build_report(root, tmp_path / "R.md").with_suffix(".pdf"))
    assert "no run selected" not in text and "T3 selected run missing" in text


def test_the_archive_takes_the_built_report_over_a_stale_one_committed_to_the_repo(tmp_path, monkeypatch):
    """A REPORT.md once committed to the repository is a code file of the same name as the
    report just built in the runs folder: the zip must hold the fresh one."""
    repo, runs = tmp_path / "repo", tmp_path / "runs"
    write(repo / "a.py", "x = 1\n")
    write(repo / "REPORT.md", "# stale report\n")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for command in (["init", "-q"], ["add", "a.py", "REPORT.md"], ["commit", "-q", "-m", "two files"]):
        subprocess.run(git + command, cwd=repo, check=True, capture_output=True)
    write(runs / "REPORT.md", "# fresh report\n")
    write(runs / "REPORT.pdf", b"%PDF")
    write(runs / "t2" / "results.json", classifier("t2", "resnet18", 0.456789, 0.51234))
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 2}, runs / "t2" / "best.pt")
    monkeypatch.setattr(archive, "REPO", repo)
    dest = archive.build_archive(runs, runs / "REPORT.md", tmp_path / "Assignment2.zip")
    with zipfile.ZipFile(dest) as zf:
        assert zf.read("Assignment2/REPORT.md") == b"# fresh report\n"
        assert zf.read("Assignment2/a.py") == b"x = 1\n"


# ---------------------------------------------------------------- sections, without a full report
def test_classifier_table_takes_every_column_from_its_own_key(tmp_path):
    r = classifier("t2", "resnet18", 0.456789, 0.51234, test_top5=0.888888, holdout_top5=0.777777,
                   stopped_early=True, train_time_s=12.345, images_per_s=1234.56, device="cuda:0")
    write(tmp_path / "t2" / "results.json", r)
    text = "\n".join(report.section_classifiers(runs_folder.collect(tmp_path)))
    assert find_tables(text, "test top-1", "device")[0] == [{
        "run": "t2", "task": "T2", "model": "resnet18", "kind": "real", "test top-1": "0.4568",
        "test top-5": "0.8889", "holdout top-1": "0.5123", "holdout top-5": "0.7778", "params": "123,456",
        "best epoch / epochs run": "2/3", "stopped early": "yes", "train time (s)": "12.3",
        "train images/s": "1234.6", "device": "cuda:0"}]


def test_t4s_architecture_rows_quote_each_phases_own_parameter_count(tmp_path):
    t4 = runs_folder.Run(tmp_path / "t4", "t4", {"task": "t4", "model": "cubs_resnet18_serial_plain",
                                                  "params": 111, "embedding_params": 222})
    t2 = runs_folder.Run(tmp_path / "t2", "t2", {"task": "t2", "model": "resnet18", "params": 333})
    arch = lambda label, params: architecture.Architecture(label, 32, 20, 1, 20, 0, 0, params, 2e8)  # noqa: E731
    text = "\n".join(report.section_architectures([(t4, "a", arch("A", 111)), (t4, "b", arch("B", 222)),
                                                   (t2, "", None)]))
    rows = find_tables(text, "conv", "GFLOPs / image")[0]
    assert [(r["model"], r["params (results.json)"], r["params (rebuilt)"]) for r in rows[:2]] == [
        ("A", "111", "111"), ("B", "222", "222")]
    assert rows[2] == {"run": "t2", "model": "resnet18", **{h: "n/a" for h in list(rows[0])[2:]}}


def test_t4_section_says_where_its_initial_weights_came_from(tmp_path):
    results = {"task": "t4", "init": "t3", "init_source": "runs/t3/serial_plain/best.pt", "init_loaded": 120,
               "init_skipped": ["fc.weight", "fc.bias"], "phase_a": {}, "phase_b": {"mining": "ms"}}
    lines = report.retrieval_block(runs_folder.Run(tmp_path / "t4", "t4", results),
                                   report.Figures(tmp_path / "REPORT.md"))
    assert "init t3 from `runs/t3/serial_plain/best.pt` (120 tensors loaded, 2 skipped)." in lines[2]


def test_the_t3_section_tells_an_unfinished_comparison_from_no_t3_run(tmp_path):
    figs = report.Figures(tmp_path / "REPORT.md")
    (tmp_path / "none").mkdir()
    assert report.section_placements(runs_folder.collect(tmp_path / "none"), figs)[2] == "**not run yet**."
    write(tmp_path / "runs" / "t3" / "serial_plain" / "results.json",
          classifier("t3", "cubs_resnet18_serial_plain", 0.4, 0.5, placement="serial", variant="plain"))
    assert report.section_placements(runs_folder.collect(tmp_path / "runs"), figs)[2].startswith(
        "**T3 runs exist but no readable placements.json compares them yet")


def test_a_comparison_with_only_vanilla_links_its_figure(tmp_path):
    # t3_cubs.py draws placements.png from the vanilla bar alone when no CUBS run was compared
    write(tmp_path / "t3" / "placements.png", b"png")
    c = {"runs": [], "selected": None, "vanilla": {"test_acc": 0.5, "holdout_acc": 0.5}, "at_par": None,
         "plus_vs_plain": []}
    runs = runs_folder.RunsFolder(tmp_path, placements=[("t3", c)])
    lines = report.placement_block(runs, "t3", c, report.Figures(tmp_path / "REPORT.md"))
    assert "![holdout (selects) and test accuracy per run; the selected run hatched]" \
           "(report_figures/t3__placements.png)" in lines


def paragraphs(flowables) -> list[str]:
    from reportlab.platypus import Paragraph
    return [f.getPlainText() for f in flowables if isinstance(f, Paragraph)]


def test_pdf_plus_vs_plain_reads_from_plain_to_plus():
    c = {"runs": [], "selected": None, "vanilla": None, "at_par": None,
         "plus_vs_plain": [{"placement": "serial", "plain_test_acc": 0.40004, "plus_test_acc": 0.44449,
                            "gain_points": 4.445}]}
    text = paragraphs(report_pdf.section_placements(runs_folder.Chosen({"t3": None}, ("t3", c))))[-1]
    assert text == ("Our variant (plus) against plain, same placement and seed: serial +4.45 points test "
                    "top-1 (0.4000 -> 0.4445).")
    strategy = report_pdf.variant_strategy(runs_folder.Chosen({}, ("t3", c)))
    assert strategy.endswith("Result: serial: +4.45 test points over plain.")


def test_pdf_header_counts_the_unfinished_runs_it_does_not_name(tmp_path):
    def unfinished(n):
        return report_pdf._not_reported(runs_folder.RunsFolder(tmp_path, unfinished=[(f"r{i}", []) for i in range(n)]))
    assert unfinished(6).endswith("finish): r0, r1, r2, r3, r4, r5")  # all six named: no "and 0 more"
    assert unfinished(7).endswith("finish): r0, r1, r2, r3, r4, r5 and 1 more")
    assert report_pdf._not_reported(runs_folder.RunsFolder(tmp_path)) == ""


def test_pdf_header_names_six_runs_it_leaves_to_report_md_then_counts_the_rest(tmp_path):
    runs = [runs_folder.Run(tmp_path / f"r{i}", f"r{i}", {"task": "t2"}) for i in range(9)]
    folder = runs_folder.RunsFolder(tmp_path, classifiers=runs)
    chosen = runs_folder.Chosen({"t1": None, "t2": runs[0], "t3": None, "t4": None}, None)
    assert paragraphs(report_pdf.header(folder, chosen))[1].endswith(
        "REPORT.md also lists r1, r2, r3, r4, r5, r6, 2 more.")


def test_pdf_mining_verdict_names_every_best_mining_and_says_tied_only_for_a_tie():
    def verdict(scores):
        entries = [{"mining": m, "holdout_r1": v} for m, v in scores.items()]
        run = runs_folder.Run(Path("t4"), "t4", {"task": "t4", "args": {"mining": "ms"},
                                                 "phase_b": {"mining": "ms"}, "mining_comparison": entries})
        return report_pdf.mining_strategy(runs_folder.Chosen({"t4": run}, None))
    assert " Best by holdout R@1 (0.5000): ms. " in verdict({"ms": 0.5, "none": 0.4, "hard": 0.45})
    assert " Best by holdout R@1 (0.5000): ms, hard (tied). " in verdict({"ms": 0.5, "none": 0.4, "hard": 0.5})
    assert "Best by" not in verdict({"ms": 0.5})


@pytest.mark.parametrize("fits, empty, written", [
    ({1.0: 3, 0.9: 2}, {}, "0.9"),                    # the largest scale on two pages
    ({}, {1.0: 3 * cm, 0.9: 1 * cm}, "0.9"),          # ... without a hole at the foot of page 1
    ({}, {s: (3 + abs(s - 0.8)) * cm for s in report_pdf.FIGURE_SCALES}, "0.8"),  # else the smallest hole
])
def test_write_pdf_takes_the_largest_scale_that_fits_without_a_hole(tmp_path, monkeypatch, fits, empty, written):
    calls = []

    def render(runs, summaries, figures, scale):
        calls.append(scale)
        return str(scale).encode(), fits.get(scale, 2), empty.get(scale, 0.5 * cm)
    monkeypatch.setattr(report_pdf, "render", render)
    report_pdf.write_pdf(None, [], tmp_path / "R.pdf", tmp_path / "figures")
    assert (tmp_path / "R.pdf").read_bytes() == written.encode()
    assert calls[-1] == float(written)  # the figure files left are the chosen scale's


def test_pdf_results_rows_name_each_runs_model(tmp_path):
    t2 = runs_folder.Run(tmp_path / "t2", "t2", classifier("t2", "resnet18", 0.5, 0.5))
    t3 = runs_folder.Run(tmp_path / "t3" / "serial_plain", "t3/serial_plain",
                         classifier("t3", "cubs_resnet18_serial_plain", 0.5, 0.5))
    assert report_pdf.classifier_row("t2", t2)[:2] == ["T2", "t2: resnet18"]
    # T3's folder already names the placement and variant
    assert report_pdf.classifier_row("t3", t3, selected=True)[:2] == ["T3", "t3/serial_plain (selected): cubs_resnet18"]


def test_recipe_table_groups_equal_recipes_and_dashes_a_setting_a_run_lacks():
    lines = report.recipe_table([("t1", {"LR": "0.1", "dropout": "0.2"}), ("t2", {"LR": "0.1"}),
                                 ("t3", {"LR": "0.1"})])
    assert md_tables("\n".join(lines))[0] == [{"setting": "LR", "t1": "0.1", "t2, t3": "0.1"},
                                              {"setting": "dropout", "t1": "0.2", "t2, t3": "-"}]


def test_collect_counts_t4_phase_folders_as_parts_of_t4_not_as_unfinished_runs(tmp_path):
    make_runs(tmp_path)  # t1 unfinished; t4 finished, with phase_a, phase_b_ms, phase_b_none
    runs = runs_folder.collect(tmp_path)
    assert [name for name, _ in runs.unfinished] == ["t1"]
    assert [len(records) for _, records in runs.unfinished] == [2]
    assert [r.name for r in runs.retrievals] == ["t4"] and runs.problems == []
    assert list(runs.retrievals[0].phases) == ["phase_a", "phase_b_ms", "phase_b_none"]


def test_a_t4_run_whose_t3_weights_file_changed_since_is_a_problem_of_the_report_and_archive(tmp_path):
    # T3 trained again after T4 started from its best.pt: the report said "init t3 from
    # .../best.pt" and the archive shipped the new T3 beside a T4 grown from the old one.
    import json as json_module

    from common.files import file_sha256
    make_runs(tmp_path / "runs")
    t3_best = tmp_path / "runs" / "t3" / "serial_plain" / "best.pt"
    write(t3_best, b"the weights T4 started from")
    results_path = tmp_path / "runs" / "t4" / "results.json"
    t4 = json_module.loads(results_path.read_text())
    write(results_path, {**t4, "init": "t3", "init_source": str(t3_best), "init_sha256": file_sha256(t3_best)})
    assert runs_folder.collect(tmp_path / "runs").problems == []  # the same file: nothing to say
    write(t3_best, b"T3 trained again")
    assert runs_folder.collect(tmp_path / "runs").problems == [
        f"t4/results.json: T4 started from {t3_best}, which holds other weights now (T3 trained again "
        f"since): rerun t4_retrieval.py with --fresh to train T4 from them, else T4's figures are of a "
        f"T3 run no longer there"]
    t3_best.unlink()  # gone (or T4 trained on another machine): nothing to compare with
    assert runs_folder.collect(tmp_path / "runs").problems == []


def test_a_placements_json_without_selected_falls_back_to_best_overall(tmp_path):
    data = make_runs(tmp_path)
    placements = {k: v for k, v in data["placements"].items() if k != "selected"}  # an older t3_cubs.py
    write(tmp_path / "t3" / "placements.json", placements)
    chosen = runs_folder.choose_runs(runs_folder.collect(tmp_path))
    assert chosen.runs["t3"].name == "t3/serial_plus"  # best_overall
    assert chosen.placements[0] == "t3"


def test_without_a_placements_json_the_t3_run_comes_from_the_scripts_own_folder(tmp_path):
    # Two unfinished comparisons: the default folder t3 is preferred to an earlier-sorting one,
    # even where that one holds the better run.
    for folder, holdout in (("a_old", 0.99), ("t3", 0.5)):
        write(tmp_path / folder / "serial_plain" / "results.json",
              classifier("t3", "cubs_resnet18_serial_plain", 0.5, holdout, placement="serial", variant="plain"))
    assert runs_folder.choose_runs(runs_folder.collect(tmp_path)).runs["t3"].name == "t3/serial_plain"


def test_placement_runs_are_the_runs_beside_that_placements_json_only(tmp_path):
    make_runs(tmp_path)
    shutil.copytree(tmp_path / "t3", tmp_path / "t3_full")  # another comparison whose name starts alike
    runs = runs_folder.collect(tmp_path)
    expected = ["reverse_plain", "serial_plain", "serial_plus"]
    for name in ("t3", "t3_full"):
        assert sorted(r.name for r in runs.placement_runs(name)) == [f"{name}/{run}" for run in expected]
    assert runs.placement_runs("t2") == []


def test_a_comparison_in_the_runs_root_holds_t3s_runs_not_t1_and_t2_beside_them(tmp_path):
    # t3_cubs.py --out runs beside runs/t1 (smoke) and runs/t2: the comparison was called SMOKE
    # and named t1.
    t3 = classifier("t3", "cubs_resnet18_serial_plain", 0.4, 0.5, placement="serial", variant="plain")
    write(tmp_path / "serial_plain" / "results.json", t3)
    write(tmp_path / "placements.json", {"selected": {"placement": "serial", "variant": "plain"}})
    write(tmp_path / "t1" / "results.json", {**classifier("t1", "custom_cnn", 0.2, 0.2), "args": {**ARGS, "smoke": True}})
    write(tmp_path / "t2" / "results.json", classifier("t2", "resnet18", 0.3, 0.3))
    runs = runs_folder.collect(tmp_path)
    assert [r.name for r in runs.placement_runs(".")] == ["serial_plain"]
    comparison = json.loads((tmp_path / "placements.json").read_text())
    assert "SMOKE" not in "\n".join(report.placement_block(runs, ".", comparison, report.Figures(tmp_path / "R.md")))


# ---------------------------------------------------------------- damaged or odd runs folders
def test_a_run_stopped_in_its_first_epoch_is_unfinished_not_missing(tmp_path):
    # Ctrl-C in epoch 1 leaves last.pt and no metrics.jsonl line: the report said "not run yet".
    make_runs(tmp_path)
    (tmp_path / "t1" / "metrics.jsonl").unlink()
    write(tmp_path / "t1" / "last.pt", b"checkpoint")
    runs = runs_folder.collect(tmp_path)
    assert runs.unfinished == [("t1", [])]
    table = find_tables(report.build_report(tmp_path).read_text(), "folder", "epochs logged")[0]
    assert table == [{"folder": "`t1`", "epochs logged": "0", "last holdout score": "n/a"}]


def test_bad_json_files_are_named_problems_and_good_lines_are_kept(tmp_path):
    # Each crashed the report with a traceback (UnicodeDecodeError, AttributeError on None),
    # or was left out without a word, or was reported as a "real" run of task "?".
    make_runs(tmp_path)
    write(tmp_path / "t2" / "metrics.jsonl", history(3) + "null\n" + '{"epoch": 4, "train_lo')  # killed mid-line
    write(tmp_path / "utf16" / "results.json", '{"task": "t2"}'.encode("utf-16"))
    write(tmp_path / "list" / "results.json", [])
    write(tmp_path / "null" / "results.json", "null")
    write(tmp_path / "null" / "placements.json", "null")
    write(tmp_path / "empty" / "results.json", {})
    runs = runs_folder.collect(tmp_path)
    assert [r["epoch"] for r in runs.run_at("t2").history] == [1, 2, 3]
    problems = "\n".join(runs.problems)
    assert f"left out of {tmp_path / 't2' / 'metrics.jsonl'}: line 4 (a JSON NoneType, not an object), " \
           f"line 5 (Unterminated string starting at)" in problems
    assert f"could not read {tmp_path / 'utf16' / 'results.json'}: 'utf-8' codec can't decode" in problems
    for name in ("list", "null"):
        assert f"{tmp_path / name / 'results.json'} is not the results of a task script (a JSON " \
               f"object): not reported" in problems
    assert f"{tmp_path / 'null' / 'placements.json'} is not T3's comparison (a JSON object): not reported" in problems
    assert f"{tmp_path / 'empty' / 'results.json'} is not the results of a task script (a JSON object " \
           f"whose \"task\" is one of t1, t2, t3, t4): not reported" in problems
    assert len(runs.problems) == 6 and [name for name, _ in runs.placements] == ["t3"]
    assert {r.name for r in runs.classifiers} == {"t2", "t3/serial_plain", "t3/reverse_plain", "t3/serial_plus"}
    text = report.build_report(tmp_path).read_text()  # and the report is written, naming them
    assert "## Problems while reading" in text and "utf16" in text


def test_linked_run_folders_are_read_and_unreadable_ones_named(tmp_path, monkeypatch):
    elsewhere = tmp_path / "drive"
    make_runs(elsewhere)
    root = tmp_path / "runs"
    root.mkdir()
    (root / "t2").symlink_to(elsewhere / "t2", target_is_directory=True)  # a run kept on another drive
    (root / "loop").symlink_to(root, target_is_directory=True)  # must not be walked forever
    (root / "a_latest").symlink_to(root / "t2", target_is_directory=True)  # within root: not a second run
    runs = runs_folder.collect(root)
    assert [r.name for r in runs.classifiers] == ["t2"] and runs.problems == []
    # a link that sorts before its folder hid the folder: T3's selected run went missing
    shutil.copytree(elsewhere / "t3", root / "t3_real")
    (root / "t3_best").symlink_to(root / "t3_real" / "reverse_plain", target_is_directory=True)
    (root / "t3_real" / "best").symlink_to(root / "t3_real" / "reverse_plain", target_is_directory=True)
    runs = runs_folder.collect(root)
    assert runs.problems == [] and runs_folder.choose_runs(runs).runs["t3"].name == "t3_real/reverse_plain"
    shutil.rmtree(root / "t3_real")
    (root / "t3_best").unlink()
    real_scandir = os.scandir
    def scandir(path="."):  # as a folder without read permission (root ignores chmod)
        if os.path.realpath(path) == str(elsewhere / "t3"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    (root / "t3").symlink_to(elsewhere / "t3", target_is_directory=True)
    assert runs_folder.collect(root).problems == [f"could not read {root / 't3'}: Permission denied"]


def test_a_placements_json_older_than_finished_runs_beside_it_is_a_named_problem(tmp_path):
    # A --placement all run killed after parallel_plain finished leaves the comparison of an
    # earlier command: its selection said nothing of the better run beside it.
    make_runs(tmp_path)
    write(tmp_path / "t3" / "parallel_plain" / "results.json",
          classifier("t3", "cubs_resnet18_parallel_plain", 0.9, 0.9, placement="parallel", variant="plain"))
    runs = runs_folder.collect(tmp_path)
    assert runs.problems == [f"{tmp_path / 't3' / 'placements.json'} does not compare the finished run(s) "
                             f"parallel_plain beside it, so its selection may be out of date: rerun "
                             f"t3_cubs.py (finished runs are not retrained) to redo the comparison"]
    c = json.loads((tmp_path / "t3" / "placements.json").read_text())  # listed as another recipe: known
    write(tmp_path / "t3" / "placements.json", {**c, "other_recipe": [{"run": "parallel_plain", "differences": []}]})
    assert runs_folder.collect(tmp_path).problems == []


def test_real_t3_runs_outrank_a_smoke_comparison(tmp_path):
    make_runs(tmp_path / "smoke")
    for path in (tmp_path / "smoke" / "t3").glob("*/results.json"):
        write(path, {**json.loads(path.read_text()), "args": {**ARGS, "smoke": True}})
    real = classifier("t3", "cubs_resnet18_serial_plain", 0.5, 0.5, placement="serial", variant="plain")
    write(tmp_path / "t3" / "serial_plain" / "results.json", real)  # killed before its comparison
    chosen = runs_folder.choose_runs(runs_folder.collect(tmp_path))
    assert chosen.runs["t3"].name == "t3/serial_plain" and chosen.placements is None
    (tmp_path / "t3" / "serial_plain" / "results.json").unlink()  # only smoke: its comparison
    chosen = runs_folder.choose_runs(runs_folder.collect(tmp_path))
    assert chosen.placements[0] == "smoke/t3" and chosen.runs["t3"].name == "smoke/t3/reverse_plain"


def test_archive_refuses_a_checkpoint_of_another_model_than_its_results_json(tmp_path):
    # T2's results.json copied into T1's folder: the zip paired T1's weights with T2's numbers.
    runs = tmp_path / "runs"
    write(runs / "t1" / "results.json", classifier("t2", "resnet18", 0.88, 0.8))
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 2, "meta": {"task": "t1", "model": "custom_cnn"}},
               runs / "t1" / "best.pt")
    with pytest.raises(archive.ArchiveError, match=re.escape(
            f"{runs / 't1' / 'best.pt'} is not the model of the results.json beside it (task 't1' in the "
            f"checkpoint, 't2' in results.json; model 'custom_cnn' in the checkpoint, 'resnet18' in results.json)")):
        archive.build_archive(runs, tmp_path / "REPORT.md", tmp_path / "A.zip")
    meta = {"task": "t2", "model": "resnet18", "num_classes": 5}
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 2, "meta": meta}, runs / "t1" / "best.pt")
    assert torch.load(io.BytesIO(archive.inference_bytes(runs / "t1" / "best.pt", 2, json.loads(
        (runs / "t1" / "results.json").read_text()))), weights_only=True)["meta"] == meta


def test_run_folders_with_spaces_and_parentheses_get_working_figure_links(tmp_path):
    # A ")" ended the link early and the archive called the report incomplete; a space made
    # no CommonMark link at all.
    make_runs(tmp_path)
    shutil.copytree(tmp_path / "t2", tmp_path / "t2 (lr 0.1)")
    out = report.build_report(tmp_path)
    links = check_figures(out.read_text(), out)
    assert "report_figures/t2__lr_0.1___curves.png" in links
    assert all(re.fullmatch(r"[A-Za-z0-9._/-]+", link) for link in links), links
    assert "t2__lr_0.1___curves.png" in [n for n, _ in archive.report_files(out)[2:] for n in [Path(n).name]]


def test_the_pdfs_figures_of_a_deleted_run_are_removed_and_its_note_names_no_t4_then(tmp_path, monkeypatch):
    monkeypatch.setattr(architecture, "forward_flops", lambda model, size: 1e9)  # layout only: fast
    make_runs(tmp_path)
    Image.new("RGB", (80, 40)).save(tmp_path / "t4" / "retrieval.png")  # the PDF copies it as a JPEG
    report.build_report(tmp_path)
    figures = tmp_path / "report_figures"
    assert {"pdf_t4_curves.png", "pdf_retrieval.jpg"} <= set(os.listdir(figures))
    shutil.rmtree(tmp_path / "t4")
    _, text = pdf_text(report.build_report(tmp_path).with_suffix(".pdf"))
    assert not {"pdf_t4_curves.png", "pdf_retrieval.jpg"} & set(os.listdir(figures))
    assert "pdf_classifier_curves.png" in os.listdir(figures)
    assert "T4 test" not in text and "of the best holdout epoch. Accuracies" in " ".join(text.split())


@pytest.mark.parametrize("flags, message", [
    (["--out", "{tmp}/R.pdf"], "error: --out {tmp}/R.pdf: expected the Markdown report's path, ending in .md"),
    (["--out", "{tmp}"], "error: --out {tmp}: expected the Markdown report's path, ending in .md"),
    (["--out", "{tmp}/d.md"], "error: --out {tmp}/d.md is a folder: give a file name in it, e.g. {tmp}/d.md/REPORT.md"),
    (["--archive", "{tmp}/A.tar"], "error: --archive {tmp}/A.tar: expected the zip's path, ending in .zip"),
    (["--archive", "{tmp}/d.zip"], "error: --archive {tmp}/d.zip is a folder: give a file name in it, e.g. {tmp}/d.zip/Assignment2.zip"),
    (["--archive", "{tmp}/runs/REPORT.md/x/A.zip", "--out", "{tmp}/runs/R.md"],
     "error: --archive {tmp}/runs/REPORT.md/x/A.zip: {tmp}/runs/REPORT.md is a file, so nothing can be written inside it"),
    (["--out", "{tmp}/runs/REPORT.md/R.md"],
     "error: --out {tmp}/runs/REPORT.md/R.md: {tmp}/runs/REPORT.md is a file, so nothing can be written inside it"),
])
def test_report_paths_that_cannot_work_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    # --out R.pdf wrote the Markdown and then the PDF to one file; a folder ended in IsADirectoryError.
    make_runs(tmp_path / "runs")
    (tmp_path / "d.md").mkdir()
    (tmp_path / "d.zip").mkdir()
    (tmp_path / "runs" / "REPORT.md").write_text("an earlier report")  # a file where a folder would go
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tmp_path / "runs"), *[f.format(tmp=tmp_path) for f in flags]])
    assert exit_.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["d.md", "d.zip", "runs"] and os.listdir(tmp_path / "d.md") == []
    assert (tmp_path / "runs" / "REPORT.md").read_text() == "an earlier report"
    assert not (tmp_path / "runs" / "REPORT.pdf").exists() and not (tmp_path / "runs" / "R.md").exists()


def test_a_runs_path_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "runs")])
    assert (f"error: {tmp_path / 'runs'} is a file: expected the runs folder the task scripts wrote into"
            in capsys.readouterr().err)


def test_a_report_that_cannot_be_written_is_one_error_line(tmp_path, monkeypatch):
    make_runs(tmp_path)
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "report_figures"))
    monkeypatch.setattr(report.Figures, "__init__", denied)  # as a read-only runs folder (root ignores chmod)
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tmp_path)])
    assert exit_.value.code == (f"error: permission denied: {tmp_path / 'report_figures'} (--out and "
                                f"--archive choose where the report and the archive are written)")


# ---------------------------------------------------------------- a task that ran but cannot be shown
def cut_short(path: Path, size: int) -> None:
    """The file's first `size` characters, as a copy from a cloud drive cut short leaves it
    (the scripts write results.json indented, "task" first)."""
    path.write_text(json.dumps(json.loads(path.read_text()), indent=2)[:size])


def test_an_unreadable_results_json_is_named_in_both_reports_and_refused_by_the_archive(tmp_path, capsys):
    # It read "not run yet", and --archive wrote a zip without T1 ("T1 not run"), exit 0.
    runs = tmp_path / "runs"
    write(runs / "t2" / "results.json", classifier("t2", "resnet18", 0.456789, 0.51234))
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 2}, runs / "t2" / "best.pt")
    write(runs / "t1" / "results.json", classifier("t1", "custom_cnn", 0.5, 0.5))
    write(runs / "t1" / "metrics.jsonl", history(3))
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 2}, runs / "t1" / "best.pt")
    cut_short(runs / "t1" / "results.json", 300)
    dest = tmp_path / "A.zip"
    with pytest.raises(SystemExit) as exit_:
        report.main([str(runs), "--archive", str(dest)])
    assert exit_.value.code == (f"error: T1's results {runs / 't1' / 'results.json'} cannot be read, so "
                                f"its model is not known (see the report's problems): rerun the task's "
                                f"command (a finished run is not retrained: it is tested again and "
                                f"results.json rewritten), or restore the file")
    assert not dest.exists() and not (runs / "REPORT.md").exists()  # refused before the report
    text = report.build_report(runs).read_text()
    status = {r["task"]: r for r in find_tables(text, "task", "status")[0]}
    assert (status["T1"]["status"], status["T1"]["results in"]) == ("unreadable results: t1/results.json", "`t1`")
    assert "- T1 custom CNN (Tiny ImageNet): **unreadable results: t1/results.json**" in text
    assert f"- could not read {runs / 't1' / 'results.json'}: " in text
    _, pdf = pdf_text(runs / "REPORT.pdf")
    pdf = " ".join(pdf.split())
    assert "T1 custom CNN: unreadable results: t1/results.json." in pdf  # the networks
    assert "T1 unreadable results: t1/results.json T2" in pdf  # the results table
    assert "T1: unreadable results: t1/results.json" in pdf  # under the curves
    assert "T1 not run yet" not in pdf and "T1 custom CNN: not run yet" not in pdf
    collected = runs_folder.collect(runs)
    assert collected.unreadable == [("t1", "t1")] and collected.unfinished == []
    assert runs_folder.choose_runs(collected).words("t1") == "unreadable results: t1/results.json"
    # A finished run of the same task beside it: shown, and the damaged one named beside it
    write(runs / "t1_b" / "results.json", classifier("t1", "custom_cnn", 0.25, 0.25))
    status = {r["task"]: r for r in find_tables(report.build_report(runs).read_text(), "task", "status")[0]}
    assert status["T1"]["status"] == "finished (1 run: real); unreadable results: t1/results.json"
    assert status["T1"]["results in"] == "`t1_b`, `t1`"


def test_an_unreadable_t3_run_the_comparison_selected_is_refused_by_the_archive(tmp_path):
    data = make_runs(tmp_path / "runs")
    runs = tmp_path / "runs"
    for folder in ("t2", "t3/serial_plain", "t3/reverse_plain", "t3/serial_plus", "t4/phase_b_ms"):
        write(runs / folder / "best.pt", b"checkpoint")
    selected = f"t3/{data['placements']['selected']['placement']}_{data['placements']['selected']['variant']}"
    cut_short(runs / selected / "results.json", 200)
    collected = runs_folder.collect(runs)
    with pytest.raises(archive.ArchiveError, match=re.escape(
            f"T3's results {runs / selected / 'results.json'} cannot be read, so its model is not known")):
        archive.check_runs(collected, allow_smoke=True)  # it warned "T3 not run" and wrote the zip
    assert collected.unreadable == [(selected, "t3")]
    assert runs_folder.task_note(collected, "t3") == f"unreadable results: {selected}/results.json"
    # deleted instead (no last.pt: no run at all there now): still no T3 model, still refused
    (runs / selected / "results.json").unlink()
    with pytest.raises(archive.ArchiveError, match=re.escape(
            f"T3's comparison {runs / 't3' / 'placements.json'} selects {selected}, which has no readable "
            f"results.json: rerun t3_cubs.py")):
        archive.check_runs(runs_folder.collect(runs), allow_smoke=True)


def test_a_comparison_of_a_run_that_is_no_longer_finished_is_a_named_problem(tmp_path):
    # serial_plain's results.json deleted, its last.pt kept: placements.json still showed it,
    # with no word.
    data = make_runs(tmp_path)
    assert data["placements"]["selected"]["placement"] != "serial"
    (tmp_path / "t3" / "serial_plain" / "results.json").unlink()
    write(tmp_path / "t3" / "serial_plain" / "last.pt", b"checkpoint")
    runs = runs_folder.collect(tmp_path)
    assert runs.problems == [f"{tmp_path / 't3' / 'placements.json'} compares t3/serial_plain, which no "
                             f"longer has a readable results.json, so its table and selection may be out "
                             f"of date: rerun t3_cubs.py (finished runs are not retrained) to redo the "
                             f"comparison"]
    assert runs_folder.task_note(runs, "t3") == "unfinished (3 epochs logged in t3/serial_plain)"
    # two such runs, one of them cut short
    cut_short(tmp_path / "t3" / "serial_plus" / "results.json", 100)
    assert f"{tmp_path / 't3' / 'placements.json'} compares t3/serial_plain, t3/serial_plus, which no " \
           f"longer have a readable results.json" in "\n".join(runs_folder.collect(tmp_path).problems)


@pytest.mark.parametrize("results, lacking", [
    ({"task": "t1"}, "test_acc (a number)"),
    ({"task": "t3", "test_acc": 0.5, "placement": "serial"}, "variant (a string)"),
    ({"task": "t4", "phase_a": {}, "phase_b": None}, "phase_b (an object)"),
    ({"task": "t2", "test_acc": "0.5"}, "test_acc (a number)"),
    ({"task": "t3"}, "test_acc (a number), placement (a string), variant (a string)"),
])
def test_a_results_json_without_the_keys_the_report_reads_is_a_named_problem(tmp_path, results, lacking):
    # {"task": "t1"} read as "finished (1 run: real)" with every figure n/a.
    task = results["task"]
    write(tmp_path / task / "results.json", results)
    runs = runs_folder.collect(tmp_path)
    assert runs.of_task(task) == [] and runs.unreadable == [(task, task)]
    assert runs.problems == [f"{tmp_path / task / 'results.json'} lacks {lacking}, which the report reads "
                             f"of a {task.upper()} run: not reported (a results.json cut short or of other "
                             f"code; rerun the task to rewrite it)"]
    status = {r["task"]: r["status"] for r in find_tables(report.build_report(tmp_path).read_text(), "task", "status")[0]}
    assert status[task.upper()] == f"unreadable results: {task}/results.json"


def test_the_task_of_a_run_folder_is_read_from_its_name_or_its_cut_short_text(tmp_path):
    assert [runs_folder.folder_task(n) for n in ("t1", "smoke/t2", "t3_full/reverse_plus", "serial_plain",
                                                 "t4/phase_a", "mine/phase_b_ms", "t2_old", ".")] == \
        ["t1", "t2", "t3", "t3", "t4", "t4", None, None]
    write(tmp_path / "a" / "results.json", '{\n  "task": "t4",\n  "placem')
    write(tmp_path / "t4" / "phase_a" / "last.pt", b"checkpoint")  # a part of that T4 run
    write(tmp_path / "b" / "results.json", '{"model": "resnet18", "te')
    runs = runs_folder.collect(tmp_path)
    assert runs.unreadable == [("a", "t4"), ("b", None)]
    assert runs.unfinished == [("t4/phase_a", [])]  # t4's own results.json is not there to claim it
    chosen = runs_folder.choose_runs(runs)
    assert chosen.words("t4") == "unreadable results: a/results.json; unfinished (0 epochs logged in t4/phase_a)"
    assert chosen.words("t1") == "not run yet"


def test_the_archive_warns_of_an_unfinished_task_by_what_it_has(tmp_path, capsys):
    runs = tmp_path / "runs"
    write(runs / "t2" / "results.json", classifier("t2", "resnet18", 0.456789, 0.51234))
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 2}, runs / "t2" / "best.pt")
    write(runs / "t1" / "metrics.jsonl", history(3))
    write(runs / "t1" / "last.pt", b"checkpoint")
    archive.build_archive(runs, report.build_report(runs), tmp_path / "A.zip")
    out = capsys.readouterr().out
    assert "warning: T1 unfinished (3 epochs logged in t1): no model of it in the archive" in out
    assert "warning: T3 not run: no model of it in the archive" in out


@pytest.mark.parametrize("name", ["..zip", "...zip", ".zip", " .zip"])
def test_an_archive_name_that_gives_no_folder_to_unzip_into_is_a_usage_error(tmp_path, capsys, name):
    # '..zip' gave a zip whose entries ('./README.md') unzip into the current folder;
    # '...zip' a traceback from write_zip.
    runs = tmp_path / "runs"
    write(runs / "t2" / "results.json", classifier("t2", "resnet18", 0.456789, 0.51234))
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 2}, runs / "t2" / "best.pt")
    dest = tmp_path / name
    with pytest.raises(SystemExit) as exit_:
        report.main([str(runs), "--archive", str(dest)])
    assert exit_.value.code == 2
    assert (f"error: --archive {dest}: expected a zip name that starts with the name of the folder to "
            f"put everything in, e.g. Assignment2.zip, not {name!r}") in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["runs"] and not (tmp_path / "runs" / "REPORT.md").exists()
    with pytest.raises(archive.ArchiveError, match="expected a zip name that starts with the name of the folder"):
        archive.build_archive(runs, runs / "REPORT.md", dest)
    assert archive.top_folder(tmp_path / "Assignment2.zip") == "Assignment2"
    assert archive.top_folder(tmp_path / "A2.v1.zip") == "A2.v1"


def test_a_run_folder_named_with_a_backslash_is_refused_before_the_report(tmp_path):
    # 'a\..\..\x' passed the '..' check (a Linux name of one part), and Windows extractors
    # split it: A/runs/a, .., .., x is outside A/. (A folder '..\x' is hidden: not read.)
    runs, folder = tmp_path / "runs", "a\\..\\..\\x"
    write(runs / folder / "results.json", classifier("t2", "resnet18", 0.456789, 0.51234))
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 2}, runs / folder / "best.pt")
    with pytest.raises(SystemExit) as exit_:
        report.main([str(runs), "--archive", str(tmp_path / "A.zip")])
    assert exit_.value.code == (f"error: archive names outside its folder: runs/{folder}/results.json, "
                                f"runs/{folder}/best.pt: rename the run folder (expected no '\\', no '..' "
                                f"part and no drive letter such as 'C:')")
    assert not (tmp_path / "A.zip").exists() and not (runs / "REPORT.md").exists()


def test_runs_in_folders_of_the_users_naming_are_named_by_what_they_wrote(tmp_path, capsys):
    # A killed T1 run in runs/t1_old read "not run yet", and a T4 run in runs/cars whose
    # results.json was emptied was taken for unfinished phases and left out of the archive.
    runs = tmp_path / "runs"
    write(runs / "t2" / "results.json", classifier("t2", "resnet18", 0.456789, 0.51234))
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 2}, runs / "t2" / "best.pt")
    write(runs / "t1_old" / "metrics.jsonl", history(2))
    torch.save({"model": {"w": torch.arange(3.0)}, "meta": {"task": "t1"}, "epoch": 2}, runs / "t1_old" / "last.pt")
    write(runs / "cars" / "results.json", "")
    write(runs / "cars" / "phase_a" / "metrics.jsonl", history(3))
    found = runs_folder.collect(runs)
    assert found.unreadable == [("cars", "t4")]
    assert runs_folder.task_note(found, "t1") == "unfinished (2 epochs logged in t1_old)"
    assert runs_folder.task_note(found, "t4") == "unreadable results: cars/results.json"
    with pytest.raises(archive.ArchiveError, match="T4's results .*cars/results.json cannot be read"):
        archive.build_archive(runs, report.build_report(runs), tmp_path / "A.zip")
