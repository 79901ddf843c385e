"""T3: ResNet-18 with two CUBS attention blocks in every BasicBlock, on Tiny ImageNet.

    python t3_cubs.py --placement serial      # y = B2(B1(x)) in each residual branch
    python t3_cubs.py --placement all         # serial, reverse, parallel; best by holdout
    python t3_cubs.py --placement serial --variant both   # plain vs our `plus` variant
    python t3_cubs.py --smoke --placement all # everything on a generated dataset, CPU

The blocks (common/cubs.py, specification in docs/cubs.md, summary in README): Block 1
gates channels through a self-similarity of the pooled channel descriptor, Block 2 gates
positions through a self-similarity of the positions; both similarities are computed
exactly by a Taylor series in O(N p) (a fused attention kernel beyond its range) and the
N x N maps are never materialised. Each (placement, variant) trains with the same
seed and recipe as T2, from T2's initial tensors (the blocks are drawn after them), into
--out/<placement>_<variant>/. Afterwards every finished run under --out is compared: the
placement is selected by HOLDOUT accuracy (never test), test accuracies are reported, and
if a matching T2 result exists the "at most 2 points below vanilla ResNet-18" rule is
checked. Writes placements.json, placements.md and placements.png in --out.
"""
import argparse
import time
from pathlib import Path

import torch

from common import cli, engine, evaluate, runtime, task_data
from common.checkpoint import discard_files, discard_runs
from common.cubs import BLOCK1_D, GATE_LOGIT_INIT, PLACEMENTS, VARIANTS, check_plus_d, cubs_resnet18, range_check
from common.diagnostics import diagnostics

# The recipe: the defaults of `python t3_cubs.py`. Each is a flag (--lr 0.1, ...). The
# training settings are T2's (tests/test_schema.py checks it), so that the at-par rule
# compares the networks, not two recipes.
RECIPE = dict(
    epochs=60,  # length of the cosine schedule; early stopping may end the run sooner
    batch_size=256,  # per process (per GPU); the LR below goes with it: scale the two together
    lr=0.2,  # peak LR after warmup
    optimizer="sgd",  # SGD with Nesterov momentum 0.9
    weight_decay=5e-4,  # on conv / linear weights only, not on biases, BatchNorm, plus's gamma
    warmup_epochs=2,  # linear warmup: the first large-LR steps come while BN statistics settle
    label_smoothing=0.1,  # 200 classes with look-alikes (dog breeds): no reward for overconfidence
    patience=15,  # early stopping: epochs without a better holdout accuracy
    min_delta=0.0,  # any holdout improvement counts
    grad_clip=0.0,  # off; 1.0 is the remedy if a loss goes non-finite
    holdout_per_class=10,  # 2,000 train images select the epoch and the placement; test is used once
    image_size=64,  # Tiny ImageNet's own size: train crops and evaluation at 64 x 64
    color_jitter=0.0,  # off: random-resized crop + flip are the augmentation
    width=64,  # ResNet-18's widths (64, 128, 256, 512)
    d=BLOCK1_D,  # 512, Block 1: the pooled channel descriptor is projected to d values (docs/cubs.md)
    gate_init=GATE_LOGIT_INIT,  # plain blocks: gates start at sigmoid(3) = 0.95, nearly open,
                                # so serial/reverse learn as fast as vanilla (docs/cubs.md ablation)
)


