"""`--evaluate PATH` (common/evaluate.py) on the smoke runs of the session fixture `runs`.

A copy of each run's checkpoint is evaluated with the run's own --smoke --out, so the same
generated data and settings are used while eval.json lands beside the copy and the shared
runs stay as the other tests read them. The figures must equal the run's results.json to
the last digit (same device, loader and CPU thread count), and nothing in the run's folder
may change.
"""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from common import archive, evaluate
from common.checkpoint import CheckpointError
from tests.conftest import T1_ENV
from tests.conftest import run_script as run


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# script, run folder, checkpoint in it, extra flags, the run's results.json in it, and where
# in that file the checkpoint's test figures are (None: at the top level)
CASES = {
    "t1": ("t1_custom_cnn.py", "t1", "best.pt", [], "results.json", None),
    "t2": ("t2_resnet18.py", "t2", "best.pt", [], "results.json", None),
    "t3": ("t3_cubs.py", "t3", "serial_plain/best.pt", ["--placement", "serial"],
           "serial_plain/results.json", None),
    "t4_phase_a": ("t4_retrieval.py", "t4", "phase_a/best.pt", [], "results.json", "phase_a"),
    "t4_phase_b": ("t4_retrieval.py", "t4", "phase_b_ms/best.pt", [], "results.json", "phase_b"),
}
# The archive's inference checkpoints (weights, meta, epoch; archive.inference_bytes) must
# score the same: a classifier and a Phase B embedding, the two kinds of meta --evaluate reads.
CASES |= {f"{case}_archived": CASES[case] for case in ("t1", "t4_phase_b")}


@pytest.mark.parametrize("case", CASES)
def test_evaluate_reproduces_the_runs_test_figures_and_changes_nothing(runs, tmp_path, case):
    script, name, checkpoint, flags, results_file, part = CASES[case]
    out = runs / name
    if name == "t4":  # T4 trained the placement of T3's selection
        flags = [*flags, "--t3-results", str(runs / "t3" / "placements.json")]
    copy = tmp_path / "copy.pt"
    if case.endswith("_archived"):
        copy.write_bytes(archive.inference_bytes(out / checkpoint))
        assert copy.stat().st_size < 0.6 * (out / checkpoint).stat().st_size  # no optimizer state
    else:
        shutil.copy(out / checkpoint, copy)
    before = _digests(out)

    # the thread count the run had: another sums the test loss in another order
    proc = run(script, "--smoke", "--out", str(out), "--evaluate", str(copy), *flags,
               env=T1_ENV if name == "t1" else None)

    assert _digests(out) == before  # no training, nothing written into the run (last.pt included)
    assert "epoch 1/" not in proc.stdout
    got = json.loads((tmp_path / "eval.json").read_text())
    results = json.loads((out / results_file).read_text())
    assert (got["checkpoint"], got["device"], got["loader"]) == (str(copy), "cpu", results["loader"])
    expected = results[part] if part else results
    keys = ["test_recall"] if part else ["test_acc", "test_top5", "test_loss", "test_images"]
    for key in keys:
        assert got[key] == expected[key], key  # to the last digit
    if name == "t4":
        assert list(got["test_recall"]) == ["1", "2", "4", "8"]
    else:
        assert f"test_acc {expected['test_acc']:.4f}" in proc.stdout


