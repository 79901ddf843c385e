"""T1: our own CNN (chained-conv concatenation blocks, no ResNet/VGG) on Tiny ImageNet.

    python t1_custom_cnn.py                   # full run; downloads Tiny ImageNet to ./data
    python t1_custom_cnn.py --smoke           # whole pipeline on a generated dataset, CPU, ~1 min (2-core VM)
    python t1_custom_cnn.py --evaluate runs/t1/best.pt   # test top-1/top-5 of a checkpoint, no training

The network (common/models.py, CustomCNN) chains 3x3 conv units whose outputs are all
concatenated and fused by a 1x1 conv with a squeeze-excitation gate; resolution goes
64 -> 32 -> 16 -> 8 with most depth at 16 x 16. Training recipe as in T2: random-resized-crop
+ flip, label-smoothed cross-entropy, SGD Nesterov, warmup + cosine, early stopping on a
holdout carved from train, best holdout epoch tested once.
Outputs in --out: last.pt, best.pt, metrics.jsonl, curves.png, results.json.
"""
from common import cli, data, evaluate, runtime
from common.classifier import train_and_test
from common.models import CustomCNN


def main(argv: list[str] | None = None) -> dict:
    # -- settings
    parser = cli.training_parser(__doc__, out="runs/t1", epochs=60, batch_size=256, lr=0.2,
                                 weight_decay=5e-4)
    parser.add_argument("--dropout", type=float, default=0.2, help="before the classifier")
    args = cli.parse(parser, argv)  # --smoke: small model, generated data, CPU
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    rt = runtime.setup_runtime(args.device, args.seed)

    # -- data
    splits = data.tiny_imagenet(args, rt)
    loaders = data.make_loaders(splits, args, rt)

    # -- model
    model = CustomCNN(num_classes=len(splits.train.classes), width=args.width, dropout=args.dropout)
    meta = {"task": "t1", "model": "custom_cnn", "num_classes": len(splits.train.classes),
            "width": args.width, "image_size": args.image_size, "dropout": args.dropout}

    # -- --evaluate PATH: test a saved checkpoint instead of training
    if args.evaluate:
        return evaluate.classifier_checkpoint(model, args.evaluate, meta, loaders.test, rt)

    # -- train, select on holdout, test once, write results.json
    return train_and_test(model, loaders, args, rt, meta, args.out)


if __name__ == "__main__":
    cli.run(main)
