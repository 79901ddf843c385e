"""The runs folder as the task scripts left it, read once for REPORT.md, REPORT.pdf and the
submission archive: every finished run (a results.json with its metrics.jsonl), every
unfinished one (metrics.jsonl or last.pt, no results.json), every results.json that cannot
be used (cut short, not UTF-8 JSON, lacking the keys the report reads), every
placements.json, and the one run per task that REPORT.pdf shows and the archive ships
(choose_runs).

    runs = collect("runs")       # RunsFolder: classifiers, retrievals, placements, unfinished, unreadable
    chosen = choose_runs(runs)   # Chosen: runs["t1"] ... runs["t4"], T3's placements.json

Also the words both reports use for a task (TASKS), a task without a finished run (NOT_RUN,
or task_note: its unreadable results and unfinished runs) and a smoke run (SMOKE_BANNER), so
REPORT.md and REPORT.pdf say the same.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.files import file_sha256
from common.placements import RUN_FOLDERS, select
from common.schema import ClassifierResults, RetrievalResults

SMOKE_BANNER = "smoke run on generated data, not a real result"
NOT_RUN = "not run yet"
SKIP_DIRS = {"smoke_data", "report_figures", "__pycache__"}
TASKS = {"t1": "T1 custom CNN (Tiny ImageNet)", "t2": "T2 ResNet-18 (Tiny ImageNet)",
         "t3": "T3 CUBS-ResNet-18 placements (Tiny ImageNet)",
         "t4": "T4 Cars196 retrieval (Multi-Similarity loss)"}
# What both reports read of a task's results.json, and its type: without them every figure
# of the run would read n/a, so such a file (cut short, or of other code) is no finished run.
_NUMBER, _TEXT, _OBJECT = ((int, float), "a number"), (str, "a string"), (dict, "an object")
NEEDED_KEYS: dict[str, dict[str, tuple[type | tuple[type, ...], str]]] = {
    "t1": {"test_acc": _NUMBER}, "t2": {"test_acc": _NUMBER},
    "t3": {"test_acc": _NUMBER, "placement": _TEXT, "variant": _TEXT},
    "t4": {"phase_a": _OBJECT, "phase_b": _OBJECT}}


# ---------------------------------------------------------------- reading
@dataclass
class Run:
    """One folder holding a results.json (T1/T2/T3 classifier run or a whole T4 run)."""
    path: Path
    name: str  # path relative to the runs folder, with '/'
    results: ClassifierResults | RetrievalResults  # as read: a run of older code may lack keys
    history: list[dict] = field(default_factory=list)  # metrics.jsonl of this folder
    phases: dict[str, list[dict]] = field(default_factory=dict)  # T4: phase_a, phase_b_<m>

    @property
    def task(self) -> str:
        return str(self.results.get("task", "?"))

    @property
    def args(self) -> dict:
        return self.results.get("args") or {}

    @property
    def loss_recipe(self) -> tuple[float, int | None]:
        """(label smoothing, number of classes) of a classifier run: what its train loss's
        floor depends on (plots.smoothed_loss_note)."""
        return float(self.results.get("label_smoothing") or 0.0), self.results.get("num_classes")

    @property
    def smoke(self) -> bool:
        return bool(self.args.get("smoke"))

    @property
    def label(self) -> str:
        return f"{self.name} (SMOKE)" if self.smoke else self.name


@dataclass
class RunsFolder:
    """Everything collect() found under `root`, and what it could not read (`problems`)."""
    root: Path
    classifiers: list[Run] = field(default_factory=list)
    retrievals: list[Run] = field(default_factory=list)
    placements: list[tuple[str, dict]] = field(default_factory=list)  # (folder name, json)
    unfinished: list[tuple[str, list[dict]]] = field(default_factory=list)
    # (folder name, its task or None): a results.json that could not be used (named in problems)
    unreadable: list[tuple[str, str | None]] = field(default_factory=list)
    unfinished_tasks: dict[str, str | None] = field(default_factory=dict)  # folder name -> run_task
    problems: list[str] = field(default_factory=list)

    def of_task(self, task: str) -> list[Run]:
        return [r for r in self.classifiers + self.retrievals if r.task == task]

    def unreadable_of(self, task: str) -> list[str]:
        """The folders whose results.json of `task` could not be used."""
        return [name for name, of in self.unreadable if of == task]

    def unfinished_of(self, task: str) -> list[tuple[str, list[dict]]]:
        """The unfinished runs of `task` (by run_task: the folder's name, else its last.pt)."""
        return [(name, history) for name, history in self.unfinished if self.unfinished_tasks.get(name) == task]

    def run_at(self, name: str) -> Run | None:
        """The run whose folder is `name` (relative to the runs folder), if any."""
        return next((r for r in self.classifiers + self.retrievals if r.name == name), None)

    def placement_runs(self, name: str) -> list[Run]:
        """The T3 runs next to the placements.json in folder `name` (in the runs root, that
        holds T1 and T2's folders too)."""
        return [r for r in self.classifiers if r.path.parent == self.root / name and r.task == "t3"]


def read_json_object(path: Path, problems: list[str], what: str) -> dict | None:
    """The JSON object in `path`, or None with a line in `problems`: unreadable, not UTF-8,
    not JSON, or JSON but not an object (`what` says what it should be)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError and UnicodeDecodeError
        problems.append(f"could not read {path}: {err}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path} is not {what} (a JSON object): not reported")
        return None
    return data


def read_jsonl(path: Path, problems: list[str]) -> list[dict]:
    """The records (JSON objects, one a line) of `path`. A line that is not one, such as the
    half-written last line of a killed run, is left out and named in `problems`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as err:
        problems.append(f"could not read {path}: {err}")
        return []
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            bad.append(f"line {number} ({err.msg if isinstance(err, json.JSONDecodeError) else err})")
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(f"line {number} (a JSON {type(record).__name__}, not an object)")
    if bad:
        problems.append(f"left out of {path}: {', '.join(bad)}")
    return records


def rel_name(path: Path, root: Path) -> str:
    name = path.relative_to(root).as_posix()
    return "." if name in ("", ".") else name


def walk(root: Path, problems: list[str]) -> Iterable[tuple[Path, set[str]]]:
    """(folder, file names) for every folder under root, skipping generated data. A link to
    a folder outside root is followed (a run kept on another drive), each real folder once;
    a link within root is not (its folder is read under its own name, not as "latest" or
    "best"). A folder that cannot be listed is named in `problems`, not passed over."""
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True,
                                       onerror=lambda err: problems.append(f"could not read {err.filename}: "
                                                                           f"{err.strerror}")):
        real = os.path.realpath(folder)
        if real in seen:  # two links to one folder outside root
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")
                         and not _link_within(os.path.join(folder, d), root))
        yield Path(folder), set(files)


