"""common/engine.py: the schedule, early stopping, and fit on a tiny dataset: resume, fp16
loss scaling, a kill after any write, non-finite losses, the per-epoch metrics."""
import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from common import engine, evaluate, runtime
from common.checkpoint import RUN_FILES, CheckpointError, load_checkpoint, save_checkpoint
from common.errors import ConfigError, Interrupted
from common.datasets import load_tiny_imagenet
from common.loader import HAVE_DALI, ImageLoader, LoaderSettings
from common.synthetic import make_tiny_imagenet
from common import plots
from tests.conftest import fit

needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali not importable")


def test_warmup_cosine_values_at_known_steps():
    f = engine.warmup_cosine
    assert f(0, 100, 10) == pytest.approx(0.1)
    assert f(4, 100, 10) == pytest.approx(0.5)
    assert f(9, 100, 10) == pytest.approx(1.0)
    assert f(10, 100, 10) == pytest.approx(1.0)          # cosine starts at the peak
    assert f(55, 100, 10) == pytest.approx(0.5)          # halfway through the decay
    assert f(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert f(77, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 67 / 90)))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_and_schedule_give_the_recipes_optimiser_and_lr_at_every_step(optimizer):
    # 3 epochs of 10 steps, warmup 0.25 epochs -> round(2.5) = 2 steps (banker's rounding).
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    cfg = engine.FitConfig(epochs=3, lr=0.2, weight_decay=1e-3, optimizer=optimizer, warmup_epochs=0.25)
    opt, sched = engine.optimizer_and_schedule(model, cfg, steps_per_epoch=10)
    if optimizer == "sgd":
        assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]
    else:
        assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]  # Linear weight | biases, BN
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.2 * engine.warmup_cosine(s, 30, 2) for s in range(30)]
    assert lrs == pytest.approx(expected) and lrs[:3] == pytest.approx([0.1, 0.2, 0.2])
    # 0.27 epochs of 10 steps round to 3 warmup steps, not down to 2
    opt, _ = engine.optimizer_and_schedule(model, engine.FitConfig(lr=0.3, warmup_epochs=0.27), 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    # --warmup-epochs 0 (allowed) is one warmup step, at the full LR; the cosine starts at step 1
    opt, sched = engine.optimizer_and_schedule(model, engine.FitConfig(epochs=1, lr=0.1, warmup_epochs=0), 10)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.1 * (1 + math.cos(math.pi / 9)) / 2])
    with pytest.raises(ValueError, match="'sgd' or 'adamw', got 'adam'"):
        engine.optimizer_and_schedule(model, engine.FitConfig(optimizer="adam"), 10)


def test_weight_decay_goes_to_every_weight_matrix_and_kernel_and_nothing_else():
    from common.cubs import cubs_resnet18
    model = cubs_resnet18(10, variant="plus", width=8, d=64)
    decay, no_decay = engine.param_groups(model, 5e-4)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters()
                                                      if n.endswith("weight") and p.ndim > 1}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert undecayed == {n for n, _ in model.named_parameters()} - {names[id(p)] for p in decay["params"]}
    assert {n.rsplit(".", 1)[-1] for n in undecayed} == {"bias", "weight", "gamma"}  # BN weights: 1-d
    assert all(model.get_parameter(n).ndim <= 1 for n in undecayed)


def test_early_stopping_inside_fit_stops_reports_and_keeps_the_best_epoch(tiny_splits, tmp_path, capsys):
    torch.manual_seed(0)
    rt = runtime.Runtime(torch.device("cpu"), amp_dtype=None)
    train = ImageLoader(tiny_splits.train.files, tiny_splits.train.labels, LoaderSettings(
        batch_size=8, train=True, image_size=16, backend="torch", workers=0, seed=5))
    scores = iter([0.5, 0.7, 0.6, 0.7, 0.9])  # best at epoch 2; epochs 3 and 4 do not beat it
    config = engine.FitConfig(epochs=5, lr=0.05, warmup_epochs=1, patience=2)
    calls = []  # on_epoch after each epoch, and once more when the run finishes (curves.png)
    result = fit(_SmallNet(), train, lambda m: {"holdout_acc": next(scores)}, config, tmp_path, rt,
                 {"task": "test", "model": "small"},
                 on_epoch=lambda history, finished: calls.append((len(history), finished)))
    assert (result["epochs_run"], result["best_epoch"], result["best_score"]) == (4, 2, 0.7)
    assert result["stopped_early"] and result["finished"]
    assert "early stopping: holdout_acc has not improved for 2 epochs (best 0.7000 at epoch 2)" in capsys.readouterr().out
    assert calls == [(1, False), (2, False), (3, False), (4, False), (4, True)]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "last.pt")["finished"]


def test_patience_running_out_at_the_last_epoch_is_not_an_early_stop(tiny_splits, tmp_path, capsys):
    rt = runtime.Runtime(torch.device("cpu"), amp_dtype=None)
    train = ImageLoader(tiny_splits.train.files, tiny_splits.train.labels, LoaderSettings(
        batch_size=8, train=True, image_size=16, backend="torch", workers=0, seed=5))
    scores = iter([0.9, 0.5, 0.5])  # the patience of 2 runs out at epoch 3 of 3
    result = fit(_SmallNet(), train, lambda m: {"holdout_acc": next(scores)},
                 engine.FitConfig(epochs=3, lr=0.05, warmup_epochs=1, patience=2), tmp_path, rt,
                 {"task": "test", "model": "small"})
    assert (result["epochs_run"], result["best_epoch"], result["finished"]) == (3, 1, True)
    assert not result["stopped_early"]
    assert "early stopping" not in capsys.readouterr().out  # it printed one, for a run that ran every epoch


def test_train_loss_is_the_mean_over_images_of_the_batch_losses(tiny_splits, tmp_path):
    # Each batch's loss is a mean over its images; the epoch's is over all images, so a
    # constant batch loss of 2 gives 2, not 2 / batch size.
    rt = runtime.Runtime(torch.device("cpu"), amp_dtype=None)
    train = ImageLoader(tiny_splits.train.files, tiny_splits.train.labels, LoaderSettings(
        batch_size=8, train=True, image_size=16, backend="torch", workers=0, seed=5))
    result = fit(_SmallNet(), train, lambda m: {"holdout_acc": 0.5},
                 engine.FitConfig(epochs=1, lr=0.05, warmup_epochs=1), tmp_path, rt,
                 {"task": "test", "model": "small"}, loss_fn=lambda logits, y: 0 * logits.sum() + 2.0)
    record = result["history"][0]
    assert record["train_images"] == len(train) * 8 == 40
    assert record["train_loss"] == 2.0