def test_a_checkpoint_of_another_task_is_refused_with_the_mismatch_named(runs):
    proc = run("t1_custom_cnn.py", "--smoke", "--out", str(runs / "t1"),
               "--evaluate", str(runs / "t2" / "best.pt"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "task: checkpoint has 't2', this run has 't1'" in proc.stderr
    assert "model: checkpoint has 'resnet18', this run has 'custom_cnn'" in proc.stderr


def test_a_checkpoint_of_another_placement_is_refused(runs):
    import t3_cubs
    with pytest.raises(CheckpointError) as err:
        t3_cubs.main(["--smoke", "--out", str(runs / "t3"), "--placement", "reverse",
                      "--evaluate", str(runs / "t3" / "serial_plain" / "best.pt")])
    assert "placement: checkpoint has 'serial', this run has 'reverse'" in str(err.value)
    assert "--fresh" not in str(err.value)  # training's advice; here the flags must change


def test_a_run_folder_stands_for_its_best_pt_and_a_bare_state_dict_is_refused(tmp_path):
    torch.save({"model": {}, "meta": {"task": "t2"}, "epoch": 3}, tmp_path / "best.pt")
    path, ck = evaluate.load(tmp_path)
    assert path == tmp_path / "best.pt" and ck["epoch"] == 3
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="lacks the 'model', 'meta' and 'epoch' entries"):
        evaluate.load(tmp_path / "weights.pt")


def test_t4_evaluate_builds_the_checkpoints_block1_size_not_t3s(runs, tmp_path):
    # T4 has no --d: it trains T3's. A T4 checkpoint of d = 64 must be scored as a d = 64
    # network while the T3 run beside it (the smoke runs, d = 512) says otherwise.
    import t4_retrieval
    from common.checkpoint import save_checkpoint
    from common.cubs import cubs_resnet18
    ck = torch.load(runs / "t4" / "phase_a" / "best.pt", weights_only=True)
    meta = ck["meta"]
    assert "d" not in meta  # trained with T3's default of 512
    torch.manual_seed(0)
    model = cubs_resnet18(meta["num_classes"], stem="imagenet", placement=meta["placement"],
                          variant=meta["variant"], width=meta["width"], d=64)
    save_checkpoint({"model": model.state_dict(), "meta": {**meta, "d": 64}, "epoch": 1},
                    tmp_path / "d64.pt")
    args = ["--smoke", "--out", str(runs / "t4"), "--t3-results", str(runs / "t3" / "placements.json")]

    got = t4_retrieval.main([*args, "--evaluate", str(tmp_path / "d64.pt")])

    assert got["d"] == 64 and got["epoch"] == 1 and list(got["test_recall"]) == [1, 2, 4, 8]
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["test_recall"] == {str(k): v for k, v in got["test_recall"].items()}
    # The control: the same weights under a meta without d are refused, shapes named.
    save_checkpoint({"model": model.state_dict(), "meta": meta, "epoch": 1}, tmp_path / "no_d.pt")
    with pytest.raises(CheckpointError, match=r"k_proj.bias \(64,\) vs \(512,\)"):
        t4_retrieval.main([*args, "--evaluate", str(tmp_path / "no_d.pt")])


# Each script's --evaluate, given another network's checkpoint, and the flags that tell what
# the check is: no dataset at --data-dir and no download.
OTHER_NETWORK = {
    "t1_custom_cnn": ({"task": "t2", "model": "resnet18"}, "task: checkpoint has 't2', this run has 't1'"),
    "t2_resnet18": ({"task": "t1", "model": "custom_cnn"}, "model: checkpoint has 'custom_cnn', this run has 'resnet18'"),
    "t3_cubs": ({"task": "t3", "model": "cubs_resnet18_parallel_plain", "placement": "parallel"},
                "placement: checkpoint has 'parallel', this run has 'serial'"),
    "t4_retrieval": ({"task": "t3", "model": "cubs_resnet18_serial_plain"}, "task: checkpoint has 't3', this run has 't4'"),
}


@pytest.mark.parametrize("script", OTHER_NETWORK)
def test_another_networks_checkpoint_is_refused_before_the_dataset_is_read(script, tmp_path):
    import importlib
    saved_meta, named = OTHER_NETWORK[script]
    torch.save({"model": {}, "meta": saved_meta, "epoch": 1}, tmp_path / "best.pt")
    flags = ["--data-dir", str(tmp_path / "no_dataset"), "--out", str(tmp_path / "out"),
             "--evaluate", str(tmp_path / "best.pt")]
    if script == "t4_retrieval":  # the placement by name: no T3 run to read it from (Cars196: no download)
        flags += ["--placement", "serial", "--variant", "plain", "--init", "scratch"]
    else:
        flags += ["--no-download"] + (["--placement", "serial", "--variant", "plain"] if script == "t3_cubs" else [])
    with pytest.raises(CheckpointError) as err:  # not the missing dataset's error
        importlib.import_module(script).main(flags)
    assert named in str(err.value) and "--evaluate needs the flags" in str(err.value)
    assert not (tmp_path / "no_dataset").exists()


def test_t4_evaluate_takes_the_checkpoints_placement_whatever_t3_selects_now(runs, tmp_path):
    # T4 read its network from T3's placements.json: after T3 was trained again (another
    # selection, or a comparison cut short), a T4 checkpoint was refused or not evaluated.
    import t4_retrieval
    copy = tmp_path / "best.pt"
    shutil.copy(runs / "t4" / "phase_b_ms" / "best.pt", copy)
    trained = torch.load(copy, weights_only=True)["meta"]
    other = next(p for p in ("serial", "reverse", "parallel") if p != trained["placement"])
    selection = tmp_path / "placements.json"
    selection.write_text(json.dumps({"best_overall": {"placement": other, "variant": "plus"}}))
    expected = json.loads((runs / "t4" / "results.json").read_text())["phase_b"]["test_recall"]
    for t3_results in (selection, tmp_path / "cut_short.json"):
        t3_results.write_text(t3_results.read_text() if t3_results.exists() else '{"best_ov')
        got = t4_retrieval.main(["--smoke", "--out", str(runs / "t4"), "--t3-results", str(t3_results),
                                 "--evaluate", str(copy)])
        assert (got["placement"], got["variant"]) == (trained["placement"], trained["variant"])
        assert {str(k): v for k, v in got["test_recall"].items()} == expected
    with pytest.raises(CheckpointError, match=f"placement: checkpoint has '{trained['placement']}', "
                                              f"this run has '{other}'"):  # a typed flag must agree
        t4_retrieval.main(["--smoke", "--out", str(runs / "t4"), "--placement", other, "--evaluate", str(copy)])
