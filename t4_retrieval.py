"""T4: Cars196 zero-shot retrieval with the CUBS network: Recall@K before and after
metric learning with the Multi-Similarity loss.

    python t4_retrieval.py --data-dir data/cars196          # either Cars196 layout
    python t4_retrieval.py --compare-mining                 # + none / hard / semihard runs
    python t4_retrieval.py --smoke                          # generated Cars layout, CPU
    python t4_retrieval.py --evaluate runs/t4/phase_b_ms    # Recall@K of a saved checkpoint

Split by class id: classes 1-98 train (a stratified holdout of their images drives early
stopping), 99-196 test (never seen in training). Network: CUBS-ResNet-18 with the ImageNet
stem at 224 px, of the placement/variant that --placement/--variant name, else of T3's best
run by holdout over all variants (`best_overall` in runs/t3/placements.json), else serial
plain. Phase A trains it as a 98-way classifier (cross-entropy), then embeds the test
images (pooled features, L2-normalised) and reports Recall@1,2,4,8. Phase B replaces the
classifier by a 512-d L2-normalised linear embedding, trains the whole network from the
Phase A weights with the Multi-Similarity loss on P x K class-balanced batches, and reports
Recall@K again. Outputs in --out: phase_a/, phase_b_<mining>/ (checkpoints, metrics.jsonl,
curves.png), results.json, retrieval.png.
"""
import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch

from common import cli, engine, evaluate, plots, runtime, task_data
from common.checkpoint import check_resumable, discard_files, discard_runs, weights_sha256
from common.cubs import BLOCK1_D, PLACEMENTS, VARIANTS, cubs_resnet18, range_check
from common.diagnostics import diagnostics
from common.errors import ConfigError
from common.files import STALE_TEMP_S, remove_stale_temps, write_json
from common.init_weights import INIT_CHOICES, load_initial_weights, t3_block1_size, t3_selection
from common.loss import MINING_CHOICES, multi_similarity_loss
from common.models import EmbeddingNet, count_parameters
from common.recall import KS, chance_recall_at_1, recall_at_k
from common.runtime import describe_device
from common.schema import FitConfig, RetrievalResults

