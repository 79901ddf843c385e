"""bench/bench_data.py: each loader is timed on the second of two back-to-back epochs only."""

from __future__ import annotations

import torch

from bench import bench_data


def test_no_loader_is_timed_on_an_epoch_it_prepared_during_the_others(monkeypatch, capsys):
    # DALI starts on its next epoch as soon as one ends. Alternating timed epochs gave it the
    # baseline's whole epoch to prepare batches (3.08x where fair timing gives 2.58x).
    events: list[str] = []

    class Loader:
        def __init__(self, files, labels, settings):
            pass

        def epoch(self, e):
            events.append(f"ours {e}")
            yield torch.zeros(2, 3, 4, 4), torch.zeros(2)

    class Baseline:
        def __init__(self, *args, **kwargs):
            pass

        def __iter__(self):
            events.append("baseline")
            yield torch.zeros(2, 3, 4, 4), torch.zeros(2)

    real_timed = bench_data.timed

    def timed(fn):
        events.append("clock:")
        return real_timed(fn)

    monkeypatch.setattr(bench_data, "ImageLoader", Loader)
    monkeypatch.setattr(bench_data.torch.utils.data, "DataLoader", Baseline)
    monkeypatch.setattr(bench_data, "PilFiles", lambda *args: None)
    monkeypatch.setattr(bench_data, "timed", timed)
    bench_data.bench_case("x", ["a.jpg"] * 4, [0] * 4, size=4, batch_size=2, workers=0, epochs=2,
                          goal=3.0, backends=["dali"])
    assert events == ["ours 0", "baseline",  # warm-up
                      "ours 1", "clock:", "ours 2", "baseline", "clock:", "baseline",
                      "ours 3", "clock:", "ours 4", "baseline", "clock:", "baseline"]
    assert "ratio" in capsys.readouterr().out
