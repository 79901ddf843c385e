"""common/cli.py: --smoke overrides, numeric flag checks, user errors without a traceback."""

import argparse
import re
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from test_colab import script_parser

from common import cli
from common.errors import ConfigError, DatasetNotFoundError


RECIPE = dict(epochs=60, batch_size=256, lr=0.2, optimizer="sgd", weight_decay=5e-4, warmup_epochs=2,
              label_smoothing=0.1, patience=15, min_delta=0.0, grad_clip=0.0, holdout_per_class=10,
              image_size=64, color_jitter=0.0, width=64, name="runs-but-not-a-path")


def _parser():
    p = cli.training_parser("test", task="t3", recipe=RECIPE)
    p.add_argument("--vanilla-results", default="runs/t2/results.json")
    p.add_argument("--name")  # its default comes from the recipe
    return p


def test_a_recipe_must_give_every_training_default():
    with pytest.raises(ValueError, match=r"the recipe lacks \['patience'\]"):
        cli.training_parser("test", task="tx", recipe={k: v for k, v in RECIPE.items() if k != "patience"})


def test_smoke_moves_default_runs_paths_under_runs_smoke_and_keeps_typed_ones():
    args = cli.parse(_parser(), ["--smoke"], smoke=cli.SMOKE)
    assert (args.out, args.vanilla_results) == ("runs/smoke/t3", "runs/smoke/t2/results.json")
    assert args.name == "runs-but-not-a-path" and args.epochs == 8 and args.device == "cpu"
    typed = cli.parse(_parser(), ["--smoke", "--out", "runs/mine", "--epochs", "3"], smoke=cli.SMOKE)
    assert (typed.out, typed.vanilla_results, typed.epochs) == ("runs/mine", "runs/smoke/t2/results.json", 3)
    # results.json's args name the generated data (task_data makes it in <out>/smoke_data), not ./data
    assert (args.data_dir, typed.data_dir) == ("runs/smoke/t3/smoke_data", "runs/mine/smoke_data")
    real = cli.parse(_parser(), [], smoke=cli.SMOKE)
    assert (real.out, real.vanilla_results, real.epochs) == ("runs/t3", "runs/t2/results.json", 60)
    assert real.data_dir == "./data"
    assert vars(real).items() >= RECIPE.items()  # every default is the recipe's


@pytest.mark.parametrize("check, good, bad", [
    (cli.positive_int, ("1", 1), "0"), (cli.nonnegative_int, ("0", 0), "-1"),
    (cli.positive_float, ("0.5", 0.5), "0"), (cli.nonnegative_float, ("0", 0.0), "-0.1"),
])
def test_numeric_checks_accept_the_range_and_refuse_outside_it(check, good, bad):
    assert check(good[0]) == good[1]
    with pytest.raises(argparse.ArgumentTypeError):
        check(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.positive_float("nan")


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "Infinity", "1e999"])
def test_float_flags_refuse_non_finite_values(text):
    for check in (cli.finite_float, cli.positive_float, cli.nonnegative_float):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number"):
            check(text)
    assert cli.finite_float("-2.5") == -2.5


def test_lr_inf_is_a_usage_error_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(_parser(), ["--lr", "inf"], smoke=cli.SMOKE)
    assert exit_info.value.code == 2
    assert "error: argument --lr: must be a finite number, got 'inf'" in capsys.readouterr().err


def test_under_torchrun_rank_0_alone_prints_a_usage_error(capsys, monkeypatch):
    # Each rank printed the whole usage and the error, interleaved.
    for rank, printed in (("1", ""), ("0", "error: argument --lr: must be a finite number, got 'inf'")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            cli.parse(_parser(), ["--lr", "inf"], smoke=cli.SMOKE)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and (printed in err if printed else err == "")


def test_workers_are_capped_at_four_per_core_and_image_size_at_eight_pixels_below(monkeypatch):
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 1)  # bench/gpu_check.sh passes --workers 8
    assert [cli.workers(n) for n in ("0", "8", "16")] == [0, 8, 16]
    with pytest.raises(argparse.ArgumentTypeError, match="must be at most 16 .16, or 4 per CPU core of this "
                                                         "machine., got 17"):
        cli.workers("17")
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 8)
    assert cli.workers("32") == 32
    with pytest.raises(argparse.ArgumentTypeError, match="must be at most 32 "):
        cli.workers("33")
    assert cli.image_size("8") == 8
    with pytest.raises(argparse.ArgumentTypeError, match="must be at least 8 .pixels a side., got 7"):
        cli.image_size("7")


