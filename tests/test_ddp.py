"""T3 and T4 --smoke under DDP: two gloo processes on the CPU (torchrun), as on two GPUs.

T2's DDP run is checked in tests/test_scripts.py. Here each script runs under
`torch.distributed.run --nproc_per_node=2` through a small probe (written to tmp_path) that
records, per rank, every file written under --out and every pass of an ImageLoader, then
runs the script unchanged as __main__. torchrun's --redirects keeps each rank's stdout and
stderr apart. Each test then checks:

- one set of outputs: rank 1 writes nothing under --out, only rank 0 prints results;
- exactly-once evaluation: each evaluation pass over the test (or holdout) split embeds or
  scores every image once in total over the ranks, not once per rank, and all ranks hold
  rank 0's weights and BatchNorm statistics when each scores its holdout shard;
- the same figures as one process: `--evaluate` of the DDP run's checkpoint in a single
  process gives the test counts and figures that the DDP run wrote to results.json (T3 test
  accuracy over all 100 test images; T4 Recall@K over all 192 test images, so recall is not
  computed per shard);
- sharding: metrics.jsonl train_images per epoch = 2 ranks x full batches of each half;
- each rank's RNG state saved in last.pt.

Settings are the smallest that still run every DDP code path (one epoch per phase), to keep
the suite's time down.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from tests.conftest import ROOT
from tests.conftest import run_script as run

# Runs the task script given on the command line as __main__, logging to LOG.<rank>:
#   write <path>                       a file written (opened for writing, renamed or removed
#                                      into place) under the watched folder
#   pass <train|eval> <files> <images> one ImageLoader pass: size of its file list, images yielded
#   evaluate <same|differs>            engine.fit's holdout evaluation: do the ranks hold the
#                                      same weights and buffers (BatchNorm statistics)?
PROBE = r'''
import os, runpy, sys
root, log_base, watched, script, *argv = sys.argv[1:]
sys.path.insert(0, root)
rank = int(os.environ.get("RANK", "0"))
fd = os.open(f"{log_base}.{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
watched = os.path.abspath(watched) + os.sep
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT

def note(line):
    os.write(fd, (line + "\n").encode())

def hook(event, args):
    try:
        if event == "open":
            path, mode, flags = args
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                       else bool((flags or 0) & WRITE_FLAGS))
        elif event == "os.rename":
            path, writing = args[1], True
        elif event in ("os.remove", "tempfile.mkstemp"):
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(watched):
                note("write " + path)
    except Exception:  # the probe must never change what the script does
        pass

from common import loader
_epoch = loader.ImageLoader.epoch

def epoch(self, *args, **kwargs):
    n = 0
    try:
        for images, labels in _epoch(self, *args, **kwargs):
            n += len(labels)
            yield images, labels
    finally:
        note(f"pass {'train' if self.train else 'eval'} {len(self.files)} {n}")

loader.ImageLoader.epoch = epoch

import torch, torch.distributed as dist
from common import engine
_fit = engine.fit

def fit(net, loader_, loss_fn, optimizer, scheduler, scaler, evaluate, *args, **kwargs):
    def checked(m):  # do the ranks hold the same weights and buffers when they evaluate?
        sums = [t.detach().double().sum().item() for t in m.state_dict().values()]
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, sums)
        note("evaluate " + ("same" if all(x == every[0] for x in every) else "differs"))
        return evaluate(m)
    return _fit(net, loader_, loss_fn, optimizer, scheduler, scaler, checked, *args, **kwargs)

engine.fit = fit
sys.addaudithook(hook)
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
'''


def _torchrun(tmp_path: Path, script: str, out: Path, *args: str) -> dict:
    """Run `script` under 2 gloo processes with the probe; returns {rank: {stdout, stderr,
    log}} (log: the probe's lines). --standalone: torchrun picks a free port (a fixed one
    failed whenever another run held it)."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    logs = tmp_path / "torchrun_logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--standalone", f"--log-dir={logs}", "--redirects=3", str(probe),
         str(ROOT), str(tmp_path / "probe"), str(out), str(ROOT / script), "--smoke",
         "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    ranks = {}
    for rank in (0, 1):
        read = lambda path: path.read_text() if path.exists() else ""  # noqa: E731
        rank_dir = next(logs.glob(f"*/attempt_0/{rank}"), logs / "missing")
        ranks[rank] = {"stdout": read(rank_dir / "stdout.log"), "stderr": read(rank_dir / "stderr.log"),
                       "log": read(tmp_path / f"probe.{rank}").splitlines()}
    assert proc.returncode == 0, (f"{script} under torchrun failed ({proc.returncode}):\n"
                                  f"{proc.stderr[-3000:]}\nrank 0:\n{ranks[0]['stderr'][-3000:]}"
                                  f"\nrank 1:\n{ranks[1]['stderr'][-3000:]}")
    return ranks