def _link_within(path: str, root: Path) -> bool:
    """Whether `path` is a link to a folder in `root` (or to root): its next step, or where
    it ends, lies there (runs/latest -> t2, or -> /content/drive/.../runs/t2 when runs/ is
    itself a link to that Drive folder)."""
    if not os.path.islink(path):
        return False
    step = os.path.abspath(os.path.join(os.path.dirname(path), os.readlink(path)))
    return any((target + os.sep).startswith(base + os.sep) for target, base in (
        (step, os.path.abspath(root)), (os.path.realpath(path), os.path.realpath(root))))


def collect(root: str | Path) -> RunsFolder:
    """Read every results.json / metrics.jsonl / placements.json under `root`."""
    root = Path(root)
    found = RunsFolder(root)
    if not root.is_dir():
        return found
    folders = list(walk(root, found.problems))
    t4_dirs = set()
    for folder, files in folders:
        name = rel_name(folder, root)
        if "placements.json" in files:
            data = read_json_object(folder / "placements.json", found.problems, "T3's comparison")
            if data is not None:
                found.placements.append((name, data))
        if "results.json" not in files:
            continue
        run = read_run(folder, name, found)
        if run is None:  # named in found.unreadable
            if found.unreadable[-1][1] == "t4":
                t4_dirs.add(folder)  # its phase folders are parts of that run, not runs of their own
            continue
        if "metrics.jsonl" in files:
            run.history = read_jsonl(folder / "metrics.jsonl", found.problems)
        if run.task == "t4":
            t4_dirs.add(folder)
            read_phases(run, found)
            check_t4_start(run, found)
            found.retrievals.append(run)
        else:
            found.classifiers.append(run)
    for folder, files in folders:  # a run stopped in its first epoch has a last.pt, no metrics yet
        if {"metrics.jsonl", "last.pt"} & files and "results.json" not in files and folder.parent not in t4_dirs:
            name = rel_name(folder, root)
            found.unfinished.append((name, read_jsonl(folder / "metrics.jsonl", found.problems)
                                     if "metrics.jsonl" in files else []))
            found.unfinished_tasks[name] = run_task(folder, name)
    for name, data in found.placements:
        check_comparison(found, name, data)
    found.classifiers.sort(key=lambda r: (r.task, r.name))
    found.retrievals.sort(key=lambda r: r.name)
    return found