def test_batch_size_1_cannot_train_but_can_evaluate(capsys, tmp_path):
    # It ended in BatchNorm's "Expected more than 1 value per channel when training" traceback
    # (--image-size 8: the last stage's maps are 1 x 1).
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(_parser(), ["--batch-size", "1", "--out", str(tmp_path / "run")], smoke=cli.SMOKE)
    assert exit_info.value.code == 2
    assert "error: --batch-size 1 cannot train: BatchNorm needs more than one value per channel" \
        in capsys.readouterr().err
    (tmp_path / "best.pt").write_bytes(b"")
    args = cli.parse(_parser(), ["--batch-size", "1", "--evaluate", str(tmp_path / "best.pt")], smoke=cli.SMOKE)
    assert args.batch_size == 1


def test_a_warmup_as_long_as_the_run_is_named(capsys, tmp_path, monkeypatch):
    """warmup_cosine never reaches its decay when the warmup covers every epoch."""
    out = ["--out", str(tmp_path / "run")]
    monkeypatch.setenv("RANK", "1")  # under torchrun: rank 0 alone says it
    cli.parse(_parser(), ["--epochs", "2", *out], smoke=cli.SMOKE)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    cli.parse(_parser(), ["--epochs", "2", *out], smoke=cli.SMOKE)  # the recipe's warmup: 2 epochs
    assert capsys.readouterr().err == ("note: --warmup-epochs 2 >= --epochs 2: the LR only warms up, "
                                       "reaching its peak at the last step, and never decays; a short "
                                       "run wants a smaller --warmup-epochs\n")
    cli.parse(_parser(), ["--epochs", "3", *out], smoke=cli.SMOKE)
    cli.parse(_parser(), ["--epochs", "2", "--warmup-epochs", "1.5", *out], smoke=cli.SMOKE)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 2), (4, 4), (64, 4), (None, 1)])
def test_default_workers_never_exceed_the_cpu_count(cpus, expected, monkeypatch):
    monkeypatch.setattr(cli.os, "cpu_count", lambda: cpus)
    assert cli.parse(_parser(), [], smoke=cli.SMOKE).workers == expected


def test_smoke_with_a_typed_data_dir_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(_parser(), ["--smoke", "--data-dir", "mine"], smoke=cli.SMOKE)
    assert exit_info.value.code == 2
    assert "error: --smoke trains on a dataset it generates in --out and never reads --data-dir mine" \
        in capsys.readouterr().err
    assert cli.parse(_parser(), ["--smoke"], smoke=cli.SMOKE).smoke  # the default --data-dir is fine


def test_t4_help_offers_no_download(monkeypatch):
    help_text = " ".join(script_parser("t4_retrieval.py", monkeypatch).format_help().split())
    assert "--no-download" not in help_text and "receiving" not in help_text
    assert "folder holding the dataset (never downloaded: place it there by hand)" in help_text
    t2_help = " ".join(script_parser("t2_resnet18.py", monkeypatch).format_help().split())
    assert "--no-download never download the dataset" in t2_help


def test_run_prints_a_user_error_alone_and_lets_bugs_keep_their_traceback():
    def missing():
        raise DatasetNotFoundError("Tiny ImageNet not found in ./data")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(missing)
    assert exit_info.value.code == "error: Tiny ImageNet not found in ./data"  # printed, status 1

    def bug():
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        cli.run(bug)


def test_run_ends_a_ctrl_c_outside_training_with_130_and_one_line(capsys):
    def evaluating():  # engine.fit turns Ctrl-C into Interrupted; elsewhere it is a KeyboardInterrupt
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_info:
        cli.run(evaluating)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == ("interrupted (Ctrl-C); what was saved is kept: rerun the same "
                                       "command to go on\n")


def test_out_is_checked_when_parsing_without_creating_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = cli.parse(_parser(), ["--out", "new/run"], smoke=cli.SMOKE)
    assert args.out == "new/run" and list(tmp_path.iterdir()) == []  # checked, nothing left behind
    (tmp_path / "file").write_text("x")
    for out, expected in (("file", "--out file is a file"),
                          ("file/run", "--out file/run lies inside file, which is a file"),
                          ("/proc/no-such-run", "--out /proc/no-such-run: cannot create folders or "
                                                "files in /proc (No such file or directory)")):
        with pytest.raises(ConfigError) as error:
            cli.parse(_parser(), ["--out", out], smoke=cli.SMOKE)
        assert str(error.value).startswith(expected)