def test_grad_clip_clips_the_unscaled_gradients_of_a_loss_scaled_step(tiny_splits):
    # --grad-clip with fp16's GradScaler: the optimiser steps with gradients of norm
    # grad_clip, clipped after unscaling (clipping the scaled ones would leave grad_clip /
    # scale). The raw gradients here are far larger than grad_clip.
    torch.manual_seed(0)
    rt = runtime.Runtime(torch.device("cpu"), amp_dtype=None)
    train = ImageLoader(tiny_splits.train.files, tiny_splits.train.labels, LoaderSettings(
        batch_size=8, train=True, image_size=16, backend="torch", workers=0, seed=5))
    model = _SmallNet()
    net = engine.for_training(model, rt)
    opt, sched = engine.optimizer_and_schedule(model, engine.FitConfig(epochs=1, warmup_epochs=1), len(train))
    norms = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
    opt.register_step_pre_hook(record_norm)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    engine.train_one_epoch(net, train, nn.CrossEntropyLoss(), opt, sched, scaler, rt=rt, epoch=0,
                           grad_clip=1e-3)
    assert len(norms) == len(train) == 5
    assert norms == pytest.approx([1e-3] * 5, rel=1e-4)


def test_early_stopping_fires_after_patience_epochs_without_improvement():
    """min_delta decides which improvements reset the patience; the best epoch (best.pt,
    the test pass) is still the highest score."""
    stopper = engine.EarlyStopping(patience=3, min_delta=0.01)
    scores = [0.10, 0.20, 0.205, 0.21, 0.15, 0.22]  # 0.205 and 0.21 are within min_delta of 0.20
    fired, new_best = None, []
    for epoch, s in enumerate(scores):
        new_best.append(stopper.update(s, epoch))
        if stopper.should_stop:
            fired = epoch
            break
    assert fired == 4 and stopper.best_epoch == 3 and stopper.best_score == 0.21
    assert new_best == [True, True, True, True, False]
    restored = engine.EarlyStopping(3, 0.01)
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == stopper.state_dict()
    # A state saved before the reference was stored resumes counting from the best score.
    old = {k: v for k, v in stopper.state_dict().items() if k != "reference"}
    restored = engine.EarlyStopping(3, 0.01)
    restored.load_state_dict(old)
    assert restored.reference == 0.21
    assert restored.update(0.215, 5) is True and restored.bad_epochs == 4  # best, not by min_delta


def test_early_stopping_without_min_delta_counts_every_epoch_that_is_not_a_new_best():
    stopper = engine.EarlyStopping(patience=2)
    assert [stopper.update(s, e) for e, s in enumerate([0.3, 0.3, 0.31, 0.2])] == [True, False, True, False]
    assert (stopper.best_epoch, stopper.bad_epochs, stopper.should_stop) == (2, 1, False)
    assert stopper.update(0.31, 4) is False and stopper.should_stop  # a tie is no improvement


@pytest.mark.parametrize("capability, dtype", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                               ((7, 5), torch.float16)])
def test_cuda_runtime_names_its_gpu_and_picks_the_autocast_dtype(monkeypatch, capability, dtype):
    # Runs on CPU with the CUDA queries faked: catches mistakes in the CUDA branch itself,
    # e.g. set_device("cuda") without an index, which raises before touching any GPU.
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "fake GPU")
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: None)
    # The backend flags are process-wide: set here, they would change every later test's SDPA.
    monkeypatch.setattr(runtime, "cuda_backend_settings", lambda: calls.append("backend settings"))
    for flags in ("auto", "cuda"):
        rt = runtime.setup_runtime(flags, seed=0)
        assert rt.device == torch.device("cuda", 0) and rt.amp_dtype == dtype
    assert calls == [torch.device("cuda", 0), "backend settings"] * 2
    # torchrun: LOCAL_RANK picks the GPU, set before NCCL's process group is created; on a
    # second node of two GPUs each, rank 3 is that node's GPU 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append(backend))
    rt = runtime.setup_runtime("cuda", seed=0)
    assert (rt.device, rt.rank, rt.world_size) == (torch.device("cuda", 1), 3, 4)
    assert calls[4:] == [torch.device("cuda", 1), "backend settings", "nccl"]


def test_each_torchrun_process_is_seeded_by_its_rank_and_results_name_the_world_size(monkeypatch):
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: None)
    one = runtime.setup_runtime("cpu", seed=5)
    assert torch.initial_seed() == 5 and runtime.describe_device(one) == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank1 = runtime.setup_runtime("cpu", seed=5)
    # its own dropout and augmentation draws, not rank 0's
    assert (rank1.rank, torch.initial_seed()) == (1, 6) and runtime.describe_device(rank1) == "cpu x2"


def test_a_cuda_device_without_a_gpu_is_a_config_error_and_auto_takes_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"^--device {device} but torch sees no GPU; use --device cpu$"):
            runtime.setup_runtime(device, seed=0)
    assert runtime.setup_runtime("auto", seed=0).device == torch.device("cpu")


def test_cuda_backend_settings_are_the_ones_measured_and_the_bench_uses_them():
    def flags():
        return (torch.backends.cudnn.benchmark, torch.backends.cuda.math_sdp_enabled(),
                torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32)
    before = flags()
    try:
        runtime.cuda_backend_settings()
        # no autotuning, no math or cuDNN attention, no TF32 matmuls (the loss's and Recall@K's
        # fp32 similarities), TF32 convolutions
        assert flags() == (False, False, False, False, True)
    finally:  # process-wide flags: restored for every later test
        benchmark, math_sdp, cudnn_sdp, matmul_tf32, cudnn_tf32 = before
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.enable_math_sdp(math_sdp)
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    import bench.bench_train as bench_train
    assert bench_train.cuda_backend_settings is runtime.cuda_backend_settings


# ---------------------------------------------------------------- fit on a tiny dataset
@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory):
    root = make_tiny_imagenet(tmp_path_factory.mktemp("tiny"), num_classes=4,
                              train_per_class=12, val_per_class=4, image_size=16, seed=3)
    return load_tiny_imagenet(root, holdout_per_class=2)


