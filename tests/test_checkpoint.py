"""common/checkpoint.py: atomic saves, weights_only loads, compatibility checks, RNG states,
and where a run resumes from (RunCheckpoints)."""
import os
import pickle
import random
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from common.checkpoint import (CheckpointError, check_compatible, check_resumable, inference_state, load_checkpoint,
                               load_matching_tensors, load_model_state, rng_state, save_checkpoint,
                               set_rng_state)
from tests.test_engine import _run_fit, tiny_splits  # noqa: F401 (a fixture)


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary file left behind


def test_temporary_files_a_kill_left_are_removed_on_resume_and_by_fresh(tiny_splits, tmp_path, capsys):
    # A SIGKILL mid-save leaves atomic_file's temporary (the size of the checkpoint) behind;
    # on a cloud drive it would take quota and upload time for good.
    _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=1)
    stale = [tmp_path / ".last.pt.abc123.tmp", tmp_path / ".best.pt.x_y.tmp",
             tmp_path / ".metrics.jsonl.q.tmp", tmp_path / ".curves.png.z.tmp"]
    kept = [tmp_path / ".notes.txt.a.tmp", tmp_path / "last.pt.tmp"]  # not ours: left alone
    for path in stale + kept:
        path.write_bytes(b"half a file")
    _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=1)
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)
    assert "resuming from" in capsys.readouterr().out
    stale[0].write_bytes(b"half a file")
    _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=0, fresh=True)
    assert not stale[0].exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


@pytest.mark.parametrize("reader", ["load_checkpoint", "archive.inference_bytes"])
def test_crafted_pickle_is_refused_without_running_it(tmp_path, monkeypatch, reader):
    # report --archive reads every best.pt of a runs folder, which may come from anyone.
    from common import archive
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"model": _Payload()}, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="not a plain-tensor checkpoint"):
        {"load_checkpoint": load_checkpoint, "archive.inference_bytes": archive.inference_bytes}[reader](path)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


class _CallsPrint:
    def __reduce__(self):
        return (print, ("ran",))


