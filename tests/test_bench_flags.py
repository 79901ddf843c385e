"""Bench scripts refuse misspelled names and unusable flags before they spend any time
(a GPU lease, a training run), and write strict JSON."""

from __future__ import annotations

import json
import math
import sys

import pytest

import torch

from bench import at_par_ablation, bench_compile, bench_cubs, bench_retrieval, gpu_diagnose


@pytest.mark.parametrize("module, argv, message", [
    (gpu_diagnose, ["--device", "cpu", "--parts", "t3_graph,t2_compiled"],
     "--parts: no part named t3_graph; the parts are range_check, t3_compiled"),
    (gpu_diagnose, ["--device", "cpu", "--steps", "1"], "--steps must be >= 2"),
    (at_par_ablation, ["t2", "serial3"], "run name 'serial3': expected t2 or PLACEMENT-GATE"),
    (at_par_ablation, ["serial-foo"], "run name 'serial-foo'"),
    (at_par_ablation, ["bogus-3"], "run name 'bogus-3'"),
    (bench_compile, ["--only", "cubs_serial_plian"], "--only: no network named cubs_serial_plian"),
    (bench_cubs, ["--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    (bench_cubs, ["--device", "cuda"], "--device cuda: torch sees no GPU here"),
    (bench_retrieval, ["--help-me"], "unrecognized arguments: --help-me"),  # it took no flags: ran anyway
])
def test_a_bad_name_or_flag_is_a_usage_error_before_any_work(module, argv, message, monkeypatch, capsys, tmp_path):
    # Before: gpu_diagnose ran nothing and exited 0 (or failed after every part's compile),
    # at_par_ablation failed after training the runs before the bad name, bench_compile did nothing.
    if module is bench_cubs and "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    trained = []
    monkeypatch.setattr(at_par_ablation, "train", lambda *args: trained.append(args))
    monkeypatch.setattr(at_par_ablation, "make_data", lambda *args: pytest.fail("made data before checking names"))
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert trained == [] and not (tmp_path / "out").exists()


def test_summary_json_writes_missing_figures_as_null():
    summary = {"parts": {"range_check": [{"scale": 100, "max_abs_vs_eager": math.nan}],
                         "t2": {"peak_mem_gib": float("inf"), "steps": 3, "ok": 1.5}}}
    text = json.dumps(gpu_diagnose.without_nan(summary), allow_nan=False)
    assert json.loads(text) == {"parts": {"range_check": [{"scale": 100, "max_abs_vs_eager": None}],
                                          "t2": {"peak_mem_gib": None, "steps": 3, "ok": 1.5}}}


def test_a_negative_gate_logit_passes_the_check_and_builds(monkeypatch):
    # serial--2 passed the name check and then failed to unpack in build(), after training others.
    assert at_par_ablation._is_gate("-2")
    model = at_par_ablation.build("serial--2")
    assert isinstance(model, torch.nn.Module)


def test_the_load_note_warns_above_half_the_cpus(monkeypatch):
    from bench import machine
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (1.0, 2.5, 0.25))
    assert machine.load_note() == "2 CPUs, load average 1.00 2.50 0.25"
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (1.01, 0.0, 0.0))
    assert machine.load_note("at the end") == ("2 CPUs, load average at the end 1.01 0.00 0.00"
                                               "  (machine is loaded: figures are noisy)")


def test_at_par_plot_refuses_a_folder_with_no_name_of_two_seeds(tmp_path, capsys):
    # It wrote a figure with axes, a title and no line: plot keeps names of 2+ seeds only.
    def run(name: str, accuracies: list[float]) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"epoch": e + 1, "holdout_acc": a}) + "\n" for e, a in enumerate(accuracies)))
    run("serial-plus_s0_w1", [0.2, 0.3])
    with pytest.raises(SystemExit) as exit_:
        at_par_ablation.plot(tmp_path, tmp_path / "curves.png")
    assert str(exit_.value) == (f"error: --plot draws each name's mean over 2 or more seeds (runs NAME_sSEED_w1 "
                                f"in {tmp_path}), and none has them: serial-plus ran one seed; train another "
                                f"with --seed")
    assert not (tmp_path / "curves.png").exists()
    run("t2_s0_w1", [0.2, 0.4])
    run("t2_s1_w1", [0.3, 0.5])
    at_par_ablation.plot(tmp_path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "not plotted, one seed each: serial-plus" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to make: name --tiny DIR, --cars DIR or both"),  # exited 0, having made nothing
    (["--cars", "x", "--cars-per-class", "1"], "--cars-per-class must be >= 2, got 1"),  # a traceback
    (["--tiny", "x", "--procs", "0"], "--procs must be >= 1, got 0"),
])
def test_make_full_synthetic_refuses_flags_that_make_nothing_or_fail_later(argv, message, capsys, tmp_path,
                                                                           monkeypatch):
    from bench import make_full_synthetic
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        make_full_synthetic.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