class _SmallNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3))
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.body(x))

    def features(self, x):  # as the task models: the pooled features before the classifier
        return self.body(x)


def _run_fit(splits, out, backend, epochs=4, stop_after=None, step_log=None, amp_dtype=None, meta=None, **cfg):
    torch.manual_seed(0)
    rt = runtime.Runtime(torch.device("cpu"), amp_dtype=amp_dtype)
    train = ImageLoader(splits.train.files, splits.train.labels, LoaderSettings(batch_size=8, train=True,
                        image_size=16, backend=backend, workers=0, seed=5))
    holdout = ImageLoader(splits.holdout.files, splits.holdout.labels, LoaderSettings(batch_size=8,
                          train=False, image_size=16, backend=backend, workers=0))
    model = _SmallNet()
    ce, factor = torch.nn.CrossEntropyLoss(label_smoothing=0.1), cfg.pop("loss_factor", 1.0)

    loss_hook = cfg.pop("loss_hook", None)  # (loss, logits) -> loss

    def loss_fn(logits, y):
        if step_log is not None:
            step_log.append(y.tolist())
        loss = ce(logits, y) * factor
        return loss_hook(loss, logits) if loss_hook else loss
    config = engine.FitConfig(epochs=epochs, lr=cfg.pop("lr_override", 0.05), warmup_epochs=1,
                              patience=100, stop_after_epoch=stop_after, **cfg)
    result = fit(model, train, evaluate.holdout_scorer(holdout, rt), config, out, rt,
                 meta or {"task": "test", "model": "small"}, loss_fn=loss_fn,
                 on_epoch=plots.curves_png(out, {"task": "test"}))
    return model, result


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_resume_gives_identical_weights_with_either_loader(tiny_splits, tmp_path, backend):
    # DALI too: its crops, jitter and flips come from (seed, epoch, position), not from a
    # random state inside the pipeline, which the resumed run builds anew.
    straight, r1 = _run_fit(tiny_splits, tmp_path / "a", backend)
    _, half = _run_fit(tiny_splits, tmp_path / "b", backend, stop_after=2)
    assert half["epochs_run"] == 2 and not half["finished"]
    assert (tmp_path / "b" / "curves.png").stat().st_size > 0  # drawn when fit stops, < every_s
    resumed, r2 = _run_fit(tiny_splits, tmp_path / "b", backend)
    assert r2["finished"] and r2["epochs_run"] == 4
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["lr"] for h in r1["history"]] == [h["lr"] for h in r2["history"]]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and (tmp_path / "b" / "curves.png").stat().st_size > 0


def test_non_finite_gradients_on_an_epochs_last_step_are_not_saved(tiny_splits, tmp_path):
    """A finite loss with non-finite gradients (no GradScaler to skip the step in bf16 or
    fp32) on an epoch's last step: no later loss of that epoch shows it, so the weights are
    checked before last.pt and best.pt are written, which keep the last good epoch."""
    calls = []

    def nan_gradients_at_step_10(loss, logits):  # 5 steps an epoch: epoch 2's last
        calls.append(1)
        if len(calls) == 10:  # d sqrt(x) / dx at 0 is inf; inf x 0 = nan, while the value adds 0
            return loss + 0 * torch.sqrt(logits.sum() * 0)
        return loss
    with pytest.raises(engine.NonFiniteLoss, match=r"the weights or BatchNorm statistics became non-finite "
                       r"in epoch 2 by batch 5; stopped without saving, so last.pt"):
        _run_fit(tiny_splits, tmp_path, "torch", loss_hook=nan_gradients_at_step_10)
    for name in ("last.pt", "best.pt"):
        ck = load_checkpoint(tmp_path / name)
        assert ck["epoch"] == 1 and all(torch.isfinite(t).all() for t in ck["model"].values()), name


def test_non_finite_batchnorm_statistics_are_not_saved(tiny_splits, tmp_path, monkeypatch):
    """The loss and the weights can stay finite while a BatchNorm running variance overflows
    (it is updated in the forward pass, outside the gradients): best.pt would then score
    with it. It is checked with the weights, at epoch 2's last step here."""
    real_forward, calls = nn.BatchNorm2d.forward, []

    def overflowing_at_step_10(self, x):
        out = real_forward(self, x)
        if self.training:
            calls.append(1)
            if len(calls) == 10:
                self.running_var.data.fill_(float("inf"))  # .data: not seen by autograd
        return out
    monkeypatch.setattr(nn.BatchNorm2d, "forward", overflowing_at_step_10)
    with pytest.raises(engine.NonFiniteLoss, match=r"the weights or BatchNorm statistics became non-finite "
                       r"in epoch 2 by batch 5"):
        _run_fit(tiny_splits, tmp_path, "torch")
    for name in ("last.pt", "best.pt"):
        ck = load_checkpoint(tmp_path / name)
        assert ck["epoch"] == 1 and all(torch.isfinite(t).all() for t in ck["model"].values()), name


def test_non_finite_gradients_just_before_a_signal_are_not_saved_either(tiny_splits, tmp_path):
    calls = []

    def nan_gradients_and_sigint_at_step_8(loss, logits):  # epoch 2, batch 3
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGINT)  # saved at this step's end, were the weights finite
            return loss + 0 * torch.sqrt(logits.sum() * 0)
        return loss
    with pytest.raises(engine.NonFiniteLoss, match=r"the weights or BatchNorm statistics became non-finite in epoch 2 by batch 3"):
        _run_fit(tiny_splits, tmp_path, "torch", loss_hook=nan_gradients_and_sigint_at_step_8)
    ck = load_checkpoint(tmp_path / "last.pt")
    assert (ck["epoch"], ck["step"]) == (1, 0) and all(torch.isfinite(t).all() for t in ck["model"].values())