def test_random_bytes_are_unreadable_and_a_pickled_function_is_refused_as_code(tmp_path):
    noise = tmp_path / "random.pt"
    noise.write_bytes(random.Random(1).randbytes(2048))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(noise)
    assert str(error.value).startswith(f"{noise} is not a readable PyTorch checkpoint (2048 bytes; ")
    assert "weights_only" not in str(error.value) and "code" not in str(error.value)
    printed = tmp_path / "print.pt"
    torch.save({"model": _CallsPrint()}, printed)  # an allowed module, a function not allowed
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(printed)
    assert str(error.value) == (f"{printed} is not a plain-tensor checkpoint (weights_only load refused "
                                "it; it may contain code). Not loading it. Details: Unsupported global: "
                                "GLOBAL print was not an allowed global by default.")


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_only_an_empty_file_is_called_empty(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert "(100 bytes; " in str(error.value) and "the file is empty" not in str(error.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"\(0 bytes; .*: the file is empty$"):
        load_checkpoint(path)


def _damage_middle(path: Path, count: int = 200) -> None:
    """Overwrite `count` bytes in the middle of the file with zeros: inside the weights,
    where the zip's directory and the pickle stay intact (a bad copy, a disk or sync error)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(count)
    path.write_bytes(bytes(data))


def test_weights_damaged_in_the_middle_are_refused_not_loaded(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.randn(100_000)}, "epoch": 3}, path)
    assert load_checkpoint(path)["epoch"] == 3
    _damage_middle(path)
    # torch.load alone returns the damaged weights without a word: what this check is for
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"].abs().gt(0),
                           torch.ones(100_000, dtype=torch.bool))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    member = zipfile.ZipFile(path).testzip()  # the tensor's storage, e.g. archive/data/0
    assert member.endswith("/data/0")
    assert str(error.value) == (f"{path} is not a readable PyTorch checkpoint ({path.stat().st_size} bytes; "
                                f"truncated, damaged or not a checkpoint at all): the data of {member} "
                                "fails its CRC-32 check (bytes changed after it was written)")


def test_a_damaged_zip_directory_is_named_not_a_traceback(tmp_path):
    # zipfile.is_zipfile raised BadZipFile ("zipfiles that span multiple disks are not
    # supported") for this byte of the end-of-directory record, outside every handler.
    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.ones(10)}, path)
    data = bytearray(path.read_bytes())
    data[-25] = 2
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value).endswith("its zip archive is damaged (zipfiles that span multiple disks are not supported)")


@pytest.mark.parametrize("text", ["hello\n", "a,b\n1,2\n", "epochs: 3\n", "colab notes\n", "J\n"])
def test_a_text_file_is_named_as_no_checkpoint(tmp_path, text):
    path = tmp_path / "notes.pt"
    path.write_text(text)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == (f"{path} is not a readable PyTorch checkpoint ({len(text)} bytes; "
                                "truncated, damaged or not a checkpoint at all): neither a zip archive "
                                "(torch.save's format) nor a pickle")


class _RawPickler:
    """A torch.save pickle module whose dump writes a fixed pickle: a dict BUILD, which
    weights_only refuses with a message naming no GLOBAL."""
    __name__ = "raw"

    class Pickler:
        def __init__(self, f, protocol=None):
            self.f = f

        def dump(self, obj):
            self.f.write(b"\x80\x02}}b.")


def test_a_refusal_of_a_non_allowlisted_operation_is_reported_as_possible_code(tmp_path):
    path = tmp_path / "build.pt"
    torch.save({}, path, pickle_module=_RawPickler)
    with pytest.raises(CheckpointError, match="not a plain-tensor checkpoint .*it may contain code"):
        load_checkpoint(path)


def test_matching_tensors_load_and_the_rest_are_listed_with_the_reason():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    target = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    loaded, skipped = load_matching_tensors(target, source.state_dict())
    assert loaded == ["0.weight", "0.bias"]
    assert torch.equal(target[0].weight, source[0].weight)
    assert skipped == ["1.weight: shape (3, 4) vs (2, 4)", "1.bias: shape (3,) vs (2,)",
                       "2.weight: not in the checkpoint (fresh init)", "2.bias: not in the checkpoint (fresh init)"]
    for k in ("1.weight", "1.bias", "2.weight", "2.bias"):
        assert torch.equal(target.state_dict()[k], before[k]), k
    _, skipped = load_matching_tensors(nn.Linear(4, 4), {"extra": torch.zeros(1), **nn.Linear(4, 4).state_dict()})
    assert skipped == ["extra: not in this model"]


def test_resuming_a_run_of_another_model_is_refused(tiny_splits, tmp_path):
    _run_fit(tiny_splits, tmp_path, "torch", epochs=2, stop_after=1)
    with pytest.raises(CheckpointError, match="model: checkpoint has 'small', this run has 'other'"):
        _run_fit(tiny_splits, tmp_path, "torch", epochs=2, meta={"task": "test", "model": "other"})


def test_check_resumable_refuses_only_a_readable_last_pt_of_another_setup(tmp_path):
    meta = {"task": "t4", "init_sha256": "a" * 64}
    check_resumable(tmp_path, meta)  # no last.pt: a new run
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")  # unreadable: engine.fit's resume decides
    check_resumable(tmp_path, meta)
    save_checkpoint({"meta": meta, "config": {}, "finished": False}, tmp_path / "last.pt")
    check_resumable(tmp_path, meta)
    with pytest.raises(CheckpointError, match="init_sha256: checkpoint has 'a{64}', this run has 'b{64}'"):
        check_resumable(tmp_path, {**meta, "init_sha256": "b" * 64})


def test_incompatible_checkpoint_names_the_mismatch(tmp_path):
    with pytest.raises(CheckpointError, match="num_classes: checkpoint has 200, this run has 10"):
        check_compatible({"model": "resnet18", "num_classes": 200},
                         {"model": "resnet18", "num_classes": 10}, tmp_path / "last.pt")
    # a key this run sets and the checkpoint lacks is a difference too
    with pytest.raises(CheckpointError, match="width: checkpoint has no width, this run has 8"):
        check_compatible({"task": "t1"}, {"task": "t1", "width": 8}, tmp_path / "last.pt")
    small, big = nn.Linear(4, 2), nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match="missing"):
        load_model_state(big, small.state_dict(), "x.pt")
    with pytest.raises(CheckpointError, match=r"another shape.*weight \(2, 4\) vs \(3, 4\)"):
        load_model_state(nn.Linear(4, 3), small.state_dict(), "x.pt")
    with pytest.raises(CheckpointError, match=r"^x.pt does not fit this model: 1 unexpected \(e.g. extra\)$"):
        load_model_state(nn.Linear(4, 2), {**small.state_dict(), "extra": torch.zeros(1)}, "x.pt")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np
    save_checkpoint({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]



# ---------------------------------------------------------------- resuming a run
@pytest.mark.parametrize("damage", ["empty", "middle"])
def test_a_damaged_last_checkpoint_resumes_from_its_predecessor(tiny_splits, tmp_path, capsys, damage):
    _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=3)
    assert load_checkpoint(tmp_path / "last.prev.pt")["epoch"] == 2
    if damage == "empty":  # e.g. a cloud-drive sync gone wrong
        (tmp_path / "last.pt").write_bytes(b"")
        why = "(0 bytes; truncated, damaged or not a checkpoint at all): the file is empty"
    else:  # a bad copy: the file is whole but some of its weights are not
        _damage_middle(tmp_path / "last.pt", 4000)
        why = "fails its CRC-32 check"
    straight, _ = _run_fit(tiny_splits, tmp_path / "straight", "torch", epochs=4)
    _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=1)  # resumes, saves epoch 3
    printed = capsys.readouterr().out
    assert "last.pt is not a readable PyTorch checkpoint" in printed and why in printed
    assert f"resuming from {tmp_path / 'last.prev.pt'} (epoch 3, batch 0)" in printed
    # The damaged file is set aside: epoch 3's save no longer moved it over the good
    # last.prev.pt, which left the run without a readable predecessor for an epoch.
    assert "renamed last.pt to last.unusable.pt, so that the next save does not move it over last.prev.pt" in printed
    assert (tmp_path / "last.unusable.pt").exists()
    assert load_checkpoint(tmp_path / "last.prev.pt")["epoch"] == 2
    resumed, result = _run_fit(tiny_splits, tmp_path, "torch", epochs=4)
    assert result["finished"] and result["epochs_run"] == 4
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_run_saved_by_two_processes_resumes_in_one_only_when_finished(tiny_splits, tmp_path, capsys):
    """One RNG state per process in last.pt: two mean a torchrun of two, whose LR schedule
    counts that many processes' steps. Training on in one process is refused; a finished
    run only re-reports, so it is not (tests/test_ddp.py cuts and resumes a real one)."""
    for finished, out in ((False, tmp_path / "cut"), (True, tmp_path / "done")):
        _run_fit(tiny_splits, out, "torch", epochs=2, stop_after=None if finished else 1)
        ck = load_checkpoint(out / "last.pt")
        assert ck["finished"] == finished
        save_checkpoint({**ck, "rng": ck["rng"] * 2}, out / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt was saved by a run of 2 process\(es\); this "
                       r"one has 1.*Resume it with as many \(torchrun --nproc_per_node=2\), --fresh"):
        _run_fit(tiny_splits, tmp_path / "cut", "torch", epochs=2)
    _, result = _run_fit(tiny_splits, tmp_path / "done", "torch", epochs=2)
    assert result["finished"] and result["epochs_run"] == 2


def test_a_last_checkpoint_that_holds_no_dict_is_named_and_passed_over(tiny_splits, tmp_path, capsys):
    _run_fit(tiny_splits, tmp_path, "torch", epochs=3, stop_after=2)
    torch.save(torch.zeros(3), tmp_path / "last.pt")  # a tensor saved under the name
    _, result = _run_fit(tiny_splits, tmp_path, "torch", epochs=3)
    assert f"{tmp_path / 'last.pt'} holds a Tensor, not a checkpoint of these scripts" in capsys.readouterr().out
    assert result["finished"] and result["epochs_run"] == 3


def test_no_readable_checkpoint_names_every_file_and_the_way_on(tiny_splits, tmp_path):
    _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=1)
    for name in ("last.pt", "last.prev.pt", "best.pt"):
        if (tmp_path / name).exists():
            (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*last\.pt.*best\.pt.*--fresh"):
        _run_fit(tiny_splits, tmp_path, "torch", epochs=4)


def test_the_archives_weights_only_best_pt_of_the_right_epoch_is_accepted(tiny_splits, tmp_path, capsys):
    # A damaged best.pt replaced by the submission archive's copy (weights, meta, epoch)
    # of the same epoch: the test pass can score it, so the run resumes.
    from common import archive
    _run_fit(tiny_splits, tmp_path, "torch", epochs=3, stop_after=2)
    (tmp_path / "best.pt").write_bytes(archive.inference_bytes(tmp_path / "best.pt"))
    _run_fit(tiny_splits, tmp_path, "torch", epochs=3, stop_after=0)
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "rewrote" not in printed and "passed over" not in printed
    assert "config" not in load_checkpoint(tmp_path / "best.pt")  # accepted as it is
    _, result = _run_fit(tiny_splits, tmp_path, "torch", epochs=3)
    assert result["finished"] and result["epochs_run"] == 3


def test_a_weights_only_copy_is_named_and_never_resumed_from(tiny_splits, tmp_path):
    # The submission archive's best.pt holds weights, meta and epoch only; put back into
    # --out alone, it must be refused by name (it once raised KeyError: 'finished').
    _run_fit(tiny_splits, tmp_path, "torch", epochs=2)
    best = load_checkpoint(tmp_path / "best.pt")
    for name in ("last.pt", "last.prev.pt"):
        (tmp_path / name).unlink()
    save_checkpoint(inference_state(best), tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint to resume from: \S*best\.pt holds "
                                              r"weights only .*a run cannot resume from it.*--fresh"):
        _run_fit(tiny_splits, tmp_path, "torch", epochs=2)


def test_a_best_checkpoint_older_than_the_best_epoch_is_rewritten_from_the_state_at_that_epoch(
        tiny_splits, tmp_path, capsys):
    # best.pt is written before last.pt, so on a local disk it always holds the best epoch
    # last.pt records. A cloud drive may lose its newest upload (best.pt stays at epoch 1)
    # or damage it; last.pt, saved at the end of that best epoch, holds the same state.
    _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=2)
    assert load_checkpoint(tmp_path / "last.pt")["early_stopping"]["best_epoch"] + 1 == 2
    best_at_2 = load_checkpoint(tmp_path / "best.pt")
    for damage in ("older", "truncated"):
        if damage == "older":
            save_checkpoint(load_checkpoint(tmp_path / "last.prev.pt"), tmp_path / "best.pt")  # epoch 1
        else:
            (tmp_path / "best.pt").write_bytes((tmp_path / "best.pt").read_bytes()[:300])
        _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=0)
        assert f"rewrote {tmp_path / 'best.pt'} from {tmp_path / 'last.pt'} (epoch 2, the best)" \
            in capsys.readouterr().out, damage
        rewritten = load_checkpoint(tmp_path / "best.pt")
        assert rewritten["epoch"] == 2 and not rewritten["finished"]
        assert all(torch.equal(v, best_at_2["model"][k]) for k, v in rewritten["model"].items())
    # ... and the run goes on to the weights of one that was never interrupted
    straight, _ = _run_fit(tiny_splits, tmp_path / "straight", "torch", epochs=4)
    resumed, result = _run_fit(tiny_splits, tmp_path, "torch", epochs=4)
    assert result["finished"] and result["epochs_run"] == 4
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_newer_best_pt_is_resumed_with_one_line_that_says_why(tiny_splits, tmp_path, capsys):
    # Edited states, as a stop between the writes of best.pt and last.pt leaves them: best.pt
    # holds epoch 3's end (its best), last.pt still epoch 2's. Two "resuming from" lines,
    # with different wording, said neither why best.pt won.
    _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=3)
    third, second = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "last.prev.pt")
    save_checkpoint({**third, "early_stopping": {**third["early_stopping"], "best_epoch": 2}}, tmp_path / "best.pt")
    save_checkpoint({**second, "early_stopping": {**second["early_stopping"], "best_epoch": 1}}, tmp_path / "last.pt")
    capsys.readouterr()
    _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=0)
    assert capsys.readouterr().out.splitlines()[:2] == [
        "best.pt holds a newer state than last.pt (a stop between their writes)",
        f"resuming from {tmp_path / 'best.pt'} (epoch 4, batch 0); --fresh starts over"]
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "last.unusable.pt").exists()


def test_a_run_stopped_after_its_last_epoch_says_all_epochs_are_done(tiny_splits, tmp_path, capsys):
    # It said "epoch 3, batch 0" of a 2-epoch run: as if another epoch would train.
    _run_fit(tiny_splits, tmp_path, "torch", epochs=2)
    save_checkpoint({**load_checkpoint(tmp_path / "last.pt"), "finished": False}, tmp_path / "last.pt")
    capsys.readouterr()
    _, result = _run_fit(tiny_splits, tmp_path, "torch", epochs=2)
    assert f"resuming from {tmp_path / 'last.pt'} (all 2 epochs done); --fresh starts over" in capsys.readouterr().out
    assert result["finished"] and result["epochs_run"] == 2


def test_a_state_whose_best_epoch_no_file_holds_is_passed_over_or_refused(tiny_splits, tmp_path, capsys,
                                                                         monkeypatch):
    # Edited states: last.pt saved mid-epoch 4 records best epoch 3, best.pt holds epoch 2
    # and last.prev.pt is gone, so no file holds epoch 3's end: last.pt is passed over and
    # the run resumes from best.pt itself, which agrees with itself.
    _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=3)
    last = load_checkpoint(tmp_path / "last.pt")
    (tmp_path / "last.prev.pt").unlink()
    save_checkpoint({**last, "early_stopping": {**last["early_stopping"], "best_epoch": 2},
                     "step": 1}, tmp_path / "last.pt")  # mid-epoch 4, best epoch 3 (0-based 2)
    save_checkpoint({**load_checkpoint(tmp_path / "best.pt"), "epoch": 2,
                     "early_stopping": {**last["early_stopping"], "best_epoch": 1}}, tmp_path / "best.pt")
    for name in ("results.json", "eval.json"):  # what a script and --evaluate wrote of the old state
        (tmp_path / name).write_text("{}")
    with monkeypatch.context() as m:  # a kill at the renaming: the stale results are gone already
        m.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=0)
    assert not (tmp_path / "results.json").exists() and (tmp_path / "last.pt").exists()
    _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=0)
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'last.pt'} (epoch 3 done) records best epoch 3, which {tmp_path / 'best.pt'} " \
        f"does not hold" in printed, printed
    assert f"resuming from {tmp_path / 'best.pt'} (epoch 3, batch 0)" in printed
    # last.pt is kept aside, so that it cannot win the next resume once best.pt moves on
    assert "renamed last.pt to *.passed-over.pt" in printed
    assert (tmp_path / "last.passed-over.pt").exists()
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "eval.json").exists()
    save_checkpoint(load_checkpoint(tmp_path / "last.passed-over.pt"), tmp_path / "last.pt")
    # with best.pt unreadable too, nothing agrees with it: refused, every file named
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"records best epoch 3, which \S*best\.pt does not hold\. "
                                              r"No saved state agrees with \S*best\.pt.*--fresh"):
        _run_fit(tiny_splits, tmp_path, "torch", epochs=4, stop_after=0)


def test_every_recipe_field_but_the_process_only_ones_must_match_to_resume(tmp_path):
    from dataclasses import asdict, fields

    from common.checkpoint import _check_same_recipe
    from common.schema import FitConfig
    saved = asdict(FitConfig())
    process_only = {"compile", "compile_mode", "fresh", "stop_after_epoch"}  # steer the process only
    for field in fields(FitConfig):
        value = saved[field.name]
        changed = (not value if isinstance(value, bool) else value + "x" if isinstance(value, str)
                   else 1 if value is None else value + 1)
        current = {**saved, field.name: changed}
        flag = "--" + field.name.replace("_", "-")  # the error names the flag: --warmup-epochs
        if field.name in process_only:
            _check_same_recipe(saved, current, tmp_path / "last.pt", {})
        else:
            with pytest.raises(CheckpointError, match=f"trained with {flag} "):
                _check_same_recipe(saved, current, tmp_path / "last.pt", {})
            # a checkpoint that does not record the field (an older one) cannot vouch for it
            missing = {k: v for k, v in saved.items() if k != field.name}
            with pytest.raises(CheckpointError, match=rf"trained with {flag} None \(now "):
                _check_same_recipe(missing, current, tmp_path / "last.pt", {})
    # T4's Phase B sets epochs by --embed-epochs: the error says so, not --epochs (Phase A's)
    with pytest.raises(CheckpointError, match=r"trained with --embed-epochs 30 \(now 31\)\. Rerun"):
        _check_same_recipe(saved, {**saved, "epochs": 31}, tmp_path / "last.pt", {"epochs": "--embed-epochs"})


def test_weights_sha256_tells_weights_apart_not_devices_or_copies():
    from common.checkpoint import weights_sha256
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert weights_sha256(a) == weights_sha256(b) and len(weights_sha256(a)) == 64
    with torch.no_grad():
        b.bias[1] += 1e-7  # one float's last bits
    assert weights_sha256(a) != weights_sha256(b)
    # names and shapes count too: the same bytes under another name or shape are other weights
    c = torch.nn.Module()
    c.other = a
    assert weights_sha256(c) != weights_sha256(a)
    bn = torch.nn.BatchNorm1d(2)  # with its 0-dim int64 num_batches_tracked
    assert weights_sha256(bn) == weights_sha256(torch.nn.BatchNorm1d(2))


def test_atomic_file_is_synced_before_the_rename_and_readable_as_the_umask_allows(tmp_path, monkeypatch):
    # fsync before os.replace: after a power loss the renamed file is never empty, and of the
    # folder after it, or the rename may be lost; mkstemp's
    # private 0600 would leave results and checkpoints unreadable to a group or a grader.
    from common import files
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda src, dst: (events.append(("replace", str(src))),
                                                               real_replace(src, dst))[1])
    old = os.umask(0o027)
    try:
        files.write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(old)
    (fsync, synced), (replace, moved), (fsync_folder, folder) = events
    assert (fsync, replace) == ("fsync", "replace") and synced == moved  # the same temporary file
    assert (fsync_folder, folder) == ("fsync", str(tmp_path))  # then the rename itself is on disk
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o640


def test_stale_temps_are_removed_but_a_live_writes_is_spared(tmp_path):
    # In folders other commands may write (T3's and T4's --out, the report's figures, next to
    # the zip), a kill's temps piled up; removing them must not pull a live write's away.
    import os
    import time

    from common.files import STALE_TEMP_S, remove_stale_temps
    old = tmp_path / ".results.json.k1.tmp"
    live = tmp_path / ".results.json.k2.tmp"
    other = tmp_path / ".notes.txt.k3.tmp"
    for path in (old, live, other):
        path.write_text("x")
    os.utime(old, (time.time() - STALE_TEMP_S - 1,) * 2)
    os.utime(other, (time.time() - STALE_TEMP_S - 1,) * 2)
    assert remove_stale_temps(tmp_path, ["results.json"], STALE_TEMP_S) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.k3.tmp", ".results.json.k2.tmp"]
    assert remove_stale_temps(tmp_path, ["results.json"]) == 1  # a folder only this process writes
    assert [p.name for p in tmp_path.iterdir()] == [".notes.txt.k3.tmp"]


def test_stale_temps_of_a_name_with_glob_characters_are_found_and_no_others(tmp_path):
    """A zip named A2[final].zip: its own kill's temp goes, another name's stays. Unescaped,
    the brackets were a character class: the own temp stayed and .A2f.zip's was deleted."""
    from common.files import remove_stale_temps
    own, other = tmp_path / ".A2[final].zip.k1.tmp", tmp_path / ".A2f.zip.k2.tmp"
    for path in (own, other):
        path.write_text("x")
    assert remove_stale_temps(tmp_path, ["A2[final].zip"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [".A2f.zip.k2.tmp"]


def test_an_atomic_write_syncs_its_folder_after_the_rename(tmp_path, monkeypatch):
    """The renames (temp -> file, file -> .prev) live in the folder's entries: without an
    fsync of the folder a power loss can undo them."""
    import os

    from common.files import atomic_file
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(b))),
                                                     real_replace(a, b))[1])
    (tmp_path / "last.pt").write_text("old")
    with atomic_file(tmp_path / "last.pt", keep_previous=True) as tmp:
        tmp.write_text("new")
    assert events == [("fsync", False), ("replace", "last.prev.pt"), ("replace", "last.pt"), ("fsync", True)]
    assert (tmp_path / "last.pt").read_text() == "new"


