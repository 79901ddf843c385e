"""A user's mistake ends a script with one `error:` line, exit status 1 and no traceback, and
before any training: bad image files, a damaged Cars196 .mat, an unusable --out, a failed
download. Each runs the script as a user would (a subprocess) and fails in seconds."""

from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.synthetic import make_cars196, make_tiny_imagenet
from tests.conftest import ROOT, run_script


def assert_one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ")
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == [proc.stderr.splitlines()[0]]
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in:\n{proc.stderr}"
    assert "epoch 1/" not in proc.stdout  # nothing was trained


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_imagenet(tmp_path_factory.mktemp("tiny"), num_classes=3, train_per_class=6,
                              val_per_class=2, image_size=16, seed=0)


def test_bad_images_in_any_split_stop_the_run_before_epoch_1(tiny: Path, tmp_path: Path) -> None:
    val = sorted((tiny / "val" / "images").iterdir())[1]
    train = sorted((tiny / "train").glob("*/images/*.JPEG"))[4]
    val_bytes, train_bytes = val.read_bytes(), train.read_bytes()
    try:
        val.write_bytes(val_bytes[: len(val_bytes) // 2])  # truncated: must be found before training
        train.write_text("not an image\n")  # a text file named .JPEG
        proc = run_script("t2_resnet18.py", "--data-dir", str(tiny), "--device", "cpu", "--workers", "0",
                          "--out", str(tmp_path / "out"), "--holdout-per-class", "1", check=False)
    finally:
        val.write_bytes(val_bytes)
        train.write_bytes(train_bytes)
    assert_one_error_line(proc, "2 of 24 image files are not whole JPEG/PNG images",
                          f"{val}: truncated JPEG", f"{train}: not a JPEG or PNG",
                          "--check-images full")


def test_truncated_cars_annos_mat_names_the_file_and_the_layouts(tmp_path: Path) -> None:
    root = make_cars196(tmp_path / "cars", "cars_annos", num_classes=4, per_class=3, image_size=(24, 16))
    mat = root / "cars_annos.mat"
    mat.write_bytes(mat.read_bytes()[:200])
    proc = run_script("t4_retrieval.py", "--data-dir", str(root), "--device", "cpu",
                      "--out", str(tmp_path / "out"), check=False)
    assert_one_error_line(proc, f"{mat} (200 bytes) is not a readable MATLAB .mat file",
                          "expected one of two Cars196 layouts")


def test_out_that_is_a_file_is_refused_by_name(tmp_path: Path) -> None:
    taken = tmp_path / "results.txt"
    taken.write_text("mine")
    proc = run_script("t2_resnet18.py", "--smoke", "--out", str(taken), check=False)
    assert_one_error_line(proc, f"--out {taken} is a file")
    assert taken.read_text() == "mine"


def test_out_where_nothing_can_be_written_is_refused_by_name() -> None:
    # Tests run as root, whom permission bits do not stop; /proc refuses new entries to anyone.
    proc = run_script("t3_cubs.py", "--smoke", "--out", "/proc/no-such-run/t3", check=False)
    assert_one_error_line(proc, "--out /proc/no-such-run/t3: cannot create folders or files in /proc")


def test_failed_download_leaves_no_data_dir_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    offline = ("import runpy, sys, urllib.error, urllib.request\n"
               "def urlopen(*args, **kwargs):\n"
               "    raise urllib.error.URLError('no network (test)')\n"
               "urllib.request.urlopen = urlopen\n"
               f"sys.argv = ['t2_resnet18.py', '--data-dir', {str(data_dir)!r}, '--device', 'cpu',\n"
               f"            '--out', {str(tmp_path / 'out')!r}]\n"
               "runpy.run_path('t2_resnet18.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", offline], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert_one_error_line(proc, f"Could not download Tiny ImageNet into {data_dir}", "no network (test)")
    assert list(tmp_path.iterdir()) == []  # neither data/ nor its parent new/, nor --out


def assert_one_usage_error_line(proc: subprocess.CompletedProcess, *expected: str) -> None:
    """argparse's refusal: usage, then one `<script>: error: ...` line, exit status 2."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith("usage: ")
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for text in expected:
        assert text in errors[0], f"{text!r} not in:\n{proc.stderr}"
    assert proc.stdout == ""  # nothing ran


def test_smoke_with_a_typed_data_dir_is_refused_not_ignored(tiny: Path, tmp_path: Path) -> None:
    proc = run_script("t2_resnet18.py", "--smoke", "--data-dir", str(tiny), "--out", str(tmp_path / "out"),
                      check=False)
    assert_one_usage_error_line(proc, f"t2_resnet18.py: error: --smoke trains on a dataset it generates "
                                      f"in --out and never reads --data-dir {tiny}")
    assert not (tmp_path / "out").exists()


def test_non_finite_lr_is_refused_by_argparse(tmp_path: Path) -> None:
    proc = run_script("t1_custom_cnn.py", "--smoke", "--lr", "inf", "--out", str(tmp_path / "out"),
                      check=False)
    assert_one_usage_error_line(proc, "error: argument --lr: must be a finite number, got 'inf'")


@pytest.mark.parametrize("script, flags, message", [
    ("t3_cubs", ["--gate-init", "nan"], "argument --gate-init: must be a finite number, got 'nan'"),
    ("t3_cubs", ["--gate-init", "open"], "argument --gate-init: must be a number or 'pytorch', got 'open'"),
    ("t2_resnet18", ["--backend", "cache", "--color-jitter", "0.2"],
     "error: --backend cache does no colour jitter (--color-jitter 0.2)"),
    ("t4_retrieval", ["--backend", "cache"], "error: --backend cache cannot make T4's evaluation images"),
    ("t1_custom_cnn", ["--seed", "-1"], "argument --seed: must be >= 0, got -1"),  # NumPy's generators refuse it
    ("t4_retrieval", ["--init-weights", "resnet18.pth"],
     "error: --init-weights is read only with --init imagenet, not --init auto"),
    ("t4_retrieval", ["--classes-per-batch", "1"],
     "error: --classes-per-batch must be >= 2 (each image needs a negative), got 1"),
    ("t4_retrieval", ["--holdout-per-class", "1"],
     "error: --holdout-per-class must be >= 2 for T4 (Phase B selects its epoch by holdout Recall@1"),
    ("t4_retrieval", ["--images-per-class", "1"],
     "error: --images-per-class must be >= 2 (each image needs a positive), got 1"),
    ("t3_cubs", ["--variant", "both", "--d", "32"], "error: --d 32 does not fit the plus variant"),
    ("t3_cubs", ["--variant", "plus", "--gate-init", "pytorch"],
     "error: --gate-init sets the plain blocks' gates; --variant plus trains none"),
    ("t3_cubs", ["--variant", "both", "--evaluate", "README.md"],  # any file: refused before it is read
     "error: --evaluate takes the checkpoint's one --placement and one --variant, not all/both"),
    ("t3_cubs", ["--placement", "all", "--evaluate", "README.md"],
     "error: --evaluate takes the checkpoint's one --placement and one --variant, not all/both"),
    ("t1_custom_cnn", ["--dropout", "1"], "error: --dropout must be in [0, 1), got 1.0"),
    ("t1_custom_cnn", ["--dropout", "-0.1"], "error: --dropout must be in [0, 1), got -0.1"),
    ("t1_custom_cnn", ["--width", "1"], "error: --width must be at least 2 for the custom CNN, got 1"),  # was a traceback
    ("t2_resnet18", ["--label-smoothing", "1.5"], "argument --label-smoothing: must be in [0, 1), got 1.5"),
    ("t2_resnet18", ["--color-jitter", "1.5"], "argument --color-jitter: must be in [0, 1), got 1.5"),
    ("t1_custom_cnn", ["--seed", str(2**32)], "argument --seed: must be below 2^32, got 4294967296"),
    ("t3_cubs", ["--gate-init", "1e308"], "argument --gate-init: must be within [-100, 100] (a gate logit)"),
    ("t2_resnet18", ["--evaluate", ""], "error: --evaluate needs a checkpoint path (got an empty one)"),
    ("t2_resnet18", ["--evaluate", "README.md", "--fresh"],  # it evaluated, leaving the folder as it was
     "error: --fresh starts a training run over and --evaluate trains nothing: drop one of them"),
    ("t1_custom_cnn", ["--image-size", "6"], "argument --image-size: must be at least 8 (pixels a side), got 6"),
    ("t4_retrieval", ["--workers", "100000"], "argument --workers: must be at most "),
])
def test_flags_that_cannot_work_are_refused_before_anything_runs(script, flags, message, tmp_path, capsys):
    # In-process: argparse's refusal comes before any import of data or model work.
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(script).main(["--smoke", "--out", str(tmp_path / "out"), *flags])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_random_bytes_checkpoint_is_named_as_unreadable_without_unsafe_advice(tmp_path: Path) -> None:
    bad = tmp_path / "random.pt"
    bad.write_bytes(random.Random(0).randbytes(4096))  # seeded: the same bytes each run
    proc = run_script("t2_resnet18.py", "--smoke", "--out", str(tmp_path / "out"), "--evaluate", str(bad),
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if "error:" in line] == proc.stderr.splitlines()
    assert proc.stderr.startswith(f"error: {bad} is not a readable PyTorch checkpoint (4096 bytes; ")
    for unsafe in ("weights_only", "may contain code", "will likely succeed", "trusted source"):
        assert unsafe not in proc.stderr, proc.stderr


def test_unloadable_init_weights_are_a_config_error(tmp_path: Path) -> None:
    from common.errors import ConfigError
    from common.init_weights import load_initial_weights
    text = tmp_path / "weights.pt"
    text.write_text("not a checkpoint")
    missing = tmp_path / "missing.pt"
    for path, message in ((missing, f"--init-weights: no checkpoint at {missing}"),
                          (text, f"--init-weights: {text} is not a readable PyTorch checkpoint (16 bytes; ")):
        with pytest.raises(ConfigError) as error:
            load_initial_weights(None, "imagenet", t3_best=None, t3_results="unused", init_weights=str(path))
        assert str(error.value).startswith(message)


class _OpensAFile:
    """Unpickling it calls open(path, "w"): code a state dict must not be able to run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_init_weights_with_pickled_code_are_refused_without_running_it(tmp_path: Path) -> None:
    from common.errors import ConfigError
    from common.init_weights import load_initial_weights
    marker, weights = tmp_path / "ran", tmp_path / "weights.pt"
    torch.save({"conv1.weight": _OpensAFile(marker)}, weights)
    with pytest.raises(ConfigError, match=f"^--init-weights: {weights} is not a plain-tensor checkpoint .*may "
                                          f"contain code"):
        load_initial_weights(None, "imagenet", t3_best=None, t3_results="unused", init_weights=str(weights))
    assert not marker.exists()


@pytest.mark.parametrize("skipped", [12, 13])
def test_init_lists_twelve_skipped_tensors_then_says_how_many_more(tmp_path: Path, capsys, skipped: int) -> None:
    from common.init_weights import load_initial_weights
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2, bias=False) for _ in range(skipped + 1)])
    weights = tmp_path / "weights.pt"
    torch.save({"0.weight": torch.ones(2, 2), **{f"{i}.weight": torch.zeros(3) for i in range(1, skipped + 1)}},
               weights)
    init = load_initial_weights(model, "imagenet", t3_best=None, t3_results="unused", init_weights=str(weights))
    assert (init["init_loaded"], len(init["init_skipped"])) == (1, skipped)
    assert torch.equal(model[0].weight, torch.ones(2, 2))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"--init imagenet: loaded 1 tensors from {weights}; skipped {skipped}:"
    assert lines[1:13] == [f"  {i}.weight: shape (3,) vs (2, 2)" for i in range(1, 13)]
    assert lines[13:] == ([] if skipped == 12 else ["  ... and 1 more (listed in results.json)"])


