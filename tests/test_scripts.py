"""The four task scripts end to end, as a user runs them: --smoke from the command line.

The session-scoped fixture `runs` (tests/conftest.py) runs every script's smoke mode once
into a shared runs/ folder; the tests then check what those runs wrote. Each smoke dataset has 10 (Tiny) or 8 unseen (Cars)
balanced classes, so chance is 0.10 top-1 and about 0.12 Recall@1.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.conftest import run_script as run


def _check_classifier_run(out: Path, task: str, model: str) -> dict:
    r = json.loads((out / "results.json").read_text())
    assert r["task"] == task and r["model"] == model and r["finished"]
    assert r["test_images"] == 100 and r["params"] > 0 and r["device"] == "cpu"
    # Bars from chance, not from one machine's run: T1's test accuracy spans 0.45-0.81 over
    # seeds 0-5 on one and two threads (t1_custom_cnn.py's SMOKE; holdout 0.46-0.80). A network at chance
    # (0.1) scores >= 0.22 of 100 test images with probability 3e-4, >= 12 of 50 holdout
    # images with 3e-3.
    assert r["test_acc"] >= 0.22, f"no learning: test acc {r['test_acc']}"
    assert r["holdout_acc"] >= 0.24
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [h["epoch"] for h in history] == list(range(1, r["epochs_run"] + 1))
    assert 1 <= r["best_epoch"] <= r["epochs_run"] <= r["args"]["epochs"]
    best = history[r["best_epoch"] - 1]
    assert best["holdout_acc"] == max(h["holdout_acc"] for h in history)  # the best holdout epoch
    assert (r["holdout_acc"], r["holdout_top5"]) == (best["holdout_acc"], best["holdout_top5"])
    for name in ("last.pt", "best.pt", "curves.png"):
        assert (out / name).stat().st_size > 0
    # every holdout image once per epoch (an augmenting loader would drop the last batch)
    assert all(h["holdout_n"] == 50 for h in history)
    assert not [k for k in r["args"] if k.startswith("_")]  # argparse's bookkeeping is not a flag
    return r


def test_t1_smoke_learns_and_writes_everything(runs):
    r = _check_classifier_run(runs / "t1", "t1", "custom_cnn")
    meta = torch.load(runs / "t1" / "best.pt", weights_only=True)["meta"]
    assert meta["dropout"] == r["args"]["dropout"] == 0.2  # so a resume with another --dropout is refused


def test_t2_smoke_learns_and_writes_everything(runs):
    _check_classifier_run(runs / "t2", "t2", "resnet18")
    history = [json.loads(line) for line in (runs / "t2" / "metrics.jsonl").read_text().splitlines()]
    assert all(h["diagnostics"]["branch_grad_norm"] for h in history)  # common/diagnostics.py each epoch


def test_t3_all_placements_selects_by_holdout_and_checks_vanillas_recipe(runs):
    c = json.loads((runs / "t3" / "placements.json").read_text())
    assert sorted(r["placement"] for r in c["runs"]) == ["parallel", "reverse", "serial"]
    for r in c["runs"]:
        _check_classifier_run(runs / "t3" / f"{r['placement']}_plain", "t3",
                              f"cubs_resnet18_{r['placement']}_plain")
    assert c["selected_by"] == "holdout_acc" and c["other_recipe"] == []
    assert c["selected"]["holdout_acc"] == max(r["holdout_acc"] for r in c["runs"])
    # The fixture trains T3 for 2 epochs and T2 for the smoke default of 8: two recipes,
    # so the at-par rule is not applied (common/placements.py; the rule is tested there).
    assert c["vanilla"] is None and c["at_par"] is None
    assert "trained with another recipe than these runs (epochs 8 instead of 2)" in c["vanilla_note"]
    table = (runs / "t3" / "placements.md").read_text()
    assert f"Selected by holdout accuracy: **{c['selected']['placement']}**" in table
    assert "**At-par check: not made**" in table
    assert (runs / "t3" / "placements.png").stat().st_size > 0


def test_t3_starts_from_t2s_initial_tensors_at_the_same_seed(tmp_path, monkeypatch):
    # What makes T3's at-par check a paired comparison: at one seed, every tensor that T2's
    # network has starts equal in T3's, so the two runs differ only by the attention
    # modules (common/models.py draws them last). In this process: the model is captured
    # as it is built, and the run stops there.
    import t2_resnet18
    import t3_cubs

    class Built(Exception):
        pass

    built = {}
    for script, builder in ((t2_resnet18, "ResNet18"), (t3_cubs, "cubs_resnet18")):
        def capture(*args, name=script.__name__, build=getattr(script, builder), **kwargs):
            built[name] = build(*args, **kwargs).state_dict()
            raise Built
        monkeypatch.setattr(script, builder, capture)
        with pytest.raises(Built):
            script.main(["--smoke", "--backend", "torch", "--seed", "3", "--out", str(tmp_path)])  # one data set
    vanilla, cubs = built["t2_resnet18"], built["t3_cubs"]
    assert set(cubs) > set(vanilla)
    assert [k for k, v in vanilla.items() if not torch.equal(cubs[k], v)] == []


def test_t3_holdout_ties_go_to_the_spec_order_and_are_reported(tmp_path):
    from common.placements import compare_runs, write_comparison
    base = {"variant": "plain", "test_top5": 0.9, "params": 1, "best_epoch": 1, "epochs_run": 1,
            "num_classes": 10, "width": 16, "image_size": 32}
    for placement, holdout, test in (("parallel", 0.88, 0.90), ("reverse", 0.88, 0.80), ("serial", 0.86, 0.95)):
        (tmp_path / f"{placement}_plain").mkdir()
        (tmp_path / f"{placement}_plain" / "results.json").write_text(json.dumps(
            {**base, "placement": placement, "holdout_acc": holdout, "test_acc": test}))
    c = compare_runs(tmp_path, tmp_path / "no_t2.json")
    assert [r["placement"] for r in c["runs"]] == ["serial", "reverse", "parallel"]
    assert c["selected"]["placement"] == "reverse"  # tied with parallel, earlier in the spec; never by test
    write_comparison(c, tmp_path)
    assert ("**reverse** (reverse, parallel tie on holdout; ties go in the order "
            "serial > reverse > parallel)") in (tmp_path / "placements.md").read_text()


def test_t3_checkpoint_of_one_placement_is_refused_by_another(runs, tmp_path):
    (tmp_path / "reverse_plain").mkdir()
    shutil.copy(runs / "t3" / "serial_plain" / "last.pt", tmp_path / "reverse_plain" / "last.pt")
    shutil.copytree(runs / "t3" / "smoke_data", tmp_path / "smoke_data")
    proc = run("t3_cubs.py", "--smoke", "--placement", "reverse", "--out", str(tmp_path), check=False)
    assert proc.returncode != 0
    assert "belongs to a different model" in proc.stderr
    assert "placement: checkpoint has 'serial', this run has 'reverse'" in proc.stderr


# T4's smoke run must show Phase A learning against the network it starts from, not against
# chance: on the smoke test split (8 unseen classes x 24 images, R@1 chance 0.12) a network
# that learned nothing scores well above chance (centred pixels 0.34). One query is 1/192 =
# 0.0052 of R@1. With the smoke settings Phase A gains 0.16-0.20 R@1 over its start (init
# t3 or scratch, seeds 0-2). Phase B's gain over Phase A is within a few queries either way
# here (its 8 training classes of 20 images are fitted, not generalised from;
# bench/t4_phase_b_gain.py), so Phase B beating Phase A is tested on generated features
# where metric learning has something to add (tests/test_metric_learning.py); here Phase B
# must keep what Phase A learned.
PHASE_A_OVER_START = 0.08  # half the smallest of those gains


def test_t4_smoke_phase_a_beats_the_network_it_started_from(runs):
    r = json.loads((runs / "t4" / "results.json").read_text())
    t3 = json.loads((runs / "t3" / "placements.json").read_text())["best_overall"]
    assert (r["placement"], r["variant"]) == (t3["placement"], t3["variant"])
    # --init auto starts from that T3 run: every tensor but the 3x3 stem (conv and its
    # BatchNorm) and the classifier
    assert r["init"] == "t3" and r["init_source"].endswith(f"{t3['placement']}_{t3['variant']}/best.pt")
    assert [s.split(":")[0] for s in r["init_skipped"]] == ["conv1.weight", "fc.weight", "fc.bias", "bn1.weight",
                                                             "bn1.bias", "bn1.running_mean", "bn1.running_var",
                                                             "bn1.num_batches_tracked"]
    t3_state = torch.load(runs / "t3" / f"{t3['placement']}_{t3['variant']}" / "best.pt", weights_only=True)["model"]
    assert r["init_loaded"] == len(t3_state) - 8
    assert r["test_classes"] == 8 and r["train_classes"] == 8
    assert r["recall_at_1_chance"] == pytest.approx(23 / 191)  # 8 x 24 images: 23 of 191 others match
    start, a = r["init_test_recall"]["1"], r["phase_a"]["test_recall"]["1"]
    assert a >= start + PHASE_A_OVER_START, f"Phase A R@1 {a} vs {start} before it"
    assert sorted(m["mining"] for m in r["mining_comparison"]) == ["hard", "ms", "none", "semihard"]
    assert r["phase_b"] == next(m for m in r["mining_comparison"] if m["mining"] == "ms")
    assert (runs / "t4" / "retrieval.png").stat().st_size > 0
    assert (runs / "t4" / "phase_b_ms" / "curves.png").stat().st_size > 0


def test_t4_tests_each_phase_with_best_pt_not_its_last_weights(runs, tmp_path, monkeypatch, capsys):
    # Holdout scores that peak at epoch 1 of 2 in every phase: the test embeddings must come
    # from best.pt (epoch 1), not from the weights training ended with. Weights, not Recall@K,
    # are compared: two epochs' weights can give the same recall on 192 queries.
    import itertools

    import t4_retrieval
    from common import evaluate
    scores = itertools.cycle([0.9, 0.1])
    monkeypatch.setattr(evaluate, "holdout_scorer",
                        lambda *a, **k: lambda m: {"holdout_acc": next(scores)})
    real_recall, real_embed = t4_retrieval.recall_at_k, evaluate.embed
    monkeypatch.setattr(t4_retrieval, "recall_at_k", lambda emb, labels, ks, **kw: {1: next(scores)}
                        if tuple(ks) == (1,) else real_recall(emb, labels, ks, **kw))
    embedded = []  # (images, the weights embedding them)

    def recording_embed(model, loader, rt, features=False):
        embedded.append((len(loader.files), {k: v.clone() for k, v in model.state_dict().items()}))
        return real_embed(model, loader, rt, features)
    monkeypatch.setattr(evaluate, "embed", recording_embed)
    shutil.copytree(runs / "t4" / "smoke_data", tmp_path / "smoke_data")
    r = t4_retrieval.main(["--smoke", "--out", str(tmp_path), "--epochs", "2", "--embed-epochs", "2",
                           "--init", "scratch", "--width", "8", "--t3-results", str(tmp_path / "none.json")])
    phases = ["phase_a"] + [f"phase_b_{m['mining']}" for m in r["mining_comparison"]]
    fits = [r["phase_a"], *r["mining_comparison"]]
    assert [(f["best_epoch"], f["epochs_run"]) for f in fits] == [(1, 2)] * 5
    tested = [state for n, state in embedded if n == r["test_images"]]
    assert len(tested) == 1 + len(phases)  # the initial network, then each phase's test
    for phase, state in zip(phases, tested[1:]):
        best = torch.load(tmp_path / phase / "best.pt", weights_only=True)["model"]
        last = torch.load(tmp_path / phase / "last.pt", weights_only=True)["model"]
        assert any(not torch.equal(best[k], last[k]) for k in best), phase  # epoch 2 changed them
        assert all(torch.equal(state[k], best[k]) for k in best), phase

    # The same finished run, rerun without --compare-mining (this run reuses the one above):
    # it retrains nothing, reports --mining's run only, and names the runs it left out.
    capsys.readouterr()
    again = t4_retrieval.main(["--smoke", "--out", str(tmp_path), "--epochs", "2", "--embed-epochs", "2",
                               "--init", "scratch", "--width", "8", "--no-compare-mining",
                               "--t3-results", str(tmp_path / "none.json")])
    assert [m["mining"] for m in again["mining_comparison"]] == ["ms"]
    assert again["phase_b"]["test_recall"] == r["phase_b"]["test_recall"]
    assert again["phase_b"]["train_time_s"] == r["phase_b"]["train_time_s"]  # not trained again
    printed = capsys.readouterr().out
    assert ("not in results.json: the Phase B runs with none, hard, semihard mining in "
            f"{tmp_path} (--compare-mining reports them, or resumes those that did not finish)") in printed
    assert f"Phase A: the {again['train_classes']}-way classifier (cross-entropy) in {tmp_path / 'phase_a'}" \
        in printed  # each phase's epoch lines come under the phase's name
    assert f"Phase B (ms mining): the 512-d embedding (Multi-Similarity loss) in {tmp_path / 'phase_b_ms'}" \
        in printed

    # results.json says the run finished, so it is written last: a failure drawing
    # retrieval.png leaves none (a rerun then redoes both)
    (tmp_path / "results.json").unlink()

    def failing_grid(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(t4_retrieval.plots, "retrieval_grid", failing_grid)
    with pytest.raises(OSError, match="disk full"):
        t4_retrieval.main(["--smoke", "--out", str(tmp_path), "--epochs", "2", "--embed-epochs", "2",
                           "--init", "scratch", "--width", "8", "--no-compare-mining",
                           "--t3-results", str(tmp_path / "none.json")])
    assert not (tmp_path / "results.json").exists()


def test_t4_builds_t3s_block1_size_so_that_every_t3_tensor_loads(tmp_path):
    # T4 has no --d: a T3 run trained with --d 64 must not lose its 16 Block 1s to shape
    # mismatches (they were skipped, and only listed).
    from common.checkpoint import save_checkpoint
    from common.cubs import cubs_resnet18
    from common.errors import ConfigError
    from common.init_weights import load_initial_weights, t3_block1_size
    best = tmp_path / "serial_plain" / "best.pt"
    t3_state = cubs_resnet18(10, width=8, d=64).state_dict()
    for key in ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):  # trained, not fresh
        t3_state[key] = t3_state[key] + 0.5
    save_checkpoint({"model": t3_state}, best)
    (best.parent / "results.json").write_text(json.dumps({"d": 64, "width": 8}))
    d = t3_block1_size("auto", best, width=8)
    assert d == 64 and t3_block1_size("scratch", best, width=8) is None
    t4 = cubs_resnet18(8, stem="imagenet", width=8, d=d)
    init = load_initial_weights(t4, "auto", t3_best=best, t3_results="unused", verbose=False)
    stem_bn = ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"]
    assert [s.split(":")[0] for s in init["init_skipped"]] == ["conv1.weight", "fc.weight", "fc.bias", *stem_bn]
    assert init["init_loaded"] == len(t3_state) - 8 and init["init"] == "t3"
    # T3's stem BatchNorm described its 3x3 conv's outputs, not the fresh 7x7 conv's
    assert "bn1.running_var: the stem BatchNorm of the skipped conv1 (fresh init)" in init["init_skipped"]
    fresh = cubs_resnet18(8, stem="imagenet", width=8, d=d).state_dict()
    assert all(torch.equal(t4.state_dict()[k], fresh[k]) for k in stem_bn)
    with pytest.raises(ConfigError, match=f"T3 run in {best.parent}, of width 8; pass --width 8, or --init scratch"):
        t3_block1_size("t3", best, width=64)


def test_t4_resumes_only_from_the_t3_weights_it_started_from(tmp_path, capsys):
    """Phase A's checkpoints record the SHA-256 of the file T4 started from: after T3 trained
    again (a new best.pt), a rerun is refused instead of resuming weights grown from the old
    one while results.json reports the new one."""
    import t4_retrieval
    from common.checkpoint import CheckpointError, save_checkpoint
    from common.cubs import cubs_resnet18
    t3 = tmp_path / "t3"
    (t3 / "serial_plain").mkdir(parents=True)
    (t3 / "placements.json").write_text(json.dumps({"best_overall": {"placement": "serial", "variant": "plain"}}))
    (t3 / "serial_plain" / "results.json").write_text(json.dumps({"d": 512, "width": 8}))

    def train_t3(seed: int) -> None:
        torch.manual_seed(seed)
        save_checkpoint({"model": cubs_resnet18(10, width=8).state_dict()}, t3 / "serial_plain" / "best.pt")
    flags = ["--smoke", "--out", str(tmp_path / "t4"), "--backend", "torch", "--epochs", "2",
             "--embed-epochs", "2", "--width", "8", "--no-compare-mining", "--init", "t3",
             "--t3-results", str(t3 / "placements.json"), "--stop-after-epoch", "1"]
    train_t3(1)
    assert t4_retrieval.main(flags) == {"finished": False}  # Phase A stopped after epoch 1
    assert t4_retrieval.main(flags) == {"finished": False}  # the same file: resumed (Phase A epoch 2, Phase B 1)
    train_t3(2)
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=r"phase_a/last.pt belongs to a different model or setup: "
                                              r"init_sha256: checkpoint has '[0-9a-f]{64}', this run has "
                                              r"'[0-9a-f]{64}' \(the weights file this run started from "
                                              r"\(--init; T4's default: T3's best.pt, whose SHA-256 changes "
                                              r"whenever T3 trains again\) is not the one it holds now\)\. Use "
                                              r"another --out, or --fresh to start over\."):
        t4_retrieval.main(flags)
    assert "Before Phase A" not in capsys.readouterr().out  # refused before the test set's pass


def test_t4_results_record_t3s_block1_size_so_the_report_rebuilds_its_network(tmp_path):
    # T4 builds its network with T3's d; results.json did not say so, and the report rebuilt
    # (and counted parameters and FLOPs of) a d = 512 network.
    import t4_retrieval
    from common.checkpoint import save_checkpoint
    from common.cubs import cubs_resnet18
    from common.networks import build_model
    t3 = tmp_path / "t3"
    (t3 / "serial_plain").mkdir(parents=True)
    (t3 / "placements.json").write_text(json.dumps({"best_overall": {"placement": "serial", "variant": "plain"}}))
    (t3 / "serial_plain" / "results.json").write_text(json.dumps({"d": 64, "width": 8}))
    save_checkpoint({"model": cubs_resnet18(10, width=8, d=64).state_dict()}, t3 / "serial_plain" / "best.pt")
    killed = tmp_path / "t4" / ".retrieval.png.k1.tmp"  # a kill's, mid-write, an hour ago
    killed.parent.mkdir()
    killed.write_bytes(b"half a png")
    os.utime(killed, (time.time() - 3600,) * 2)
    t4_retrieval.main(["--smoke", "--out", str(tmp_path / "t4"), "--backend", "torch", "--epochs", "1",
                       "--embed-epochs", "1", "--width", "8", "--no-compare-mining", "--init", "t3",
                       "--t3-results", str(t3 / "placements.json")])
    results = json.loads((tmp_path / "t4" / "results.json").read_text())
    assert results["d"] == 64 and not killed.exists()
    assert sum(p.numel() for p in build_model(results).parameters()) == results["params"]


# Every mining's Phase B keeps what Phase A learned: R@1 at least the untrained network's
# + 0.065, half the smallest gain over the start of any mining (0.13, init scratch, seeds
# 0-2). A Phase B that undid Phase A's training
# fails it; one that learned nothing new passes, which is why the gain over Phase A is
# tested in tests/test_metric_learning.py.
PHASE_B_OVER_START = 0.065


def test_t4_smoke_no_phase_b_loses_what_phase_a_learned(runs):
    r = json.loads((runs / "t4" / "results.json").read_text())
    start = r["init_test_recall"]["1"]
    for m in r["mining_comparison"]:
        assert m["test_recall"]["1"] >= start + PHASE_B_OVER_START, (m["mining"], m["test_recall"], start)


def test_rerunning_a_finished_command_does_not_retrain(runs):
    before = (runs / "t2" / "results.json").read_text()
    proc = run("t2_resnet18.py", "--smoke", "--out", str(runs / "t2"))
    assert "resuming from" in proc.stdout and "finished run" in proc.stdout
    assert "epoch 1/" not in proc.stdout
    after = json.loads((runs / "t2" / "results.json").read_text())
    assert after["test_acc"] == json.loads(before)["test_acc"]


def test_fresh_clears_the_earlier_run_and_the_summaries_that_describe_it(runs, tmp_path):
    # --fresh killed before its first save (--stop-after-epoch 0): nothing of the earlier run
    # may be left for a rerun to resume or for the report and archive to show as current.
    shutil.copytree(runs / "t3", tmp_path / "t3")
    t3 = tmp_path / "t3"
    # What a kill mid-write of the comparison leaves (atomic_file's temporaries).
    stale_t3 = [t3 / ".placements.json.k1.tmp", t3 / ".placements.png.k2.tmp"]
    for path in stale_t3:
        path.write_bytes(b"half a file")
    proc = run("t3_cubs.py", "--smoke", "--placement", "serial", "--out", str(t3), "--fresh",
               "--stop-after-epoch", "0")
    assert (f"--fresh: removed the earlier run's last.pt, last.prev.pt, best.pt, metrics.jsonl, "
            f"results.json, curves.png from {t3 / 'serial_plain'}") in proc.stdout
    assert [p.name for p in (t3 / "serial_plain").iterdir()] == []
    assert [p.name for p in t3.glob("placements.*")] == []  # redone when the runs finish
    assert [p.name for p in stale_t3 if p.exists()] == []
    assert (t3 / "reverse_plain" / "best.pt").is_file()  # runs this command does not train stay
    # --fresh beside --evaluate is refused (it was ignored): nothing is deleted or evaluated
    before = {p.name for p in (t3 / "reverse_plain").iterdir()}
    proc = run("t3_cubs.py", "--smoke", "--placement", "reverse", "--out", str(t3), "--fresh",
               "--evaluate", str(t3 / "reverse_plain"), check=False)
    assert proc.returncode == 2 and "error: --fresh starts a training run over and --evaluate trains " \
        "nothing: drop one of them" in proc.stderr
    assert {p.name for p in (t3 / "reverse_plain").iterdir()} == before >= {"best.pt", "last.pt", "results.json",
                                                                           "metrics.jsonl"}

    shutil.copytree(runs / "t2", tmp_path / "t2")  # T1 and T2: engine.fit's --fresh
    run("t2_resnet18.py", "--smoke", "--out", str(tmp_path / "t2"), "--fresh", "--stop-after-epoch", "0")
    assert [p.name for p in (tmp_path / "t2").glob("*.*")] == []

    shutil.copytree(runs / "t4", tmp_path / "t4")
    t4 = tmp_path / "t4"
    # A command that fails before training (here: no T3 run to start from) deletes nothing.
    failed = run("t4_retrieval.py", "--smoke", "--out", str(t4), "--init", "t3", "--fresh",
                 "--t3-results", str(tmp_path / "none" / "placements.json"), check=False)
    assert failed.returncode == 1 and "--init t3 needs a T3 best.pt" in failed.stderr
    assert (t4 / "results.json").is_file() and (t4 / "phase_a" / "best.pt").is_file()
    (t4 / ".results.json.k3.tmp").write_bytes(b"half a file")
    run("t4_retrieval.py", "--smoke", "--out", str(t4), "--init", "scratch", "--fresh",
        "--stop-after-epoch", "0")
    assert [p.name for p in t4.glob("*.*")] == []  # pathlib's * matches the .*.tmp names too
    # Phase B's too, though the run stopped in Phase A: a rerun must not resume them.
    assert [p.name for p in t4.glob("phase_*/*")] == []


# The kill tests train a narrower T2 for 3 epochs: what they check (resume, epoch records)
# does not depend on the size.
SMALL_T2 = ("--smoke", "--epochs", "3", "--width", "8")


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "t2_resnet18.py"), *SMALL_T2, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_sigkill_mid_run_then_rerun_completes(tmp_path):
    proc = _start(tmp_path)
    _wait_for(tmp_path / "last.pt", proc)  # epoch 1 saved; two more to go (over a second)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished before the kill
    # (a kill between last.pt's two renames leaves last.prev.pt alone: either may be there)
    saved = [torch.load(tmp_path / name, weights_only=True) for name in ("last.pt", "last.prev.pt")
             if (tmp_path / name).exists()]
    assert saved and not any(ck["finished"] for ck in saved)
    rerun = run("t2_resnet18.py", *SMALL_T2, "--out", str(tmp_path))
    assert "resuming from" in rerun.stdout
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert json.loads((tmp_path / "results.json").read_text())["epochs_run"] == 3


# Runs t2_resnet18.py as __main__, sending itself SIGTERM at its first training step after
# epoch 1's last.pt: a signal sent from outside when last.pt appeared could land between the
# epochs (metrics, curves.png) and stop there instead, in 1 run of 10 on an idle machine.
SIGTERM_IN_EPOCH_2 = """
import os, runpy, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from common import engine
fit, out = engine.fit, Path(sys.argv[sys.argv.index("--out") + 1])
def fit_signalled(net, loader, loss_fn, *args, **kwargs):
    def loss(*a):
        if (out / "last.pt").exists() and not getattr(loss, "sent", False):
            loss.sent = True
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by fit's handler: the step ends, then saves
        return loss_fn(*a)
    return fit(net, loader, loss, *args, **kwargs)
