"""The T3 at-par ablation of docs/cubs.md ("Gate initialisation"), on generated data, CPU.

    python -m bench.at_par_ablation t2 serial-none serial-3 parallel-3 --seed 0
    python -m bench.at_par_ablation serial-none --warmup 3
    python -m bench.at_par_ablation --test-accuracy     # test accuracy of every finished run
    python -m bench.at_par_ablation --plot docs/at_par_curves.png   # holdout per epoch
    python -m bench.at_par_ablation t2 serial-3 --seed 0 --test-per-class 200   # 2,000 test images
    python -m bench.at_par_ablation --plus-stats   # |scale|, gate range, attention logits

A name is `t2` (vanilla ResNet-18) or `<placement>-<gate>`: gate `none` = PyTorch's default
init, a number = the gate logit (3 is the default), `plus` = the plus variant (its default,
scale tanh(gamma)), `plusraw` = plus with the unbounded scale gamma (the variant before).
Each run trains with engine.fit (torch loader, the scripts' recipe at a small size) into
OUT/<name>_s<seed>_w<warmup>/ and prints holdout and train accuracy per epoch.
metrics.jsonl also holds common.diagnostics of the first holdout batch per epoch (gates,
branch gradient norms, every plus block's scale), and plus runs write gamma_steps.json
(every scale and the loss at every step). A CUBS run starts from t2's initial tensors at the
same seed (ResNet18 draws its attention modules last): a plus network computes exactly what
t2 computes until gamma moves, so the pair differs only by what the attention learns (the
batches are a function of the seed alone). Runs are deterministic (one thread): a rerun repeats every figure.

Data: the Tiny ImageNet layout, 10 classes whose shapes all differ (class styles 0-6, 10,
11, 12 of common.synthetic), 80 images per class of which 8 are held out, 100 test images,
32x32, class hue +- 0.2: colour is a weak cue, shape decides. Takes 1-3 minutes a run on
2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
import types
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from bench.synthetic_options import hue_jitter
from common import cubs, engine, runtime, synthetic
from common.checkpoint import load_checkpoint
from common.cubs import PLACEMENTS, CUBSBlock1Plus, CUBSBlock2Plus, PlusGateBlock, cubs_resnet18
from common.diagnostics import diagnostics, gamma_values
from common.datasets import load_tiny_imagenet
from common.evaluate import evaluate_classifier
from common.loader import ImageLoader, LoaderSettings
from common.models import ResNet18
from common.plots import finish_epoch_axes

SIZE, CLASSES, PER_CLASS, EPOCHS, WIDTH, LR, BATCH = 32, 10, 80, 8, 8, 0.2, 32
STYLES = [0, 1, 2, 3, 4, 5, 6, 10, 11, 12]  # ids 7-9 would repeat the shapes of 0-2


def make_data(root: Path, test_per_class: int = 10) -> Path:
    """The data set; the train images come first from the generator's stream, so a larger
    `test_per_class` leaves the train (and holdout) images byte-identical and only adds test
    images of the same distribution."""
    if not (root / "tiny-imagenet-200" / "wnids.txt").exists():
        original = synthetic.class_style
        synthetic.class_style = lambda class_id: original(STYLES[class_id])
        try:
            with hue_jitter(0.2):
                synthetic.make_tiny_imagenet(root, num_classes=CLASSES, train_per_class=PER_CLASS,
                                             val_per_class=test_per_class, image_size=SIZE, seed=11)
        finally:
            synthetic.class_style = original
    return root / "tiny-imagenet-200"


def unbounded(model: torch.nn.Module) -> torch.nn.Module:
    """`plusraw`: every plus block of `model` scales its modulation by gamma itself instead of
    tanh(gamma), so its gate may leave (0, 2) once |gamma| > 1 (the plus variant before the bound)."""
    for block in model.modules():
        if isinstance(block, PlusGateBlock):
            # A method of the block: a copy of the model gets one bound to its own gamma.
            block.effective_gamma = types.MethodType(lambda self: self.gamma, block)
    return model


def _is_gate(gate: str) -> bool:
    if gate in ("none", "plus", "plusraw"):
        return True
    try:
        return math.isfinite(float(gate))
    except ValueError:
        return False


def build(name: str) -> torch.nn.Module:
    if name == "t2":
        return ResNet18(CLASSES, width=WIDTH)
    placement, _, gate = name.partition("-")  # gate may be negative: serial--2
    if gate in ("plus", "plusraw"):
        model = cubs_resnet18(CLASSES, width=WIDTH, d=64, placement=placement, variant="plus")
        return unbounded(model) if gate == "plusraw" else model
    return cubs_resnet18(CLASSES, width=WIDTH, d=64, placement=placement,
                         gate_logit=None if gate == "none" else float(gate))


def train(name: str, splits, out: Path, seed: int, warmup: float) -> None:
    torch.manual_seed(seed)
    rt = runtime.Runtime(torch.device("cpu"))
    loader = ImageLoader(splits.train.files, splits.train.labels, LoaderSettings(batch_size=BATCH, train=True,
                         image_size=SIZE, backend="torch", workers=0, seed=5 + seed))
    holdout = ImageLoader(splits.holdout.files, splits.holdout.labels,
                          LoaderSettings(batch_size=64, train=False,
                                         image_size=SIZE, backend="torch", workers=0))
    cfg = engine.FitConfig(epochs=EPOCHS, lr=LR, warmup_epochs=warmup, patience=100, fresh=True)
    with torch.random.fork_rng():  # the diagnostics batch must not move the training RNG
        batch = list(holdout.epoch())[0]  # a whole pass: never leave an epoch half-read
    model = build(name)
    trace: list[dict] = []  # plus only: every scale before each step, and the step's loss
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    is_plus = bool(gamma_values(model))

    def loss_fn(logits, labels):
        loss = ce(logits, labels)
        if is_plus:
            trace.append({"loss": loss.item(), "gamma": gamma_values(model)})
        return loss

    def evaluate(m):
        metrics = {f"holdout_{k}": v for k, v in evaluate_classifier(m, holdout, rt).items()}
        return {**metrics, "diagnostics": diagnostics(m, *batch)}

    start = time.time()
    net = engine.for_training(model, rt)  # the scripts' recipe: SGD Nesterov, warmup + cosine
    optimizer, scheduler = engine.optimizer_and_schedule(model, cfg, len(loader))
    result = engine.fit(net, loader, loss_fn, optimizer, scheduler, engine.grad_scaler(rt), evaluate,
                        cfg, out, rt, {"task": "ablation", "model": name})
    if trace:
        (out / "gamma_steps.json").write_text(json.dumps(trace))
    history = result["history"]
    print(f"{out.name}: holdout {[round(h['holdout_acc'], 3) for h in history]} "
          f"train {[round(h['train_acc'], 3) for h in history]} ({time.time() - start:.0f} s)", flush=True)


def finished_runs(out: Path, pattern: str):
    """(run folder, its network with the last weights, last.pt) of every finished run in
    `out` whose name matches `pattern`, in name order."""
    for run in sorted(p for p in out.glob(pattern) if (p / "last.pt").exists()):
        ck = load_checkpoint(run / "last.pt")
        if ck["finished"]:
            model = build(run.name.split("_s")[0])
            model.load_state_dict(ck["model"])
            yield run, model, ck


def test_accuracy(splits, out: Path) -> None:
    rt = runtime.Runtime(torch.device("cpu"))
    test = ImageLoader(splits.test.files, splits.test.labels, LoaderSettings(batch_size=100, train=False,
                       image_size=SIZE, backend="torch", workers=0))
    for run, model, ck in finished_runs(out, "*_s*_w*"):
        last = ck["history"][-1]
        print(f"{run.name:28s} train {last['train_acc']:.3f} holdout {last['holdout_acc']:.3f} "
              f"test {evaluate_classifier(model, test, rt)['acc']:.3f}")


@torch.no_grad()
def plus_statistics(splits, out: Path) -> None:
    """For every finished plus run: its largest |scale| (tanh(gamma), or gamma for plusraw), the
    range of its gates and the largest |attention logit| (q . k / sqrt(8)) on the holdout
    images, in eval mode."""
    holdout = ImageLoader(splits.holdout.files, splits.holdout.labels,
                          LoaderSettings(batch_size=100, train=False,
                                         image_size=SIZE, backend="torch", workers=0))
    images = torch.cat([batch[0] for batch in holdout.epoch()])
    for run, model, ck in finished_runs(out, "*plus*_s*_w*"):
        model.eval()
        logits: list[float] = []
        gates: list[torch.Tensor] = []

        def recording(q, k, v, scale=None, pad_head_dim=None):
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
            logits.append((q @ k.transpose(-2, -1)).abs().max().item() * scale)
            return attention(q, k, v, scale, pad_head_dim)

        attention, cubs.fused_attention = cubs.fused_attention, recording
        hooks = [m.register_forward_hook(lambda mod, args, y: gates.append(mod.gate(args[0])))
                 for m in model.modules() if isinstance(m, (CUBSBlock1Plus, CUBSBlock2Plus))]
        try:
            model(images)
        finally:
            cubs.fused_attention = attention
            for h in hooks:
                h.remove()
        scale = max(abs(g) for g in gamma_values(model).values())
        print(f"{run.name:32s} max |scale| {scale:.3f}  gates {min(g.min().item() for g in gates):.3f}"
              f"..{max(g.max().item() for g in gates):.3f}  max |logit| {max(logits):.2f}")


def plot_mean_curves(curves: dict[str, list[list[float]]], path: str | Path, ylabel: str,
                     title: str, reference: str | None = None) -> None:
    """One line per name: the mean over its runs (e.g. seeds) per epoch, shaded from the
    lowest to the highest run. curves[name] is a list of runs, each a list of per-epoch
    values; the `reference` name is drawn thick and black."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in curves.items():
        values = np.array(runs, dtype=float)
        epochs = np.arange(1, values.shape[1] + 1)
        style = {"color": "black", "linewidth": 2.5} if name == reference else {}
        line, = ax.plot(epochs, values.mean(0), marker=".", label=f"{name} ({len(runs)} runs)", **style)
        if len(runs) > 1:
            ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    ax.set(xlabel="epoch", ylabel=ylabel, title="\n".join(textwrap.wrap(title, 70)))
    finish_epoch_axes(fig, [ax], path, dpi=120)