def test_init_weights_that_would_load_no_weight_are_refused(tmp_path: Path) -> None:
    """A wrapped state dict, or one of another width (where only BatchNorm's 0-d step counters
    match), would start T4 from scratch under the name --init imagenet."""
    from common.cubs import cubs_resnet18
    from common.errors import ConfigError
    from common.init_weights import load_initial_weights
    model = cubs_resnet18(10, stem="imagenet", width=8)
    narrow = cubs_resnet18(10, stem="imagenet", width=4).state_dict()
    cases = {"wrapped": ({"model": model.state_dict(), "epoch": 3},
                         r"is not a state dict of tensors \(keys model, epoch\)"),
             "a tensor": (torch.zeros(3), r"is not a state dict of tensors \(a Tensor\)"),
             "prefixed": ({f"module.{k}": v for k, v in model.state_dict().items()},
                          r"no weight of .* fits this network: names or shapes differ everywhere "
                          r"\(its first: module.conv1.weight, .*this network's: conv1.weight"),
             "another width": (narrow, "no weight of .* fits this network")}
    assert any(k.endswith("num_batches_tracked") for k in narrow)
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(ConfigError, match=message):
            load_initial_weights(model, "imagenet", t3_best=None, t3_results="unused",
                                 init_weights=str(tmp_path / f"{name}.pt"), verbose=False)