def test_a_one_process_run_resumed_by_two_is_refused_and_each_rank_gets_its_own_rng(tiny_splits, tmp_path):
    """The process-count check goes both ways (1 saved, 2 now: the LR schedule would count
    half the steps), and a two-process checkpoint gives rank 1 rank 1's RNG state, not rank
    0's: else both ranks draw the same dropout and augmentation after a resume."""
    from common.checkpoint import RunCheckpoints
    from common.runtime import Runtime
    _run_fit(tiny_splits, tmp_path, "torch", epochs=2, stop_after=1)
    ck = load_checkpoint(tmp_path / "last.pt")
    cpu = torch.device("cpu")
    with pytest.raises(CheckpointError, match=r"last.pt was saved by a run of 1 process\(es\); this one has 2"):
        RunCheckpoints(tmp_path, Runtime(cpu, rank=0, world_size=2), ck["meta"], ck["config"]).resume()
    rank_1_state = {**ck["rng"][0], "torch": torch.Generator().manual_seed(123).get_state()}
    save_checkpoint({**ck, "rng": [ck["rng"][0], rank_1_state]}, tmp_path / "last.pt")
    before = torch.get_rng_state()
    try:
        RunCheckpoints(tmp_path, Runtime(cpu, rank=1, world_size=2), ck["meta"], ck["config"]).resume()
        assert torch.equal(torch.get_rng_state(), rank_1_state["torch"])
        RunCheckpoints(tmp_path, Runtime(cpu, rank=0, world_size=2), ck["meta"], ck["config"]).resume()
        assert torch.equal(torch.get_rng_state(), ck["rng"][0]["torch"])
    finally:
        torch.set_rng_state(before)