def plot(out: Path, path: Path) -> None:
    """Holdout accuracy per epoch, mean and range over the seeds of each name that ran more
    than one seed (warmup 1)."""
    curves: dict[str, list[list[float]]] = {}
    for run in sorted(out.glob("*_s*_w1")):
        if (run / "metrics.jsonl").exists():
            history = [json.loads(line) for line in (run / "metrics.jsonl").open()]
            curves.setdefault(run.name.split("_s")[0], []).append([h["holdout_acc"] for h in history])
    single = sorted(k for k, v in curves.items() if len(v) == 1)
    curves = {k: v for k, v in curves.items() if len(v) > 1}
    if not curves:  # it wrote axes and a title with no line in them
        sys.exit(f"error: --plot draws each name's mean over 2 or more seeds (runs NAME_sSEED_w1 in "
                 f"{out}), and none has them{': ' + ', '.join(single) + ' ran one seed' if single else ''}; "
                 f"train another with --seed")
    if single:
        print(f"not plotted, one seed each: {', '.join(single)}")
    plot_mean_curves(curves, path, "holdout accuracy",
                     "CUBS-ResNet-18 vs vanilla ResNet-18 (t2), generated data; gate init "
                     "none = PyTorch default (before), 3 = open gates (now)", reference="t2")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="runs to train, e.g. t2 serial-none serial-3")
    parser.add_argument("--seed", type=int, default=0, help="init and batch-order seed (default 0)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warmup epochs (default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/at_par_ablation"), help="runs and data folder")
    parser.add_argument("--test-accuracy", action="store_true", help="report every finished run")
    parser.add_argument("--plus-stats", action="store_true",
                        help="largest |scale|, gate range and largest |attention logit| of every "
                             "finished plus run")
    parser.add_argument("--test-per-class", type=int, default=10,
                        help="test images per class (default 10); another value uses the data "
                             "folder data_test<N>: the same train images, a larger test split")
    parser.add_argument("--plot", type=Path, help="write the per-epoch holdout curves here: for each name "
                                                  "trained with 2 or more seeds (warmup 1), their mean and range")
    args = parser.parse_args()
    for name in args.names:  # all of them before the first run trains
        placement, _, gate = name.partition("-")
        if name != "t2" and (placement not in PLACEMENTS or not _is_gate(gate)):
            parser.error(f"run name {name!r}: expected t2 or PLACEMENT-GATE with PLACEMENT one of "
                         f"{', '.join(PLACEMENTS)} and GATE none, plus, plusraw or a number (serial-3)")
    torch.set_num_threads(1)  # two runs side by side on 2 cores, as measured
    data = args.out / ("data" if args.test_per_class == 10 else f"data_test{args.test_per_class}")
    splits = load_tiny_imagenet(make_data(data, args.test_per_class), holdout_per_class=8, seed=0)
    for name in args.names:
        train(name, splits, args.out / f"{name}_s{args.seed}_w{args.warmup:g}", args.seed, args.warmup)
    if args.test_accuracy:
        test_accuracy(splits, args.out)
    if args.plus_stats:
        plus_statistics(splits, args.out)
    if args.plot:
        plot(args.out, args.plot)


if __name__ == "__main__":
    main()
