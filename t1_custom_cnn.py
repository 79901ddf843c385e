"""T1: our own CNN (chained-conv concatenation blocks, no ResNet/VGG) on Tiny ImageNet.

    python t1_custom_cnn.py                   # full run; downloads Tiny ImageNet to ./data
    python t1_custom_cnn.py --smoke           # whole pipeline on a generated dataset, CPU, ~1 min (2-core VM)
    python t1_custom_cnn.py --evaluate runs/t1/best.pt   # test top-1/top-5 of a checkpoint, no training

Outputs in --out: last.pt, best.pt, metrics.jsonl, curves.png, results.json. Rerunning the
same command resumes from last.pt.
"""
from common import cli, evaluate, runtime, task_data
from common.engine import classification_step
from common.networks import build_model
from common.train_classifier import train_and_test

# The recipe: the defaults of `python t1_custom_cnn.py`. Each is a flag (--lr 0.1, ...).
# Training settings as T2's ResNet-18, so that the two networks are compared, not two recipes.
RECIPE = dict(
    epochs=60,  # length of the cosine schedule; early stopping may end the run sooner
    batch_size=256,  # per process (per GPU); the LR below goes with it: scale the two together
    lr=0.2,  # peak LR after warmup
    optimizer="sgd",  # SGD with Nesterov momentum 0.9
    weight_decay=5e-4,  # on conv / linear weights only, not on biases, BatchNorm and SE gates
    warmup_epochs=2,  # linear warmup: the first large-LR steps come while BN statistics settle
    label_smoothing=0.1,  # 200 classes with look-alikes (dog breeds): no reward for overconfidence
    patience=15,  # early stopping: epochs without a better holdout accuracy; the best epochs
                  # often come late, at the small LRs at the end of the cosine
    min_delta=0.0,  # any holdout improvement counts
    grad_clip=0.0,  # off; 1.0 is the remedy if a loss goes non-finite
    holdout_per_class=10,  # 2,000 train images select the epoch: the test split is used once
    image_size=64,  # Tiny ImageNet's own size: train crops and evaluation at 64 x 64
    color_jitter=0.0,  # off: random-resized crop + flip are the augmentation
    width=64,  # channels of the first stage; stages 2-4 double them (10.8M parameters)
    dropout=0.2,  # before the classifier: the network has no residual adds to regularise it
)


def main(argv: list[str] | None = None) -> dict:
    parser = cli.training_parser(__doc__, out="runs/t1", recipe=RECIPE)
    parser.add_argument("--dropout", type=float, help="dropout before the classifier")
    args = cli.parse(parser, argv, smoke=cli.SMOKE)  # --smoke: generated data, small model, CPU
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    rt = runtime.setup_runtime(args.device, args.seed)

    # -- data: Tiny ImageNet's train split minus a stratified holdout; its labelled val split
    # is the test split. Training batches: random-resized crop (area 25-100 %, aspect
    # 3/4-4/3) + horizontal flip; evaluation: the image as it is. Normalised with ImageNet's
    # mean and std.
    splits = task_data.tiny_imagenet(args.data_dir, args.out, rt, holdout_per_class=args.holdout_per_class,
                                     seed=args.seed, check=args.check_images,
                                     download=not args.no_download, smoke=args.smoke,
                                     smoke_image_size=args.image_size)
    loaders = task_data.classifier_loaders(splits, cli.loader_settings(args), rt)

    # -- model: CustomCNN (common/models.py, its docstring explains each choice): chains of
    # 3x3 conv units whose outputs are all concatenated and fused by a 1x1 conv with a
    # squeeze-excitation gate; resolution 64 -> 32 -> 16 -> 8, most depth at 16 x 16.
    meta = dict(task="t1", model="custom_cnn", num_classes=len(splits.train.classes),
                width=args.width, image_size=args.image_size, dropout=args.dropout,
                **cli.data_recipe(args))
    model = build_model(meta)

    # -- --evaluate PATH: test a saved checkpoint instead of training
    if args.evaluate:
        return evaluate.classifier_checkpoint(model, args.evaluate, meta, loaders.test, rt)

    # -- loss and step: label-smoothed cross-entropy on the logits (computed in fp32 under
    # autocast); the step also counts correct top-1 predictions for the train accuracy.
    step = classification_step(label_smoothing=args.label_smoothing)

    # -- optimiser and LR schedule (engine.fit builds them from this config): SGD or AdamW
    # (engine.make_optimizer), LR set every step: linear warmup, then cosine decay to 0
    # (engine.warmup_cosine); early stopping on holdout accuracy.
    cfg = cli.fit_config(args, cuda=rt.cuda)

    # -- train, keep the best holdout epoch (best.pt), test it once, write results.json
    return train_and_test(model, loaders, step, cfg, rt, meta, args.out, cli.flags(args))


if __name__ == "__main__":
    cli.run(main)
