"""Command-line flags shared by the task scripts, the --smoke settings, and the step from
parsed flags to the typed settings that the rest of common/ takes.

Each script builds its parser with `training_parser(...)`, passing its RECIPE (the defaults
of every training flag), then adds the few flags only it has.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import signal
import sys
import tempfile
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.datasets import DatasetSplits
from common.errors import ConfigError, Interrupted, UserError
from common.image_check import CHECK_MODES
from common.schema import RECIPE_FLAGS, DataRecipe, FitConfig
from common.loader import LoaderSettings
from common.runtime import leave_process_group


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    """float(text), refusing inf and nan: Python parses them, and an --lr inf would only
    show up minutes later as a NaN training loss."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1): label smoothing (1 would make every target uniform) and the colour
    jitter's range (1 or more would allow a brightness factor of 0 or below)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def seed(text: str) -> int:
    value = nonnegative_int(text)
    if value >= 2**32:  # NumPy and torch take seeds below 2^32 and 2^64: one range for all
        raise argparse.ArgumentTypeError(f"must be below 2^32, got {value}")
    return value


def image_size(text: str) -> int:
    """Crop size in pixels, at least 8: the CIFAR-stem networks halve it three times, so the last
    stage of a smaller crop would see nothing but padding (a typo such as 6 for 64 would train)."""
    value = int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be at least 8 (pixels a side), got {value}")
    return value


def workers(text: str) -> int:
    """Loader workers / DALI threads: at most 16, or 4 per CPU core where that is more, which
    no loader needs; a typo such as 400 would start hundreds of processes (the torch
    DataLoader) or threads."""
    value = nonnegative_int(text)
    limit = max(16, 4 * (os.cpu_count() or 1))
    if value > limit:
        raise argparse.ArgumentTypeError(f"must be at most {limit} (16, or 4 per CPU core of this "
                                         f"machine), got {value}")
    return value


def default_workers() -> int:
    """4 loader workers, but no more than the machine's cores: the torch DataLoader warns
    (twice) when asked for more workers than there are CPUs."""
    return min(4, os.cpu_count() or 1)


# --smoke: a small model and a few short epochs on a generated dataset, on the CPU. A script
# passes these (plus its own) to parse(); flags typed on the command line still win.
SMOKE = dict(epochs=8, batch_size=32, lr=0.05, warmup_epochs=1.0, patience=4, holdout_per_class=5,
             image_size=32, width=16, workers=0, device="cpu")