SCRIPTS = ("t1_custom_cnn.py", "t2_resnet18.py", "t3_cubs.py", "t4_retrieval.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_shows_its_default_once(script, monkeypatch):
    parser = script_parser(script, monkeypatch)
    help_text = parser.format_help()
    entries = re.split(r"\n(?=  -)", help_text.split("\noptions:\n", 1)[1])
    by_flag = {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries}
    flags = [a for a in parser._actions if a.help is not argparse.SUPPRESS and a.dest != "help"]
    assert len(flags) >= 25 and len(by_flag) == len(flags) + 1  # + -h
    for action in flags:
        entry = by_flag[action.option_strings[0]]
        assert action.help and action.help.strip(), f"{action.option_strings[0]} has no help text"
        assert entry.lower().count("default:") == 1, entry
        if "default:" not in action.help.lower():  # the formatter adds the value itself
            shown = {False: "off", True: "on", None: "none"}.get(action.default, action.default) \
                if isinstance(action.default, (bool, type(None))) else action.default
            assert entry.endswith(f"(default: {shown})"), entry
    assert "(default: None)" not in help_text and "(default: False)" not in help_text


@pytest.mark.parametrize("script", SCRIPTS)
def test_readmes_flags_section_names_every_flag_of_the_script(script, monkeypatch):
    from pathlib import Path
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("\n## Flags\n"):readme.index("\n## The data path\n")]
    named = set(re.findall(r"--[a-z0-9-]+", section))
    parser = script_parser(script, monkeypatch)
    flags = {o for a in parser._actions if a.help is not argparse.SUPPRESS
             for o in a.option_strings if o.startswith("--") and o != "--help"}
    assert len(flags) >= 25 and flags - named == set()


def test_the_report_help_names_the_command_and_no_empty_default(capsys):
    from common import report
    with pytest.raises(SystemExit):
        report.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # as argparse wraps it for any terminal width
    assert text.startswith("usage: python -m common.report ") and "(default: runs)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_the_typed_data_flags_reach_the_checkpoint_meta_and_the_loaders():
    # data_recipe goes into checkpoint meta (a resume with other values is refused) and
    # loader_settings into every loader: each typed value must arrive as typed.
    args = cli.parse(_parser(), ["--batch-size", "48", "--label-smoothing", "0.2", "--holdout-per-class", "7",
                                 "--color-jitter", "0.3", "--seed", "11", "--image-size", "40",
                                 "--workers", "1", "--backend", "torch"], smoke=cli.SMOKE)
    splits = SimpleNamespace(fingerprint=lambda: "40 train, 10 holdout and 20 test images of 2 classes")
    assert cli.data_recipe(args, splits) == dict(batch_size=48, label_smoothing=0.2, holdout_per_class=7,
                                                 color_jitter=0.3, seed=11, data=splits.fingerprint())
    s = cli.loader_settings(args, eval_resize=46)
    assert (s.batch_size, s.image_size, s.workers, s.backend, s.seed, s.color_jitter, s.eval_resize) == (
        48, 40, 1, "torch", 11, 0.3, 46)


def _exit_message(failing: Callable[[], object]) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.run(failing)
    return str(stop.value.code)


def test_a_file_this_user_may_not_read_is_one_line_that_names_it(tmp_path):
    # A dataset folder or image without read permission (or an --out without write
    # permission) ended in a PermissionError traceback from wherever it was first opened.
    image = tmp_path / "n01443537_0.JPEG"

    def unreadable():
        try:  # as DALI's reader raises it, wrapped by the code around it
            raise PermissionError(13, "Permission denied", str(image))
        except PermissionError as err:
            raise RuntimeError("Critical error in pipeline") from err
    assert _exit_message(unreadable) == (
        f"error: permission denied: {image} (Permission denied). The user running this needs read "
        "access to the dataset's files and folders and write access to --out; then rerun the same "
        "command (what was saved is kept)")


@pytest.mark.parametrize("raised", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 180000000000 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.11 GiB"),
    RuntimeError("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.resize`,\nstd::bad_alloc"),
    MemoryError()])
