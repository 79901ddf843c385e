"""The submission archive: the code, the report and each task's best model in one zip.

    python -m common.report runs --archive Assignment2.zip [--allow-smoke]

Everything sits under one folder named after the zip (Assignment2/), so unzipping never
spills files into the current folder:
    <the code>                      the git-tracked files (`git ls-files`), or, where the code
                                    is not a git checkout, the package's source files
    REPORT.md, REPORT.pdf           and the figures REPORT.md links (report_figures/)
    runs/t1/best.pt, results.json   T1 (paths as in the runs folder)
    runs/t2/...                     T2
    runs/t3/placements.json         T3's comparison, and the selected placement's
    runs/t3/<placement>_<variant>/best.pt, results.json
    runs/t4/results.json, runs/t4/phase_b_<mining>/best.pt      T4 Phase B (the main mining)
Each best.pt in the zip is the inference part of the run's best.pt (checkpoint.inference_state:
weights, meta, epoch), about the size of the weights: `--evaluate` scores it to the same
figures as results.json, but a run cannot resume from it. The training best.pt in the runs
folder, with its optimizer and RNG state, is left as it is.
One run per task, chosen as REPORT.pdf chooses (runs_folder.choose_runs). The zip is written to
a temporary file next to the target and renamed into place, so an interrupted run never
leaves a half-written archive under the final name.

Refused (one `error:` line, exit status 1): smoke runs anywhere in the runs folder unless
--allow-smoke (they would be in the report too), a chosen run without its best.pt, a task
whose only results.json cannot be read (cut short, say), a T3 comparison whose selected run
has no readable results.json, no finished run at all, and a file name in the zip that an
extractor could put outside that folder (a run folder named `..\\x`). A zip name that gives
no folder to hold everything (`..zip`) raises ArchiveError too; the report command checks it,
with its other flags, as a usage error (exit status 2) before it writes anything. A task that
was not run, or whose runs are unfinished, is left out with a warning that says which.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import inference_state, load_checkpoint
from common.errors import UserError
from common.files import STALE_TEMP_S, atomic_file, remove_stale_temps
from common.runs_folder import Chosen, RunsFolder, choose_runs, collect, selected_folder

REPO = Path(__file__).resolve().parents[1]
# Where there is no git: files with these endings, outside these folders, are "the code".
CODE_SUFFIXES = {".py", ".md", ".txt", ".ipynb", ".sh", ".toml", ".cfg", ".ini", ".yml", ".yaml"}
SKIP_DIRS = {"runs", "data", "__pycache__", "venv", "env", "build", "dist"}
# Already compressed (or random-looking float weights): deflating them costs time for ~nothing.
STORED = {".pt", ".png", ".pdf", ".zip"}


class ArchiveError(UserError, ValueError):
    """The archive cannot be made as asked: smoke runs, a missing checkpoint, no runs."""


# ---------------------------------------------------------------- what goes in
def check_runs(runs: RunsFolder, allow_smoke: bool) -> None:
    """Refuse smoke runs (unless allowed), a runs folder without any finished run, a task
    whose model cannot be known (its_model_is_known) and a chosen run without its best.pt:
    before the report is built, which takes a while."""
    found = runs.classifiers + runs.retrievals
    if not found:
        raise ArchiveError(f"no finished run in {runs.root} (no results.json): nothing to hand in")
    smoke = [r.name for r in found if r.smoke]
    if smoke and not allow_smoke:
        raise ArchiveError(
            f"{runs.root} holds smoke runs (generated data, not results): {', '.join(smoke)}. "
            "Remove them (smoke runs live in runs/smoke), point at a folder without them, "
            "or pass --allow-smoke to include them anyway")
    chosen = choose_runs(runs)
    its_model_is_known(runs, chosen)
    files, _ = model_files(chosen)  # raises if a best.pt is missing
    outside = outside_names([name for name, *_ in files])
    if outside:  # a run folder's name is in them: say so before the report is built
        raise ArchiveError(f"archive names outside its folder: {', '.join(outside)}: rename the run "
                           f"folder (expected no '\\', no '..' part and no drive letter such as 'C:')")


def its_model_is_known(runs: RunsFolder, chosen: Chosen) -> None:
    """Refuse a task that ran but whose model cannot be shipped: without a finished run, its
    results.json cannot be read (cut short by a cloud drive, say; the archive would leave the
    task out as if it had not run), or T3's comparison selects a run without a readable one."""
    for task, run in chosen.runs.items():
        unreadable = runs.unreadable_of(task)
        if run is None and unreadable:
            files = ", ".join(str(runs.root / name / "results.json") for name in unreadable)
            raise ArchiveError(f"{task.upper()}'s results {files} cannot be read, so its model is not "
                               f"known (see the report's problems): rerun the task's command (a finished "
                               f"run is not retrained: it is tested again and results.json rewritten), or "
                               f"restore the file")
    selected = selected_folder(*chosen.placements) if chosen.placements else None
    if selected is not None and chosen.runs.get("t3") is None:
        raise ArchiveError(f"T3's comparison {runs.root / chosen.placements[0] / 'placements.json'} "
                           f"selects {selected}, which has no readable results.json: rerun t3_cubs.py "
                           f"(finished runs are not retrained) to redo the comparison")


