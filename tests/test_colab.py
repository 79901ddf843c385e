"""colab.ipynb: valid nbformat-4 JSON without outputs, and every `!python ...` command in it
is accepted by the parser of the script (or module) it runs.

The scripts build their parser inside main(); the test captures it by replacing
`common.cli.parse` for one call, then parses the notebook's arguments with it, so unknown
flags, bad choices and bad types all fail here instead of on Colab.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from common import cli, report

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab.ipynb"


def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def python_commands() -> list[list[str]]:
    """Each `!python ...` line of the code cells, split like a shell would (without 'python')."""
    commands = []
    for cell in load_notebook()["cells"]:
        if cell["cell_type"] != "code":
            continue
        for line in source(cell).splitlines():
            line = line.strip()
            if line.startswith("!python "):
                commands.append(shlex.split(line[len("!python "):]))
    return commands


class _Captured(Exception):
    pass


def script_parser(script: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argparse parser `script`'s main() builds, without running anything else."""
    module = importlib.import_module(Path(script).stem)
    captured = {}

    def capture(parser: argparse.ArgumentParser, argv=None, smoke=None):
        captured["parser"] = parser
        raise _Captured

    with monkeypatch.context() as m:
        m.setattr(cli, "parse", capture)
        with pytest.raises(_Captured):
            module.main([])
    return captured["parser"]


def parser_for(command: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.ArgumentParser, list[str]]:
    if command[0] == "-m":
        assert command[1] == "common.report", f"unexpected module in the notebook: {command}"
        return report.build_parser(), command[2:]
    assert (ROOT / command[0]).is_file(), f"no script {command[0]}"
    return script_parser(command[0], monkeypatch), command[1:]


def test_notebook_is_nbformat4_json_without_outputs():
    nb = load_notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [c.get("id") for c in nb["cells"]]
    if nb["nbformat_minor"] >= 5:
        assert all(ids) and len(set(ids)) == len(ids)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], (str, list))
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
        else:
            assert "outputs" not in cell and "execution_count" not in cell


def test_notebook_runs_every_task_and_the_report():
    commands = [" ".join(c) for c in python_commands()]
    for expected in ("t1_custom_cnn.py", "t2_resnet18.py", "t3_cubs.py --placement all --variant both",
                     "t4_retrieval.py --data-dir data/cars196", "-m common.report runs"):
        assert expected in commands, f"missing cell: !python {expected}"
    text = "\n".join(source(c) for c in load_notebook()["cells"])
    assert "REPO_URL" in text and "pip install -q -r requirements.txt" in text
    assert "drive.mount" in text and "os.symlink(DRIVE_RUNS, \"runs\")" in text
    assert "runs/<task>/last.pt" in text  # the resume note
    assert "cars_annos.mat" in text and "devkit/cars_meta.mat" in text  # both Cars196 layouts


@pytest.mark.parametrize("command", python_commands(), ids=" ".join)
def test_every_command_line_is_accepted_by_its_parser(command, monkeypatch):
    if command[0] == "-c":  # inline Python: at least it must compile
        compile(command[1], "<notebook -c>", "exec")
        return
    parser, args = parser_for(command, monkeypatch)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"`python {' '.join(command)}` is rejected: {err.getvalue()}")


def test_a_wrong_flag_would_be_caught(monkeypatch):
    parser, _ = parser_for(["t3_cubs.py"], monkeypatch)
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        parser.parse_args(["--placements", "all"])


