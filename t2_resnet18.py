"""T2: ResNet-18 from random initialisation on Tiny ImageNet (200 classes, 64 x 64).

    python t2_resnet18.py                     # full run; downloads Tiny ImageNet to ./data
    python t2_resnet18.py --smoke             # whole pipeline on a generated dataset, CPU, ~1 min (2-core VM)
    python t2_resnet18.py --evaluate runs/t2/best.pt   # test top-1/top-5 of a checkpoint, no training
    torchrun --nproc_per_node=4 t2_resnet18.py   # several GPUs

Recipe: ResNet-18 with the CIFAR-style stem (3x3 conv, stride 1, no max-pool: a 64 x 64
image keeps 64 x 64 resolution in stage 1, as small objects need), random-resized-crop +
flip, label-smoothed cross-entropy, SGD Nesterov, warmup + cosine, early stopping on a
holdout carved from train, best holdout epoch tested once on the labelled val split.
Outputs in --out: last.pt, best.pt, metrics.jsonl, curves.png, results.json.
"""
from common import cli, data, evaluate, runtime
from common.classifier import train_and_test
from common.models import ResNet18


def main(argv: list[str] | None = None) -> dict:
    # -- settings
    parser = cli.training_parser(__doc__, out="runs/t2", epochs=60, batch_size=256, lr=0.2,
                                 weight_decay=5e-4)
    args = cli.parse(parser, argv)  # --smoke: small model, generated data, CPU
    rt = runtime.setup_runtime(args.device, args.seed)

    # -- data
    splits = data.tiny_imagenet(args, rt)
    loaders = data.make_loaders(splits, args, rt)

    # -- model
    model = ResNet18(num_classes=len(splits.train.classes), stem="cifar", width=args.width)
    meta = {"task": "t2", "model": "resnet18", "num_classes": len(splits.train.classes),
            "width": args.width, "image_size": args.image_size}

    # -- --evaluate PATH: test a saved checkpoint instead of training
    if args.evaluate:
        return evaluate.classifier_checkpoint(model, args.evaluate, meta, loaders.test, rt)

    # -- train, select on holdout, test once, write results.json
    return train_and_test(model, loaders, args, rt, meta, args.out)


if __name__ == "__main__":
    cli.run(main)