def _writes(rank: dict) -> set[str]:
    return {line.split(" ", 1)[1] for line in rank["log"] if line.startswith("write ")}


def _eval_passes(ranks: dict, num_files: int) -> list[int]:
    """Images yielded, summed over the ranks, by each evaluation pass over a set of
    `num_files` files (the ranks make the same passes in the same order)."""
    per_rank = [[int(line.split()[3]) for line in ranks[r]["log"]
                 if line.startswith(f"pass eval {num_files} ")] for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]), per_rank
    return [a + b for a, b in zip(*per_rank)]


def _evaluations(ranks: dict) -> list[str]:
    return [line.split()[1] for line in ranks[0]["log"] if line.startswith("evaluate ")]


def _history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _one_set_of_outputs(ranks: dict, out: Path, expected: list[str]) -> None:
    assert not _writes(ranks[1]), f"rank 1 wrote under --out: {sorted(_writes(ranks[1]))}"
    written = _writes(ranks[0])
    for name in expected:
        assert str(out / name) in written, f"rank 0 did not write {name}"
    assert ranks[1]["stdout"] == "", f"rank 1 printed:\n{ranks[1]['stdout'][-2000:]}"


def _rng_per_rank(last: Path) -> None:
    rng = load_checkpoint(last)["rng"]  # one stream per rank, seeded seed + rank
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_t3_under_two_gloo_processes_equals_one_process_on_test_counts(tmp_path):
    out = tmp_path / "t3"
    # one epoch of a narrow network (the DDP paths do not depend on the size); no T2 to compare
    # with from the repo's runs/
    isolated = ("--width", "8", "--vanilla-results", str(tmp_path / "no_t2.json"))
    ranks = _torchrun(tmp_path, "t3_cubs.py", out, "--placement", "serial",
                      "--epochs", "1", *isolated)
    run_dir = out / "serial_plain"
    r = json.loads((run_dir / "results.json").read_text())
    assert r["device"] == "cpu x2" and r["epochs_run"] == 1 and r["finished"]
    assert r["test_images"] == 100  # both shards' test images, each counted once

    # one set of outputs, written by rank 0; rank 0 alone prints the results and the comparison
    _one_set_of_outputs(ranks, out, ["serial_plain/results.json", "serial_plain/best.pt",
                                     "serial_plain/last.pt", "serial_plain/metrics.jsonl",
                                     "placements.json", "placements.md", "placements.png"])
    assert [line.startswith("test accuracy") for line in ranks[0]["stdout"].splitlines()].count(True) == 1
    assert ranks[0]["stdout"].count("Selected by holdout accuracy") == 1
    c = json.loads((out / "placements.json").read_text())
    assert [(row["placement"], row["variant"]) for row in c["runs"]] == [("serial", "plain")]
    assert c["selected"]["test_acc"] == r["test_acc"]

    # every evaluation pass (holdout each epoch, test once) saw each image once over the ranks
    assert _eval_passes(ranks, 100) == [100]
    assert set(_eval_passes(ranks, 50)) == {50}
    # the ranks score their holdout shards with one model: rank 0's, the one best.pt holds
    assert _evaluations(ranks) == ["same"]

    # 400 train images, 2 ranks x 200, full batches only
    batch = r["args"]["batch_size"]
    assert [h["train_images"] for h in _history(run_dir / "metrics.jsonl")] == [2 * (200 // batch) * batch]
    _rng_per_rank(run_dir / "last.pt")

    # one process scoring the same best.pt: the same test images and figures
    run("t3_cubs.py", "--smoke", "--out", str(out), "--placement", "serial", "--epochs", "1",
        *isolated, "--evaluate", str(run_dir), timeout=300)
    e = json.loads((run_dir / "eval.json").read_text())
    assert e["device"] == "cpu" and e["test_images"] == r["test_images"] == 100
    # Two ranks of one thread against one process of two: the sums run in another order,
    # so an image at a near-tie may flip; one of the 100 at most.
    assert abs(e["test_acc"] - r["test_acc"]) <= 0.01 and abs(e["test_top5"] - r["test_top5"]) <= 0.01
    assert abs(e["test_loss"] - r["test_loss"]) < 1e-5


def test_t4_under_two_gloo_processes_embeds_each_test_image_once_and_equals_one_process(tmp_path):
    out = tmp_path / "t4"
    # one epoch per phase, small images and width, one mining (the DDP paths are the same)
    flags = ("--init", "scratch", "--epochs", "1", "--embed-epochs", "1", "--image-size", "32",
             "--width", "8", "--batch-size", "32", "--no-compare-mining",
             "--t3-results", str(tmp_path / "no_t3.json"))  # not the repo's runs/
    ranks = _torchrun(tmp_path, "t4_retrieval.py", out, *flags)
    r = json.loads((out / "results.json").read_text())
    assert r["device"] == "cpu x2" and r["finished"]
    assert r["test_images"] == 192 and r["train_images"] == 160
    minings = [m["mining"] for m in r["mining_comparison"]]
    assert minings == ["ms"]

    _one_set_of_outputs(ranks, out, ["results.json", "retrieval.png", "phase_a/best.pt",
                                     *(f"phase_b_{m}/best.pt" for m in minings)])
    assert ranks[0]["stdout"].count("Recall@K on 192 test images") == 1
    assert ranks[0]["stdout"].count("Phase B (ms mining) test") == 1

    # Each embedding of the test split (before Phase A, after it, after each Phase B run)
    # embeds each of the 192 images once in total, not once per rank; each holdout
    # evaluation (Phase A accuracy, Phase B Recall@1) sees each of the 32 images once.
    assert _eval_passes(ranks, 192) == [192] * (2 + len(minings))
    assert set(_eval_passes(ranks, 32)) == {32}
    assert _evaluations(ranks) == ["same"] * (1 + len(minings))  # Phase A, each Phase B

    # Phase A: 160 train images, 2 ranks x 80, full batches; Phase B: 160 // (P*K * 2)
    # batches of P x K per rank
    args = r["args"]
    batch, pk = args["batch_size"], args["classes_per_batch"] * args["images_per_class"]
    assert [h["train_images"] for h in _history(out / "phase_a" / "metrics.jsonl")] == \
        [2 * (80 // batch) * batch]
    for m in minings:
        assert [h["train_images"] for h in _history(out / f"phase_b_{m}" / "metrics.jsonl")] == \
            [2 * (160 // (2 * pk)) * pk]
    _rng_per_rank(out / "phase_b_ms" / "last.pt")

    # one process embedding the same Phase B checkpoint: the same Recall@K over all 192
    # test images (a per-shard gallery of 96 would give other figures)
    run("t4_retrieval.py", "--smoke", "--out", str(out), *flags,
        "--evaluate", str(out / "phase_b_ms"), timeout=300)
    e = json.loads((out / "phase_b_ms" / "eval.json").read_text())
    assert e["device"] == "cpu"
    # Equal here; a margin of one query of 192 in case another CPU's kernels round a
    # sample differently in another batch (each rank batches every 2nd image)
    ddp = r["phase_b"]["test_recall"]
    assert e["test_recall"].keys() == ddp.keys() == {"1", "2", "4", "8"}
    assert all(abs(e["test_recall"][k] - ddp[k]) <= 1 / 192 + 1e-9 for k in ddp), (e["test_recall"], ddp)


# ---------------------------------------------------------------- evaluate.embed's shard check
# Rank 1's shard of 6 images (rank 0 keeps 0, 2, 4): each case's indices, or None for the
# loader's own sharding (every 2nd image, 1, 3, 5).
SHARD_CASES = {"sharded": None, "one missing": [1, 3], "one twice, one missing": [1, 3, 4]}


def _embed_worker(rank: int, store: str, files: list[str], out: str) -> None:
    """One of two gloo ranks: evaluate.embed over `files` once per SHARD_CASES entry, rank 1's
    shard replaced by the case's indices; writes {case: outcome} to out.<rank>."""
    import copy
    import datetime

    import numpy as np
    import torch.distributed as dist

    from common import evaluate
    from common.loader import ImageLoader, LoaderSettings
    from common.runtime import Runtime, leave_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    loader = ImageLoader(files, list(range(len(files))), LoaderSettings(
        batch_size=2, image_size=16, backend="torch", workers=0))
    torch.manual_seed(rank)  # rank 1's weights differ until embed broadcasts rank 0's
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    real_shard_of, outcomes = evaluate._shard_of, {}
    for case, indices in SHARD_CASES.items():
        def shard_of(loader_, rt, indices=indices):
            shard = real_shard_of(loader_, rt)
            if rt.rank == 1 and indices is not None:
                shard = copy.copy(shard)  # the cached shard stays as it is
                shard.batches = lambda epoch: [np.array(indices)]
            return shard
        evaluate._shard_of = shard_of
        try:
            emb, labels = evaluate.embed(model, loader, Runtime(torch.device("cpu"), rank, 2))
        except RuntimeError as err:
            outcomes[case] = f"RuntimeError: {err}"
            continue
        # one process embedding every image with the same (rank 0's) weights
        single, _ = evaluate.embed(model, loader, Runtime(torch.device("cpu")))
        outcomes[case] = {"labels": labels.tolist(), "as one process": torch.allclose(emb, single, atol=1e-6)}
    Path(f"{out}.{rank}").write_text(json.dumps(outcomes))
    leave_process_group()


def test_embed_under_two_gloo_processes_refuses_shards_that_miss_or_repeat_an_image(tmp_path):
    """evaluate.embed all-gathers the ranks' shards: the loader's own sharding gives every
    image once, in order, as one process does; a shard that leaves an image out, or repeats
    one in place of another (the count then right), raises on every rank rather than return
    embeddings with holes or misplaced rows."""
    from PIL import Image
    files = []
    for i in range(6):
        files.append(str(tmp_path / f"{i}.jpg"))
        Image.new("RGB", (16, 16), (40 * i, 255 - 40 * i, 128)).save(files[-1])
    torch.multiprocessing.spawn(_embed_worker, args=(str(tmp_path / "store"), files,
                                                     str(tmp_path / "outcome")), nprocs=2)
    for rank in (0, 1):
        outcomes = json.loads((tmp_path / f"outcome.{rank}").read_text())
        assert outcomes == {
            "sharded": {"labels": [0, 1, 2, 3, 4, 5], "as one process": True},
            "one missing": "RuntimeError: embed: the ranks' shards cover 5 of 6 images",
            "one twice, one missing": "RuntimeError: embed: the ranks' shards cover 6 of 6 images",
        }, rank



def _finished_run_worker(rank: int, store: str, out: str, ending: str) -> None:
    """One of two gloo ranks: cli.run of a main() whose last collective is an all-gather of
    tensors (as T3's and T4's evaluation), which then returns ("finished"), raises
    Interrupted on both ranks ("signalled", as fit at an agreed step), or on rank 0 alone
    raises a UserError a second later ("rank 0 fails", as a full disk writing results).
    Writes cli.run's exit and whether a process group is left to out.<rank>."""
    import datetime
    import time

    import torch.distributed as dist

    from common import cli
    from common.errors import Interrupted, UserError

    def main() -> None:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        parts: list = [None, None]
        dist.all_gather_object(parts, torch.arange(4) + rank)
        assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [1, 2, 3, 4]]
        if ending == "signalled":
            raise Interrupted(15, epoch=0, step=3, partial={})  # SIGTERM
        if ending == "rank 0 fails" and rank == 0:
            time.sleep(1)  # rank 1 is waiting in cli.run's barrier by now
            raise UserError("no space left")

    try:
        cli.run(main)
        exit_ = "returned"
    except SystemExit as stop:
        exit_ = str(stop.code)
    Path(f"{out}.{rank}").write_text(json.dumps({"exit": exit_, "process group left": not dist.is_initialized()}))


@pytest.mark.parametrize("ending", ["finished", "signalled", "rank 0 fails"])
def test_a_run_under_two_processes_leaves_its_process_group_before_it_exits(tmp_path, ending):
    """cli.run ends a finished or signalled run's process group (a barrier, then
    destroy_process_group). A rank that exited straight after an all-gather aborted at exit
    in about 1 of 4 runs (gloo's thread freeing the gathered tensors while the interpreter
    shut down), and torchrun called a finished run failed. When rank 0 fails alone, rank 1
    leaves quietly instead of raising from the barrier ("Connection closed by peer")."""
    torch.multiprocessing.spawn(_finished_run_worker, args=(str(tmp_path / "store"), str(tmp_path / "out"), ending),
                                nprocs=2)
    outcomes = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    expected = {"finished": [{"exit": "returned", "process group left": True}] * 2,
                "signalled": [{"exit": "143", "process group left": True}] * 2,
                "rank 0 fails": [{"exit": "error: no space left", "process group left": False},
                                 {"exit": "returned", "process group left": False}]}[ending]
    assert outcomes == expected


# ---------------------------------------------------------------- engine.fit cut and resumed
def _fit_worker(rank: int, world_size: int, store: str, data: str, out: str, cut: bool, report: str,
                batch_size: int = 1) -> None:
    """engine.fit of a small network for 2 epochs of 28 steps per rank (batch 1); with `cut`,
    rank 1 alone gets SIGINT at its 10th step and the ranks stop together at step 25 (with
    batch 4, 7 steps an epoch: SIGINT at step 3, and they stop at the end of epoch 1).
    Writes {"history": ...} or {"signal": name, "epoch": ..., "step": ...} or {"error": ...}
    to report.<rank>."""
    import datetime
    import signal

    import torch.distributed as dist

    from common import engine, evaluate, runtime
    from common.checkpoint import CheckpointError
    from common.datasets import load_tiny_imagenet
    from common.errors import Interrupted
    from common.loader import ImageLoader, LoaderSettings
    from tests.test_engine import _SmallNet

    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
    rt = runtime.Runtime(torch.device("cpu"), rank, world_size)
    splits = load_tiny_imagenet(Path(data), holdout_per_class=2)
    shard = dict(shard_id=rank, num_shards=world_size, image_size=16, backend="torch", workers=0)
    train = ImageLoader(splits.train.files, splits.train.labels, LoaderSettings(batch_size=batch_size, train=True,
                                                                                seed=5, **shard))
    holdout = ImageLoader(splits.holdout.files, splits.holdout.labels, LoaderSettings(batch_size=8, train=False, **shard))
    torch.manual_seed(0)
    model = _SmallNet()
    cfg = engine.FitConfig(epochs=2, lr=0.05, warmup_epochs=1, patience=100)
    net = engine.for_training(model, rt)
    optimizer, scheduler = engine.optimizer_and_schedule(model, cfg, len(train))
    ce, steps = torch.nn.CrossEntropyLoss(), [0]

    def loss_fn(outputs, labels):
        steps[0] += 1
        if cut and rank == 1 and steps[0] == (10 if batch_size == 1 else 3):  # within epoch 1
            os.kill(os.getpid(), signal.SIGINT)
        return ce(outputs, labels)
    try:
        fitted = engine.fit(net, train, loss_fn, optimizer, scheduler, engine.grad_scaler(rt),
                            evaluate.holdout_scorer(holdout, rt), cfg, out, rt, {"task": "t", "model": "small"})
        outcome = {"history": [{k: h[k] for k in ("train_loss", "train_acc", "train_images")}
                               for h in fitted["history"]]}
    except Interrupted as stop:
        outcome = {"signal": stop.name, "epoch": stop.epoch, "step": stop.step}
    except CheckpointError as err:
        outcome = {"error": str(err)}
    Path(f"{report}.{rank}").write_text(json.dumps(outcome))
    runtime.leave_process_group()


def test_a_run_cut_mid_epoch_under_two_processes_resumes_with_every_ranks_sums(tmp_path):
    """A signal on one rank stops both at the same batch, under that signal's name on both;
    last.pt holds the sums of every rank's batches before the cut, so the resumed epoch's
    train loss and accuracy equal the uninterrupted run's (counted once per image, not rank
    0's twice). A run saved by two processes is not resumed by one: its LR schedule counts
    two processes' steps."""
    from common.synthetic import make_tiny_imagenet
    data = make_tiny_imagenet(tmp_path / "data", num_classes=4, train_per_class=16, val_per_class=2,
                              image_size=16, seed=3)

    def spawn(name: str, out: str, cut: bool = False) -> dict:
        report = str(tmp_path / name)
        torch.multiprocessing.spawn(_fit_worker, args=(2, str(tmp_path / f"{name}.store"), str(data),
                                                       str(tmp_path / out), cut, report), nprocs=2)
        outcomes = [json.loads(Path(f"{report}.{rank}").read_text()) for rank in (0, 1)]
        assert outcomes[0] == outcomes[1], outcomes
        return outcomes[0]

    straight = spawn("straight", "a")
    assert [h["train_images"] for h in straight["history"]] == [56, 56]
    assert spawn("cut", "b", cut=True) == {"signal": "SIGINT", "epoch": 0, "step": 25}
    threads = torch.get_num_threads()
    try:  # in this process: the worker's torch.set_num_threads(1) must not outlive the test
        _fit_worker(0, 1, "", str(data), str(tmp_path / "b"), False, str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    error = json.loads((tmp_path / "one.0").read_text())["error"]
    assert "was saved by a run of 2 process(es); this one has 1" in error
    assert "torchrun --nproc_per_node=2" in error
    resumed = spawn("resumed", "b")
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert b["train_images"] == a["train_images"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
        assert b["train_acc"] == a["train_acc"]


def test_under_two_processes_a_signal_in_an_epoch_of_fewer_than_25_steps_stops_at_its_end(tmp_path):
    """The ranks agree on a signal every 25 steps: in an epoch of fewer steps (T4's on 3+
    GPUs) none did, and a Ctrl-C or a scheduler's SIGTERM waited for the end of training
    (torchrun SIGKILLs the workers 30 s after forwarding it). Now the run stops at the end of
    the epoch the signal came in, with that epoch saved."""
    from common.checkpoint import load_checkpoint
    from common.synthetic import make_tiny_imagenet
    data = make_tiny_imagenet(tmp_path / "data", num_classes=4, train_per_class=16, val_per_class=2,
                              image_size=16, seed=3)
    report = str(tmp_path / "cut")
    torch.multiprocessing.spawn(_fit_worker, args=(2, str(tmp_path / "store"), str(data), str(tmp_path / "out"),
                                                   True, report, 4), nprocs=2)
    outcomes = [json.loads(Path(f"{report}.{rank}").read_text()) for rank in (0, 1)]
    assert outcomes == [{"signal": "SIGINT", "epoch": 1, "step": 0}] * 2  # after epoch 1 of 2
    saved = load_checkpoint(tmp_path / "out" / "last.pt")
    assert (saved["epoch"], saved["step"], saved["finished"]) == (1, 0, False)


def _main_first_worker(rank: int, store: str, out: str, fails: bool) -> None:
    """One of two gloo ranks: cli.run of a main() whose rank-0-only work (runtime.main_first,
    as the data check and the folder lock) raises a UserError on rank 0, or succeeds; then
    one more collective. Writes cli.run's exit and what each rank saw to out.<rank>."""
    import datetime

    import torch.distributed as dist

    from common import cli
    from common.errors import ImageDecodeError
    from common.runtime import Runtime, main_first

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # as torchrun sets them: cli.run's label
    seen = []

    def work() -> None:
        seen.append(f"work on rank {rank}")
        if fails:
            raise ImageDecodeError("a.jpg: truncated JPEG")

    def main() -> None:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        main_first(Runtime(torch.device("cpu"), rank, 2), work)
        total = torch.ones(1)
        dist.all_reduce(total)
        seen.append(f"all_reduce {int(total)}")

    try:
        cli.run(main)
        exit_ = "returned"
    except SystemExit as stop:
        exit_ = str(stop.code)
    Path(f"{out}.{rank}").write_text(json.dumps({"exit": exit_, "seen": seen}))


@pytest.mark.parametrize("fails", [False, True])
def test_an_error_of_rank_0s_own_work_is_one_line_on_every_rank(tmp_path, fails):
    """Rank 0 alone checks the data and locks --out while the others wait. When that failed,
    rank 1 raised gloo's "Connection closed by peer" from its barrier, a traceback under rank
    0's one-line error (found by running torchrun with a truncated JPEG)."""
    torch.multiprocessing.spawn(_main_first_worker, args=(str(tmp_path / "store"), str(tmp_path / "out"), fails),
                                nprocs=2)
    outcomes = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    if not fails:
        assert outcomes == [{"exit": "returned", "seen": ["work on rank 0", "all_reduce 2"]},
                            {"exit": "returned", "seen": ["all_reduce 2"]}]
    else:
        assert outcomes == [
            {"exit": "error (rank 0 of 2): a.jpg: truncated JPEG", "seen": ["work on rank 0"]},
            {"exit": "error (rank 1 of 2): rank 0 stopped with the error above, so rank 1 stops too", "seen": []}]
