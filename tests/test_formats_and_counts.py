"""Known answers for the report's counting and printing helpers: common/architecture.py and
common/flops.py (layer counts and FLOPs written out by hand), common/formats.py (each
documented precision and unit) and common/recipes.py (every row from its own flag). No
training and no report build: each test is well under a second."""
from __future__ import annotations

import json

import pytest
from torch import nn

from common import architecture, formats, recipes, runs_folder
from common.cubs import CUBSBlock1Plus, CUBSBlock2Plus
from common.flops import forward_flops
from common.models import ResNet18, count_parameters


# ---------------------------------------------------------------- FLOPs and layer counts
def test_forward_flops_of_a_strided_conv_and_a_linear_layer_are_the_hand_formula():
    # Conv 3 -> 8, 5 x 5, stride 2, padding 2 on 32 x 32: 16 x 16 outputs, each 3*25 multiply-adds
    # per output channel, 2 FLOPs a multiply-add, bias not counted.
    assert forward_flops(nn.Conv2d(3, 8, 5, stride=2, padding=2), 32) == 2 * 16 * 16 * 3 * 25 * 8
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    assert forward_flops(net, 8) == 2 * 8 * 8 * 3 * 9 * 4 + 2 * 256 * 10


def test_cpu_fused_attention_counts_queries_times_keys_not_queries_squared():
    # Plus Block 2 at 16 x 16: 256 queries attend over keys / values pooled to 8 x 8 = 64 cells.
    # Attention: 4 heads of 8 dims, q k^T and the product with v, 2 * (2 * 256 * 64 * 8) * 4.
    # Convs: q 3 -> 32 on 256 positions, k and v 3 -> 64 on 64 cells, out 32 -> 1 on 256.
    attention = 2 * (2 * 256 * 64 * 8) * 4
    convs = 2 * 256 * 3 * 32 + 2 * 64 * 3 * 64 + 2 * 256 * 32
    assert forward_flops(CUBSBlock2Plus(3), 16) == attention + convs == 2187264


def test_summarise_counts_flops_not_multiply_adds_and_every_layer_kind():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    a = architecture.summarise(net, "tiny", 16)
    # 8 x 8 outputs of a 3 x 3 x 3 kernel, 4 channels; then a 4 -> 10 linear layer.
    assert a.flops == 2 * 8 * 8 * 27 * 4 + 2 * 4 * 10 == 13904
    assert (a.label, a.input_size, a.conv, a.linear, a.batchnorm, a.attention, a.se_gates) == (
        "tiny", 16, 1, 1, 1, 0, 0)
    assert a.params == (27 * 4 + 4) + (4 + 4) + (4 * 10 + 10)
    # ResNet-18 (CIFAR stem): 20 convs (17 3x3 + 3 1x1 shortcuts), each followed by a BatchNorm.
    r = architecture.summarise(ResNet18(5, width=8), "r", 16)
    assert (r.conv, r.linear, r.batchnorm, r.attention, r.se_gates) == (20, 1, 20, 0, 0)


def test_each_plus_block_is_one_cubs_attention_block():
    assert architecture.summarise(CUBSBlock2Plus(3), "b2", 8).attention == 1
    assert architecture.summarise(CUBSBlock1Plus(3, d=64), "b1", 4).attention == 1


def _t2(root, name: str, **results) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps({
        "task": "t2", "model": "resnet18", "num_classes": 5, "width": 8, "test_acc": 0.5,
        "holdout_acc": 0.5, "finished": True, **results}))


def test_architectures_read_the_input_size_results_json_states_over_the_typed_flag(tmp_path):
    _t2(tmp_path, "t2", image_size=16, args={"image_size": 32, "width": 8})
    ((_, _, a),) = architecture.architectures(runs_folder.collect(tmp_path))
    assert a.input_size == 16


def test_a_model_that_cannot_be_rebuilt_is_a_named_problem_not_a_crash(tmp_path):
    _t2(tmp_path, "t2", image_size=16, model="vgg", args={"image_size": 16})
    runs = runs_folder.collect(tmp_path)
    assert [(r.name, p, a) for r, p, a in architecture.architectures(runs)] == [("t2", "", None)]
    assert runs.problems == ["could not rebuild the model of t2: ValueError(\"no network is called 'vgg'\")"]