# The recipe: the defaults of `python t4_retrieval.py`. Each is a flag (--lr 0.05, ...).
RECIPE = dict(
    # Phase A: the CUBS network as a 98-way classifier (the shared training flags)
    epochs=30,  # length of the cosine schedule; classes 1-98 hold 8,054 images
    batch_size=128,  # per process: about 59 steps an epoch on the 7,564 training images (8,054 less
                     # the holdout); the ImageNet stem makes a 224 px image's activations
                     # about those of T2's 64 px one (layer1 at 56 x 56)
    lr=0.1,  # peak LR after warmup (SGD, Nesterov momentum 0.9)
    optimizer="sgd",
    weight_decay=5e-4,  # on conv / linear weights only
    warmup_epochs=1,  # linear warmup, then cosine decay to 0
    label_smoothing=0.1,  # as T2
    patience=8,  # early stopping: epochs without a better holdout accuracy (Phase B: Recall@1)
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
    embed_weight_decay=1e-4,  # AdamW's decoupled decay, on weights only: 1e-8 a step at this LR, practically none
    embed_warmup_epochs=1.0,  # linear warmup, then cosine: the new head's first steps are small
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.training_parser(__doc__, task="t4", recipe=RECIPE, downloads=False)  # Cars196: by hand
    add = p.add_argument  # T4's own flags; those without a default here take RECIPE's
    add("--t3-results", default="runs/t3/placements.json", help="where T3 wrote its selection")
    add("--placement", choices=PLACEMENTS, default=None, help="CUBS placement (default: T3's selection, else serial)")
    add("--variant", choices=VARIANTS, default=None, help="CUBS variant (default: T3's selection, else plain)")
    add("--init", choices=INIT_CHOICES, default="auto",
        help="auto = t3 if its best.pt exists, else scratch")
    add("--init-weights", default=None, help="local torchvision ResNet-18 state dict for --init imagenet")
    add("--embed-epochs", type=cli.positive_int, help="Phase B: maximum epochs")
    add("--embed-lr", type=cli.positive_float, help="Phase B: peak learning rate")
    add("--embed-optimizer", choices=["sgd", "adamw"], help="Phase B: optimiser")
    add("--embed-weight-decay", type=cli.nonnegative_float, help="Phase B: weight decay")
    add("--embed-warmup-epochs", type=cli.nonnegative_float, help="Phase B: linear warmup, then cosine")
    add("--embedding-dim", type=cli.positive_int, help="Phase B: size of the L2-normalised embedding")
    add("--classes-per-batch", type=cli.positive_int,
        help="P of the P x K batches (>= 2: each image needs a negative)")
    add("--images-per-class", type=cli.positive_int, help="K of the P x K batches (>= 2: each image needs a positive)")
    add("--mining", choices=MINING_CHOICES,
        help="pair mining of the MS loss: none = all pairs, ms = the paper's, hard = hardest positive "
             "and negative per anchor, semihard = ms positives and the negatives within +-epsilon of "
             "the hardest positive")
    add("--compare-mining", action=argparse.BooleanOptionalAction, default=False,
        help="also train Phase B with every other mining (--smoke turns it on)")
    add("--alpha", type=cli.positive_float, help="MS loss: weight scale of positive pairs")
    add("--beta", type=cli.positive_float, help="MS loss: weight scale of negative pairs")
    add("--lam", type=cli.finite_float, help="MS loss: similarity margin lambda")
    add("--epsilon", type=cli.nonnegative_float, help="mining margin of the ms and semihard mining")
    p.set_defaults(compile_mode="default")  # a CUBS network: as T3 (t3_cubs.py says why)
    args = cli.parse(p, argv, smoke=SMOKE)
    if args.backend == "cache":  # it holds S x S images; T4 evaluates centre crops of 256 px ones
        p.error("--backend cache cannot make T4's evaluation images (resize the shorter side, "
                "then centre crop); use --backend dali, torch or auto")
    if args.init_weights and args.init != "imagenet":
        p.error(f"--init-weights is read only with --init imagenet, not --init {args.init}")
    if args.classes_per_batch < 2:  # one class a batch: no negatives, so every mining keeps no pair
        p.error(f"--classes-per-batch must be >= 2 (each image needs a negative), got {args.classes_per_batch}")
    if args.holdout_per_class < 2:  # holdout R@1 is leave-one-out: one image a class has no match
        p.error(f"--holdout-per-class must be >= 2 for T4 (Phase B selects its epoch by holdout "
                f"Recall@1, which needs two images of a class), got {args.holdout_per_class}")
    if args.images_per_class < 2:
        p.error(f"--images-per-class must be >= 2 (each image needs a positive), got {args.images_per_class}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rt = runtime.setup_runtime(args.device, args.seed)
    out = Path(args.out)
    saved = evaluate.load(args.evaluate) if args.evaluate else None
    if saved:  # the checkpoint's network, whatever T3 holds now (--placement / --variant typed must agree)
        placement, variant, t3_best = (args.placement or saved[1]["meta"].get("placement", "serial"),
                                       args.variant or saved[1]["meta"].get("variant", "plain"), None)
    else:
        placement, variant, t3_best = t3_selection(args.t3_results, args.placement, args.variant)
    network = dict(task="t4", model=f"cubs_resnet18_{placement}_{variant}", placement=placement,
                   variant=variant, width=args.width, image_size=args.image_size)
    if saved:  # another network's checkpoint is refused now, before the data
        evaluate.check_network(saved, network)
    data = load_data(args, rt, out)

    # -- model: CUBS-ResNet-18 (T3's network) with the ImageNet stem (7x7 stride 2 + max-pool)
    # for 224 px, initialised as --init says
    num_classes = len(data.splits.train.classes)
    if saved:  # the network the checkpoint was trained as, whatever T3 holds now
        d = saved[1]["meta"].get("d", BLOCK1_D)
    else:
        d = t3_block1_size(args.init, t3_best, args.width) or BLOCK1_D  # T3's, so that its Block 1s load
    model = cubs_resnet18(num_classes, stem="imagenet", placement=placement, variant=variant,
                          width=args.width, d=d)
    # d only when not the default: checkpoints written before T4 followed T3's d still resume.
    meta = dict(network, num_classes=num_classes, **({"d": d} if d != BLOCK1_D else {}))
    if saved:  # --evaluate PATH: Recall@K of a saved Phase A or Phase B checkpoint
        return evaluate.retrieval_checkpoint(model, saved, meta, data.test_all, rt, args.embedding_dim)
    init = load_initial_weights(model, args.init, t3_best=t3_best, t3_results=args.t3_results,
                                init_weights=args.init_weights, verbose=rt.is_main)
    if args.fresh:  # every phase, once nothing can fail before training starts
        def discard() -> None:
            discard_runs([out / phase for phase in ["phase_a", *(f"phase_b_{m}" for m in MINING_CHOICES)]])
            discard_files(out, ("results.json", "retrieval.png"), "the earlier summary's")
        runtime.main_first(rt, discard)  # rank 0 deletes; the others wait (and stop if it fails)
    # The file's digest too: a rerun after T3 trained again must not resume from other weights.
    meta = {**meta, **{k: init[k] for k in ("init", "init_sha256") if k in init}, **cli.data_recipe(args, data.splits)}
    if rt.is_main:
        print(f"CUBS-ResNet-18 ({placement}, {variant}), {count_parameters(model) / 1e6:.2f}M params, "
              f"init {init['init']}; {len(data.splits.train.files)} train images of {num_classes} "
              f"classes, {len(data.splits.test.files)} test images of "
              f"{len(data.splits.test.classes)} unseen classes")

    # -- before training: Recall@K of the initial network, the baseline Phase A must beat
    check_resumable(out / "phase_a", meta)  # a Phase A of other weights or data: refused before this pass
    recall_init = recall_at_k(*evaluate.embed(model.to(rt.device), data.test_all, rt, features=True), ks=KS)
    if rt.is_main:
        print(f"Before Phase A (--init {init['init']}) test " + evaluate.fmt_recall(recall_init))
    result_a = phase_a(model, data, args, rt, meta, out)
    if not result_a["finished"]:
        return {"finished": False}
    data.loaders.train.close()  # Phase A's loaders are done: free their DALI readers (and GPU batches)
    data.loaders.holdout.close()
    phase_a_weights = {k: v.clone() for k, v in model.state_dict().items()}
    minings = [args.mining] + ([m for m in MINING_CHOICES if m != args.mining]
                               if args.compare_mining else [])
    results_b = {}
    for mining in minings:
        model.load_state_dict(phase_a_weights)
        results_b[mining] = phase_b(model, mining, data, args, rt, meta, out)
        if not results_b[mining]["finished"]:
            return {"finished": False}
    if not rt.is_main:
        return {}
    return write_results(model, meta, init, recall_init, result_a, results_b, data, args, rt)


def load_data(args: argparse.Namespace, rt: runtime.Runtime, out: Path) -> SimpleNamespace:
    """Classes 1-98 train (minus a stratified holdout), 99-196 test, never seen in training.
    Training: random-resized crop + flip; evaluation: resize 256, centre crop 224.
    Retrieval compares every image with every other: holdout_all and test_all list the whole
    split in every process (evaluate.embed shards them over the ranks and gathers the result)."""
    splits = task_data.cars196(args.data_dir, out, rt, holdout_per_class=args.holdout_per_class,
                               seed=args.seed, check=args.check_images, smoke=args.smoke)
    settings = cli.loader_settings(args, eval_resize=round(args.image_size * 256 / 224))
    if args.classes_per_batch > len(splits.train.classes) and not args.evaluate:  # now, not after Phase A
        raise ConfigError(f"--classes-per-batch {args.classes_per_batch} exceeds the "
                          f"{len(splits.train.classes)} training classes of {splits.root}")
    data = SimpleNamespace(
        splits=splits, settings=settings,
        loaders=task_data.classifier_loaders(splits, settings, rt),  # Phase A: train and holdout
        holdout_all=task_data.whole_split_loader(splits.holdout, settings, rt),
        test_all=task_data.whole_split_loader(splits.test, settings, rt),
        pk_train=task_data.pk_loader(splits.train, settings, rt,  # Phase B: P x K batches
                                     classes_per_batch=args.classes_per_batch,
                                     images_per_class=args.images_per_class))
    if not args.evaluate:  # a P x K batch larger than the training set: found now, not after Phase A
        data.pk_train.batches(0)
    return data


def fit_phase(model: torch.nn.Module, loader, loss_fn, score, cfg: FitConfig, run_dir: Path,
              rt: runtime.Runtime, meta: dict, **fit_kw) -> dict:
    """engine.fit of one phase with T2's step: SGD Nesterov or AdamW with weight decay on
    weights only; LR per step, linear warmup then cosine to 0; a loss scaler for fp16
    autocast only. No torch.compile by default: at 224 px its build costs more than it
    saves in T4's phases (--compile turns it on). curves.png: plots.curves_png."""
    net = engine.for_training(model, rt, cfg.compile, cfg.compile_mode, redo_check=range_check(
        model) if cfg.compile and cfg.compile_mode == "reduce-overhead" else None)
    optimizer, scheduler = engine.optimizer_and_schedule(model, cfg, len(loader))
    return engine.fit(net, loader, loss_fn, optimizer, scheduler, engine.grad_scaler(rt), score,
                      cfg, run_dir, rt, meta, on_epoch=plots.curves_png(run_dir, meta), **fit_kw)


def phase_a(model: torch.nn.Module, data: SimpleNamespace, args: argparse.Namespace,
            rt: runtime.Runtime, meta: dict, out: Path) -> dict:
    """Phase A: label-smoothed cross-entropy over the 98 training classes, early stopping on
    holdout accuracy; then Recall@K of best.pt's pooled features. Returns fit's summary plus
    test_recall; the model keeps best.pt's weights."""
    run_dir = out / "phase_a"
    if rt.is_main:
        print(f"Phase A: the {len(data.splits.train.classes)}-way classifier (cross-entropy) in {run_dir}")
    fitted = fit_phase(model, data.loaders.train,
                       torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
                       evaluate.holdout_scorer(data.loaders.holdout, rt, diagnostics),
                       cli.fit_config(args, cuda=rt.cuda, compile_on_cuda=False), run_dir, rt, meta)
    if not fitted["finished"]:
        return fitted
    evaluate.load_best(model, run_dir, fitted["best_epoch"])
    fitted["test_recall"] = recall_at_k(*evaluate.embed(model, data.test_all, rt, features=True), ks=KS)
    if rt.is_main:
        print("Phase A (classifier features) test " + evaluate.fmt_recall(fitted["test_recall"]))
    return fitted


def phase_b(model: torch.nn.Module, mining: str, data: SimpleNamespace, args: argparse.Namespace,
            rt: runtime.Runtime, meta: dict, out: Path) -> dict:
    """Phase B: an --embedding-dim (512) L2-normalised linear embedding on the pooled
    features, the whole network trained from `model`'s weights with the Multi-Similarity loss
    (`mining`) on P x K batches; --embed-* settings (AdamW, warmup, cosine); early stopping
    on holdout Recall@1. Returns fit's summary plus the test embeddings and Recall@K."""
    cfg = dataclasses.replace(cli.fit_config(args, cuda=rt.cuda, compile_on_cuda=False),
                              epochs=args.embed_epochs, lr=args.embed_lr,
                              optimizer=args.embed_optimizer, weight_decay=args.embed_weight_decay,
                              warmup_epochs=args.embed_warmup_epochs)
    # What a refused resume names: the flags that set those fields here
    embed_flags = {"epochs": "--embed-epochs", "lr": "--embed-lr", "optimizer": "--embed-optimizer",
                   "weight_decay": "--embed-weight-decay", "warmup_epochs": "--embed-warmup-epochs"}
    runtime.seed_everything(args.seed + rt.rank)
    embedder = EmbeddingNet(model, dim=args.embedding_dim)
    model.fc.requires_grad_(False)  # unused by the embedding: DDP must not wait for its gradients
    loss_fn = lambda emb, labels: multi_similarity_loss(  # noqa: E731 (fp32 emb: common/loss.py)
        emb, labels, args.alpha, args.beta, args.lam, mining, args.epsilon)
    holdout_r1 = lambda m: {"holdout_r1": recall_at_k(  # noqa: E731
        *evaluate.embed(m, data.holdout_all, rt), ks=(1,))[1]}
    run_dir = out / f"phase_b_{mining}"
    # The Phase A weights it starts from: a Phase A trained again must not be resumed into.
    meta_b = {**meta, "phase": "b", "mining": mining, "phase_a_sha256": weights_sha256(model),
              **{k: getattr(args, k) for k in ("embedding_dim", "classes_per_batch",
                                               "images_per_class", "alpha", "beta", "lam", "epsilon")}}
    if rt.is_main:
        print(f"Phase B ({mining} mining): the {args.embedding_dim}-d embedding (Multi-Similarity loss) "
              f"in {run_dir}")
    fitted = fit_phase(embedder, data.pk_train, loss_fn, holdout_r1, cfg, run_dir, rt, meta_b,
                       score_key="holdout_r1", top1=False, flag_names=embed_flags)
    if not fitted["finished"]:
        return fitted
    evaluate.load_best(embedder, run_dir, fitted["best_epoch"])
    fitted["embeddings"] = evaluate.embed(embedder, data.test_all, rt)
    fitted["test_recall"] = recall_at_k(*fitted["embeddings"], ks=KS)
    fitted["embedding_params"] = count_parameters(embedder)
    if rt.is_main:
        print(f"Phase B ({mining} mining) test " + evaluate.fmt_recall(fitted["test_recall"]))
    return fitted


def write_results(model: torch.nn.Module, meta: dict, init: dict, recall_init: dict, result_a: dict,
                  results_b: dict, data: SimpleNamespace, args: argparse.Namespace,
                  rt: runtime.Runtime) -> dict:
    """results.json and retrieval.png (rank 0), and the before / after summary."""
    out, test = Path(args.out), data.splits.test
    chance = chance_recall_at_1(torch.as_tensor(test.labels))
    phase_b = {m: phase_summary(f, "holdout_r1", mining=m) for m, f in results_b.items()}
    chosen = results_b[args.mining]
    results = RetrievalResults(
        task="t4", placement=meta["placement"], variant=meta["variant"], d=meta.get("d", BLOCK1_D),
        **init, params=count_parameters(model), embedding_params=chosen["embedding_params"],
        test_images=len(test.files), test_classes=len(test.classes),
        train_images=len(data.splits.train.files), train_classes=len(data.splits.train.classes),
        recall_at_1_chance=chance, init_test_recall=recall_init,
        phase_a=phase_summary(result_a, "holdout_acc"), phase_b=phase_b[args.mining],
        mining_comparison=list(phase_b.values()), device=chosen.get("device") or describe_device(rt),
        loader=data.loaders.train.backend, finished=True, args=cli.flags(args))
    # The figure first: results.json says the command finished, so nothing may be missing then.
    remove_stale_temps(out, ("retrieval.png", "results.json"), STALE_TEMP_S)  # what a kill mid-write left
    plots.retrieval_grid(*chosen["embeddings"], test.files, out / "retrieval.png", seed=args.seed,
                         embedding=f"the Phase B embedding (Multi-Similarity loss, {args.mining} mining)")
    write_json(results, out / "results.json")
    print(f"Recall@K on {len(test.files)} test images of unseen classes "
          f"(R@1 chance {chance:.3f}):\n  before (Phase A) {evaluate.fmt_recall(result_a['test_recall'])}\n"
          f"  after  (Phase B, {args.mining}) {evaluate.fmt_recall(chosen['test_recall'])}\n"
          f"wrote {out / 'results.json'} and {out / 'retrieval.png'}")
    left_out = [m for m in MINING_CHOICES if m not in results_b and (out / f"phase_b_{m}" / "best.pt").is_file()]
    if left_out:  # results.json describes this command; an earlier --compare-mining's runs stay on disk
        print(f"not in results.json: the Phase B runs with {', '.join(left_out)} mining in {out} "
              f"(--compare-mining reports them, or resumes those that did not finish)")
    return results


def phase_summary(fitted: dict, score_key: str, **extra) -> dict:
    """One phase's entry in results.json: test Recall@K, its best holdout score and epoch."""
    return {"test_recall": fitted["test_recall"], score_key: fitted["best_score"], **extra,
            "best_epoch": fitted["best_epoch"], "epochs_run": fitted["epochs_run"],
            "train_time_s": fitted["train_time_s"]}


if __name__ == "__main__":
    cli.run(main)
