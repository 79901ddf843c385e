"""T4: Cars196 zero-shot retrieval with the CUBS network: Recall@K before and after
metric learning with the Multi-Similarity loss.

    python t4_retrieval.py --data-dir data/cars196          # either Cars196 layout
    python t4_retrieval.py --compare-mining                 # + none / hard / semihard runs
    python t4_retrieval.py --smoke                          # generated Cars layout, CPU
    python t4_retrieval.py --evaluate runs/t4/phase_b_ms    # Recall@K of a saved checkpoint

Split by class id: classes 1-98 train (a stratified holdout of their images drives early
stopping), 99-196 test (never seen in training). Network: CUBS-ResNet-18 with the ImageNet
stem at 224 px and the placement/variant of T3's best run by holdout over all variants
(`best_overall` in runs/t3/placements.json), else --placement. Phase A trains it as a 98-way classifier (cross-entropy), then embeds the test
images (pooled features, L2-normalised) and reports Recall@1,2,4,8. Phase B replaces the
classifier by a 512-d L2-normalised linear embedding, trains the whole network from the
Phase A weights with the Multi-Similarity loss on P x K class-balanced batches, and reports
Recall@K again. Outputs in --out: phase_a/, phase_b_<mining>/ (checkpoints, metrics.jsonl,
curves.png), results.json, retrieval.png.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import cli, engine, evaluate, runtime, task_data
from common.cubs import PLACEMENTS, VARIANTS
from common.errors import ConfigError
from common.init_weights import INIT_CHOICES, load_initial_weights
from common.loss import MINING_CHOICES, multi_similarity_loss
from common.models import EmbeddingNet, count_parameters
from common.networks import build_model
from common.plots import plot_retrieval
from common.recall import nearest_neighbours, recall_at_k
from common.files import write_json
from common.runtime import describe_device
from common.schema import RetrievalResults
from common.train_classifier import fit_classifier, load_best

KS = (1, 2, 4, 8)

# The recipe: the defaults of `python t4_retrieval.py`. Each is a flag (--lr 0.05, ...).
RECIPE = dict(
    # Phase A: the CUBS network as a 98-way classifier (the shared training flags)
    epochs=30,  # length of the cosine schedule; classes 1-98 hold 8,054 images
    batch_size=128,  # per process; a 224 px image takes 12x the activations of T2's 64 px one
    lr=0.1,  # peak LR after warmup (SGD, Nesterov momentum 0.9)
    optimizer="sgd",
    weight_decay=5e-4,  # on conv / linear weights only
    warmup_epochs=1,  # linear warmup, then cosine decay to 0
    label_smoothing=0.1,  # as T2
    patience=8,  # early stopping: epochs without a better holdout accuracy
    min_delta=0.0,
    grad_clip=0.0,  # off
    holdout_per_class=5,  # 490 train images select Phase A's epoch; Cars196 has ~82 per class
    image_size=224,  # Cars196 photos are large: random-resized crops of 224 px for training,
                     # resize to 256 + centre crop 224 for evaluation (eval_resize below)
    color_jitter=0.0,  # off: random-resized crop + flip are the augmentation
    width=64,  # ResNet-18 widths (64, 128, 256, 512): T3's weights load into it
    # Phase B: the 512-d embedding trained with the Multi-Similarity loss from Phase A's weights
    embed_epochs=30,  # length of Phase B's cosine schedule; early stopping on holdout R@1
    embed_lr=1e-4,  # small: fine-tune what Phase A learned rather than overwrite it
    embed_optimizer="adamw",  # the usual optimiser of deep metric learning recipes
    embed_weight_decay=1e-4,  # AdamW's decoupled decay, on weights only
    embedding_dim=512,  # the assignment's size
    classes_per_batch=32,  # P: each batch holds P classes x K images
    images_per_class=4,  # K: every anchor has K - 1 = 3 positives and (P - 1) K negatives
    mining="ms",  # the MS paper's mining: keep the pairs within epsilon of the hardest pair
                  # of the other kind (common/loss.py); --compare-mining trains the others too
    alpha=2.0, beta=50.0, lam=0.5, epsilon=0.1,  # MS loss / mining constants: the values of
                                                 # pytorch-metric-learning's defaults
)
# --smoke: cli.SMOKE plus T4's own: 64 px; Phase A takes batches of 16 so that its 10 epochs
# make 100 steps on the 160 generated training images, enough to beat its starting network
# clearly (tests/test_scripts.py); Phase B batches of 4 classes x 4 images.
SMOKE = {**cli.SMOKE, "image_size": 64, "epochs": 10, "batch_size": 16, "holdout_per_class": 4,
         "embed_epochs": 4, "embed_lr": 1e-3, "classes_per_batch": 4, "images_per_class": 4,
         "compare_mining": True}


def main(argv: list[str] | None = None) -> dict:
    p = cli.training_parser(__doc__, out="runs/t4", recipe=RECIPE, downloads=False)  # Cars196: by hand
    a = p.add_argument  # T4's own flags; their defaults come from RECIPE
    a("--t3-results", default="runs/t3/placements.json", help="where T3 wrote its selection")
    a("--placement", choices=PLACEMENTS, default=None, help="CUBS placement (default: T3's selection, else serial)")
    a("--variant", choices=VARIANTS, default=None, help="CUBS variant (default: T3's selection, else plain)")
    a("--init", choices=INIT_CHOICES, default="auto",
      help="auto = t3 if its best.pt exists, else scratch")
    a("--init-weights", default=None, help="local torchvision ResNet-18 state dict for --init imagenet")
    a("--embed-epochs", type=cli.positive_int, help="Phase B: maximum epochs")
    a("--embed-lr", type=cli.positive_float, help="Phase B: peak learning rate")
    a("--embed-optimizer", choices=["sgd", "adamw"], help="Phase B: optimiser")
    a("--embed-weight-decay", type=cli.nonnegative_float, help="Phase B: weight decay")
    a("--embedding-dim", type=cli.positive_int, help="Phase B: size of the L2-normalised embedding")
    a("--classes-per-batch", type=cli.positive_int, help="P of the P x K batches")
    a("--images-per-class", type=cli.positive_int, help="K of the P x K batches (>= 2: each image needs a positive)")
    a("--mining", choices=MINING_CHOICES,
      help="pair mining of the MS loss: none = all pairs, ms = the paper's, hard = hardest positive "
           "and negative per anchor, semihard = ms positives and the negatives within +-epsilon of "
           "the hardest positive")
    a("--compare-mining", action=argparse.BooleanOptionalAction, default=False,
      help="also train Phase B with every other mining (--smoke turns it on)")
    a("--alpha", type=cli.positive_float, help="MS loss: weight scale of positive pairs")
    a("--beta", type=cli.positive_float, help="MS loss: weight scale of negative pairs")
    a("--lam", type=cli.finite_float, help="MS loss: similarity margin lambda")
    a("--epsilon", type=cli.nonnegative_float, help="mining margin of the ms and semihard mining")
    args = cli.parse(p, argv, smoke=SMOKE)
    if args.images_per_class < 2:
        p.error(f"--images-per-class must be >= 2 (each image needs a positive), got {args.images_per_class}")
    rt = runtime.setup_runtime(args.device, args.seed)
    out = Path(args.out)
    placement, variant, t3_best = t3_selection(args)

    # -- data: classes 1-98 train (minus a stratified holdout), 99-196 test, never seen in
    # training. Training: random-resized crop + flip; evaluation: resize 256, centre crop 224.
    splits = task_data.cars196(args.data_dir, out, rt, holdout_per_class=args.holdout_per_class,
                               seed=args.seed, check=args.check_images, smoke=args.smoke)
    settings = cli.loader_settings(args, eval_resize=round(args.image_size * 256 / 224))
    loaders = task_data.classifier_loaders(splits, settings, rt)  # Phase A: train and holdout
    # Retrieval compares every image with every other: each process embeds the whole split.
    holdout_all = task_data.whole_split_loader(splits.holdout, settings, rt)
    test_all = task_data.whole_split_loader(splits.test, settings, rt)
    num_classes = len(splits.train.classes)
    if args.classes_per_batch > num_classes:  # found now, not after Phase A has trained
        raise ConfigError(f"--classes-per-batch {args.classes_per_batch} exceeds the "
                          f"{num_classes} training classes of {splits.root}")

    # -- model: CUBS-ResNet-18 (T3's network) with the ImageNet stem (7x7 stride 2 + max-pool)
    # for 224 px, initialised as --init says
    meta = dict(task="t4", model=f"cubs_resnet18_{placement}_{variant}", placement=placement,
                variant=variant, num_classes=num_classes, width=args.width,
                image_size=args.image_size)
    model = build_model(meta)

    # -- --evaluate PATH: Recall@K of a saved Phase A or Phase B checkpoint instead of training
    if args.evaluate:
        return evaluate_saved(model, meta, args, test_all, rt)

    init = load_initial_weights(model, args.init, t3_best=t3_best, t3_results=args.t3_results,
                                init_weights=args.init_weights, verbose=rt.is_main)
    meta.update(init=init["init"], **cli.data_recipe(args))
    if rt.is_main:
        print(f"CUBS-ResNet-18 ({placement}, {variant}), {count_parameters(model) / 1e6:.2f}M params, "
              f"init {init['init']}; {len(splits.train.files)} train images of {num_classes} classes, "
              f"{len(splits.test.files)} test images of {len(splits.test.classes)} unseen classes")

    # -- before training: Recall@K of the initial network, the baseline Phase A must beat
    recall_init = recall_at_k(*engine.embed(model.to(rt.device), test_all, rt, features=True), ks=KS)
    if rt.is_main:
        print(f"Before Phase A (--init {init['init']}) test " + fmt(recall_init))

    # -- Phase A: label-smoothed cross-entropy over the 98 training classes, SGD + warmup +
    # cosine as T2 (engine.fit, cli.fit_config); then Recall@K of the pooled features
    # No torch.compile by default: at 224 px its build costs more than it saves in T4's
    # phases (--compile turns it on).
    cfg_a = cli.fit_config(args, cuda=rt.cuda, compile_on_cuda=False)
    fitted_a = fit_classifier(model, loaders, engine.classification_step(args.label_smoothing),
                              cfg_a, rt, meta, out / "phase_a")
    if not fitted_a["finished"]:
        return {"finished": False}
    load_best(model, out / "phase_a", fitted_a["best_epoch"])
    recall_a = recall_at_k(*engine.embed(model, test_all, rt, features=True), ks=KS)
    if rt.is_main:
        print("Phase A (classifier features) test " + fmt(recall_a))

    # -- Phase B: a 512-d L2-normalised linear embedding on the pooled features, the whole
    # network trained with the Multi-Similarity loss on P x K batches, from Phase A's weights.
    # Optimiser --embed-optimizer (AdamW) at --embed-lr, 1 warmup epoch, then cosine;
    # early stopping on holdout Recall@1.
    pk_train = task_data.pk_loader(splits.train, settings, rt, classes_per_batch=args.classes_per_batch,
                                   images_per_class=args.images_per_class)
    cfg_b = cli.fit_config(args, cuda=rt.cuda, compile_on_cuda=False)
    cfg_b.epochs, cfg_b.lr, cfg_b.optimizer = args.embed_epochs, args.embed_lr, args.embed_optimizer
    cfg_b.weight_decay, cfg_b.warmup_epochs = args.embed_weight_decay, 1.0
    phase_a_weights = {k: v.clone() for k, v in model.state_dict().items()}
    minings = [args.mining] + ([m for m in MINING_CHOICES if m != args.mining]
                               if args.compare_mining else [])
    phase_b = {}
    for mining in minings:
        model.load_state_dict(phase_a_weights)
        runtime.seed_everything(args.seed + rt.rank)
        embedder = EmbeddingNet(model, dim=args.embedding_dim)

        def step(m, images, labels, mining=mining):  # the loss in fp32 (common/loss.py)
            return multi_similarity_loss(m(images).float(), labels, args.alpha, args.beta,
                                         args.lam, mining, args.epsilon), None

        def holdout_r1(m):
            return {"holdout_r1": recall_at_k(*engine.embed(m, holdout_all, rt), ks=(1,))[1]}

        run_dir = out / f"phase_b_{mining}"
        fitted = engine.fit(embedder, pk_train, step, holdout_r1, cfg_b, run_dir, rt,
                            {**meta, "phase": "b", "mining": mining,
                             **{k: getattr(args, k) for k in ("embedding_dim", "classes_per_batch",
                                                              "images_per_class", "alpha", "beta",
                                                              "lam", "epsilon")}},
                            score_key="holdout_r1")
        if not fitted["finished"]:
            return {"finished": False}
        load_best(embedder, run_dir, fitted["best_epoch"])
        embeddings, labels = engine.embed(embedder, test_all, rt)
        phase_b[mining] = {"mining": mining, "test_recall": recall_at_k(embeddings, labels, ks=KS),
                           "holdout_r1": fitted["best_score"], "best_epoch": fitted["best_epoch"],
                           "epochs_run": fitted["epochs_run"], "train_time_s": fitted["train_time_s"]}
        if mining == args.mining:
            main_embeddings = (embeddings, labels)
        if rt.is_main:
            print(f"Phase B ({mining} mining) test " + fmt(phase_b[mining]["test_recall"]))

    # -- results
    if not rt.is_main:
        return {}
    counts = np.bincount(splits.test.labels)
    chance = float((counts * (counts - 1)).sum() / (len(splits.test.labels) * (len(splits.test.labels) - 1)))
    results = RetrievalResults(
        task="t4", placement=placement, variant=variant, **init,
        params=count_parameters(model), embedding_params=count_parameters(embedder),
        test_images=len(splits.test.files), test_classes=len(splits.test.classes),
        train_images=len(splits.train.files), train_classes=num_classes,
        recall_at_1_chance=chance, init_test_recall=recall_init,
        phase_a={"test_recall": recall_a, "holdout_acc": fitted_a["best_score"],
                 "best_epoch": fitted_a["best_epoch"], "epochs_run": fitted_a["epochs_run"],
                 "train_time_s": fitted_a["train_time_s"]},
        phase_b=phase_b[args.mining], mining_comparison=list(phase_b.values()),
        device=describe_device(rt), loader=loaders.train.backend, finished=True,
        args=cli.flags(args))
    write_json(results, out / "results.json")
    draw_retrieval(*main_embeddings, splits.test.files, out / "retrieval.png", seed=args.seed,
                   embedding=f"the Phase B embedding (Multi-Similarity loss, {args.mining} mining)")
    print(f"Recall@K on {len(splits.test.files)} test images of unseen classes "
          f"(R@1 chance {chance:.3f}):\n  before (Phase A) {fmt(recall_a)}\n"
          f"  after  (Phase B, {args.mining}) {fmt(phase_b[args.mining]['test_recall'])}\n"
          f"wrote {out / 'results.json'} and {out / 'retrieval.png'}")
    return results


def evaluate_saved(model, meta: dict, args, test_all, rt) -> dict:
    """--evaluate: Recall@K on the unseen test classes of a Phase A checkpoint (the
    classifier's pooled features, as Phase A reports them) or of a Phase B one (the
    embedding); the checkpoint's meta says which."""
    saved = evaluate.load(args.evaluate)
    phase_b = saved[1]["meta"].get("phase") == "b"
    if phase_b:
        model = EmbeddingNet(model, dim=args.embedding_dim)
        meta = {**meta, "phase": "b", "embedding_dim": args.embedding_dim}
    score = lambda m: {"test_recall": recall_at_k(  # noqa: E731
        *engine.embed(m, test_all, rt, features=not phase_b), ks=KS)}
    return evaluate.evaluate_checkpoint(model, saved, meta, rt, score, test_all.backend)