def training_parser(description: str, *, task: str, recipe: Mapping[str, Any],
                    downloads: bool = True) -> argparse.ArgumentParser:
    """The flags every task script has, with the defaults of its `recipe` (keys RECIPE_FLAGS;
    other keys are defaults of the script's own flags, which it adds afterwards). task: "t1"
    ... "t4"; --out defaults to runs/<task>, and parse refuses one holding another task's
    results (check_out_owner).

    downloads: whether the script can download its dataset (Tiny ImageNet). T4's Cars196 is
    placed by hand, so T4 passes False and gets no --no-download flag."""
    missing = [k for k in RECIPE_FLAGS if k not in recipe]
    if missing:
        raise ValueError(f"the recipe lacks {missing}")
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    a = p.add_argument
    a("--data-dir", default="./data",
      help="folder holding (or receiving: downloaded there if missing) the dataset" if downloads
      else "folder holding the dataset (never downloaded: place it there by hand)")
    a("--out", default=f"runs/{task}", help="output folder; rerunning with the same --out resumes")
    a("--epochs", type=positive_int, default=None, help="maximum epochs (early stopping may end sooner)")
    a("--batch-size", type=positive_int, default=None, help="per process (per GPU under torchrun)")
    a("--lr", type=positive_float, default=None, help="peak learning rate after warmup")
    a("--weight-decay", type=nonnegative_float, default=None,
      help="on conv and linear weights only: not on biases, norm layers or plus's gamma")
    a("--optimizer", choices=["sgd", "adamw"], default=None, help="sgd = SGD, Nesterov 0.9")
    a("--warmup-epochs", type=nonnegative_float, default=None, help="linear warmup, then cosine")
    a("--label-smoothing", type=fraction, default=None,
      help="cross-entropy label smoothing")
    a("--patience", type=positive_int, default=None, help="early stopping: epochs without improvement")
    a("--min-delta", type=nonnegative_float, default=None, help="early stopping: smallest improvement counted")
    a("--grad-clip", type=nonnegative_float, default=None, help="max gradient norm; 0 = off")
    a("--holdout-per-class", type=positive_int, default=None,
      help="training images per class held out for early stopping and model selection")
    a("--image-size", type=image_size, default=None, help="training and eval crop, pixels")
    a("--color-jitter", type=fraction, default=None,
      help="brightness/contrast/saturation range, e.g. 0.2; 0 = off")
    a("--width", type=positive_int, default=None,
      help="channels of the model's first stage (each later stage doubles them)")
    a("--workers", type=workers, default=default_workers(),
      help="decoding threads (DALI) / DataLoader workers (default: min(4, CPU count), here "
           f"{default_workers()})")
    a("--backend", choices=["auto", "dali", "torch", "cache"], default="auto",
      help="auto = on a GPU the device cache where it applies (T1-T3), else DALI if importable, "
           "else the torch DataLoader fallback; cache = decode every image once into the "
           "device's memory and augment there")
    a("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (default: on with CUDA for T1-T3; off for T4, whose "
           "short phases at 224 px do not earn back the compile time; off on CPU)")
    a("--compile-mode", choices=["default", "reduce-overhead"], default="reduce-overhead",
      help="torch.compile mode; reduce-overhead replays each step as CUDA graphs, one launch "
           "instead of one per kernel (on an H200 with data in memory, 2026-12-04: T1's step 29 -> 14 ms, "
           "T2's 13.0 -> 11.4 ms; README, Performance). Default: reduce-overhead, except T3 and T4 "
           "(CUBS networks): default. DDP runs always use default")
    a("--seed", type=seed, default=0, help="seeds the init, batch order, holdout and augmentation")
    a("--check-images", choices=CHECK_MODES, default="quick",
      help="before training, check every image file: quick = both ends of each (signature, end "
           "marker, size), full = decode each with PIL, off = skip (then a truncated JPEG can crash DALI's "
           "decoder with a segmentation fault instead of an error naming the file)")
    a("--fresh", action="store_true",
      help="delete the earlier run's checkpoints and results in --out and start over")
    if downloads:
        a("--no-download", action="store_true", help="never download the dataset")
    a("--evaluate", metavar="PATH", default=None,
      help="no training: evaluate this checkpoint (e.g. runs/t2/best.pt, or a run folder for its "
           "best.pt) on the test split, print the figures and write eval.json beside it")
    a("--smoke", action="store_true",
      help="generate a tiny learnable dataset in --out and run the whole script on it (CPU; 10-40 s "
           "a script on a 2-core VM); default paths under runs/ become runs/smoke/...; --data-dir is refused "
           "with it (the smoke data is generated, never read from a folder)")
    a("--stop-after-epoch", type=nonnegative_int, default=None, help=argparse.SUPPRESS)  # 0: set up only
    # Over the placeholders above (so that --help shows them), and the defaults of the
    # script's own flags, which argparse takes from here when they are added.
    p.set_defaults(**recipe, _task=task)  # "_": not a flag, so not in results.json "args"
    return p


def apply_smoke(args: argparse.Namespace, smoke: Mapping[str, Any]) -> None:
    """--smoke: set every flag in `smoke` (e.g. SMOKE) that was not typed on the command line.

    Default paths under runs/ (--out, T3's --vanilla-results, T4's --t3-results) move to
    runs/smoke/, so a smoke run never leaves a checkpoint or result that a real run would
    resume from, compare with or initialise from. --data-dir becomes <out>/smoke_data, where
    the generated dataset is (parse refuses a typed --data-dir with --smoke).
    """
    explicit = getattr(args, "_explicit", set())
    for k, v in vars(args).items():
        if k not in explicit and isinstance(v, str) and v.startswith("runs/"):
            setattr(args, k, "runs/smoke/" + v.removeprefix("runs/"))
    for k, v in smoke.items():
        if k not in explicit:
            setattr(args, k, v)
    # What it trains on (task_data makes it there), so that results.json's args say so, not ./data.
    args.data_dir = os.path.join(args.out, "smoke_data")