def test_memory_that_ran_out_is_one_line_with_the_flags_that_need_less(raised):
    def out_of_memory():
        raise raised
    message = _exit_message(out_of_memory)
    first_line = str(raised).splitlines()[0] if str(raised) else "MemoryError"
    assert message == (f"error: out of memory ({first_line}). A smaller batch needs less (--batch-size; "
                       "T4's Phase B: --classes-per-batch x --images-per-class), as do a smaller --image-size "
                       "or --width; in training each changes the run, so use another --out or --fresh")


def test_another_rank_gone_is_one_line_under_torchrun_only(monkeypatch):
    # What gloo raised on the surviving rank when the other one was killed (2 CPU processes).
    def peer_gone():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
                           "[127.0.0.1]:40123: Connection reset by peer")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _exit_message(peer_gone) == (
        "error (rank 1 of 2): another process of this torchrun run stopped (its output or torchrun's "
        "summary says why), so this one cannot go on. What was saved is kept: rerun the same command "
        "to resume from last.pt")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no other rank, so not that; the traceback stays
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        cli.run(peer_gone)


def test_any_other_runtime_error_keeps_its_traceback():
    def bug():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cli.run(bug)

    def bug_while_handling_a_permission_error():  # "from None": not caused by it
        try:
            raise PermissionError(13, "Permission denied", "/data/x.JPEG")
        except PermissionError:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)") from None
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cli.run(bug_while_handling_a_permission_error)


def test_a_full_disk_while_saving_is_one_line_that_says_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    # torch.save reports ENOSPC as "RuntimeError: [enforce fail at inline_container.cc:672]":
    # a 30-line traceback that never said the disk was full.
    import errno

    import torch

    from common import checkpoint
    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint({"epoch": 1}, path)

    def full_disk(state, f):
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 11975424")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: checkpoint.save_checkpoint({"epoch": 2}, path))
    assert str(stop.value.code).startswith("error: no space left on the device (No space left on device). "
                                           "Every file is written whole or not at all")
    assert "rerun the same command to resume" in str(stop.value.code)
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path) == {"epoch": 1}  # the last one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # and no temp beside it

    def other_runtime_error():
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):  # not a full disk: its traceback stays
        cli.run(other_runtime_error)


def test_a_second_ctrl_c_while_a_signalled_run_leaves_its_process_group_still_exits_with_the_signal(monkeypatch):
    """cli.run leaves the process group after Interrupted (a barrier under torchrun); Ctrl-C
    pressed again while it waits ends the run with the first signal's status, not a traceback."""
    import signal

    from common.errors import Interrupted

    def stopped():
        raise Interrupted(signal.SIGTERM, epoch=1, step=3, partial={})

    def waiting():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "leave_process_group", waiting)
    try:
        cli.run(stopped)
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
        pytest.fail("the second Ctrl-C escaped cli.run as a traceback")
    except SystemExit as stop:
        assert stop.code == 128 + signal.SIGTERM
    else:
        pytest.fail("cli.run returned")


def test_ctrl_c_while_a_finished_run_waits_for_the_other_ranks_says_it_finished(monkeypatch, capsys):
    """main() returned; Ctrl-C during the final barrier must not say that what was saved is
    all there is, only that results.json is written last."""
    import signal

    def waiting():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "leave_process_group", waiting)
    try:
        cli.run(lambda: None)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C at the final barrier escaped cli.run as a traceback")
    except SystemExit as stop:
        assert stop.code == 128 + signal.SIGINT
    else:
        pytest.fail("cli.run returned")
    assert "interrupted (Ctrl-C) while this finished rank waited for the others; rank 0 writes " \
        "results.json last: if it is missing, rerun the same command to go on" in capsys.readouterr().err