def test_fp16_trains_with_a_grad_scaler_whose_state_survives_resume(tiny_splits, tmp_path):
    # The GPUs without bf16 (T4, V100) train in fp16 with loss scaling; CPU autocast runs
    # the same code path. 5 batches per epoch: the scaler counts good steps since its last
    # change, so after resume it must continue from 10, not restart from 0.
    _, half = _run_fit(tiny_splits, tmp_path, "torch", stop_after=2, amp_dtype=torch.float16)
    saved = load_checkpoint(tmp_path / "last.pt")["scaler"]
    assert saved["scale"] == 2.0**16 and saved["_growth_tracker"] == 10
    resumed, result = _run_fit(tiny_splits, tmp_path, "torch", amp_dtype=torch.float16)
    assert result["finished"] and result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    assert load_checkpoint(tmp_path / "last.pt")["scaler"]["_growth_tracker"] == 20
    assert all(torch.isfinite(p).all() for p in resumed.parameters())
    # bf16 / fp32 runs need no scaler: their checkpoints hold an empty scaler state.
    _run_fit(tiny_splits, tmp_path / "fp32", "torch", epochs=1)
    assert load_checkpoint(tmp_path / "fp32" / "last.pt")["scaler"] == {}


def test_resume_with_dali_restores_state_and_continues_schedule_and_order(tiny_splits, tmp_path):
    log_a, log_b = [], []
    _, r1 = _run_fit(tiny_splits, tmp_path / "a", "dali", step_log=log_a)
    _run_fit(tiny_splits, tmp_path / "b", "dali", stop_after=2, step_log=log_b)
    saved = load_checkpoint(tmp_path / "b" / "last.pt")
    _, r2 = _run_fit(tiny_splits, tmp_path / "b", "dali", step_log=log_b)
    assert log_a == log_b  # the same images in the same batches, epoch after epoch
    assert [h["lr"] for h in r1["history"]] == [h["lr"] for h in r2["history"]]
    assert saved["epoch"] == 2 and saved["scheduler"]["last_epoch"] == 2 * 5
    assert r2["history"][:2] == saved["history"]  # history restored, not recomputed


def test_finished_run_is_not_retrained(tiny_splits, tmp_path):
    _run_fit(tiny_splits, tmp_path, "torch", epochs=1)
    stamp = (tmp_path / "last.pt").stat().st_mtime_ns
    _, again = _run_fit(tiny_splits, tmp_path, "torch", epochs=1)
    assert again["finished"] and again["epochs_run"] == 1
    assert (tmp_path / "last.pt").stat().st_mtime_ns == stamp


def test_resume_with_another_recipe_is_refused_with_the_differences_named(tiny_splits, tmp_path):
    _run_fit(tiny_splits, tmp_path, "torch", epochs=3, stop_after=1)
    with pytest.raises(CheckpointError, match=r"trained with --epochs 3 \(now 4\), --lr 0.05 \(now 0.01\)"):
        _run_fit(tiny_splits, tmp_path, "torch", epochs=4, lr_override=0.01)
    # flags that only steer the process (compile, --fresh, --stop-after-epoch) may change
    _, result = _run_fit(tiny_splits, tmp_path, "torch", epochs=3, stop_after=5)
    assert result["finished"] and result["epochs_run"] == 3


def test_fresh_deletes_the_earlier_run_so_that_a_killed_fresh_run_never_resumes_it(tiny_splits, tmp_path):
    _run_fit(tiny_splits, tmp_path, "torch", epochs=2)  # a finished run ...
    for name in ("results.json", "eval.json"):  # ... with what the script and --evaluate write
        (tmp_path / name).write_text("{}")
    _, nothing = _run_fit(tiny_splits, tmp_path, "torch", epochs=3, fresh=True, stop_after=0)
    assert nothing["epochs_run"] == 0
    assert [name for name in RUN_FILES if (tmp_path / name).exists()] == []
    gone = ("last.pt", "last.prev.pt", "best.pt", "metrics.jsonl", "results.json", "eval.json", "curves.png")
    assert [name for name in gone if (tmp_path / name).exists()] == []  # not only RUN_FILES' own list
    # A fresh run with another recipe, killed after its first epoch: the rerun resumes it.
    # (Before, the old finished last.pt, rotated to last.prev.pt, won the resume and was
    # refused for its other epoch count.)
    (tmp_path / "results.json").write_text("{}")
    _run_fit(tiny_splits, tmp_path, "torch", epochs=2)
    _, killed = _run_fit(tiny_splits, tmp_path, "torch", epochs=3, fresh=True, stop_after=1)
    assert not (tmp_path / "results.json").exists()
    _, rerun = _run_fit(tiny_splits, tmp_path, "torch", epochs=3)
    assert rerun["finished"] and rerun["epochs_run"] == 3
    assert rerun["history"][0] == killed["history"][0]


def test_a_signal_during_the_last_holdout_pass_stops_the_finished_run(tiny_splits, tmp_path):
    # No training step comes after the last epoch's evaluation to see the signal; fit must
    # not return as if nothing happened (the script would go on to its test pass).
    torch.manual_seed(0)
    rt = runtime.Runtime(torch.device("cpu"), amp_dtype=None)
    train = ImageLoader(tiny_splits.train.files, tiny_splits.train.labels, LoaderSettings(
        batch_size=8, train=True, image_size=16, backend="torch", workers=0, seed=5))
    evaluations: list[int] = []

    def evaluate_with_ctrl_c_in_the_last(m):
        evaluations.append(1)
        if len(evaluations) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # recorded by fit's handler, not raised
        return {"holdout_acc": 0.5}
    config = engine.FitConfig(epochs=2, lr=0.05, warmup_epochs=1, patience=100)
    # Python's default_int_handler, or SIG_IGN where pytest was started in the background
    # of a non-interactive shell: fit must give back whichever it found.
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stop:
        fit(_SmallNet(), train, evaluate_with_ctrl_c_in_the_last, config, tmp_path, rt,
            {"task": "test", "model": "small"})
    assert stop.value.signum == signal.SIGINT
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["finished"] and saved["epoch"] == 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_a_run_interrupted_mid_epoch_resumes_to_the_uninterrupted_weights_dropout_included(
        tiny_splits, tmp_path, backend):
    # _SmallNet has dropout, which draws from the global RNG that last.pt saves: nothing
    # else (the torch loader's own seed) may draw from it between the resume and the steps.
    straight, straight_result = _run_fit(tiny_splits, tmp_path / "straight", backend, epochs=2)

    class CtrlCAtStep(list):
        def append(self, labels):
            super().append(labels)
            if len(self) == 8:  # in epoch 2 (5 steps an epoch)
                os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(Interrupted):
        _run_fit(tiny_splits, tmp_path / "cut", backend, epochs=2, step_log=CtrlCAtStep())
    saved = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 3)
    resumed, result = _run_fit(tiny_splits, tmp_path / "cut", backend, epochs=2)
    assert result["finished"]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # the cut epoch's record counts the batches before the cut too
    for key in ("train_loss", "train_acc", "train_images"):
        assert result["history"][1][key] == pytest.approx(straight_result["history"][1][key], rel=1e-12), key