def test_init_imagenet_reads_torchvisions_cached_file_weights_only(tmp_path: Path, monkeypatch) -> None:
    """The cached download is read with weights_only: a file planted there cannot run code,
    and a real state dict there loads (no internet needed)."""
    import torchvision

    from common.cubs import cubs_resnet18
    from common.errors import ConfigError
    from common.init_weights import load_initial_weights
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"conv1.weight": _OpensAFile(marker)}, cached)
    model = cubs_resnet18(10, stem="imagenet")
    with pytest.raises(ConfigError, match=f"^--init imagenet: {cached} is not a plain-tensor checkpoint .*"
                                          f"torchvision's cached ResNet-18 weights: delete the file"):
        load_initial_weights(model, "imagenet", t3_best=None, t3_results="unused", verbose=False)
    assert not marker.exists()
    reference = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(reference, cached)
    init = load_initial_weights(model, "imagenet", t3_best=None, t3_results="unused", verbose=False)
    assert init["init_source"] == "torchvision IMAGENET1K_V1" and init["init_loaded"] == len(reference) - 2
    assert torch.equal(model.layer4[1].conv2.weight, reference["layer4.1.conv2.weight"])  # fc.* skipped


def test_init_t3_without_a_t3_run_is_a_config_error() -> None:
    from common.errors import ConfigError
    from common.init_weights import load_initial_weights
    with pytest.raises(ConfigError, match="^--init t3 needs a T3 best.pt next to x/placements.json; "
                                          "run t3_cubs.py first or use --init scratch$"):
        load_initial_weights(None, "t3", t3_best=None, t3_results="x/placements.json")


