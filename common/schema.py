"""The keys of checkpoint meta and of results.json, defined once.

A checkpoint's "meta" says which network and data recipe it belongs to: resuming or
evaluating with a different one is refused, naming the keys that differ
(checkpoint.check_compatible). results.json holds the meta of the run plus its figures; the
report reads it by these keys. tests/test_schema.py checks that what the scripts write has
exactly these keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

# The train augmentation's fixed ranges (no flags; results.json does not store them, the
# report quotes them): random-resized crops keep this fraction of the image's area, with an
# aspect ratio in this range.
RANDOM_AREA = (0.25, 1.0)
RANDOM_ASPECT = (3 / 4, 4 / 3)

# The flags whose defaults are a task's training recipe: every script passes all of them
# (its RECIPE, cli.training_parser), so that reading the script tells every default.
RECIPE_FLAGS = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "warmup_epochs",
                "label_smoothing", "patience", "min_delta", "grad_clip", "holdout_per_class",
                "image_size", "color_jitter", "width")


@dataclass
class FitConfig:
    """engine.fit's training recipe; a checkpoint stores it as its "config".

    The defaults are no task's recipe: the scripts set every field from their RECIPE
    (cli.fit_config); tests and bench scripts override the few that matter to them."""
    epochs: int = 30
    lr: float = 0.1
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    warmup_epochs: float = 2.0
    patience: int = 10
    min_delta: float = 0.0
    compile: bool = False
    # "reduce-overhead" replays each compiled step as CUDA graphs: one launch instead of one
    # per kernel, for networks whose steps are many small kernels.
    compile_mode: str = "default"  # scripts: --compile-mode (reduce-overhead; T3's and T4's: default)
    grad_clip: float = 0.0
    fresh: bool = False
    stop_after_epoch: int | None = None  # end this process after that many epochs (tests, time-boxed sessions)


class DataRecipe(TypedDict):
    """The settings outside FitConfig that change what a run computes."""
    batch_size: int
    label_smoothing: float
    holdout_per_class: int
    color_jitter: float
    seed: int
    data: str  # DatasetSplits.fingerprint(): image counts and a digest of names and labels


class ModelMeta(TypedDict, total=False):
    """Which network: networks.build_model rebuilds it from these keys."""
    task: str  # "t1" ... "t4"
    model: str  # "custom_cnn", "resnet18", "cubs_resnet18_<placement>_<variant>"
    num_classes: int
    width: int  # channels of the first stage
    image_size: int
    dropout: float  # T1
    placement: str  # T3, T4: serial, reverse or parallel
    variant: str  # T3, T4: plain or plus
    d: int  # T3 and T4: Block 1 similarity size
    gate_init: float | None  # T3 plain: initial gate logit (None = PyTorch's init)
    phase: str  # T4 Phase B: "b", the network with its embedding head
    embedding_dim: int  # T4 Phase B


class RetrievalMeta(TypedDict, total=False):
    """T4 adds where its weights came from and, in Phase B, the loss settings."""
    init: str  # scratch, t3 or imagenet
    init_sha256: str  # of the weights file T4 started from (not with scratch)
    phase_a_sha256: str  # Phase B: of the Phase A weights it started from (checkpoint.weights_sha256)
    mining: str
    classes_per_batch: int
    images_per_class: int
    alpha: float
    beta: float
    lam: float
    epsilon: float


class CheckpointMeta(ModelMeta, DataRecipe, RetrievalMeta):
    pass


class RunFigures(TypedDict):
    """What every finished run reports besides its meta."""
    params: int
    device: str  # e.g. "cpu", "NVIDIA H100 80GB HBM3 x4"
    loader: str  # "dali", "torch" or "cache"
    finished: bool
    args: dict[str, Any]  # every flag of the command, for the report and for reruns


class ClassifierResults(ModelMeta, DataRecipe, RunFigures):
    """results.json of T1, T2 and of each T3 (placement, variant) run."""
    test_acc: float
    test_top5: float
    test_loss: float
    test_images: int
    holdout_acc: float  # of the best holdout epoch, whose weights (best.pt) were tested
    holdout_top5: float
    best_epoch: int  # 1-based
    epochs_run: int
    stopped_early: bool
    train_time_s: float
    images_per_s: float


Recall = dict[str, float]  # {"1": R@1, "2": R@2, "4": R@4, "8": R@8} once written as JSON


class PhaseResult(TypedDict, total=False):
    test_recall: Recall
    holdout_acc: float  # Phase A: holdout top-1 of its best epoch
    holdout_r1: float  # Phase B: holdout Recall@1 of its best epoch
    mining: str  # Phase B
    best_epoch: int
    epochs_run: int
    train_time_s: float


class RetrievalResults(RunFigures, total=False):
    """results.json of T4."""
    task: str
    placement: str
    variant: str
    d: int  # Block 1's similarity size, T3's (so that the report rebuilds this network)
    init: str
    init_source: str
    init_sha256: str  # of the file the weights came from
    init_loaded: int
    init_skipped: list[str]
    embedding_params: int  # Phase B network, its unused backbone fc included (what its checkpoint holds)
    test_images: int
    test_classes: int
    train_images: int
    train_classes: int
    recall_at_1_chance: float
    init_test_recall: Recall
    phase_a: PhaseResult
    phase_b: PhaseResult
    mining_comparison: list[PhaseResult]


def keys(schema: type) -> set[str]:
    """Every key a TypedDict allows (its bases' included)."""
    return set(schema.__required_keys__ | schema.__optional_keys__)