PATH_FLAGS = ("out", "data_dir", "evaluate", "vanilla_results", "t3_results", "init_weights")


def as_flags(values: Mapping[str, Any], parser: argparse.ArgumentParser) -> str:
    """{"batch_size": 32, "compare_mining": True} -> "--batch-size 32 --compare-mining", the
    keys that are `parser`'s flags, as a user would type them."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    words = [flags[k] if v is True else f"{flags[k]} {v}" for k, v in values.items() if k in flags]
    return " ".join(words).replace("%", "%%")  # argparse formats help with %


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, *,
          smoke: Mapping[str, Any]) -> argparse.Namespace:
    """parse_args, then with --smoke apply `smoke` to every flag the user did not type."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank parses: rank 0 alone says what is wrong
        parser.error = lambda message: parser.exit(2)  # type: ignore[method-assign]
    smoke_flag = next(a for a in parser._actions if "--smoke" in a.option_strings)
    if "in place of" not in smoke_flag.help:  # --help lists the recipe's defaults; say what --smoke changes
        smoke_flag.help += f"; in place of the recipe's defaults it sets {as_flags(smoke, parser)} (a flag you type wins)"
    args = parser.parse_args(argv)
    # argparse sets a default only where the namespace it is given lacks the attribute: every
    # attribute still _Unset after this second parse is a flag the user did not type.
    typed = parser.parse_args(argv, argparse.Namespace(**{k: _Unset for k in vars(args)}))
    args._explicit = {k for k, v in vars(typed).items() if v is not _Unset}
    if args.smoke:
        if "data_dir" in args._explicit:
            # Silently training on generated data while the user named a dataset would
            # pass for a check of that dataset; refuse instead (usage error, exit 2).
            parser.error(f"--smoke trains on a dataset it generates in --out and never reads "
                         f"--data-dir {args.data_dir}: drop --data-dir for a smoke run, or drop "
                         f"--smoke to train on that folder")
        apply_smoke(args, smoke)
    for flag in PATH_FLAGS:  # bash leaves a ~ after "=" as it is: expanded once, for every use
        if isinstance(getattr(args, flag, None), str):
            setattr(args, flag, os.path.expanduser(getattr(args, flag)))
    if args.evaluate == "":  # e.g. --evaluate "$CKPT" with CKPT unset: not "train instead"
        parser.error("--evaluate needs a checkpoint path (got an empty one)")
    if args.evaluate and args.fresh:  # --fresh deletes checkpoints; --evaluate reads one
        parser.error("--fresh starts a training run over and --evaluate trains nothing: drop one of them")
    if args.batch_size == 1 and not args.evaluate:  # an evaluation takes any batch
        parser.error("--batch-size 1 cannot train: BatchNorm needs more than one value per channel, "
                     "and the last stage's maps can be 1 x 1; use --batch-size 2 or more")
    if getattr(args, "backend", None) == "cache" and getattr(args, "color_jitter", None):
        parser.error(f"--backend cache does no colour jitter (--color-jitter {args.color_jitter}): "
                     f"use --color-jitter 0, or --backend dali, torch or auto")
    for warmup, epochs in (("warmup_epochs", "epochs"), ("embed_warmup_epochs", "embed_epochs")):
        if getattr(args, warmup, 0) >= getattr(args, epochs, math.inf) and not args.evaluate \
                and os.environ.get("RANK", "0") == "0":  # said once under torchrun, not once per process
            flag = "--" + warmup.replace("_", "-")
            print(f"note: {flag} {getattr(args, warmup):g} >= --{epochs.replace('_', '-')} "
                  f"{getattr(args, epochs)}: the LR only warms up, reaching its peak at the last step, "
                  f"and never decays; a short run wants a smaller {flag}", file=sys.stderr)
    check_out_dir(args.out)
    if not args.evaluate:  # --evaluate writes beside the checkpoint, not in --out
        check_out_owner(args.out, parser.get_default("_task"))
    if args.evaluate is not None and not Path(args.evaluate).exists():  # found now, not after a download
        raise ConfigError(f"--evaluate {args.evaluate}: no such file or folder (a best.pt or last.pt, "
                          f"or a run folder holding best.pt)")
    return args


