"""bench/t4_phase_b_gain.py: its cache of runs is keyed by the code that ran, and its table
reads the Phase B mining that ran."""

from __future__ import annotations

import shutil

import pytest

from bench import t4_phase_b_gain as gain
from tests.conftest import ROOT


def _checkout(folder, t4_text: str):
    (folder / "common").mkdir(parents=True)
    for f in (ROOT / "common").glob("*.py"):
        shutil.copy(f, folder / "common" / f.name)
    (folder / "t4_retrieval.py").write_text(t4_text)
    return folder


def test_cached_runs_are_keyed_by_the_checkout_that_ran_them(tmp_path):
    # Another --repo (or an edit) reused this checkout's results under its name.
    text = (ROOT / "t4_retrieval.py").read_text()
    same = _checkout(tmp_path / "same", text)
    edited = _checkout(tmp_path / "edited", text + "\n# an edit\n")
    gen, flags = {"seed": 0}, ["--epochs", "2"]
    assert gain.settings_key(gen, flags, same) == gain.settings_key(gen, flags, ROOT)
    assert gain.settings_key(gen, flags, edited) != gain.settings_key(gen, flags, ROOT)
    assert gain.settings_key(gen, flags) != gain.settings_key(gen, flags, ROOT)
    with pytest.raises(SystemExit):
        gain.main(["--repo", str(tmp_path / "nowhere"), "--work", str(tmp_path / "w")])


def test_the_table_reads_the_mining_that_ran(tmp_path, monkeypatch, capsys):
    # With --t4 --mining hard (no comparison) the B - A column looked up "ms" and crashed.
    monkeypatch.setattr(gain, "make_data", lambda root, gen: None)
    monkeypatch.setattr(gain, "load_cars196", lambda root, holdout_per_class: None)
    monkeypatch.setattr(gain, "pixel_recall", lambda splits, size: (0.1, 0.2))
    phase_b = {"mining": "hard", "test_recall": {"1": 0.5}, "best_epoch": 2, "epochs_run": 3}
    results = {"mining_comparison": [phase_b], "phase_b": phase_b, "recall_at_1_chance": 0.05,
               "init_test_recall": {"1": 0.1}, "train_classes": 4, "test_images": 40,
               "phase_a": {"test_recall": {"1": 0.4}, "best_epoch": 1, "epochs_run": 2}}
    monkeypatch.setattr(gain, "run_seed", lambda *args: (results, 1.0))
    for spelled in (["--mining", "hard"], ["--mining=hard"], ["--min", "hard"]):  # as T4 accepts them
        rows = gain.main(["--seeds", "0", "--work", str(tmp_path), "--t4", *spelled])
        assert rows[0]["b"] == {"hard": 0.5}
        out = capsys.readouterr().out
        assert "B hard" in out and "B - A (hard): min +0.100" in out
