"""T3: ResNet-18 with two CUBS attention blocks in every BasicBlock, on Tiny ImageNet.

    python t3_cubs.py --placement serial      # y = B2(B1(x)) in each residual branch
    python t3_cubs.py --placement all         # serial, reverse, parallel; best by holdout
    python t3_cubs.py --placement serial --variant both   # plain vs our `plus` variant
    python t3_cubs.py --smoke --placement all # everything on a generated dataset, CPU

The blocks (common/cubs.py, specification in docs/cubs.md, summary in README): Block 1
gates channels through a self-similarity of the pooled channel descriptor, Block 2 gates
positions through a self-similarity of the positions; both attention maps go through a
fused kernel and are never materialised. Each (placement, variant) trains with the same
seed and recipe as T2, from T2's initial tensors (the blocks are drawn after them), into
--out/<placement>_<variant>/. Afterwards every finished run under --out is compared: the
placement is selected by HOLDOUT accuracy (never test), test accuracies are reported, and
if a matching T2 result exists the "at most 2 points below vanilla ResNet-18" rule is
checked. Writes placements.json, placements.md and placements.png in --out.
"""
from pathlib import Path

from common import cli, runtime, task_data
from common.cubs import GATE_LOGIT_INIT, PLACEMENTS, VARIANTS, check_plus_d, range_check
from common.engine import classification_step
from common.networks import build_model
from common.placements import compare_runs, write_comparison
from common.train_classifier import train_and_test

# The recipe: the defaults of `python t3_cubs.py`. Each is a flag (--lr 0.1, ...). The
# training settings are T2's (tests/test_scripts.py checks it), so that the at-par rule
# compares the networks, not two recipes.
RECIPE = dict(
    epochs=60,  # length of the cosine schedule; early stopping may end the run sooner
    batch_size=256,  # per process (per GPU); the LR below goes with it: scale the two together
    lr=0.2,  # peak LR after warmup
    optimizer="sgd",  # SGD with Nesterov momentum 0.9
    weight_decay=5e-4,  # on conv / linear weights only, not on biases, BatchNorm and gates
    warmup_epochs=2,  # linear warmup: the first large-LR steps come while BN statistics settle
    label_smoothing=0.1,  # 200 classes with look-alikes (dog breeds): no reward for overconfidence
    patience=15,  # early stopping: epochs without a better holdout accuracy
    min_delta=0.0,  # any holdout improvement counts
    grad_clip=0.0,  # off; 1.0 is the remedy if a loss goes non-finite
    holdout_per_class=10,  # 2,000 train images select the epoch and the placement; test is used once
    image_size=64,  # Tiny ImageNet's own size: train crops and evaluation at 64 x 64
    color_jitter=0.0,  # off: random-resized crop + flip are the augmentation
    width=64,  # ResNet-18's widths (64, 128, 256, 512)
    d=512,  # Block 1: the pooled channel descriptor is projected to d values (docs/cubs.md)
    gate_init=GATE_LOGIT_INIT,  # plain blocks: gates start at sigmoid(3) = 0.95, nearly open,
                                # so serial/reverse learn as fast as vanilla (docs/cubs.md ablation)
)


def main(argv: list[str] | None = None) -> dict:
    parser = cli.training_parser(__doc__, out="runs/t3", recipe=RECIPE)
    parser.add_argument("--placement", choices=[*PLACEMENTS, "all"], default="serial",
                        help="where the two CUBS blocks sit in each BasicBlock; all = train the "
                             "three and select by holdout")
    parser.add_argument("--variant", choices=[*VARIANTS, "both"], default="plain",
                        help="plain = the specified blocks; plus = our identity-preserving "
                             "multi-head variant; both = train and compare the two")
    parser.add_argument("--d", type=cli.positive_int, help="Block 1 similarity size")
    parser.add_argument("--gate-init", type=_gate_logit,
                        help="initial logit of the plain blocks' sigmoid gates; 'pytorch' = "
                             "PyTorch's default init")
    parser.add_argument("--vanilla-results", default="runs/t2/results.json",
                        help="T2 results to compare with (skipped if missing or mismatched)")
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
    if args.evaluate and (args.placement == "all" or args.variant == "both"):
        parser.error("--evaluate takes the checkpoint's one --placement and one --variant, not all/both")
    rt = runtime.setup_runtime(args.device, args.seed)

    # -- data, shared by every run: as T2 (Tiny ImageNet minus a stratified holdout; test =
    # the labelled val split; random-resized crop + flip for training)
    splits = cli.tiny_imagenet_splits(args, rt)  # --smoke: generated, task_data.SMOKE_TINY_IMAGENET
    loaders = task_data.classifier_loaders(splits, cli.loader_settings(args), rt)

    # -- loss and step, optimiser and schedule: T2's (label-smoothed cross-entropy; SGD
    # Nesterov, linear warmup then cosine to 0, per step; early stopping on holdout accuracy)
    step = classification_step(label_smoothing=args.label_smoothing)
    cfg = cli.fit_config(args, cuda=rt.cuda)

    # -- one training run per (placement, variant), same seed and recipe
    placements = PLACEMENTS if args.placement == "all" else [args.placement]
    variants = VARIANTS if args.variant == "both" else [args.variant]
    for placement in placements:
        for variant in variants:
            # -- model: T2's ResNet-18 (CIFAR stem) with Block 1 and Block 2 (common/cubs.py)
            # on every BasicBlock's residual branch, before the addition:
            #   serial  y = B2(B1(x)),  reverse  y = B1(B2(x)),  parallel  y = B1(x) + B2(x)
            # (plus: B1(x) + B2(x) - x, so that it starts as the identity)
            runtime.seed_everything(args.seed + rt.rank)  # identical init draws for every run
            meta = dict(task="t3", model=f"cubs_resnet18_{placement}_{variant}",
                        placement=placement, variant=variant, num_classes=len(splits.train.classes),
                        width=args.width, image_size=args.image_size, d=args.d,
                        **({"gate_init": args.gate_init} if variant == "plain" else {}),
                        **cli.data_recipe(args))
            model = build_model(meta)
            if rt.is_main and not args.evaluate:
                print(f"== placement {placement}, variant {variant}")
            # --evaluate PATH: test that checkpoint instead of training (one placement/variant)
            result = train_and_test(model, loaders, step, cfg, rt, meta,
                                    Path(args.out) / f"{placement}_{variant}", cli.flags(args),
                                    evaluate_only=args.evaluate,
                                    redo_check=range_check(model) if cfg.compile_mode
                                    == "reduce-overhead" else None)
            if args.evaluate or not result["finished"]:
                return result

    # -- compare every finished run in --out, select the placement by HOLDOUT accuracy,
    # check the at-par rule against T2's results.json; write placements.json/.md/.png
    if not rt.is_main:
        return {}
    comparison = compare_runs(Path(args.out), Path(args.vanilla_results))
    write_comparison(comparison, Path(args.out))
    return comparison


def _gate_logit(text: str) -> float | None:
    return None if text == "pytorch" else float(text)


if __name__ == "__main__":
    cli.run(main)