def test_t3_selection_takes_the_flags_then_t3s_choice_and_only_a_best_pt_that_exists(tmp_path: Path) -> None:
    from common.init_weights import t3_selection
    results = tmp_path / "placements.json"
    results.write_text(json.dumps({"best_overall": {"placement": "parallel", "variant": "plus"}}))
    assert t3_selection(results) == ("parallel", "plus", None)  # no best.pt written yet
    assert t3_selection(tmp_path / "none.json") == ("serial", "plain", None)
    for run in ("parallel_plus", "reverse_plus", "reverse_plain"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "best.pt").write_bytes(b"")
    assert t3_selection(results) == ("parallel", "plus", tmp_path / "parallel_plus" / "best.pt")
    assert t3_selection(results, "reverse") == ("reverse", "plus", tmp_path / "reverse_plus" / "best.pt")
    assert t3_selection(results, "reverse", "plain") == ("reverse", "plain", tmp_path / "reverse_plain" / "best.pt")
    assert t3_selection(results, "serial") == ("serial", "plus", None)  # T3 trained no serial plus


def test_init_auto_without_a_t3_run_names_where_it_looked_and_the_flag(capsys) -> None:
    from common.init_weights import load_initial_weights
    assert load_initial_weights(None, "auto", t3_best=None, t3_results="elsewhere/t3/placements.json") \
        == {"init": "scratch"}
    printed = capsys.readouterr().out
    # not "no best.pt next to X", which reads as if X existed; and the flag that points elsewhere
    assert printed == ("--init auto: no T3 best.pt found from elsewhere/t3/placements.json "
                       "(--t3-results names T3's placements.json) -> --init scratch\n")