# ---------------------------------------------------------------- formats
def test_each_number_prints_at_its_documented_precision_and_unit():
    assert [formats.fmt_acc(v) for v in (0.88, 1, None)] == ["0.8800", "1.0000", "n/a"]
    assert [formats.fmt_points(v) for v in (1.254, -0.5, 0, -0.001, None)] == ["+1.25", "-0.50", "+0.00", "+0.00", "n/a"]
    # lr x wd in two significant figures: 3e-4 x 0.05 was printed as 1e-05
    assert recipes.decoupled_decay({"embed_optimizer": "adamw", "embed_lr": 3e-4, "embed_weight_decay": 0.05}) == (
        " (AdamW, decoupled: each step shrinks a weight by lr x wd = 1.5e-05)")
    assert [formats.fmt_1(v) for v in (260.16, 3, None)] == ["260.2", "3.0", "n/a"]
    assert [formats.fmt_count(v) for v in (11173962, 5, None)] == ["11,173,962", "5", "n/a"]
    assert formats.fmt_gflops(4.443e9) == "4.4430" and formats.fmt_gflops(13904) == "0.0000"
    assert formats.fmt_gflops(123456789) == "0.1235"  # giga, 4 decimals
    assert [formats.fmt_setting(v) for v in (0.0005, 1.0, 0.0, 1e-8, True, False, 16, "ms", None)] == [
        "0.0005", "1", "0", "1e-08", "yes", "no", "16", "ms", "n/a"]
    assert formats.fmt_epochs({"best_epoch": 5, "epochs_run": 8}) == "5/8"
    assert formats.fmt_epochs({"epochs_run": 8}) == "n/a/8"


def test_table_cells_cannot_break_the_table():
    assert formats.table(["a", "b|c"], [["x|y", "two\nlines"], [1, 0.5]]) == [
        "| a | b\\|c |", "|---|---|", "| x\\|y | two lines |", "| 1 | 0.5 |", ""]


# ---------------------------------------------------------------- recipes
def test_every_classifier_recipe_row_comes_from_its_own_flag():
    args = {"image_size": 64, "width": 32, "d": 128, "color_jitter": 0.4, "optimizer": "sgd", "lr": 0.1,
            "warmup_epochs": 2, "weight_decay": 0.0005, "label_smoothing": 0.1, "batch_size": 128,
            "epochs": 30, "patience": 5, "min_delta": 0.001, "holdout_per_class": 10, "images_per_class": 4,
            "grad_clip": 2.0, "seed": 7, "workers": 4, "smoke": False}
    assert recipes.classifier_recipe(args, "0.25-1") == {
        "augmentation": "random-resized-crop to 64 px (area 0.25-1 of the image), random horizontal flip, "
                        "colour jitter ±0.4 (brightness, contrast, saturation)",
        "optimiser": "SGD, Nesterov momentum", "peak LR": "0.1",
        "schedule": "linear warmup 2 epochs, then cosine decay",
        "weight decay": "0.0005 (not on biases, norms, gamma)", "label smoothing": "0.1",
        "batch size": "128 per process", "epochs (max)": "30",
        "early stopping": "patience 5 epochs (min delta 0.001)", "holdout": "10 train images per class",
        "gradient clipping": "2", "width": "32", "dropout": "-", "seed": "7", "smoke run": "no"}
    no_jitter = recipes.classifier_recipe({"color_jitter": 0.0, "smoke": True}, "0.25-1")
    assert no_jitter["augmentation"].endswith("random horizontal flip, no colour jitter")
    assert no_jitter["smoke run"] == "yes"
    assert recipes.random_area() == "0.25-1"


def test_every_embedding_recipe_row_comes_from_its_own_flag():
    r = {"init": "t3", "init_source": "runs/t3/serial_plain/best.pt",
         "args": {"alpha": 2.0, "beta": 50.0, "lam": 0.5, "epsilon": 0.1, "mining": "ms",
                  "classes_per_batch": 8, "images_per_class": 4, "embedding_dim": 128, "width": 64,
                  "embed_optimizer": "sgd", "optimizer": "adamw", "embed_lr": 0.01, "lr": 0.1,
                  "embed_weight_decay": 0.0005, "embed_epochs": 12, "epochs": 30, "patience": 3}}
    assert recipes.embedding_recipe(r) == {
        "init": "t3 (runs/t3/serial_plain/best.pt)",
        "loss": "Multi-Similarity: alpha 2, beta 50, lambda 0.5, epsilon 0.1", "mining": "ms",
        "batches (P x K)": "8 classes x 4 images", "embedding": "128-d linear, L2-normalised",
        "optimiser": "SGD, Nesterov momentum", "LR": "0.01", "weight decay": "0.0005",
        "epochs (max)": "12", "early stopping": "patience 3 epochs on holdout Recall@1"}
    assert recipes.embedding_recipe({"init": "scratch", "args": {}})["init"] == "scratch"