def check_out_owner(out: str | Path, task: str) -> None:
    """Raise ConfigError if `out` holds another task's results: a results.json of another
    "task", or T3's placements.json. Their files share names (results.json, last.pt), so a
    second task there would overwrite or mix with the first's."""
    folder = Path(out).expanduser()
    for name in ("results.json", "placements.json"):
        try:
            owner = "t3" if name == "placements.json" else json.loads((folder / name).read_text()).get("task")
        except (OSError, ValueError, AttributeError):  # none there, or not a results.json of ours
            continue
        if isinstance(owner, str) and owner != task and (folder / name).is_file():
            raise ConfigError(f"--out {out} holds the results of {owner.upper()} ({folder / name}); this "
                              f"is {task.upper()}, whose files would overwrite or mix with them. Use another "
                              f"--out, or move that {name} and its run's files elsewhere")


def check_out_dir(out: str | Path) -> None:
    """Raise ConfigError now, before any data or training, if `out` cannot become a folder
    this process writes to: a file in its place, or a read-only or virtual file system.

    Creates nothing that stays: a missing --out is made later, by the code that writes it.
    The probe really writes (a temporary folder, removed at once) because permission bits
    say nothing for root, who is refused only by read-only and virtual file systems.
    """
    path = Path(out).expanduser()
    existing = path
    while not existing.exists():
        if existing.is_symlink():  # e.g. runs -> a Google Drive folder that is not mounted
            raise ConfigError(f"--out {out}: {existing} is a symbolic link to {os.readlink(existing)}, "
                              f"which does not exist (a drive not mounted?)")
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies inside {existing}, which is a file"
        raise ConfigError(f"--out {out} {where}; --out must be a folder (created if missing)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create folders or files in {existing} "
                          f"({err.strerror}); choose a folder you can write to") from None