def test_a_cut_in_the_first_epoch_resumes_and_its_record_keeps_the_time_before_the_cut(tiny_splits, tmp_path):
    class CtrlCAtStep3(list):
        def append(self, labels):
            super().append(labels)
            if len(self) == 3:  # epoch 1 of 2, before any epoch has finished (no best epoch)
                os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(Interrupted):
        _run_fit(tiny_splits, tmp_path, "torch", epochs=2, step_log=CtrlCAtStep3())
    saved = load_checkpoint(tmp_path / "last.pt")
    assert (saved["epoch"], saved["step"]) == (0, 3) and saved["train_time_s"] > 0
    assert saved["partial"]["n"] == 24 and saved["partial"]["time"] > 0
    _, result = _run_fit(tiny_splits, tmp_path, "torch", epochs=2)
    first, second = result["history"]
    assert result["finished"] and (first["train_images"], second["train_images"]) == (40, 40)
    assert first["epoch_time_s"] >= saved["partial"]["time"]  # the cut epoch's time, both parts
    assert first["first_step_s"] > 0 and second["first_step_s"] > 0  # the resumed epoch's too
    assert result["train_time_s"] >= saved["train_time_s"] + second["epoch_time_s"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_splits, tmp_path, monkeypatch):
    _run_fit(tiny_splits, tmp_path, "torch", epochs=3, stop_after=1)
    before = load_checkpoint(tmp_path / "last.pt")
    with pytest.raises(engine.NonFiniteLoss, match="loss became nan.*last good epoch.*--fresh"):
        _run_fit(tiny_splits, tmp_path, "torch", epochs=3, loss_factor=float("nan"))
    after = load_checkpoint(tmp_path / "last.pt")
    assert after["epoch"] == before["epoch"] == 1
    for k in before["model"]:
        assert torch.equal(before["model"][k], after["model"][k])


def test_embed_runs_in_eval_mode_in_order_and_leaves_batchnorm_alone(tiny_splits):
    rt = runtime.Runtime(torch.device("cpu"))
    loader = ImageLoader(tiny_splits.test.files, tiny_splits.test.labels, LoaderSettings(batch_size=5,
                         train=False, image_size=16, backend="torch", workers=0))
    model = _SmallNet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emb, labels = evaluate.embed(model, loader, rt)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no running-stat update from the embedding pass
    assert labels.tolist() == list(tiny_splits.test.labels)
    images = torch.cat([x for x, _ in loader.epoch()])
    assert torch.allclose(emb, model(images), atol=1e-6)
    feats, _ = evaluate.embed(model.body, loader, rt)
    assert feats.shape == (len(labels), 8)
    pooled, _ = evaluate.embed(model, loader, rt, features=True)  # T4's Phase A / before figures
    assert pooled.shape == (len(labels), 8) and torch.allclose(pooled, model.features(images), atol=1e-6)


def test_embed_names_an_image_whose_embedding_is_not_finite(tiny_splits):
    rt = runtime.Runtime(torch.device("cpu"))
    loader = ImageLoader(tiny_splits.test.files, tiny_splits.test.labels, LoaderSettings(batch_size=5,
                         train=False, image_size=16, backend="torch", workers=0))
    seen = [0]

    def overflowing(images: torch.Tensor) -> torch.Tensor:  # one feature of the third image overflows
        out = images.flatten(1)[:, :4].clone()
        rows = torch.arange(seen[0], seen[0] + len(images))
        out[rows == 2, 0] = float("inf")
        seen[0] += len(images)
        return out

    with pytest.raises(RuntimeError, match=f"1 of {len(loader.files)} images got an embedding with inf or NaN, "
                                           f"first: {re.escape(loader.files[2])}"):
        evaluate.embed(_Wrap(overflowing), loader, rt)


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _FixedBatches:
    """A loader whose images are the logits themselves (the model is the identity)."""

    def __init__(self, batches):
        self.batches = batches

    def epoch(self):
        yield from self.batches