engine.fit = fit_signalled
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigterm_saves_mid_epoch_and_resumes_from_that_batch(tmp_path):
    launcher = tmp_path / "sigterm_in_epoch_2.py"
    launcher.write_text(SIGTERM_IN_EPOCH_2)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(launcher), str(ROOT), str(ROOT / "t2_resnet18.py"), *SMALL_T2,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM: saved" in output and "at epoch 2, batch 1;" in output
    rerun = run("t2_resnet18.py", *SMALL_T2, "--out", str(out))
    assert "resuming from" in rerun.stdout and "(epoch 2, batch 1)" in rerun.stdout
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(h["train_images"] == history[0]["train_images"] for h in history)


# Two gloo processes: tests/test_ddp.py runs T3 and T4 that way (T3 checks all that this
# file's T2 run did: "cpu x2", each test image counted once, rank 0 alone prints, sharded
# train_images per epoch, one RNG state per rank).

@pytest.mark.parametrize("script", ["t1_custom_cnn.py", "t2_resnet18.py", "t3_cubs.py"])
def test_missing_dataset_gives_a_clear_message(script, tmp_path):
    proc = run(script, "--data-dir", str(tmp_path / "nowhere"), "--no-download",
               "--device", "cpu", "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 1
    assert "Tiny ImageNet not found" in proc.stderr and "--smoke" in proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag, value, expected", [
    ("--batch-size", "0", "must be a positive integer, got 0"),
    ("--lr", "-1", "must be > 0, got -1.0"),
    ("--workers", "-1", "must be >= 0, got -1"),
    ("--epochs", "zero", "invalid positive_int value: 'zero'"),
])
def test_bad_numeric_flag_values_are_rejected_before_anything_runs(flag, value, expected, capsys):
    # in this process (argparse exits before anything is loaded); the subprocess path of a
    # usage error is tested just below
    import t2_resnet18
    with pytest.raises(SystemExit) as exit_info:
        t2_resnet18.main(["--smoke", flag, value])
    assert exit_info.value.code == 2 and f"argument {flag}: {expected}" in capsys.readouterr().err