def test_gate_init_pytorch_means_pytorchs_default_init():
    import t3_cubs
    assert t3_cubs.gate_logit("pytorch") is None and t3_cubs.gate_logit("-2.5") == -2.5


def test_t3_and_t4_default_to_compile_mode_default_and_t2_to_cuda_graphs(monkeypatch):
    # T3's per-block torch.cond cannot live in a CUDA graph (t3_cubs.py), nor T4's (the same
    # CUBS network: Inductor skips the graphs of a graph with torch.cond); T1 and T2 replay graphs
    from test_colab import script_parser
    assert script_parser("t3_cubs.py", monkeypatch).parse_args([]).compile_mode == "default"
    assert script_parser("t4_retrieval.py", monkeypatch).parse_args([]).compile_mode == "default"
    assert script_parser("t2_resnet18.py", monkeypatch).parse_args([]).compile_mode == "reduce-overhead"


@pytest.mark.parametrize("compile_, mode, deferred", [(True, "reduce-overhead", True), (True, "default", False),
                                                      (False, "reduce-overhead", False)])
def test_t4_under_cuda_graphs_defers_the_range_check_as_t3_does(compile_, mode, deferred, monkeypatch):
    # Without it each plain block kept its torch.cond, and CUDA graphs were silently skipped.
    import t4_retrieval
    from common import engine
    from common.cubs import SimilarityGateBlock, cubs_resnet18
    from common.schema import FitConfig

    class Stop(Exception):
        pass

    def capture(model, rt, compile, mode, redo_check=None):
        raise Stop(redo_check)

    monkeypatch.setattr(engine, "for_training", capture)
    model = cubs_resnet18(num_classes=4, width=8, d=64)
    with pytest.raises(Stop) as stopped:
        t4_retrieval.fit_phase(model, [], None, None, FitConfig(compile=compile_, compile_mode=mode),
                               Path("unused"), None, {})
    assert (stopped.value.args[0] is not None) == deferred
    assert {b.defer_range_check for b in model.modules() if isinstance(b, SimilarityGateBlock)} == {deferred}