def test_evaluate_classifier_counts_top1_top5_and_mean_loss_over_uneven_batches():
    # 7 classes; each row's label sits at a known rank of its logits (rank 1 = the largest).
    base = torch.tensor([7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # class c has rank c + 1
    labels = torch.tensor([0, 4, 5, 1, 3])  # ranks 1, 5, 6, 2, 4
    logits = base.repeat(5, 1)
    batches = [(logits[:3], labels[:3]), (logits[3:], labels[3:])]  # 3 + 2 images
    got = evaluate.evaluate_classifier(nn.Identity(), _FixedBatches(batches), runtime.Runtime(torch.device("cpu")))
    log_p = torch.log_softmax(base.double(), 0)
    loss = -sum(log_p[c] for c in labels.tolist()) / 5
    # top-1: rank 1 only; top-5: ranks 1, 5, 2, 4 (not 6): a top-4 would miss the rank-5 one
    assert got == {"loss": pytest.approx(float(loss), rel=1e-6), "acc": 1 / 5, "top5": 4 / 5, "n": 5}


class _LogitsAsImages(nn.Module):
    """Its outputs are its inputs (the loader's "images" are the logits); one parameter, at
    zero and times zero, for the optimizer to step."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + 0 * self.unused


class _FixedEpoch(_FixedBatches):
    build_times: list = []

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch, start=0):
        yield from self.batches[start:]


def test_train_one_epoch_counts_train_accuracy_and_loss_over_uneven_batches():
    # train_acc was only compared between two runs, so a count of the wrong thing (argmin,
    # say) passed. Same logits as above: top-1 right for 1 image of 5.
    base = torch.tensor([7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    labels = torch.tensor([0, 4, 5, 1, 3])
    logits = base.repeat(5, 1)
    logits[3] = base.flip(0)  # label 1 at rank 6 now; no row predicts a class other than 0 or 6
    loader = _FixedEpoch([(logits[:3], labels[:3]), (logits[3:], labels[3:])])
    rt = runtime.Runtime(torch.device("cpu"), amp_dtype=None)
    model = _LogitsAsImages()
    net = engine.for_training(model, rt)
    cfg = engine.FitConfig(epochs=1, lr=0.1, warmup_epochs=0)
    optimizer, scheduler = engine.optimizer_and_schedule(model, cfg, len(loader))
    stats = engine.train_one_epoch(net, loader, nn.CrossEntropyLoss(), optimizer, scheduler,
                                   engine.grad_scaler(rt), rt=rt, epoch=0, epochs=1)
    loss = sum(float(nn.functional.cross_entropy(row[None].double(), c[None])) for row, c in zip(logits, labels)) / 5
    assert stats["train_acc"] == 1 / 5 and stats["train_images"] == 5
    assert stats["train_loss"] == pytest.approx(loss, rel=1e-6)


def test_evaluate_classifier_scores_in_eval_mode():
    """A network left in train() (as the loop leaves it) is scored with BatchNorm's running
    statistics and no dropout: two scores agree, and the statistics are not updated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    batches = [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(2)]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    rt = runtime.Runtime(torch.device("cpu"))
    first = evaluate.evaluate_classifier(model, _FixedBatches(batches), rt)
    assert not model.training
    assert evaluate.evaluate_classifier(model.train(), _FixedBatches(batches), rt) == first
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())


def test_load_best_refuses_a_best_pt_of_another_epoch(tmp_path):
    from common.checkpoint import save_checkpoint
    model = _SmallNet()
    save_checkpoint({"model": model.state_dict(), "epoch": 2, "history": [{"epoch": 1}, {"epoch": 2}]},
                    tmp_path / "best.pt")
    assert evaluate.load_best(model, tmp_path, best_epoch=2) == {"epoch": 2}
    with pytest.raises(CheckpointError, match=r"best.pt holds epoch 2, but the best holdout epoch is 3"):
        evaluate.load_best(model, tmp_path, best_epoch=3)


# ---------------------------------------------------------------- crash consistency
class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


def _train_and_test(splits, out, on_epoch=None):
    """The scripts' path on the tiny set: fit, best.pt, test once, results.json."""
    from common.task_data import Loaders
    torch.manual_seed(0)
    rt = runtime.Runtime(torch.device("cpu"))
    loaders = Loaders(*(ImageLoader(s.files, s.labels,
                                    LoaderSettings(batch_size=8, train=train, image_size=16,
                                                   backend="torch", workers=0, seed=5))
                        for s, train in ((splits.train, True), (splits.holdout, False),
                                         (splits.test, False))))
    cfg = engine.FitConfig(epochs=3, lr=0.05, weight_decay=5e-4, optimizer="sgd", warmup_epochs=1.0,
                           patience=100)
    meta = {"task": "test", "model": "small", "batch_size": 8, "label_smoothing": 0.1,
            "holdout_per_class": 2, "color_jitter": 0.0, "seed": 0}
    model = _SmallNet()
    fitted = fit(model, loaders.train, evaluate.holdout_scorer(loaders.holdout, rt), cfg, out, rt, meta,
                 on_epoch=on_epoch)
    return evaluate.test_best(model, loaders, fitted, meta, out, rt, flags={"epochs": 3})


_TIMING = ("train_time_s", "images_per_s", "epoch_time_s", "data_wait_share")


def _without_timing(results: dict) -> dict:
    clean = {k: v for k, v in results.items() if k not in _TIMING}
    return clean


def test_a_kill_after_any_write_then_a_rerun_gives_the_uninterrupted_results(tiny_splits, tmp_path,
                                                                              monkeypatch):
    # Every file the run writes goes through os.replace: last.pt (and its rotation to
    # last.prev.pt), best.pt, metrics.jsonl, results.json. Kill after each of them in turn.
    reference = _train_and_test(tiny_splits, tmp_path / "straight")
    history = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    writes = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (real_replace(src, dst),
                                                         writes.append(Path(dst).name)))
    _train_and_test(tiny_splits, tmp_path / "count")
    kill_points = list(enumerate(writes))  # every write of every kind, each epoch
    assert {"last.pt", "last.prev.pt", "best.pt", "metrics.jsonl", "results.json"} <= set(writes)

    best_weights = load_checkpoint(tmp_path / "straight" / "best.pt")["model"]
    for index, name in kill_points:
        out = tmp_path / f"kill_{index}"
        done, drawn = [], []  # drawn: on_epoch's calls (curves.png) in both processes
        record = lambda h, final: drawn.append((len(h), final))  # noqa: E731

        def replace_then_maybe_die(src, dst):
            real_replace(src, dst)
            done.append(dst)
            if len(done) == index + 1:
                raise _Killed(f"killed after write {index} ({name})")
        monkeypatch.setattr(os, "replace", replace_then_maybe_die)
        with pytest.raises(_Killed):
            _train_and_test(tiny_splits, out, record)
        monkeypatch.setattr(os, "replace", real_replace)
        if (out / "last.pt").exists():  # the commit point: the best epoch it records is in best.pt
            last = load_checkpoint(out / "last.pt")  # (or the next epoch's, written just before it)
            assert load_checkpoint(out / "best.pt")["epoch"] in (
                last["early_stopping"]["best_epoch"] + 1, last["epoch"] + 1), (index, name)
        resumed = _train_and_test(tiny_splits, out, record)
        # The last drawing shows all 3 epochs, even where the kill hit the last.pt that
        # records the finish (a rerun then trains and draws nothing).
        assert drawn[-1] == (3, True), (index, name, drawn)
        assert _without_timing(resumed) == _without_timing(reference), (index, name)
        on_disk = json.loads((out / "results.json").read_text())
        assert on_disk["best_epoch"] == reference["best_epoch"] == load_checkpoint(out / "best.pt")["epoch"]
        assert on_disk["test_acc"] == reference["test_acc"], (index, name)
        for k, v in load_checkpoint(out / "best.pt")["model"].items():
            assert torch.equal(v, best_weights[k]), (index, name, k)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        assert [h["holdout_acc"] for h in lines] == [h["holdout_acc"] for h in history], (index, name)


@pytest.mark.parametrize("backend", ["cache", pytest.param("dali", marks=pytest.mark.skipif(
    not __import__("common.loader", fromlist=["HAVE_DALI"]).HAVE_DALI, reason="nvidia.dali not importable"))])