def read_run(folder: Path, name: str, found: RunsFolder) -> Run | None:
    """The run in `folder` (named `name`), or None with a line in found.problems and the folder
    in found.unreadable: a results.json that is not a task script's, or lacks what the report
    reads (NEEDED_KEYS), is no finished run, but no "not run yet" either."""
    path = folder / "results.json"
    results = read_json_object(path, found.problems, "the results of a task script")
    if results is None:  # cut short (a copy from a cloud drive, say): its first key may have survived
        found.unreadable.append((name, task_in_text(path) or run_task(folder, name)))
        return None
    task = results.get("task")
    if task not in TASKS:
        found.problems.append(f"{path} is not the results of a task script (a JSON object whose "
                              f"\"task\" is one of {', '.join(TASKS)}): not reported")
        found.unreadable.append((name, run_task(folder, name)))
        return None
    lacking = [f"{key} ({words})" for key, (kind, words) in NEEDED_KEYS[task].items()
               if not isinstance(results.get(key), kind)]
    if lacking:
        found.problems.append(f"{path} lacks {', '.join(lacking)}, which the report reads of a "
                              f"{task.upper()} run: not reported (a results.json cut short or of other "
                              f"code; rerun the task to rewrite it)")
        found.unreadable.append((name, task))
        return None
    return Run(folder, name, results)


def read_phases(run: Run, found: RunsFolder) -> None:
    """A T4 run's phase curves (phase_*/metrics.jsonl) that its results.json reports."""
    for sub in sorted(run.path.glob("phase_*/metrics.jsonl")):
        if sub.parent.name in reported_phases(run.results):
            run.phases[sub.parent.name] = read_jsonl(sub, found.problems)
        else:  # an older --compare-mining, or one cut short: its curve is no result
            found.problems.append(f"{rel_name(sub.parent, found.root)} is not in {run.name}/results.json: "
                                  f"not reported (rerun t4_retrieval.py with that --mining or "
                                  f"--compare-mining to report it)")


def check_t4_start(run: Run, found: RunsFolder) -> None:
    """Name in found.problems a T4 run whose starting weights (--init t3: T3's best.pt, by
    its path as T4 read it, relative to where T4 ran) are no longer in that file: T3 trained
    again, so the report and the archive would pair T4 with a T3 run it did not start from.
    A file no longer there (or T4 run elsewhere) is not checked."""
    source, digest = run.results.get("init_source"), run.results.get("init_sha256")
    if run.results.get("init") != "t3" or not source or not digest or not Path(source).is_file():
        return
    if file_sha256(source) != digest:
        found.problems.append(f"{run.name}/results.json: T4 started from {source}, which holds other "
                              f"weights now (T3 trained again since): rerun t4_retrieval.py with --fresh "
                              f"to train T4 from them, else T4's figures are of a T3 run no longer there")