def test_under_torchrun_each_ranks_error_names_its_rank(monkeypatch):
    """Every process of a torchrun job prints its own error; the label tells them apart.
    Alone (no WORLD_SIZE, or 1) the message is as before."""
    from common.errors import UserError

    def failing():
        raise UserError("no images in data/x")
    for env, expected in [({}, "error: no images in data/x"),
                          ({"WORLD_SIZE": "1", "RANK": "0"}, "error: no images in data/x"),
                          ({"WORLD_SIZE": "4", "RANK": "3"}, "error (rank 3 of 4): no images in data/x")]:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.delenv("RANK", raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as stop:
            cli.run(failing)
        assert stop.value.code == expected


def test_the_shared_defaults_a_user_gets_without_flags():
    """The machine's GPU, DALI where it imports, seed 0, the quick image check; compiled on a
    GPU only (a CPU compile costs more than it saves), unless a script turns it off there."""
    args = cli.parse(_parser(), [], smoke=cli.SMOKE)
    assert (args.device, args.backend, args.seed, args.check_images) == ("auto", "auto", 0, "quick")
    assert cli.fit_config(args, cuda=False).compile is False
    assert cli.fit_config(args, cuda=True).compile is True
    assert cli.fit_config(args, cuda=True, compile_on_cuda=False).compile is False
    assert cli.fit_config(cli.parse(_parser(), ["--fresh"], smoke=cli.SMOKE), cuda=False).fresh is True


@pytest.mark.parametrize("text", ["1", "1.5", "-0.1"])
def test_a_fraction_flag_refuses_1_and_outside(text):
    # --label-smoothing 1 makes every target uniform; --color-jitter 1 allows brightness 0
    with pytest.raises(argparse.ArgumentTypeError, match=rf"must be in \[0, 1\), got {float(text)}"):
        cli.fraction(text)
    assert cli.fraction("0") == 0.0 and cli.fraction("0.99") == 0.99


def test_a_full_disk_quota_is_reported_as_a_full_disk(tmp_path):
    import errno
    for code, reason in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded")):
        def full():
            try:
                raise OSError(code, reason, "runs/t2/last.pt")
            except OSError as err:
                raise RuntimeError("torch.save failed") from err
        with pytest.raises(SystemExit) as stop:
            cli.run(full)
        assert str(stop.value.code).startswith(f"error: no space left on the device writing runs/t2/last.pt ({reason})")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_which_defaults_smoke_replaces(script, capsys):
    # --help shows the recipe's defaults (60 epochs for T3): a smoke run trains with others.
    import importlib
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    sets = text[text.index("in place of the recipe's defaults it sets "):].split(" (a flag you type wins)")[0]
    smoke = getattr(module, "SMOKE", cli.SMOKE)
    expected = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in smoke.items())
    assert sets.endswith(f"it sets {expected}")
    assert ("--compare-mining" in sets) == (script == "t4_retrieval.py")
    assert "--epochs 8 --batch-size 32 --lr " + ("0.1" if script == "t1_custom_cnn.py" else "0.05") in sets \
        or script == "t4_retrieval.py"


def test_an_out_holding_another_tasks_results_is_refused(tmp_path):
    # T4 into a finished T1 run's folder overwrote T1's results.json without a word.
    import t4_retrieval
    t1 = tmp_path / "t1"
    t1.mkdir()
    (t1 / "results.json").write_text('{"task": "t1", "test_acc": 0.61}')
    with pytest.raises(ConfigError) as err:
        t4_retrieval.main(["--out", str(t1)])
    assert str(err.value) == (f"--out {t1} holds the results of T1 ({t1 / 'results.json'}); this is T4, "
                              "whose files would overwrite or mix with them. Use another --out, or "
                              "move that results.json and its run's files elsewhere")
    assert (t1 / "results.json").read_text() == '{"task": "t1", "test_acc": 0.61}'
    t3 = tmp_path / "t3"  # T3 writes placements.json at the top, results.json per run below it
    t3.mkdir()
    (t3 / "placements.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds the results of T3 \(.*placements.json\); this is T3X"):
        cli.parse(cli.training_parser("test", task="t3x", recipe=RECIPE), ["--out", str(t3)], smoke=cli.SMOKE)
    # its own results, a file that is not ours, --evaluate (writes beside the checkpoint): accepted
    assert cli.parse(_parser(), ["--out", str(t3)], smoke=cli.SMOKE).out == str(t3)
    (t1 / "results.json").write_text("[1, 2]")
    assert cli.parse(_parser(), ["--out", str(t1)], smoke=cli.SMOKE).out == str(t1)
    (t1 / "results.json").write_text('{"task": "t1"}')
    (t1 / "best.pt").write_bytes(b"")
    assert cli.parse(_parser(), ["--out", str(t1), "--evaluate", str(t1 / "best.pt")], smoke=cli.SMOKE).out == str(t1)
