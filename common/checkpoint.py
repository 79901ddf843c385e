"""Checkpoints that survive a killed run and never execute code when loaded.

A checkpoint is a dict of tensors and plain Python containers/scalars only, so it loads
with `torch.load(weights_only=True)`: a pickle that tries to build anything else is refused
before any of its code runs. RNG states are stored as tensors / lists for the same reason
(NumPy's state object is refused by weights_only).

Writes are atomic (common/files.atomic_file): the dict goes to a temporary file in the same
folder, is fsync'ed, then renamed over the target. A crash mid-save leaves the old file intact.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import random
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from common.errors import ConfigError, UserError
from common.files import atomic_file, folder_lock, previous_path, remove_files, remove_stale_temps
from common.runtime import Runtime, main_first
from common.schema import CheckpointMeta


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe, or from another model."""


def save_checkpoint(state: dict[str, Any], path: str | Path, keep_previous: bool = False) -> None:
    """Atomically write `state` to `path` (keep_previous: see files.atomic_file)."""
    with atomic_file(path, keep_previous) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


# What scoring a checkpoint needs (--evaluate, common/evaluate.py): the weights, the meta that
# says which network they fit, and the epoch they are from. The rest of a training checkpoint
# (optimizer, LR schedule, loss scaler, early stopping, RNG states, history) is for resuming.
INFERENCE_KEYS = ("model", "meta", "epoch")