def main(argv: list[str] | None = None) -> dict:
    parser = cli.training_parser(__doc__, task="t3", recipe=RECIPE)
    parser.add_argument("--placement", choices=[*PLACEMENTS, "all"], default="serial",
                        help="where the two CUBS blocks sit in each BasicBlock; all = train the "
                             "three and select by holdout")
    parser.add_argument("--variant", choices=[*VARIANTS, "both"], default="plain",
                        help="plain = the specified blocks; plus = our identity-preserving "
                             "multi-head variant; both = train and compare the two")
    parser.add_argument("--d", type=cli.positive_int, help="Block 1 similarity size")
    parser.add_argument("--gate-init", type=gate_logit,
                        help="initial logit of the plain blocks' sigmoid gates; 'pytorch' = leave "
                             "the gate layers as built (Block 1: PyTorch's default out_proj; "
                             "Block 2: v's bias at 1, as q's and k's)")
    parser.add_argument("--vanilla-results", default="runs/t2/results.json",
                        help="T2 results (or its run folder) to compare with (skipped if missing or mismatched)")
    # Each plain block checks that its logits suit the Taylor series (docs/cubs.md) with a
    # torch.cond in the compiled graph. CUDA graphs (--compile-mode reduce-overhead) cannot
    # hold that host-side branch: there every step takes the series, one check per step
    # finds out-of-range blocks, and such a step is redone in eager mode (exact either
    # way). On generated data on an H200 that mode ran the loop slower (4,682 against
    # 6,465 img/s; README, Performance), so the per-block branch stays the default.
    parser.set_defaults(compile_mode="default")
    args = cli.parse(parser, argv, smoke=cli.SMOKE)  # --smoke: generated data, small model, CPU
    if args.variant != "plain":
        try:
            check_plus_d(args.d)
        except ValueError as err:
            parser.error(str(err))
    if args.variant == "plus" and args.gate_init != GATE_LOGIT_INIT:  # it would only name the runs' recipe
        parser.error("--gate-init sets the plain blocks' gates; --variant plus trains none "
                     "(plus blocks start as the identity, docs/cubs.md)")
    if args.evaluate and (args.placement == "all" or args.variant == "both"):
        parser.error("--evaluate takes the checkpoint's one --placement and one --variant, not all/both")
    rt = runtime.setup_runtime(args.device, args.seed)
    # --evaluate PATH: a checkpoint of another network is refused now, before the data
    saved = evaluate.load(args.evaluate, network_meta(args, args.placement, args.variant)) if args.evaluate else None
    placements = PLACEMENTS if args.placement == "all" else [args.placement]
    variants = VARIANTS if args.variant == "both" else [args.variant]

    # -- data, shared by every run: as T2 (Tiny ImageNet minus a stratified holdout; test =
    # the labelled val split; random-resized crop + flip for training)
    splits = task_data.tiny_imagenet(  # --smoke: generated (task_data.SMOKE_TINY_IMAGENET)
        args.data_dir, args.out, rt, holdout_per_class=args.holdout_per_class, seed=args.seed,
        check=args.check_images, download=not args.no_download, smoke=args.smoke,
        smoke_image_size=args.image_size)
    loaders = task_data.classifier_loaders(splits, cli.loader_settings(args), rt)
    if args.fresh:  # (cli.parse refuses --fresh with --evaluate)
        # Every run of this command now (the data is there), not each as it starts: a rerun
        # after a kill must not resume a later placement's old run. The comparison is
        # redone at the end.
        def discard() -> None:
            discard_runs([Path(args.out) / f"{p}_{v}" for p in placements for v in variants])
            discard_files(args.out, ("placements.json", "placements.md", "placements.png"), "the earlier comparison's")
        runtime.main_first(rt, discard)  # rank 0 deletes; the others wait (and stop if it fails)

    # -- one training run per (placement, variant), same seed and recipe
    for placement in placements:
        for variant in variants:
            result = train_and_test(args, rt, splits, loaders, placement, variant, saved)
            if args.evaluate or not result["finished"]:
                return result

    # -- compare every finished run in --out, select the placement by HOLDOUT accuracy,
    # check the at-par rule against T2's results.json; write placements.json/.md/.png.
    # (Imported here: the comparison's tables and figures are not needed to train.)
    from common.placements import compare_runs, write_comparison
    if not rt.is_main:
        return {}
    comparison = compare_runs(Path(args.out), Path(args.vanilla_results), cli.flags(args), rt.world_size)
    write_comparison(comparison, Path(args.out))
    return comparison


