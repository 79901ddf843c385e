"""T3: ResNet-18 with two CUBS attention blocks in every BasicBlock, on Tiny ImageNet.

    python t3_cubs.py --placement serial      # y = B2(B1(x)) in each residual branch
    python t3_cubs.py --placement all         # serial, reverse, parallel; best by holdout
    python t3_cubs.py --placement serial --variant both   # plain vs our `plus` variant
    python t3_cubs.py --smoke --placement all # everything on a generated dataset, CPU

The blocks (common/cubs.py, specification in docs/cubs.md, summary in README): Block 1 gates channels through a
self-similarity of the pooled channel descriptor, Block 2 gates positions through a
self-similarity of the positions; both attention maps go through a fused kernel and are
never materialised. Each (placement, variant) trains with the same seed and recipe as T2
into --out/<placement>_<variant>/. Afterwards every finished run under --out is compared:
the placement is selected by HOLDOUT accuracy (never test), test accuracies are reported,
and if a matching T2 result exists the "at most 2 points below vanilla ResNet-18" rule is
checked. Writes placements.json, placements.md and placements.png in --out.
"""
from pathlib import Path

from common import cli, data, evaluate, runtime
from common.classifier import train_and_test
from common.cubs import GATE_LOGIT_INIT, PLACEMENTS, VARIANTS, check_plus_d, cubs_resnet18
from common.placements import compare_runs, write_comparison


def main(argv: list[str] | None = None) -> dict:
    # -- settings
    parser = cli.training_parser(__doc__, out="runs/t3", epochs=60, batch_size=256, lr=0.2,
                                 weight_decay=5e-4)
    parser.add_argument("--placement", choices=[*PLACEMENTS, "all"], default="serial",
                        help="where the two CUBS blocks sit in each BasicBlock; all = train the "
                             "three and select by holdout")
    parser.add_argument("--variant", choices=[*VARIANTS, "both"], default="plain",
                        help="plain = the specified blocks; plus = our identity-preserving "
                             "multi-head variant; both = train and compare the two")
    parser.add_argument("--d", type=cli.positive_int, default=512, help="Block 1 similarity size")
    parser.add_argument("--gate-init", type=_gate_logit, default=GATE_LOGIT_INIT,
                        help="initial logit of the plain blocks' sigmoid gates: 3 starts them at "
                             "0.95, nearly open, so serial/reverse train as fast as vanilla "
                             "(docs/cubs.md, ablation); 'pytorch' = PyTorch's default init")
    parser.add_argument("--vanilla-results", default="runs/t2/results.json",
                        help="T2 results to compare with (skipped if missing or mismatched)")
    args = cli.parse(parser, argv)  # --smoke: small model, generated data, CPU
    if args.variant != "plain":
        try:
            check_plus_d(args.d)
        except ValueError as err:
            parser.error(str(err))
    if args.evaluate and (args.placement == "all" or args.variant == "both"):
        parser.error("--evaluate takes the checkpoint's one --placement and one --variant, not all/both")
    rt = runtime.setup_runtime(args.device, args.seed)

    # -- data (shared by every run)
    splits = data.tiny_imagenet(args, rt)
    loaders = data.make_loaders(splits, args, rt)
    num_classes = len(splits.train.classes)

    # -- one training run per (placement, variant), same seed and recipe
    placements = PLACEMENTS if args.placement == "all" else [args.placement]
    variants = VARIANTS if args.variant == "both" else [args.variant]
    for placement in placements:
        for variant in variants:
            runtime.seed_everything(args.seed + rt.rank)  # identical init draws for every run
            model = cubs_resnet18(num_classes, stem="cifar", placement=placement, variant=variant,
                                  width=args.width, d=args.d, gate_logit=args.gate_init)
            meta = {"task": "t3", "model": f"cubs_resnet18_{placement}_{variant}",
                    "placement": placement, "variant": variant, "num_classes": num_classes,
                    "width": args.width, "image_size": args.image_size, "d": args.d,
                    **({"gate_init": args.gate_init} if variant == "plain" else {})}
            if args.evaluate:  # test that checkpoint instead of training
                return evaluate.classifier_checkpoint(model, args.evaluate, meta, loaders.test, rt)
            if rt.is_main:
                print(f"== placement {placement}, variant {variant}")
            result = train_and_test(model, loaders, args, rt, meta,
                                    Path(args.out) / f"{placement}_{variant}")
            if not result["finished"]:
                return result

    # -- compare every finished run in --out, select by holdout
    if not rt.is_main:
        return {}
    comparison = compare_runs(Path(args.out), Path(args.vanilla_results))
    write_comparison(comparison, Path(args.out))
    return comparison


def _gate_logit(text: str) -> float | None:
    return None if text == "pytorch" else float(text)


if __name__ == "__main__":
    cli.run(main)