def t3_selection(args) -> tuple[str, str, Path | None]:
    """(placement, variant, T3 best.pt or None): flags win, then T3's choice, then serial/plain."""
    chosen, best = {}, None
    path = Path(args.t3_results)
    if path.is_file():
        chosen = json.loads(path.read_text())["best_overall"]
        best = path.parent / f"{chosen['placement']}_{chosen['variant']}" / "best.pt"
    placement = args.placement or chosen.get("placement", "serial")
    variant = args.variant or chosen.get("variant", "plain")
    if best is not None and (placement, variant) != (chosen["placement"], chosen["variant"]):
        best = path.parent / f"{placement}_{variant}" / "best.pt"
    return placement, variant, best if best is not None and best.is_file() else None


def fmt(recall: dict) -> str:
    return "  ".join(f"R@{k} {v:.4f}" for k, v in recall.items())


def draw_retrieval(embeddings, labels, files, path: Path, seed: int, embedding: str,
                   queries: int = 6) -> None:
    """A few random test queries and their top-8 neighbours (green = same class); the title
    names the `embedding` the neighbours come from."""
    k = min(8, len(files) - 1)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(files), size=min(queries, len(files)), replace=False)
    nn_idx = nearest_neighbours(embeddings, k)[torch.as_tensor(picks, device=embeddings.device)].cpu()
    labels = labels.cpu()
    thumb = lambda i: np.asarray(Image.open(files[i]).convert("RGB").resize((96, 72)))  # noqa: E731
    plot_retrieval(np.stack([thumb(i) for i in picks]),
                   np.stack([[thumb(j) for j in row.tolist()] for row in nn_idx]),
                   (labels[nn_idx] == labels[torch.as_tensor(picks)][:, None]).numpy(), path,
                   title=f"T4 retrieval with {embedding}: {len(picks)} random test queries (classes "
                         f"unseen in training) and their {k} nearest test images by cosine similarity")


if __name__ == "__main__":
    cli.run(main)