def network_meta(args, placement: str, variant: str) -> dict:
    """The checkpoint meta's network keys that the flags give (num_classes comes with the data)."""
    return dict(task="t3", model=f"cubs_resnet18_{placement}_{variant}", placement=placement,
                variant=variant, width=args.width, image_size=args.image_size, d=args.d,
                **({"gate_init": args.gate_init} if variant == "plain" else {}))


def train_and_test(args, rt: runtime.Runtime, splits: task_data.DatasetSplits, loaders: task_data.Loaders,
                   placement: str, variant: str, saved: tuple | None = None) -> dict:
    """Train one (placement, variant) into --out/<placement>_<variant>/, test its best.pt once
    and return its results.json; with `saved` (--evaluate PATH, evaluate.load), test that
    checkpoint instead."""
    # -- model: T2's ResNet-18 (CIFAR stem) with Block 1 and Block 2 (common/cubs.py) on
    # every BasicBlock's residual branch, before the addition:
    #   serial  y = B2(B1(x)),  reverse  y = B1(B2(x)),  parallel  y = B1(x) + B2(x)
    # (plus: B1(x) + B2(x) - x, so that it starts as the identity)
    runtime.seed_everything(args.seed + rt.rank)  # identical init draws for every run
    num_classes = len(splits.train.classes)
    model = cubs_resnet18(num_classes, stem="cifar", placement=placement, variant=variant,
                          width=args.width, d=args.d, gate_logit=args.gate_init)
    meta = dict(network_meta(args, placement, variant), num_classes=num_classes, **cli.data_recipe(args, splits))
    if saved:  # one placement and variant (checked by main)
        return evaluate.classifier_checkpoint(model, saved, meta, loaders.test, rt)
    out = Path(args.out) / f"{placement}_{variant}"
    if rt.is_main:
        print(f"== placement {placement}, variant {variant}")

    # -- the step, T2's: label-smoothed cross-entropy; SGD Nesterov (or AdamW) with weight
    # decay on conv / linear weights only (not biases, BatchNorm, plus's gamma); LR per step,
    # linear warmup then cosine to 0; loss scaling under fp16 only. The redo check: with
    # CUDA graphs a step whose logits left the Taylor range is redone in eager mode.
    cfg = cli.fit_config(args, cuda=rt.cuda)
    net = engine.for_training(model, rt, cfg.compile, cfg.compile_mode, redo_check=range_check(
        model) if cfg.compile and cfg.compile_mode == "reduce-overhead" else None)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer, scheduler = engine.optimizer_and_schedule(model, cfg, len(loaders.train))
    scaler = engine.grad_scaler(rt)

    # -- train (holdout accuracy, gate statistics and branch gradient norms after each
    # epoch: common/diagnostics.py; early stopping), then test best.pt once: results.json
    evaluate.announce(meta["model"], model, loaders, rt)
    fitted = engine.fit(net, loaders.train, loss_fn, optimizer, scheduler, scaler,
                        evaluate.holdout_scorer(loaders.holdout, rt, diagnostics), cfg, out, rt,
                        meta, on_epoch=_curves(out, meta))
    return evaluate.test_best(model, loaders, fitted, meta, out, rt, cli.flags(args))


def _curves(out: Path, meta: dict):
    """plots.curves_png, with matplotlib loaded by the first epoch's end, not to train
    (tests/test_layers.py: T3 loads at most 16 common modules)."""
    start, drawer = time.monotonic(), None

    def draw(history: list[dict], final: bool) -> None:
        nonlocal drawer
        if drawer is None:
            from common.plots import curves_png
            drawer = curves_png(out, meta, start=start)
        drawer(history, final)
    return draw


def gate_logit(text: str) -> float | None:
    """--gate-init: a finite number, or "pytorch" (None)."""
    if text == "pytorch":
        return None
    try:
        value = cli.finite_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'pytorch', got {text!r}") from None
    if abs(value) > 100:  # sigmoid is 0 or 1 to float32 long before; and float32 must hold it
        raise argparse.ArgumentTypeError(f"must be within [-100, 100] (a gate logit), got {value}")
    return value


if __name__ == "__main__":
    cli.run(main)