def run(main: Callable[[], object]) -> None:
    """Run a script's main(). A UserError (missing dataset, corrupt image, incompatible
    checkpoint, ...) ends it with its message and exit status 1, without a traceback;
    SIGINT / SIGTERM (after last.pt is saved) with 128 + the signal's number. Ctrl-C outside
    training (data check, a test or embedding pass, writing results) also exits 130 without
    a traceback: every file is written atomically, so the rerun goes on from what was saved.
    So do a full disk, a file this user may not read or write, and memory that ran out
    (_machine_problem). A finished or signalled run under torchrun leaves its process group
    before it exits."""
    try:
        main()
    except UserError as err:
        sys.exit(f"{_error_label()}: {err}")
    except (OSError, RuntimeError, MemoryError) as err:  # torch.save reports a full disk as a RuntimeError
        problem = _machine_problem(err)
        if problem is None:
            raise
        sys.exit(f"{_error_label()}: {problem}")
    except Interrupted as stop:
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: exit now
            leave_process_group()  # every rank stops at the same agreed step
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); what was saved is kept: rerun the same command to go on",
              file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    try:
        leave_process_group()
    except KeyboardInterrupt:  # this rank is done; rank 0 may still have been writing
        print("interrupted (Ctrl-C) while this finished rank waited for the others; rank 0 writes "
              "results.json last: if it is missing, rerun the same command to go on", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def _error_label() -> str:
    """"error", or under torchrun "error (rank R of W)": each process prints its own error,
    and the ranks' lines interleave."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return f"error (rank {os.environ.get('RANK', '0')} of {world_size})" if world_size > 1 else "error"


def _machine_problem(err: BaseException) -> str | None:
    """The message for a full disk, a denied permission, memory that ran out or (under
    torchrun) another rank that died behind `err` (following its causes), or None for any
    other error, whose traceback is shown."""
    full = _behind(err, lambda e: isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
    if full:
        return (f"no space left on the device{f' writing {full.filename}' if full.filename else ''} "
                f"({full.strerror}). Every file is written whole or not at all, so the last checkpoint "
                f"is intact: free space (old runs, another run's last.prev.pt), then rerun the same "
                f"command to resume")
    denied = _behind(err, lambda e: isinstance(e, PermissionError))
    if denied:
        return (f"permission denied{f': {denied.filename}' if denied.filename else ''} ({denied.strerror}). "
                f"The user running this needs read access to the dataset's files and folders and "
                f"write access to --out; then rerun the same command (what was saved is kept)")
    memory = _behind(err, lambda e: isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(
        text in str(e) for text in ("out of memory", "can't allocate memory", "std::bad_alloc"))))
    if memory:
        first_line = (str(memory).strip().splitlines() or [type(memory).__name__])[0]
        return (f"out of memory ({first_line[:400]}). A smaller batch needs less (--batch-size; T4's "
                f"Phase B: --classes-per-batch x --images-per-class), as do a smaller --image-size "
                f"or --width; in training each changes the run, so use another --out or --fresh")
    # gloo's words when another rank's process is gone, mid-collective
    peer_gone = ("Connection reset by peer", "Connection closed by peer")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _behind(
            err, lambda e: isinstance(e, RuntimeError) and any(text in str(e) for text in peer_gone)):
        return ("another process of this torchrun run stopped (its output or torchrun's summary says "
                "why), so this one cannot go on. What was saved is kept: rerun the same command to "
                "resume from last.pt")
    return None


def _behind(err: BaseException | None, match: Callable[[BaseException], bool]) -> BaseException | None:
    """The first of `err` and its causes / contexts that `match` accepts, or None."""
    while err is not None:
        if match(err):
            return err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show each flag's default once, and keep the script docstring's line breaks.

    A help text that already says "default: ..." (a default that depends on the machine or
    on another run) keeps its own wording; on/off flags read "off", not "False".
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is argparse.SUPPRESS
                or "default:" in text.lower()):
            return text
        if action.default is None or isinstance(action.default, bool):  # not 0 or 1: they equal False, True
            shown = {False: "off", True: "on", None: "none"}[action.default]
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Break at spaces only: a flag named in a help text stays whole ("--warmup-epochs").
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


class _Unset:
    pass


# ---------------------------------------------------------------- flags -> typed settings
def data_recipe(args: argparse.Namespace, splits: DatasetSplits) -> DataRecipe:
    """The flags outside FitConfig that change what a run computes, and the data it trains
    on (splits.fingerprint()); stored in checkpoint meta so that a resume with other values
    is refused."""
    return DataRecipe(batch_size=args.batch_size, label_smoothing=args.label_smoothing,
                      holdout_per_class=args.holdout_per_class, color_jitter=args.color_jitter,
                      seed=args.seed, data=splits.fingerprint())


def fit_config(args: argparse.Namespace, cuda: bool, compile_on_cuda: bool = True) -> FitConfig:
    """FitConfig from the flags; --compile unset = `compile_on_cuda` on a GPU, off on the CPU."""
    return FitConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                     optimizer=args.optimizer, warmup_epochs=args.warmup_epochs,
                     patience=args.patience, min_delta=args.min_delta,
                     compile=cuda and compile_on_cuda if args.compile is None else args.compile,
                     compile_mode=args.compile_mode,
                     grad_clip=args.grad_clip, fresh=args.fresh,
                     stop_after_epoch=args.stop_after_epoch)


def loader_settings(args: argparse.Namespace, eval_resize: int | None = None) -> LoaderSettings:
    return LoaderSettings(batch_size=args.batch_size, image_size=args.image_size,
                          workers=args.workers, backend=args.backend, seed=args.seed,
                          color_jitter=args.color_jitter, eval_resize=eval_resize)


def flags(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag's value, as results.json records them under "args"."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}