def code_files(repo: Path = REPO, exclude: tuple[Path, ...] = ()) -> list[str]:
    """The code, as paths relative to `repo`: `git ls-files` where it works, else the
    package's source files (CODE_SUFFIXES outside SKIP_DIRS, hidden folders and `exclude`)."""
    try:
        proc = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True,
                              timeout=60)
        tracked = proc.stdout.decode().split("\0") if proc.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):  # no git installed
        tracked = []
    tracked = [n for n in tracked if n and (repo / n).is_file()]  # not deleted since the commit
    return sorted(tracked) if tracked else package_files(repo, exclude)


def untracked_files(repo: Path = REPO) -> list[str]:
    """Files git does not track and does not ignore: code a student forgot to `git add`,
    which `git ls-files` leaves out of the archive (empty where there is no git)."""
    try:
        proc = subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard"],
                              cwd=repo, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [n for n in proc.stdout.decode().split("\0") if n] if proc.returncode == 0 else []


def package_files(repo: Path, exclude: tuple[Path, ...] = ()) -> list[str]:
    skip = {p.resolve() for p in exclude}
    found = []
    for folder, dirs, files in os.walk(repo):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")
                   and not d.endswith(".egg-info") and (Path(folder) / d).resolve() not in skip]
        found += [(Path(folder) / f).relative_to(repo).as_posix() for f in files
                  if Path(f).suffix in CODE_SUFFIXES]
    return sorted(found)


def report_files(report_md: Path) -> list[tuple[str, Path]]:
    """REPORT.md, REPORT.pdf and the figures REPORT.md links, as (name in zip, file)."""
    base = report_md.parent
    files = [(report_md.name, report_md), (report_md.with_suffix(".pdf").name,
                                           report_md.with_suffix(".pdf"))]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_md.read_text())
    files += [(link, base / link) for link in dict.fromkeys(links)]
    missing = [str(path) for _, path in files if not path.is_file()]
    if missing:
        raise ArchiveError(f"the report is incomplete, missing: {', '.join(missing)}")
    return files


ModelFile = tuple[str, Path, int | None, dict | None]


def model_files(chosen: Chosen) -> tuple[list[ModelFile], list[str]]:
    """Each task's best checkpoint with its results.json, as (name in zip, file, and for a
    checkpoint the best epoch and the results.json it must agree with, else None, None),
    and one line per task saying what was taken (or that the task was not run)."""
    files, notes = [], []
    for task, run in chosen.runs.items():
        if run is None:  # unfinished, or not run at all (check_runs refused the other cases)
            notes.append(f"warning: {task.upper()} {chosen.missing.get(task, 'not run')}: no model of it "
                         f"in the archive")
            continue
        best = run.path / "best.pt"
        picked = run.label  # "(SMOKE)" after a smoke run's name
        if task == "t3" and chosen.placements is not None:
            name = chosen.placements[0]
            placements = run.path.parent / "placements.json"
            files.append((_in_runs(f"{name}/placements.json"), placements, None, None))
            picked += f" (selected in {name}/placements.json)"
        best_epoch = run.results.get("best_epoch")
        if task == "t4":
            mining = (run.results.get("phase_b") or {}).get("mining")
            best_epoch = (run.results.get("phase_b") or {}).get("best_epoch")
            best = run.path / f"phase_b_{mining}" / "best.pt"
            picked += f", Phase B ({mining} mining)"
        if not best.is_file():
            raise ArchiveError(f"{task.upper()}'s best model {best} not found: rerun the task "
                               "(it resumes), or remove the run folder")
        files += [(_in_runs(f"{run.name}/results.json"), run.path / "results.json", None, None),
                  (_in_runs(f"{run.name}/{best.relative_to(run.path).as_posix()}"), best, best_epoch,
                   run.results)]
        notes.append(f"{task.upper()}: {picked}")
    return files, notes


def inference_bytes(checkpoint: Path, best_epoch: int | None = None,
                    results: Mapping[str, Any] | None = None) -> bytes:
    """The archive's copy of a training checkpoint: its inference state, serialised as
    torch.save writes it (so it loads with weights_only=True like any other). best_epoch:
    the epoch the run's results.json reports for it; results: that results.json, whose
    task, model, placement and variant the checkpoint's meta must share. Either mismatch
    is refused, as the zip would pair those results with other weights."""
    state = inference_state(load_checkpoint(checkpoint))
    meta, results = state.get("meta") or {}, results or {}
    differ = [f"{k} {meta[k]!r} in the checkpoint, {results[k]!r} in results.json" for k in
              ("task", "model", "placement", "variant") if k in meta and k in results and meta[k] != results[k]]
    if differ:  # e.g. another task's results.json copied into this run's folder
        raise ArchiveError(f"{checkpoint} is not the model of the results.json beside it ({'; '.join(differ)}): "
                           f"put each run's files back in its own folder, or rerun the task")
    if best_epoch is not None and state.get("epoch") != best_epoch:
        raise ArchiveError(f"{checkpoint} holds epoch {state.get('epoch')}, but results.json beside "
                           f"it reports the best epoch {best_epoch}: the run was changed after it "
                           f"finished; rerun the task (it resumes) to make them agree")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _in_runs(name: str) -> str:
    """Where a file of the runs folder goes in the zip: runs/<path relative to the folder>."""
    return "runs/" + name.removeprefix("./")