def test_metrics_record_the_first_step_and_the_loader_builds_it_waited_for(tiny_splits, tmp_path, backend):
    # Start-up costs in view: epoch 1 waits for the loader's build (the cache
    # fill, or a DALI pipeline) inside its first step; epoch 2 reuses what was built.
    _, result = _run_fit(tiny_splits, tmp_path, backend, epochs=2)
    first, second = result["history"]
    assert len(first["loader_builds_s"]) == 1 and first["loader_builds_s"][0] > 0
    assert first["first_step_s"] >= first["loader_builds_s"][0]
    assert second["loader_builds_s"] == []  # DALI's train pipeline runs on into epoch 2
    assert 0 < second["first_step_s"] < second["epoch_time_s"]
    # The build is waited for inside epoch 1's first step, which is then its slowest.
    assert first["slowest_step_s"] >= first["loader_builds_s"][0]
    assert 0 < second["slowest_step_s"] < second["epoch_time_s"]
    assert "compiled_graphs" not in first  # not compiled: nothing to count
    on_disk = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert on_disk[0]["first_step_s"] == first["first_step_s"]


STALL_S, EVAL_S = 0.25, 0.1


def test_metrics_count_the_graphs_compiled_in_each_epoch_its_slowest_step_and_the_holdout_pass(tiny_splits, tmp_path,
                                                                               monkeypatch):
    # A one-time stall inside an epoch must be visible in metrics.jsonl: here the evaluation
    # after epoch 2 drops Dynamo's compiled code, so epoch 3 compiles again in its first
    # step, as after a failed guard.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compile_(model, backend="aot_eager"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    rt = runtime.Runtime(torch.device("cpu"), amp_dtype=None)
    train = ImageLoader(tiny_splits.train.files, tiny_splits.train.labels, LoaderSettings(
        batch_size=8, train=True, image_size=16, backend="torch", workers=0, seed=5))
    evaluations: list[int] = []
    stall = []  # the first step after the second evaluation also sleeps STALL_S: a known stall

    def evaluate_then_drop_the_compiled_code(m):
        time.sleep(EVAL_S)
        evaluations.append(len(evaluations) + 1)
        if len(evaluations) == 2:
            torch._dynamo.reset()
            stall.append(True)
        return {"holdout_acc": 0.0}

    def loss_with_a_stall(logits, y):
        if stall:
            time.sleep(stall.pop() * STALL_S)
        return torch.nn.functional.cross_entropy(logits, y)
    config = engine.FitConfig(epochs=3, lr=0.05, warmup_epochs=1, patience=100, compile=True)
    result = fit(_SmallNet(), train, evaluate_then_drop_the_compiled_code, config, tmp_path, rt,
                 {"task": "test", "model": "small"}, loss_fn=loss_with_a_stall)
    history = result["history"]
    assert evaluations == [1, 2, 3]
    assert [h["compiled_graphs"] for h in history] == [1, 0, 1]
    # The run's images/s leaves out the first epoch of the process, which holds the compile.
    assert [h["includes_compile"] for h in history] == [True, False, False]
    assert result["images_per_s"] == pytest.approx(
        sum(h["train_images"] for h in history[1:]) / sum(h["epoch_time_s"] for h in history[1:]))
    # Not bounded below by epoch_time_s / steps: the epoch's time also counts what comes
    # before its first batch and after its last, so with steps of equal length that mean
    # can exceed the slowest step (it did, by 0.6 %, on a 2-core CI machine).
    for h in history:
        assert 0 < h["slowest_step_s"] <= h["epoch_time_s"]
    # A lower bound only: a slower machine makes it truer (no bound on the other epochs).
    assert history[2]["slowest_step_s"] >= STALL_S
    assert all(h["eval_time_s"] >= EVAL_S for h in history)  # the holdout pass, timed apart


def test_a_second_copy_on_the_same_run_folder_is_refused_while_the_first_trains(tiny_splits, tmp_path):
    # Two copies on one --out (a second notebook on the same Drive folder) resumed from each
    # other's older last.pt and overwrote the newer checkpoints; one then advised --fresh.
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold_lock(out)  # another process trains in `out`
    try:
        with pytest.raises(ConfigError, match=f"^{re.escape(str(out))} is in use by another process "
                                              r"\(another copy of this command\?\)"):
            _run_fit(tiny_splits, out, "torch", epochs=1)
        assert sorted(p.name for p in out.iterdir()) == []  # nothing read, written or removed
    finally:
        holder.communicate("done\n", timeout=30)
    _, result = _run_fit(tiny_splits, out, "torch", epochs=1)  # once it has ended
    assert result["finished"]
    _, again = _run_fit(tiny_splits, out, "torch", epochs=1)  # the lock went with the first call
    assert again["finished"] and again["epochs_run"] == 1


def _hold_lock(folder):
    """Another process that holds `folder`'s lock (as a running copy of a command does) until
    its stdin gets a line."""
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(folder)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); sys.stdin.readline()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_fresh_of_a_command_with_several_runs_deletes_nothing_while_one_of_them_is_in_use(tmp_path):
    # T3's --fresh discarded every placement's checkpoints before the lock refused it: the
    # running copy lost its last.pt and best.pt.
    import t3_cubs
    out = tmp_path / "t3"
    for run in ("serial_plain", "reverse_plain"):
        (out / run).mkdir(parents=True)
        for name in ("last.pt", "best.pt", "metrics.jsonl"):
            (out / run / name).write_text("the running copy's")
    holder = _hold_lock(out / "reverse_plain")
    try:
        with pytest.raises(ConfigError, match=f"^{re.escape(str(out / 'reverse_plain'))} is in use by another "
                                              r"process \(another copy of this command\?\): let it finish, "
                                              r"or stop it, first$"):
            t3_cubs.main(["--smoke", "--out", str(out), "--placement", "all", "--variant", "plain",
                          "--epochs", "1", "--backend", "torch", "--fresh"])
        for run in ("serial_plain", "reverse_plain"):
            assert sorted(p.name for p in (out / run).iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]
    finally:
        holder.communicate("done\n", timeout=30)