def test_t4_refuses_more_classes_per_batch_than_training_classes_before_training(tmp_path):
    import torch

    import t4_retrieval
    from common import runtime
    from common.errors import ConfigError
    rt = runtime.Runtime(torch.device("cpu"))
    args = t4_retrieval.parse_args(["--smoke", "--out", str(tmp_path), "--classes-per-batch", "8"])
    data = t4_retrieval.load_data(args, rt, tmp_path)  # the smoke set's 8 training classes: all of them
    assert len(data.splits.train.classes) == 8
    args = t4_retrieval.parse_args(["--smoke", "--out", str(tmp_path), "--classes-per-batch", "9"])
    with pytest.raises(ConfigError, match=r"--classes-per-batch 9 exceeds the 8 training classes of "):
        t4_retrieval.load_data(args, rt, tmp_path)
    # P x K beyond the training images: refused here too, where it was found only when
    # Phase B began, after all of Phase A
    args = t4_retrieval.parse_args(["--smoke", "--out", str(tmp_path), "--images-per-class", "100"])
    with pytest.raises(ConfigError) as err:
        t4_retrieval.load_data(args, rt, tmp_path)
    assert str(err.value) == ("160 training images do not fill one P x K batch of 4 x 100 = 400 images; "
                              "lower --classes-per-batch or --images-per-class")
    (tmp_path / "best.pt").write_bytes(b"")  # --evaluate never draws a P x K batch: not refused there
    for flags in (["--images-per-class", "100"], ["--classes-per-batch", "9"]):
        args = t4_retrieval.parse_args(["--smoke", "--out", str(tmp_path), *flags,
                                        "--evaluate", str(tmp_path / "best.pt")])
        assert len(t4_retrieval.load_data(args, rt, tmp_path).splits.train.classes) == 8


def test_a_mistyped_evaluate_path_is_refused_before_the_dataset_is_looked_for(tmp_path):
    proc = run_script("t2_resnet18.py", "--data-dir", str(tmp_path / "nowhere"), "--no-download",
                      "--out", str(tmp_path / "out"), "--evaluate", str(tmp_path / "runs" / "t2"), check=False)
    assert proc.returncode == 1 and "Tiny ImageNet" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"error: --evaluate {tmp_path / 'runs' / 't2'}: no such file or "
                                            f"folder (a best.pt or last.pt, or a run folder holding best.pt)")


def test_evaluate_of_a_folder_without_best_pt_says_what_it_holds(tmp_path):
    from common import evaluate
    from common.checkpoint import CheckpointError
    (tmp_path / "t3" / "serial_plain").mkdir(parents=True)
    (tmp_path / "t3" / "serial_plain" / "best.pt").write_bytes(b"")
    (tmp_path / "t3" / "reverse_plain").mkdir()
    (tmp_path / "t3" / "reverse_plain" / "best.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"t3: this folder holds no best.pt; its run folders: "
                                              r"reverse_plain, serial_plain$"):
        evaluate.load(tmp_path / "t3")
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"t2: this folder holds no best.pt; it has .*t2/last.pt \(a run "
                                              r"stopped before its first holdout score\)$"):
        evaluate.load(tmp_path / "t2")
    with pytest.raises(CheckpointError, match=r"holds no best.pt; no last.pt and no run folder holding a best.pt either$"):
        evaluate.load(tmp_path)


@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "cpu:1"])
def test_a_device_torch_knows_but_these_scripts_do_not_run_on_is_named(device):
    from common.errors import ConfigError
    from common.runtime import setup_runtime
    with pytest.raises(ConfigError, match=f"^--device must be auto, cpu, cuda or cuda:N; got '{device}'$"):
        setup_runtime(device)


def test_a_gpu_index_the_machine_lacks_is_named(monkeypatch):
    from common.errors import ConfigError
    from common.runtime import setup_runtime
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("cuda:5", "cuda:1"):  # cuda:1 is the first index one GPU lacks
        with pytest.raises(ConfigError, match=rf"^--device {device}: this machine has 1 GPU\(s\), cuda:0 to cuda:0$"):
            setup_runtime(device)


def test_an_out_under_a_broken_link_is_named_before_anything_runs(tmp_path: Path, monkeypatch) -> None:
    """Colab: runs -> a Drive folder, with Drive not mounted."""
    from common import cli
    from common.errors import ConfigError
    (tmp_path / "runs").symlink_to(tmp_path / "drive" / "runs")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"^--out runs/t2: runs is a symbolic link to {tmp_path / 'drive' / 'runs'}, "
                                          f"which does not exist"):
        cli.check_out_dir("runs/t2")