# ---------------------------------------------------------------- writing and listing
# An entry's content: a file, or bytes made for the archive (the inference checkpoints).
Source = Path | bytes


def outside_names(names: list[str]) -> list[str]:
    """The names an extractor could put outside the zip's one folder: absolute ones, a '..'
    part, a backslash (Windows extractors split on it too: '..\\x' is '..' then 'x') and a
    drive letter ('C:', absolute on Windows)."""
    return [n for n in names if n.startswith("/") or "\\" in n or ".." in n.split("/")
            or any(re.match(r"[A-Za-z]:", part) for part in n.split("/"))]


def top_folder(dest: Path) -> str:
    """The one folder inside the zip: the zip's name without .zip (Assignment2.zip ->
    Assignment2). Refused where that is no folder of its own: '..zip' gives '.', which
    unzips into the current folder; '...zip' gives '..'; '.zip' a hidden one."""
    top = dest.stem
    if not top.strip() or top.startswith(".") or outside_names([top]):
        raise ArchiveError(f"expected a zip name that starts with the name of the folder to put "
                           f"everything in, e.g. Assignment2.zip, not {dest.name!r}")
    return top


def write_zip(entries: list[tuple[str, Source]], dest: Path) -> None:
    """Write `entries` to dest atomically: a temporary file next to it, then os.replace."""
    names = [name for name, _ in entries]
    # Every entry inside the zip's one folder (unzip would put it elsewhere).
    outside = outside_names(names)
    if outside:
        raise ArchiveError(f"archive names outside its folder: {', '.join(outside)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate names in the archive: {sorted({n for n in names if names.count(n) > 1})}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest.parent, [dest.name], STALE_TEMP_S)  # a killed earlier write's, as large as the zip
    with atomic_file(dest) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name, source in entries:
            kind = zipfile.ZIP_STORED if Path(name).suffix in STORED else zipfile.ZIP_DEFLATED
            if isinstance(source, bytes):
                zf.writestr(name, source, compress_type=kind)
            else:
                zf.write(source, name, compress_type=kind)


def fmt_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def contents(dest: Path) -> list[str]:
    """The table of contents of a zip: one line per file with its size, then the totals."""
    with zipfile.ZipFile(dest) as zf:
        infos = zf.infolist()
    lines = [f"{'size':>10}  name"] + [f"{fmt_size(i.file_size):>10}  {i.filename}" for i in infos]
    total = sum(i.file_size for i in infos)
    return lines + [f"{dest}: {len(infos)} files, {fmt_size(total)} unpacked, "
                    f"{fmt_size(dest.stat().st_size)} zipped"]


def build_archive(runs_dir: str | Path, report_md: str | Path, dest: str | Path,
                  allow_smoke: bool = False) -> Path:
    """Write the submission zip from the runs folder and the report written from it;
    prints what each task contributes and the table of contents."""
    runs_dir, report_md, dest = Path(runs_dir), Path(report_md), Path(dest)
    top = top_folder(dest)  # one folder inside the zip
    runs = collect(runs_dir)
    check_runs(runs, allow_smoke)
    models, notes = model_files(choose_runs(runs))
    notes += [f"warning: unfinished run {name} (no results.json) is not in the archive: rerun "
              f"its command to finish it" for name, _ in runs.unfinished]
    notes += [f"warning: {problem}" for problem in runs.problems]
    # The hand-in needs the model that gave the reported numbers, not the optimizer state
    # that resuming needs (half or more of a training checkpoint).
    models = [(n, inference_bytes(p, epoch, results) if p.suffix == ".pt" else p)
              for n, p, epoch, results in models]
    notes.append("each best.pt in the archive: weights, meta and epoch only (--evaluate reads "
                 "them); the training checkpoints in the runs folder keep what resuming needs")
    entries: dict[str, Source] = {f"{top}/{n}": REPO / n
                                  for n in code_files(REPO, exclude=(runs_dir,))}
    # The report and the models win over a code file of the same name (e.g. a REPORT.md
    # written into the repository root).
    entries.update({f"{top}/{n}": p for n, p in report_files(report_md) + models})
    write_zip(list(entries.items()), dest)
    forgotten = [n for n in untracked_files(REPO) if Path(n).suffix in CODE_SUFFIXES
                 and (REPO / n).resolve() != report_md.resolve()]
    if forgotten:
        notes.append(f"warning: {len(forgotten)} file(s) not tracked by git are not in the "
                     f"archive (git add them to include them): {', '.join(forgotten[:10])}"
                     + (" ..." if len(forgotten) > 10 else ""))
    print("\n".join(notes + contents(dest)))
    return dest
