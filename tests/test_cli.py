"""common/cli.py: --smoke overrides, numeric flag checks, user errors without a traceback."""

import argparse

import pytest

from common import cli
from common.errors import DatasetNotFoundError


def _parser():
    p = cli.training_parser("test", out="runs/t3", epochs=60, batch_size=256, lr=0.2, weight_decay=5e-4)
    p.add_argument("--vanilla-results", default="runs/t2/results.json")
    p.add_argument("--name", default="runs-but-not-a-path")
    return p


def test_smoke_moves_default_runs_paths_under_runs_smoke_and_keeps_typed_ones():
    args = cli.parse(_parser(), ["--smoke"])
    assert (args.out, args.vanilla_results) == ("runs/smoke/t3", "runs/smoke/t2/results.json")
    assert args.name == "runs-but-not-a-path" and args.epochs == 8 and args.device == "cpu"
    typed = cli.parse(_parser(), ["--smoke", "--out", "runs/mine", "--epochs", "3"])
    assert (typed.out, typed.vanilla_results, typed.epochs) == ("runs/mine", "runs/smoke/t2/results.json", 3)
    real = cli.parse(_parser(), [])
    assert (real.out, real.vanilla_results, real.epochs) == ("runs/t3", "runs/t2/results.json", 60)


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