def inference_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The part of a training checkpoint that --evaluate reads (INFERENCE_KEYS, those present):
    about the size of the weights, where a training checkpoint is 2-3x that (SGD momentum is
    one more copy of the weights, AdamW's moments two)."""
    return {k: checkpoint[k] for k in INFERENCE_KEYS if k in checkpoint}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True; refuse anything that is not plain data.

    Two refusals, told apart because they need opposite advice: a pickle that names code
    (a global outside weights_only's allow-list) is refused as possibly unsafe; anything
    else that fails (random bytes, a truncated copy, another kind of file) is named as not
    a readable checkpoint. Neither repeats PyTorch's suggestion to retry with
    weights_only=False: for a damaged file it is wrong, for a crafted one dangerous.
    The file's bytes are checked first (_file_problem)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    problem = _file_problem(path)
    if problem:
        raise _unreadable(path, problem)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(str(err))
        if _names_code(detail):
            raise CheckpointError(
                f"{path} is not a plain-tensor checkpoint (weights_only load refused it; it may "
                f"contain code). Not loading it. Details: {detail}") from err
        raise _unreadable(path, f"PyTorch's unpickler: {detail}") from err
    except (KeyError, IndexError) as err:  # bytes read as unknown pickle opcodes
        raise _unreadable(path, f"its pickle is damaged ({type(err).__name__}: {err})") from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        # A 0-byte file raises an EOFError with no text.
        raise _unreadable(path, str(err).strip().split(". ")[0] or type(err).__name__) from err


def _file_problem(path: Path) -> str | None:
    """What a file's bytes show is wrong before torch.load reads them, or None:
    - neither torch.save's zip format nor a (legacy) pickle: e.g. a text file, whose bytes
      torch.load would run as pickle opcodes and name as anything from a KeyError to code;
    - a zip whose directory cannot be read, or whose members fail their CRC-32s: torch.load
      checks none, so bytes changed in the middle of the weights would load silently (a
      48 MB file: 25 ms from the page cache on the 2-core VM, where torch.load took 37 ms).
    An empty file gets None: torch.load's EOFError is named as empty (_unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head and not head.startswith((b"PK", b"\x80")):
            return "neither a zip archive (torch.save's format) nor a pickle"
        if head != b"PK":
            return None
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except (zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"its zip archive is damaged ({err})"
    return f"the data of {bad} fails its CRC-32 check (bytes changed after it was written)" if bad else None


def _unreadable(path: Path, detail: str) -> CheckpointError:
    size = path.stat().st_size
    if size == 0:
        detail = "the file is empty"
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint ({size} bytes; truncated, "
                           f"damaged or not a checkpoint at all): {detail}")


def _unpickler_detail(message: str) -> str:
    """The line of a weights_only refusal that says what was refused ("Unsupported global:
    GLOBAL builtins.print ...", "Trying to load unsupported GLOBAL posix.system ...",
    "Unsupported operand 165"), without PyTorch's advice around it."""
    advice = ("weights_only", "Weights only load failed", "Check the documentation", "trust")
    for line in message.splitlines():
        # The refused name, not the allow-list recipe after it.
        line = line.strip().removeprefix("WeightsUnpickler error:").split(" Please use")[0].strip()
        if line and not any(text in line for text in advice):
            return line
    return "weights_only load refused it"


def _names_code(detail: str) -> bool:
    """Whether a weights_only refusal is about a global (a function or class the pickle
    would import and call), not about bytes that are no pickle at all."""
    return "GLOBAL" in detail or "allowlisted" in detail


# Meta keys that checkpoints written before they were recorded lack: those still resume.
_RECORDED_LATER = ("data", "phase_a_sha256")
# What a differing digest means, said after it: a hash alone names no file and no cause.
_DIGEST_MEANING = {
    "init_sha256": "the weights file this run started from (--init; T4's default: T3's best.pt, "
                   "whose SHA-256 changes whenever T3 trains again) is not the one it holds now",
    "phase_a_sha256": "Phase A's weights, which Phase B starts from, changed: Phase A trained again",
    "data": "the dataset's files or its split changed",
}


def check_compatible(saved_meta: CheckpointMeta, meta: CheckpointMeta, path: str | Path) -> None:
    """Raise if a checkpoint was written for another model (architecture, classes, ...) or
    data setup: every key of `meta` must be in the checkpoint's meta, with the same value
    (one of _RECORDED_LATER may be missing)."""
    diffs = [f"{k}: checkpoint has {repr(saved_meta[k]) if k in saved_meta else 'no ' + k}, this run has {v!r}"
             + (f" ({_DIGEST_MEANING[k]})" if k in _DIGEST_MEANING and k in saved_meta else "")
             for k, v in meta.items() if (k not in saved_meta and k not in _RECORDED_LATER)
             or saved_meta.get(k, v) != v]
    if diffs:
        raise CheckpointError(f"{path} belongs to a different model or setup: " + "; ".join(diffs)
                              + ". Use another --out, or --fresh to start over.")


def check_resumable(out: Path, meta: CheckpointMeta) -> None:
    """check_compatible against the meta of out/last.pt, where a readable one is: for a
    script with work before engine.fit (T4's test pass before Phase A), so that a resume fit
    would refuse is refused before that work. fit checks again, whichever state it resumes."""
    try:
        ck = load_checkpoint(out / "last.pt")
    except CheckpointError:  # none, or unreadable: fit's resume_point decides what to do
        return
    if isinstance(ck, dict) and isinstance(ck.get("meta"), dict):
        check_compatible(ck["meta"], meta, out / "last.pt")


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (each tensor's name, dtype, shape and bytes, in order):
    which weights a run started from, whichever file or device held them."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                     path: str | Path) -> None:
    """load_state_dict(strict) with an error that names the mismatching tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                    for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected),
                            ("of another shape, checkpoint vs model", shapes)):
            if items:
                parts.append(f"{len(items)} {name} (e.g. {', '.join(items[:3])})")
        raise CheckpointError(f"{path} does not fit this model: " + "; ".join(parts))
    model.load_state_dict(state_dict)


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, as tensors and lists (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():  # the current GPU only: resuming on fewer GPUs works
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def load_matching_tensors(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
                          ) -> tuple[list[str], list[str]]:
    """Copy every tensor whose name and shape match; returns (loaded names, skipped reasons).

    For initialising from another task's weights (T3 -> T4, ImageNet -> T4), where the stem,
    the classifier or the attention modules legitimately differ.
    """
    own = model.state_dict()
    loaded, skipped = [], []
    for name, tensor in state_dict.items():
        if name not in own:
            skipped.append(f"{name}: not in this model")
        elif own[name].shape != tensor.shape:
            skipped.append(f"{name}: shape {tuple(tensor.shape)} vs {tuple(own[name].shape)}")
        else:
            own[name].copy_(tensor)
            loaded.append(name)
    skipped += [f"{name}: not in the checkpoint (fresh init)" for name in own if name not in state_dict]
    return loaded, skipped


# ---------------------------------------------------------------- a run's last.pt and best.pt
@dataclass
class RunProgress:
    """Where a run is, saved in last.pt beside the tensors' state."""
    epoch: int = 0  # epochs done
    step: int = 0  # batches done in the current epoch (a mid-epoch save)
    partial: dict[str, float] | None = None  # the current epoch's sums so far (engine._Meter)
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl's records
    finished: bool = False
    train_time_s: float = 0.0
    # Where it trained (runtime.describe_device: "NVIDIA H100 x4"), for results.json: a
    # finished run re-reported by another process count or machine is still described by its own.
    device: str = ""


# Config fields that only steer this process, not what the run computes.
_PROCESS_ONLY = {"compile", "compile_mode", "fresh", "stop_after_epoch"}
# What a run leaves in its folder: --fresh removes it all, so that neither a resume (which
# takes the newest state on disk) nor the report can mix the old run with the new one.
RUN_FILES = ("last.pt", "last.prev.pt", "best.pt", "metrics.jsonl", "results.json", "eval.json",
             "curves.png", "last.unusable.pt")


@contextlib.contextmanager
def exclusive_folder(folder: Path) -> Iterator[None]:
    """Hold `folder` (a run's) for this process alone; ConfigError at once if another process
    holds it. Under DDP rank 0 holds it for all (RunCheckpoints.held)."""
    locked = False
    try:
        with folder_lock(folder, wait=False):
            locked = True
            yield
    except BlockingIOError:
        if locked:  # raised by the work inside, not by the lock
            raise
        raise ConfigError(f"{folder} is in use by another process (another copy of this command?): "
                          f"let it finish, or stop it, first") from None


def discard_runs(folders: Sequence[Path]) -> None:
    """--fresh of a command that trains several runs (T3's placements, T4's phases): discard_run
    in each folder, once this process holds all that exist (exclusive_folder), so that a
    second copy refused later has deleted nothing of the first's."""
    with contextlib.ExitStack() as held:
        for folder in folders:
            if folder.is_dir():
                held.enter_context(exclusive_folder(folder))
        for folder in folders:
            discard_run(folder)


def discard_run(folder: Path) -> None:
    """--fresh: delete the RUN_FILES of an earlier run in `folder`, saying so. A new run
    killed before its first save would otherwise resume, or report, the old one."""
    discard_files(folder, RUN_FILES, "the earlier run's")


def discard_files(folder: str | Path, names: Sequence[str], whose: str) -> None:
    """--fresh: delete the files `names` in `folder` (those that exist), saying so, e.g.
    "--fresh: removed the earlier comparison's placements.json from runs/t3"."""
    removed = remove_files(folder, names)
    if removed:
        print(f"--fresh: removed {whose} {', '.join(removed)} from {folder}")


class RunCheckpoints:
    """last.pt and best.pt in `out`: each holds the full state of the run (the state_dict of
    every object in `owners`: model, optimizer, scheduler, scaler, early_stopping), every
    rank's RNG state, the meta, the config and the RunProgress."""

    def __init__(self, out: Path, rt: Runtime, meta: CheckpointMeta, config: dict[str, Any],
                 flag_names: dict[str, str] | None = None, **owners: Any) -> None:
        """flag_names: config key -> the flag that sets it, where it is not --key (T4's
        Phase B: epochs -> --embed-epochs), for the error that refuses another recipe."""
        self.out, self.rt, self.meta, self.config, self.owners = out, rt, meta, config, owners
        self.flag_names = flag_names or {}
        self.last, self.best = out / "last.pt", out / "best.pt"
        out.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """This run's folder for this process alone (exclusive_folder, taken by rank 0 for
        all, main_first): a second copy of the command on the same --out would resume from an
        older last.pt and overwrite the newer checkpoints of the first."""
        with contextlib.ExitStack() as stack:
            main_first(self.rt, lambda: stack.enter_context(exclusive_folder(self.out)))
            yield

    def save(self, progress: RunProgress, *paths: Path) -> None:
        """Write the full state to each path in turn (last.pt keeps its predecessor)."""
        rng = [rng_state()]
        if self.rt.world_size > 1:
            rng = [None] * self.rt.world_size
            dist.all_gather_object(rng, rng_state())
        if self.rt.is_main:
            full = {**{name: o.state_dict() for name, o in self.owners.items()}, "rng": rng,
                    "meta": self.meta, "config": self.config, **asdict(progress)}
            for path in paths:
                save_checkpoint(full, path, keep_previous=path == self.last)
        if self.rt.world_size > 1:
            dist.barrier()  # nobody reads best.pt / last.pt before rank 0 has written it

    def discard(self) -> None:
        """--fresh: discard_run(out) on rank 0."""
        main_first(self.rt, lambda: discard_run(self.out))

    def resume(self) -> RunProgress:
        """Load the newest readable state (see resume_point) into the owners and return its
        progress; a new RunProgress when `out` holds none."""
        if self.rt.is_main:  # a kill mid-save left them; this process is the run's one writer
            remove_stale_temps(self.out, RUN_FILES)
        found = resume_point(self.out, self.rt.is_main)
        if found is None:
            return RunProgress()
        source, ck = found
        check_compatible(ck["meta"], self.meta, source)
        _check_same_recipe(ck["config"], self.config, source, self.flag_names)
        for name, owner in self.owners.items():
            if name == "model":
                load_model_state(owner, ck["model"], source)
            elif name != "scaler" or (ck["scaler"] and owner.is_enabled()):  # empty without fp16
                owner.load_state_dict(ck[name])
        progress = RunProgress(**{f.name: ck[f.name] for f in fields(RunProgress) if f.name in ck})
        # One RNG state per rank (each rank draws its own dropout / augmentation stream), so
        # their count is the saving run's number of processes. Its LR schedule and batch
        # positions count that many processes' steps (--batch-size is per process): training
        # on with another count would splice two recipes. A finished run only re-reports.
        saved_ranks = len(ck["rng"])
        if saved_ranks != self.rt.world_size and not progress.finished:
            raise CheckpointError(
                f"{source} was saved by a run of {saved_ranks} process(es); this one has "
                f"{self.rt.world_size}, and its LR schedule and batch positions count the steps of "
                f"{saved_ranks} (--batch-size is per process). Resume it with as many "
                f"({'plain python' if saved_ranks == 1 else f'torchrun --nproc_per_node={saved_ranks}'}), "
                f"--fresh to start over, or use another --out.")
        set_rng_state(ck["rng"][self.rt.rank % saved_ranks])
        if self.rt.is_main:
            epochs = self.config.get("epochs")  # all done: a stop before the run was marked finished
            where = ("finished run" if progress.finished else f"all {epochs} epochs done"
                     if progress.epoch == epochs else f"epoch {progress.epoch + 1}, batch {progress.step}")
            print(f"resuming from {source} ({where}); --fresh starts over")
        return progress


def _check_same_recipe(saved: dict[str, Any], current: dict[str, Any], path: Path,
                       flag_names: dict[str, str]) -> None:
    """Resuming with another LR, epoch count, ... would silently splice two recipes."""
    diffs = [f"{flag_names.get(k, '--' + k.replace('_', '-'))} {saved.get(k)} (now {v})"
             for k, v in current.items() if k not in _PROCESS_ONLY and saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} was trained with " + ", ".join(diffs) + ". Rerun with "
                              "the flags that set those to resume, --fresh to start over, or "
                              "use another --out.")


def resume_point(out: Path, is_main: bool) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable full state among last.pt, last.prev.pt and best.pt whose best
    holdout epoch best.pt holds, or None for a new run. best.pt holds the same full state as
    last.pt had at the end of the best epoch; the test pass and the report read it, so a
    state whose best epoch it misses (a best.pt damaged, or older than last.pt because a
    cloud drive lost its newest upload) is resumed only if one of the three files was saved
    at that best epoch's end: best.pt is then rewritten from it (rank 0; every rank picks
    the same state before and after). Every file passed over is named, and a state passed
    over for its best epoch is renamed NAME.passed-over.pt, so it cannot win a later resume;
    an unusable last.pt, last.unusable.pt (_set_aside_unusable_last)."""
    last, best = out / "last.pt", out / "best.pt"
    paths = [p for p in (last, previous_path(last), best) if p.exists()]
    if not paths:
        return None
    readable, problems, on_disk = [], [], None  # on_disk: the epoch best.pt holds
    for path in paths:
        try:
            ck = load_checkpoint(path)
        except CheckpointError as err:  # printed below: nothing is skipped silently
            problems.append(str(err))
            continue
        if not isinstance(ck, dict):  # a tensor or a list saved under the name
            problems.append(f"{path} holds a {type(ck).__name__}, not a checkpoint of these scripts")
            continue
        if path == best:  # the archive's weights-only copy counts too
            on_disk = ck.get("epoch")
        if "config" in ck and "finished" in ck:
            readable.append((path, ck))
        else:
            problems.append(f"{path} holds weights only (an inference copy, e.g. from the "
                            f"submission archive): a run cannot resume from it")
    if not readable:
        raise CheckpointError("no usable checkpoint to resume from: " + "; ".join(problems)
                              + ". --fresh starts over (or use another --out).")
    # Newest first; sort() keeps the order of equal keys: last.pt, last.prev.pt, best.pt.
    readable.sort(key=lambda r: (r[1]["finished"], r[1]["epoch"], r[1]["step"]), reverse=True)
    passed_over = []
    for source, ck in readable:
        best_epoch = ck["early_stopping"]["best_epoch"] + 1  # 1-based; 0 = none yet
        if best_epoch in (0, on_disk):
            break
        # A state saved at the best epoch's end (this one or an older one) is what best.pt held.
        at_best = next((r for r in readable if r[1]["epoch"] == best_epoch and r[1]["step"] == 0), None)
        if at_best:
            if is_main:
                save_checkpoint({**at_best[1], "finished": False}, best)
                problems.append(f"rewrote {best} from {at_best[0]} (epoch {best_epoch}, the best)")
            break
        problems.append(f"{source} (epoch {ck['epoch']} done) records best epoch {best_epoch}, "
                        f"which {best} does not hold")
        passed_over.append(source)
    else:
        raise CheckpointError("; ".join(problems) + f". No saved state agrees with {best}, whose "
                              f"weights the test pass would score. --fresh starts over (or use "
                              f"another --out).")
    if is_main and passed_over:
        # Kept under another name, so that none of them wins a later resume once best.pt
        # moves on; the run's results.json and eval.json scored the best.pt that is gone, so
        # they go first: a kill between the two steps then leaves nothing stale behind.
        remove_files(out, ("results.json", "eval.json"))
        for path in passed_over:
            os.replace(path, path.with_name(f"{path.stem}.passed-over{path.suffix}"))
        problems.append(f"renamed {', '.join(p.name for p in passed_over)} to *.passed-over.pt")
    if is_main:
        _set_aside_unusable_last(last, source, [path for path, _ in readable], problems)
        if problems:  # RunCheckpoints.resume then says where the run goes on from
            print("; ".join(problems))
    return source, ck


def _set_aside_unusable_last(last: Path, source: Path, usable: list[Path], problems: list[str]) -> None:
    """When a run resumes from another file than last.pt, say why; a last.pt that cannot be
    resumed (damaged, weights only) is renamed last.unusable.pt: the next save would rotate
    it into last.prev.pt, over the readable predecessor the run resumed from."""
    if source == last:
        return
    if last in usable:  # older than source, or passed over (renamed already, and said so)
        if last.exists():
            problems.append(f"{source.name} holds a newer state than {last.name} (a stop between their writes)")
    elif not last.exists():  # a stop between last.pt's rotation and the new file's rename
        problems.append(f"no {last.name} in {last.parent}")
    else:
        os.replace(last, last.with_name("last.unusable.pt"))
        problems.append(f"renamed {last.name} to last.unusable.pt, so that the next save does not "
                        f"move it over {previous_path(last).name}")