def test_the_wheel_gives_common_to_a_pasted_script_run_from_anywhere(tmp_path):
    # The Colab path in one cell: `pip install git+<repo>` builds this wheel; a task script
    # pasted elsewhere must then find every module it imports in the installed package.
    # Built from a copy of pyproject.toml + common/ (a build in the checkout leaves build/),
    # without build isolation (setuptools is installed; CI needs no download for it).
    import shutil
    import subprocess
    import sys
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "common", source / "common", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
                          str(source)], check=True, capture_output=True, timeout=300)
    wheels = list((tmp_path / "dist").glob("*.whl"))
    assert len(wheels) == 1
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheels[0])], check=True,
                   capture_output=True, timeout=300)
    assert not (target / "tests").exists() and (target / "common" / "cubs.py").is_file()
    pasted = tmp_path / "notebook" / "t3_cubs.py"
    pasted.parent.mkdir()
    shutil.copy(ROOT / "t3_cubs.py", pasted)
    probe = ("import runpy, sys; sys.argv = ['t3_cubs.py', '--help']\n"
             "try:\n    runpy.run_path('t3_cubs.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "import common; print(common.__file__); print('scipy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=pasted.parent, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "--placement" in done.stdout  # the script's own --help ran
    assert lines[-2].startswith(str(target))  # common came from the installed wheel
    assert lines[-1] == "False"  # scipy only where .mat files are read


@pytest.mark.parametrize("kind", ["flat", "top_folder", "mac_zip", "after_a_cut_unzip"])
def test_the_cars_cell_unzips_every_layout_into_the_folder_t4_reads(kind, tmp_path, monkeypatch):
    # The cell's own code on a generated Cars196 zip: flat, under one top folder, with the
    # __MACOSX folder a Mac adds, and with what a disconnect mid-unzip left behind.
    import os
    import zipfile

    from common.synthetic import make_cars196
    cell = next(source(c) for c in load_notebook()["cells"] if "CARS_ZIP =" in source(c))
    data = make_cars196(tmp_path / "gen", num_classes=4, per_class=8, image_size=(48, 40), seed=0)
    upload = tmp_path / "cars196.zip"
    with zipfile.ZipFile(upload, "w") as zf:
        for path in sorted(Path(data).rglob("*")):
            if path.is_file():
                name = path.relative_to(data)
                zf.write(path, str(name if kind == "flat" else Path("cars196") / name))
        if kind == "mac_zip":
            zf.writestr("__MACOSX/cars196/._cars_annos.mat", b"resource fork")
    work = tmp_path / "content"
    (work / "data").mkdir(parents=True)
    if kind == "after_a_cut_unzip":
        (work / "data" / "cars196.partial" / "car_ims").mkdir(parents=True)
    monkeypatch.chdir(work)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(cell.replace("/content/drive/MyDrive/cars196.zip", str(upload)), {"os": os})
    assert sorted(p.name for p in (work / "data").iterdir()) == ["cars196"]
    assert (work / "data" / "cars196" / "cars_annos.mat").is_file()
    assert "Cars196 (cars_annos layout): 6 train images, 16 test images" in printed.getvalue()  # 5 held out per class
    # T4's flag of the notebook, --data-dir data/cars196, reads the same folder
    from common.datasets import load_cars196
    assert len(load_cars196(work / "data" / "cars196").test.files) == 16


def test_the_report_cell_runs_after_a_disconnect_without_the_optional_cells(tmp_path, monkeypatch):
    """After a disconnect a user reruns the setup cell, then the report cell: it must not need
    a name that only an optional cell (the Cars196 unzip) imported."""
    import sys
    import types
    cell = next(source(c) for c in load_notebook()["cells"] if "runs/REPORT.md" in source(c)
                and c["cell_type"] == "code" and "display(" in source(c))
    shown = []
    display_module = types.ModuleType("IPython.display")
    display_module.Markdown, display_module.display = (lambda text: text), shown.append
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    monkeypatch.setitem(sys.modules, "IPython.display", display_module)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "REPORT.md").write_text("# Report\n")
    monkeypatch.chdir(tmp_path)
    exec(cell, {"os": os, "subprocess": subprocess})  # what the setup cell defines
    assert shown == ["# Report\n"]


def test_the_data_cells_end_in_a_message_not_a_traceback_when_a_dataset_is_missing(tmp_path, monkeypatch):
    # The Cars196 cell raised DatasetNotFoundError without an upload, which stops Colab's
    # "Run all" before T1-T3; the Tiny ImageNet cell printed a Python traceback.
    import sys
    cells = [source(c) for c in load_notebook()["cells"] if c["cell_type"] == "code"]
    tiny = next(shlex.split(c.strip()[len("!python "):]) for c in cells if "find_tiny_imagenet" in c)
    (tmp_path / "data").write_text("not a folder")  # refused before any download
    proc = subprocess.run([sys.executable, *tiny], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: --data-dir {tmp_path / 'data'} is a file")
    (tmp_path / "data").unlink()
    (tmp_path / "data").mkdir()
    cars = next(c for c in cells if "CARS_ZIP =" in c)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(cars.replace("/content/drive/MyDrive/cars196.zip", str(tmp_path / "none.zip")), {"os": os})
    assert printed.getvalue() == (f"no Cars196 yet: T4 needs it in data/cars196 (upload it as "
                                  f"{tmp_path / 'none.zip'} and rerun this cell)\n")


def test_the_install_cell_installs_everything_but_dali_when_dali_cannot_be_installed(tmp_path):
    # pip installs nothing of a requirements file when one line cannot be resolved: without
    # the fallback, a failed DALI install left reportlab, scipy, ... missing too.
    line = next(l.strip() for c in load_notebook()["cells"] if c["cell_type"] == "code"
                for l in source(c).splitlines() if "pip install -q -r requirements.txt" in l)
    fallback = line.split(" || ", 1)[1].strip("()")
    grep = fallback.split(" && ")[0].replace("/tmp/requirements-no-dali.txt", str(tmp_path / "r.txt"))
    subprocess.run(grep, shell=True, cwd=ROOT, check=True)
    kept = (tmp_path / "r.txt").read_text().splitlines()
    wanted = (ROOT / "requirements.txt").read_text().splitlines()
    assert kept == [l for l in wanted if not l.startswith("nvidia-dali")] and len(kept) == len(wanted) - 1
    assert fallback.endswith("pip install -q -r /tmp/requirements-no-dali.txt")


def _cell(marker: str) -> str:
    return next(source(c) for c in load_notebook()["cells"] if c["cell_type"] == "code" and marker in source(c))


def test_the_cars_cell_names_a_zip_in_another_layout_and_unzips_the_corrected_one(tmp_path, monkeypatch):
    # A zip of images without annotations stopped "Run all" with a traceback, and the folder
    # it left made every rerun skip the unzip, so a corrected zip was never read.
    import zipfile

    from common.synthetic import make_cars196
    cell = _cell("CARS_ZIP =")
    data = make_cars196(tmp_path / "gen", num_classes=4, per_class=8, image_size=(48, 40), seed=0)
    upload = tmp_path / "cars196.zip"
    with zipfile.ZipFile(upload, "w") as zf:  # the images only
        for path in sorted((Path(data) / "car_ims").iterdir()):
            zf.write(path, f"car_ims/{path.name}")
    (tmp_path / "content" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "content")

    def run_cell() -> str:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(cell.replace("/content/drive/MyDrive/cars196.zip", str(upload)), {"os": os})
        return printed.getvalue()

    first = run_cell()
    assert first.startswith("Cars196 is not usable yet: ") and "cars_annos.mat" in first
    assert "(removed data/cars196, unzipped from" in first
    assert not Path("data/cars196").exists() and not Path("data/cars196.partial").exists()
    with zipfile.ZipFile(upload, "w") as zf:  # the corrected upload
        for path in sorted(Path(data).rglob("*")):
            if path.is_file():
                zf.write(path, str(path.relative_to(data)))
    assert "Cars196 (cars_annos layout): 6 train images, 16 test images" in run_cell()


def test_the_drive_cell_links_runs_and_refuses_a_runs_folder_on_the_vm_disk(tmp_path, monkeypatch):
    import sys
    import types
    cell = _cell("DRIVE_RUNS =").replace("/content/drive/MyDrive/cv-project/runs", str(tmp_path / "drive" / "runs"))
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=lambda path: None)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(cell, {"os": os})
    assert os.readlink("runs") == str(tmp_path / "drive" / "runs")
    assert printed.getvalue().startswith("Drive: ") and " GB free" in printed.getvalue()
    os.remove("runs")
    Path("runs").mkdir()  # a run started before the Drive cell: its checkpoints are on the VM
    with pytest.raises(SystemExit, match="runs/ already exists as a folder on the VM disk"):
        exec(cell, {"os": os})


def test_the_install_cell_stops_a_runtime_without_a_gpu(monkeypatch):
    import torch
    cell = _cell("pip install -q -r requirements.txt")
    assert cell.index("torch.cuda.is_available()") < cell.index("!pip install")  # before installing anything
    python_lines = "\n".join(l for l in _cell("pip install -q -r requirements.txt").splitlines()
                             if not l.startswith("!"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no GPU in this runtime: Runtime > Change runtime type > GPU"):
        exec(python_lines, {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    exec(python_lines, {})