def test_a_blocking_io_error_of_the_work_inside_a_held_folder_is_not_called_a_second_copy(tmp_path):
    """exclusive_folder turns a refused lock into "in use by another process"; an
    unrelated BlockingIOError raised by the work inside (a print to a full non-blocking
    pipe) must stay what it is."""
    from common.checkpoint import exclusive_folder
    with pytest.raises(BlockingIOError, match="pipe full"):
        with exclusive_folder(tmp_path):
            raise BlockingIOError("pipe full")


def test_write_text_creates_the_missing_folders(tmp_path):
    from common.files import write_text
    write_text(tmp_path / "new" / "deeper" / "x.json", "{}")
    assert (tmp_path / "new" / "deeper" / "x.json").read_text() == "{}"


def test_the_gpus_rng_state_is_saved_and_restored_where_there_is_one(monkeypatch):
    """Dropout on a GPU draws from the CUDA generator: a resume that lost its state would
    continue another random stream than the uninterrupted run."""
    from common.checkpoint import rng_state, set_rng_state
    gpu_state, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: gpu_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(state))
    state = rng_state()
    assert torch.equal(state["cuda"], gpu_state)
    set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], gpu_state)


def test_a_resume_on_other_data_is_refused_and_an_older_checkpoint_without_it_resumes(tiny_splits, tmp_path):
    # The data's fingerprint (checkpoint meta "data"): a T1 run stopped on one dataset
    # resumed on another of the same class count and finished, one run spliced from two.
    meta = {"task": "test", "model": "small", "data": "400 train, 50 holdout and 100 test images of 10 classes"}
    _run_fit(tiny_splits, tmp_path / "a", "torch", epochs=3, stop_after=1, meta=meta)
    other = {**meta, "data": "550 train, 50 holdout and 100 test images of 10 classes"}
    with pytest.raises(CheckpointError) as err:
        _run_fit(tiny_splits, tmp_path / "a", "torch", epochs=3, meta=other)
    assert str(err.value) == (f"{tmp_path / 'a' / 'last.pt'} belongs to a different model or setup: data: "
                              f"checkpoint has {meta['data']!r}, this run has {other['data']!r} (the "
                              "dataset's files or its split changed). Use another --out, or --fresh to start over.")
    # written before "data" was recorded: it resumes, where another missing key is refused
    _run_fit(tiny_splits, tmp_path / "b", "torch", epochs=3, stop_after=1, meta={"task": "test", "model": "small"})
    _, result = _run_fit(tiny_splits, tmp_path / "b", "torch", epochs=3, meta=meta)
    assert result["finished"] and result["epochs_run"] == 3
    with pytest.raises(CheckpointError, match="width: checkpoint has no width, this run has 8"):
        _run_fit(tiny_splits, tmp_path / "b", "torch", epochs=3, meta={**meta, "width": 8})