def test_bad_flag_value_is_rejected_with_the_choices(tmp_path):
    proc = run("t3_cubs.py", "--placement", "diagonal", check=False)
    assert proc.returncode == 2 and "invalid choice: 'diagonal'" in proc.stderr
    assert "serial" in proc.stderr and "all" in proc.stderr


def test_t3_refuses_a_d_that_leaves_block1_plus_one_token():
    proc = run("t3_cubs.py", "--smoke", "--variant", "plus", "--d", "32", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--d 32 does not fit the plus variant" in proc.stderr and "d = 64" in proc.stderr


def test_init_records_the_sha256_of_the_whole_weights_file(tmp_path):
    # A resume compares this digest with the file's: it must cover every byte, not a prefix
    # (a retrained T3 best.pt can share its first MiB with the old one).
    import hashlib

    from common.init_weights import load_initial_weights
    model = torch.nn.Linear(600, 600)  # 1.4 MB of float32: more than one 1 MiB read
    weights = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(600, 600), "bias": torch.zeros(600)}, weights)
    init = load_initial_weights(model, "imagenet", t3_best=None, t3_results="unused",
                                init_weights=str(weights), verbose=False)
    assert weights.stat().st_size > 1 << 20
    assert init["init_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert init["init_loaded"] == 2 and torch.equal(model.weight, torch.ones(600, 600))