def task_in_text(path: Path) -> str | None:
    """The task a results.json names in its text, read even where it is cut short: the task
    scripts write "task" first."""
    try:
        head = path.read_bytes()[:4096].decode("utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r'"task"\s*:\s*"(t[1-4])"', head)
    return match.group(1) if match else None


def run_task(folder: Path, name: str) -> str | None:
    """The task of the run in `folder` (named `name`) whose results.json is missing or cannot
    be used: by the folder's name (folder_task), else by its phase folders (T4's), else by the
    meta of its last.pt (a run in a folder of the user's naming)."""
    if folder_task(name):
        return folder_task(name)
    if any(folder.glob("phase_*")):
        return "t4"
    return checkpoint_task(folder / "last.pt")


def checkpoint_task(path: Path) -> str | None:
    """The task a checkpoint's meta names, or None (no file, not a checkpoint). The tensors
    are memory-mapped, not read: a report reads the meta alone."""
    import torch  # here only: nothing else of the runs folder needs torch
    if not path.is_file():
        return None
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("meta")
    except Exception:  # noqa: BLE001 - a damaged file has no task to tell; resume names the damage
        return None
    task = meta.get("task") if isinstance(meta, dict) else None
    return task if task in TASKS else None


def folder_task(name: str) -> str | None:
    """The task of a run folder by its name, as the scripts name their folders: t1 ... t4
    (runs/t1, runs/smoke/t1, T4's t4/phase_a), T3's <placement>_<variant>, T4's phase_a and
    phase_b_<mining>; the innermost such part decides. None for another name (t2_old)."""
    for part in reversed(name.split("/")):
        if part in TASKS:
            return part
        if part in RUN_FOLDERS:
            return "t3"
        if part == "phase_a" or part.startswith("phase_b_"):
            return "t4"
    return None


def check_comparison(found: RunsFolder, name: str, data: dict) -> None:
    """Name in found.problems what makes the placements.json in folder `name` out of date:
    the run it selects, or one it compares, has no readable results.json (deleted, cut short,
    unfinished again), or a finished run beside it is not compared. The comparison was
    written after its runs, from their results.json."""
    file = found.root / name / "placements.json"
    redo = "rerun t3_cubs.py (finished runs are not retrained) to redo the comparison"
    selected = selected_folder(name, data)
    if selected is not None and found.run_at(selected) is None:
        found.problems.append(f"{file} selects {selected}, which has no readable results.json: {redo}")
    gone = [folder for folder in compared(name, data)
            if folder != selected and found.run_at(folder) is None]
    if gone:  # shown in its table as if finished
        found.problems.append(f"{file} compares {', '.join(gone)}, which no longer ha"
                              f"{'s' if len(gone) == 1 else 've'} a readable results.json, so its "
                              f"table and selection may be out of date: {redo}")
    missing = not_compared(found, name, data)
    if missing:  # e.g. --placement all killed after a --placement serial comparison
        found.problems.append(f"{file} does not compare the finished run(s) {', '.join(missing)} "
                              f"beside it, so its selection may be out of date: {redo}")


def compared(name: str, placements: dict) -> list[str]:
    """The runs the placements.json in folder `name` compares ("runs"), as run names of the
    runs folder (as selected_folder gives them)."""
    folders = [f"{r.get('placement')}_{r.get('variant')}" for r in placements.get("runs") or []
               if isinstance(r, dict)]
    return [folder if name == "." else f"{name}/{folder}" for folder in folders]


def not_compared(found: RunsFolder, name: str, placements: dict) -> list[str]:
    """The finished T3 runs beside the placements.json in folder `name` that it neither
    compares ("runs") nor lists as of another recipe ("other_recipe")."""
    listed = {f"{r.get('placement')}_{r.get('variant')}" for r in placements.get("runs") or []
              if isinstance(r, dict)}
    listed |= {r.get("run") for r in placements.get("other_recipe") or [] if isinstance(r, dict)}
    return [r.path.name for r in found.placement_runs(name)
            if r.path.name in RUN_FOLDERS and r.path.name not in listed]


def reported_phases(results: dict) -> set[str]:
    """The phase folders a T4 results.json reports: phase_a and phase_b_<mining> of each
    Phase B run in it (the mining comparison, else the one Phase B)."""
    runs = results.get("mining_comparison") or [results.get("phase_b")]
    return {"phase_a"} | {f"phase_b_{r.get('mining')}" for r in runs if isinstance(r, dict)}


def selected_folder(name: str, placements: dict) -> str | None:
    """The run a placements.json in folder `name` selects ("selected", else "best_overall"),
    as a run name of the runs folder; None if it selects none."""
    pick = placements.get("selected") or placements.get("best_overall")
    if not pick:
        return None
    folder = f"{pick.get('placement')}_{pick.get('variant')}"
    return folder if name == "." else f"{name}/{folder}"


# ---------------------------------------------------------------- a task without a finished run
def task_note(runs: RunsFolder, task: str) -> str:
    """What both reports say of `task` beside its finished runs, or instead of them: its
    results.json that could not be used and its unfinished runs; "" if it has neither (a
    task with no finished run and no note reads NOT_RUN)."""
    parts = []
    unreadable = runs.unreadable_of(task)
    if unreadable:
        parts.append("unreadable results: " + ", ".join(
            "results.json" if name == "." else f"{name}/results.json" for name in unreadable))
    unfinished = runs.unfinished_of(task)
    if unfinished:
        parts.append("unfinished (" + ", ".join(
            f"{len(h)} epoch{'s' * (len(h) != 1)} logged in {name}" for name, h in unfinished) + ")")
    return "; ".join(parts)


# ---------------------------------------------------------------- choosing one run per task
@dataclass
class Chosen:
    """One run per task: what REPORT.pdf shows and what the archive ships.

    runs["t3"] is the run of the placement that T3 selected (placements.json "selected",
    by holdout accuracy); `placements` is that comparison as (folder name, placements.json).
    A task that has no finished run maps to None, and `missing` says why (task_note).
    """
    runs: dict[str, Run | None]
    placements: tuple[str, dict] | None
    missing: dict[str, str] = field(default_factory=dict)  # task -> task_note, where it has one

    def words(self, task: str) -> str:
        """What to say of a task without a chosen run: its unreadable results or unfinished
        runs, else NOT_RUN."""
        return self.missing.get(task) or NOT_RUN


def _preference(smoke: bool, name: str, task: str) -> tuple:
    """Sort key: real runs before smoke runs, then the script's default folder (`t1`, ...),
    then the shallowest, then by name (so the choice never depends on the file system)."""
    return smoke, name != task, name.count("/"), name


def choose_runs(runs: RunsFolder) -> Chosen:
    """Pick the run per task that the two-page report and the archive present."""
    chosen: dict[str, Run | None] = {}
    for task in ("t1", "t2", "t4"):
        found = runs.of_task(task)
        chosen[task] = min(found, key=lambda r: _preference(r.smoke, r.name, task), default=None)
    placements = min(runs.placements, default=None, key=lambda p: _preference(
        any(r.smoke for r in runs.placement_runs(p[0])), p[0], "t3"))
    if placements is not None and any(r.smoke for r in runs.placement_runs(placements[0])) \
            and any(not r.smoke for r in runs.of_task("t3")):
        placements = None  # a smoke comparison does not outrank real T3 runs not yet compared
    chosen["t3"] = None
    if placements is not None:
        selected = selected_folder(*placements)
        chosen["t3"] = runs.run_at(selected) if selected is not None else None
    elif runs.of_task("t3"):  # t3_cubs.py writes placements.json after its last run
        # As the comparison will select (placements.select) among the runs of the preferred
        # folder; with no plain run, its best overall (as selected_folder falls back to).
        folder = lambda r: r.name.rpartition("/")[0] or "."  # noqa: E731 (the placements' folder)
        first = min(runs.of_task("t3"), key=lambda r: _preference(r.smoke, folder(r), "t3"))
        same_folder = [r for r in runs.of_task("t3") if folder(r) == folder(first)]
        selected, best_overall = select([r.results for r in same_folder])
        chosen["t3"] = next(r for r in same_folder if r.results is (selected or best_overall))
    missing = {t: task_note(runs, t) for t in TASKS if chosen[t] is None and task_note(runs, t)}
    selected = selected_folder(*placements) if placements is not None else None
    if chosen["t3"] is None and selected is not None:  # T3 finished runs; the one it chose is gone
        missing["t3"] = "; ".join(filter(None, (f"selected run missing: {selected}", missing.get("t3"))))
    return Chosen({t: chosen[t] for t in TASKS}, placements, missing)