def test_path_flags_starting_with_a_tilde_are_expanded_once_for_every_use(tmp_path: Path, monkeypatch) -> None:
    """bash leaves `--out=~/x` as it is: the check and every writer must see the same folder."""
    import t4_retrieval
    monkeypatch.setenv("HOME", str(tmp_path))
    args = t4_retrieval.parse_args(["--smoke", "--out=~/t4", "--t3-results=~/t3/placements.json"])
    assert (args.out, args.t3_results) == (str(tmp_path / "t4"), str(tmp_path / "t3" / "placements.json"))


@pytest.mark.parametrize("content", ["not json\n", "[1, 2]"])
def test_a_t3_results_file_that_is_not_a_comparison_is_named(tmp_path: Path, content: str) -> None:
    from common.errors import ConfigError
    from common.init_weights import t3_selection
    wrong = tmp_path / "results.json"
    wrong.write_text(content)
    with pytest.raises(ConfigError, match=f"^--t3-results {wrong} is not T3's placements.json"):
        t3_selection(wrong)
    wrong.write_text('{"best_overall": null}')  # T3 finished no run: no selection, no error
    assert t3_selection(wrong) == ("serial", "plain", None)


def test_a_vanilla_results_file_that_is_not_json_gives_no_at_par_check(tmp_path: Path) -> None:
    from common.placements import compare_runs
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"epoch": 1}\n{"epoch": 2}\n')
    c = compare_runs(tmp_path, bad)
    assert c["at_par"] is None and "is not a T2 ResNet-18 result" in c["vanilla_note"]


def test_evaluate_prints_its_figures_even_where_eval_json_cannot_be_written(tmp_path: Path, monkeypatch, capsys):
    """A checkpoint in a read-only folder (an unzipped archive, Kaggle's inputs)."""
    from common import evaluate
    from common.checkpoint import save_checkpoint
    from common.runtime import Runtime
    model = torch.nn.Linear(2, 2)
    save_checkpoint({"model": model.state_dict(), "meta": {"task": "t"}, "epoch": 3}, tmp_path / "best.pt")

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(evaluate, "write_json", read_only)
    report = evaluate.evaluate_checkpoint(model, evaluate.load(tmp_path), {"task": "t"},
                                          Runtime(torch.device("cpu")), lambda m: {"test_acc": 0.5}, "torch")
    assert report["test_acc"] == 0.5
    assert capsys.readouterr().out == (f"{tmp_path / 'best.pt'} (epoch 3): test_acc 0.5000\n"
                                       f"eval.json not written beside the checkpoint (Read-only file system: "
                                       f"{tmp_path})\n")


def test_t4_without_cars196_names_the_cars196_subfolder_it_also_reads(tmp_path):
    # README's Data section places Cars196 in data/cars196/; the error listed only data/'s
    # layouts, which led a user to put cars_annos.mat straight into data/ (it works there too).
    import torch

    from common import runtime, task_data
    from common.errors import DatasetNotFoundError
    rt = runtime.Runtime(torch.device("cpu"))
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        task_data.cars196(data, tmp_path / "out", rt, holdout_per_class=1, seed=0, check="off")
    assert f"no known Cars196 layout in {data}" in str(err.value)
    assert str(err.value).endswith("or from its cars196/ subfolder when that exists, as README's Data "
                                   "section places it: data/cars196/)")
    make_cars196(data / "cars196", "cars_annos", num_classes=4, per_class=3, image_size=(24, 16))
    splits = task_data.cars196(data, tmp_path / "out", rt, holdout_per_class=1, seed=0, check="off")
    assert splits.root == data / "cars196" and len(splits.test.files) == 6
    (data / "cars196" / "cars_annos.mat").unlink()  # pointed at directly: no word about a subfolder
    with pytest.raises(DatasetNotFoundError) as err:
        task_data.cars196(data / "cars196", tmp_path / "out", rt, holdout_per_class=1, seed=0, check="off")
    assert "subfolder" not in str(err.value)
