"""T2: ResNet-18 from random initialisation on Tiny ImageNet (200 classes, 64 x 64).

    python t2_resnet18.py                     # full run; downloads Tiny ImageNet to ./data
    python t2_resnet18.py --smoke             # whole pipeline on a generated dataset, CPU, under a minute (2-core VM)
    python t2_resnet18.py --evaluate runs/t2/best.pt   # test top-1/top-5 of a checkpoint, no training
    torchrun --nproc_per_node=4 t2_resnet18.py   # several GPUs

Outputs in --out: last.pt, best.pt, metrics.jsonl, curves.png, results.json. Rerunning the
same command resumes from last.pt.
"""
import torch

from common import cli, engine, evaluate, runtime, task_data
from common.diagnostics import diagnostics
from common.models import ResNet18
from common.plots import curves_png

# The recipe: the defaults of `python t2_resnet18.py`. Each is a flag (--lr 0.1, ...).
RECIPE = dict(
    epochs=60,  # length of the cosine schedule; early stopping may end the run sooner
    batch_size=256,  # per process (per GPU); the LR below goes with it: scale the two together
    lr=0.2,  # peak LR after warmup
    optimizer="sgd",  # SGD with Nesterov momentum 0.9, the usual optimiser for ResNets from scratch
    weight_decay=5e-4,  # on conv / linear weights only, not on biases and BatchNorm
    warmup_epochs=2,  # linear warmup: the first large-LR steps come while BN statistics settle
    label_smoothing=0.1,  # 200 classes with look-alikes (dog breeds): no reward for overconfidence
    patience=15,  # early stopping: epochs without a better holdout accuracy; the best epochs
                  # often come late, at the small LRs at the end of the cosine
    min_delta=0.0,  # any holdout improvement counts
    grad_clip=0.0,  # off; 1.0 is the remedy if a loss goes non-finite
    holdout_per_class=10,  # 2,000 train images select the epoch: the test split is used once
    image_size=64,  # Tiny ImageNet's own size: train crops and evaluation at 64 x 64
    color_jitter=0.0,  # off: random-resized crop + flip are the augmentation
    width=64,  # channels of stage 1; stages 2-4 double them (64, 128, 256, 512 as in ResNet-18)
)


def main(argv: list[str] | None = None) -> dict:
    args = cli.parse(cli.training_parser(__doc__, task="t2", recipe=RECIPE), argv,
                     smoke=cli.SMOKE)  # --smoke: generated data, small model, CPU (cli.SMOKE)
    rt = runtime.setup_runtime(args.device, args.seed)
    network = dict(task="t2", model="resnet18", width=args.width, image_size=args.image_size)
    saved = evaluate.load(args.evaluate, network) if args.evaluate else None  # another's: refused now

    # -- data: Tiny ImageNet's train split minus a stratified holdout; its labelled val split
    # is the test split. Training batches: random-resized crop (area 25-100 %, aspect
    # 3/4-4/3) + horizontal flip; evaluation: the image as it is. Normalised with ImageNet's
    # mean and std.
    splits = task_data.tiny_imagenet(  # --smoke: generated (task_data.SMOKE_TINY_IMAGENET)
        args.data_dir, args.out, rt, holdout_per_class=args.holdout_per_class, seed=args.seed,
        check=args.check_images, download=not args.no_download, smoke=args.smoke,
        smoke_image_size=args.image_size)
    loaders = task_data.classifier_loaders(splits, cli.loader_settings(args), rt)

    # -- model: ResNet-18 (common/models.py) with the CIFAR-style stem: a 3x3 conv, stride 1,
    # no max-pool, so stage 1 keeps 64 x 64 maps (small objects need them). Residual BN
    # gammas start at 0, so every block starts as the identity.
    model = ResNet18(len(splits.train.classes), stem="cifar", width=args.width)
    meta = dict(network, num_classes=len(splits.train.classes), **cli.data_recipe(args, splits))
    if saved:  # --evaluate PATH: test that checkpoint, no training
        return evaluate.classifier_checkpoint(model, saved, meta, loaders.test, rt)

    # -- on CUDA: channels_last, torch.compile (CUDA graphs with --compile-mode
    # reduce-overhead), DDP under torchrun. Loss: label-smoothed cross-entropy on the fp32
    # logits. SGD, Nesterov momentum 0.9 (or AdamW), weight decay on conv / linear weights
    # only. LR set every step: linear warmup, then cosine decay to 0. fp16 autocast (GPUs
    # below compute capability 8.0) scales the loss; bf16 and fp32 need no scaler.
    cfg = cli.fit_config(args, cuda=rt.cuda)
    net = engine.for_training(model, rt, cfg.compile, cfg.compile_mode)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer, scheduler = engine.optimizer_and_schedule(model, cfg, len(loaders.train))
    scaler = engine.grad_scaler(rt)

    # -- train, scoring the holdout after each epoch (and the residual branches' gradient
    # norms, common/diagnostics.py); early stopping on holdout accuracy. Then test best.pt
    # (the best holdout epoch) once and write results.json.
    evaluate.announce("resnet18", model, loaders, rt)
    fitted = engine.fit(net, loaders.train, loss_fn, optimizer, scheduler, scaler,
                        evaluate.holdout_scorer(loaders.holdout, rt, diagnostics), cfg, args.out,
                        rt, meta, on_epoch=curves_png(args.out, meta))
    return evaluate.test_best(model, loaders, fitted, meta, args.out, rt, cli.flags(args))


if __name__ == "__main__":
    cli.run(main)