def test_a_folder_on_a_file_system_without_flock_goes_unlocked_with_a_note(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    from common.files import folder_lock

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with folder_lock(tmp_path, wait=False):
        (tmp_path / "written").write_text("x")
    assert (tmp_path / "written").exists()
    assert capsys.readouterr().err == (f"note: {tmp_path} cannot be locked (Function not implemented): nothing "
                                       f"keeps a second process out of it\n")

    def held(fd, operation):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")
    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(BlockingIOError):
        with folder_lock(tmp_path, wait=False):
            pass


def test_each_epochs_lr_is_the_lr_its_last_step_trained_with(tiny_splits, tmp_path, monkeypatch):
    # It was the LR after the last scheduler step: the next epoch's, so the last epoch showed
    # "lr 0", which no step used.
    used = []
    real_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    _, result = _run_fit(tiny_splits, tmp_path, "torch", epochs=3)
    steps = len(used) // 3
    assert [h["lr"] for h in result["history"]] == [used[steps - 1], used[2 * steps - 1], used[-1]]
    assert result["history"][-1]["lr"] > 0


def test_a_finished_run_re_reported_keeps_the_device_it_trained_on(tiny_splits, tmp_path, monkeypatch):
    # results.json took the re-reporting process's device: a run trained by 2 processes and
    # re-reported by 1 read as a one-process run, and passed T3's process-count checks.
    monkeypatch.setattr(engine, "describe_device", lambda rt: "NVIDIA H100 x2")
    _, trained = _run_fit(tiny_splits, tmp_path, "torch", epochs=1)
    assert trained["device"] == "NVIDIA H100 x2"
    monkeypatch.setattr(engine, "describe_device", lambda rt: "cpu")
    _, again = _run_fit(tiny_splits, tmp_path, "torch", epochs=1)  # the finished run, re-reported
    assert again["finished"] and again["device"] == "NVIDIA H100 x2"


def test_a_resumed_epoch_with_no_batch_left_reports_its_last_steps_lr(tiny_splits, tmp_path):
    # Cut right after an epoch's last step, the resumed epoch runs no step: it reported the LR
    # after the scheduler's step (0 at the end of the run) instead of the one its last step used.
    _, straight = _run_fit(tiny_splits, tmp_path / "a", "torch", epochs=2)
    steps = straight["history"][0]["train_images"] // 8
    stops = []

    def cut_after_the_last_step(loss, logits):
        stops.append(1)
        if len(stops) == 2 * steps:  # the last step of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return loss
    with pytest.raises(Interrupted):
        _run_fit(tiny_splits, tmp_path / "b", "torch", epochs=2, loss_hook=cut_after_the_last_step)
    saved = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, steps)
    shutil.copytree(tmp_path / "b", tmp_path / "c")  # the same cut, with no correct prediction so far
    save_checkpoint({**saved, "partial": {**saved["partial"], "correct": 0.0}}, tmp_path / "c" / "last.pt")
    _, resumed = _run_fit(tiny_splits, tmp_path / "b", "torch", epochs=2)
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in straight["history"]]
    assert resumed["history"][-1]["lr"] > 0
    # train_acc from the saved sums, also when they count 0 correct (it was left out then)
    assert resumed["history"][-1]["train_acc"] == straight["history"][-1]["train_acc"]
    _, zero = _run_fit(tiny_splits, tmp_path / "c", "torch", epochs=2)
    assert zero["history"][-1]["train_acc"] == 0.0


def test_a_signal_before_the_first_epoch_says_nothing_was_saved(tiny_splits, tmp_path, monkeypatch, capsys):
    # It said "last.pt holds epoch 0" beside an empty folder.
    real = engine.describe_device

    def ctrl_c_while_starting(rt):
        os.kill(os.getpid(), signal.SIGINT)  # recorded by fit's handler
        return real(rt)
    monkeypatch.setattr(engine, "describe_device", ctrl_c_while_starting)
    with pytest.raises(Interrupted):
        _run_fit(tiny_splits, tmp_path, "torch", epochs=1)
    assert "SIGINT: stopped before the first epoch, nothing saved yet; rerun the same command to start" \
        in capsys.readouterr().out
    assert not (tmp_path / "last.pt").exists()


def test_a_signal_before_the_first_epoch_of_a_resumed_run_says_what_is_saved(tiny_splits, tmp_path, monkeypatch,
                                                                              capsys):
    # Resumed from best.pt (last.pt lost on a cloud drive), it said "nothing saved yet".
    _run_fit(tiny_splits, tmp_path, "torch", epochs=3, stop_after=2)
    (tmp_path / "last.pt").unlink()
    real = engine.describe_device

    def ctrl_c_while_starting(rt):
        os.kill(os.getpid(), signal.SIGINT)
        return real(rt)
    monkeypatch.setattr(engine, "describe_device", ctrl_c_while_starting)
    capsys.readouterr()
    with pytest.raises(Interrupted):
        _run_fit(tiny_splits, tmp_path, "torch", epochs=3)
    printed = capsys.readouterr().out
    assert f"SIGINT: stopped with epoch 2 saved in {tmp_path}; rerun the same command to resume" in printed
    assert "nothing saved" not in printed


def test_the_grad_scaler_scales_fp16_only():
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range, and a scaler
    there would only skip steps it thinks overflowed."""
    from common.runtime import Runtime
    cpu = torch.device("cpu")
    assert engine.grad_scaler(Runtime(cpu, amp_dtype=torch.float16)).is_enabled()
    assert not engine.grad_scaler(Runtime(cpu, amp_dtype=torch.bfloat16)).is_enabled()
    assert not engine.grad_scaler(Runtime(cpu)).is_enabled()


def test_data_wait_share_counts_the_time_spent_waiting_for_batches(tiny_splits, tmp_path, monkeypatch):
    """metrics.jsonl's data_wait_share is how a user tells a loader-bound run: a loader that
    takes 50 ms a batch, against a step of a few ms, must show most of the epoch waiting."""
    real_epoch = ImageLoader.epoch

    def slow_epoch(self, *args, **kwargs):
        for batch in real_epoch(self, *args, **kwargs):
            time.sleep(0.05)
            yield batch
    monkeypatch.setattr(ImageLoader, "epoch", slow_epoch)
    _, result = _run_fit(tiny_splits, tmp_path, "torch", epochs=1)
    share = result["history"][0]["data_wait_share"]
    assert 0.3 < share <= 1.0, share  # 0.96 measured; it was 0.0 with the wait not summed
