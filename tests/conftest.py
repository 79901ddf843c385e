"""Shared test setup: the repository root on sys.path (so plain `pytest` finds `common`), and
the session fixture `runs` holding the four scripts' smoke runs."""

import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import contextlib  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(_REPO_ROOT)

# README's command runs the suite in two pytest-xdist workers (`-n 2 --dist loadgroup`), one
# per core of a 2-core CI machine: each worker, and every script it starts, computes on one
# thread, so that the two never fight over the cores (two threads each made the suite slower).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The garbage collector off across a fork, and so in the forked child (a DataLoader worker):
# a test process holds DALI pipelines that earlier tests dropped in reference cycles, and
# the child's first collection (in threading's after-fork hook) ran one's __del__, whose
# shutdown waits forever for threads that do not exist in the child: the worker hung and
# the test with it (seen on 2026-12-07 in test_corrupt_jpeg_torch_workers_still_value_error,
# on a loaded machine). The scripts never fork with DALI pipelines about (a run's loaders
# share one backend), so this is the tests' own mix.
_gc_was_enabled = []
os.register_at_fork(before=lambda: _gc_was_enabled.append(gc.isenabled()) or gc.disable(),
                    after_in_parent=lambda: gc.enable() if _gc_was_enabled.pop() else None)


def run_script(script: str, *args: str, timeout: int = 900, check: bool = True,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a task script as a user would (a subprocess in the repository root); `env`: extra
    environment variables."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, timeout=timeout,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# The environment of the T1 smoke run below: one thread (a CPU sums in another order with
# another thread count, so a test reproducing its figures to the last digit uses it too).
T1_ENV = {"OMP_NUM_THREADS": "1"}


def say(config: pytest.Config, text: str) -> None:
    """One line on the terminal now, under -q too: the session fixture trains for minutes, and
    a silent suite looks hung. Capturing is suspended for it (pytest captures file
    descriptor 1 itself while a fixture is set up, so a plain write would be swallowed)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            if reporter._tw.width_of_current_line:  # after -q's dots: a line of its own
                reporter.write("\n")
            reporter.write_line(text)
        else:  # -p no:terminal
            print(text, file=sys.__stderr__, flush=True)


def claim_smoke_runs(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Under `--dist loadgroup`, a second worker that starts the smoke runs fails at once (it
    would train them again, minutes on a 2-core machine): one of its tests uses `runs`
    outside the xdist group "smoke_runs" (pytest_collection_modifyitems below). Other
    --dist modes ignore groups: each worker that needs the runs trains its own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    # A worker's own --dist is "no"; xdist sets option.loadgroup from the controller's.
    if worker is None or not getattr(config.option, "loadgroup", False):
        return
    claim = tmp_path_factory.getbasetemp().parent / "smoke_runs.worker"  # shared by the workers
    try:
        with open(claim, "x") as f:
            f.write(worker)
    except FileExistsError:
        raise AssertionError(f"xdist worker {worker} was asked for the smoke runs that worker "
                             f"{claim.read_text()} trains: the test asking is not in the xdist "
                             f"group 'smoke_runs' (tests/conftest.py)") from None


@pytest.fixture(scope="session")
def runs(tmp_path_factory, request) -> Path:
    """The four smoke runs, once per session: T2 first (T3 compares with it), T3 before T4
    (T4 reads T3's selection; 2 epochs per placement are enough for what the tests check of
    it, and T4's thresholds were measured from such a run). T1 depends on none of them: it
    runs beside that chain, on one thread. Under `-n 2`, one worker trains them and runs
    every test that uses them (pytest_collection_modifyitems below)."""
    claim_smoke_runs(request.config, tmp_path_factory)
    runs = tmp_path_factory.mktemp("runs")
    start = time.monotonic()

    def step(text: str) -> None:
        say(request.config, f"[smoke runs for the tests, {time.monotonic() - start:4.0f} s] {text}")

    step(f"training T1 (beside the others) and T2 -> T3 (3 placements) -> T4 into {runs}; "
         "about 3 minutes on 2 cores")
    t1 = subprocess.Popen([sys.executable, str(ROOT / "t1_custom_cnn.py"), "--smoke", "--out", str(runs / "t1")],
                          cwd=ROOT, env={**os.environ, **T1_ENV},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_script("t2_resnet18.py", "--smoke", "--out", str(runs / "t2"))
        step("T2 done; training T3 --placement all")
        run_script("t3_cubs.py", "--smoke", "--placement", "all", "--epochs", "2",
                   "--out", str(runs / "t3"), "--vanilla-results", str(runs / "t2" / "results.json"))
        step("T3 done; training T4 (Phase A, then Phase B with each mining)")
        run_script("t4_retrieval.py", "--smoke", "--out", str(runs / "t4"),
                   "--t3-results", str(runs / "t3" / "placements.json"))
        step("T4 done; waiting for T1")
        output, _ = t1.communicate(timeout=900)
    finally:
        if t1.poll() is None:
            t1.kill()
    if t1.returncode != 0:
        raise AssertionError(f"t1_custom_cnn.py --smoke failed ({t1.returncode}):\n{output[-3000:]}")
    step("all four done")
    return runs


def fit(model, loader, evaluate, cfg, out, rt, meta, loss_fn=None, redo_check=None, **kw) -> dict:
    """engine.fit with the task scripts' recipe (SGD Nesterov, weight decay groups, warmup +
    cosine per step, a GradScaler for fp16); loss_fn: label-smoothed (0.1) cross-entropy."""
    import torch

    from common import engine
    net = engine.for_training(model, rt, cfg.compile, cfg.compile_mode, redo_check=redo_check)
    opt, sched = engine.optimizer_and_schedule(model, cfg, len(loader))
    loss_fn = loss_fn or torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    return engine.fit(net, loader, loss_fn, opt, sched, engine.grad_scaler(rt), evaluate, cfg, out,
                      rt, meta, **kw)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, every test of the smoke runs (the session fixture `runs`, or
    test_report.py's `smoke_runs`, which asks for it) goes to one worker: the runs are
    trained once, not once per worker."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if {"runs", "smoke_runs"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("smoke_runs"))
