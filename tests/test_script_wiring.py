"""What the task scripts pass on, in this process and without training: each T4 phase's
engine.fit arguments (recipe, split, loss constants, checkpoint meta), T4's Phase A -> Phase B
hand-over and its results.json fields, T1-T3's engine.fit arguments and checkpoint meta, T3's
per-run seed, --fresh of T3 and T4, and T3's gate-logit bounds. engine.fit and the phases are
replaced by recorders, so each test takes about a second."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


class Stop(Exception):
    pass


def _t4_args(tmp_path, *flags):
    import t4_retrieval
    return t4_retrieval.parse_args(["--smoke", "--out", str(tmp_path), "--width", "8", *flags])


def _recording_fit_phase(monkeypatch, calls):
    import t4_retrieval

    def record(model, loader, loss_fn, score, cfg, run_dir, rt, meta, **kw):
        calls.append(dict(model=model, loader=loader, loss_fn=loss_fn, score=score, cfg=cfg,
                          run_dir=run_dir, meta=meta, kw=kw,
                          state={k: v.clone() for k, v in model.state_dict().items()}))
        return {"finished": False}
    monkeypatch.setattr(t4_retrieval, "fit_phase", record)


def _embedded_split(monkeypatch):
    """evaluate.embed replaced: records the loader it embeds, returns 8 embeddings of 4 classes."""
    from common import evaluate
    seen = []

    def embed(model, loader, rt, features=False):
        seen.append((loader, features))
        return torch.nn.functional.normalize(torch.randn(8, 4), dim=1), torch.arange(8) % 4
    monkeypatch.setattr(evaluate, "embed", embed)
    return seen


def test_t4_phase_b_trains_with_the_embed_flags_the_loss_constants_and_holdout_recall(tmp_path, monkeypatch):
    import t4_retrieval
    from common import runtime
    from common.checkpoint import weights_sha256
    from common.cubs import cubs_resnet18
    from common.loss import multi_similarity_loss
    args = _t4_args(tmp_path, "--epochs", "3", "--lr", "0.3", "--weight-decay", "0.01", "--warmup-epochs", "2",
                    "--embed-epochs", "5", "--embed-lr", "0.002", "--embed-optimizer", "sgd",
                    "--embed-weight-decay", "0.003", "--embed-warmup-epochs", "0.5", "--embedding-dim", "16",
                    "--classes-per-batch", "3", "--images-per-class", "5", "--alpha", "1.5", "--beta", "40",
                    "--lam", "0.25", "--epsilon", "0.05", "--seed", "7")
    calls = []
    _recording_fit_phase(monkeypatch, calls)
    seen = _embedded_split(monkeypatch)
    rt = runtime.Runtime(torch.device("cpu"))
    data = SimpleNamespace(pk_train=object(), holdout_all=object(), test_all=object())
    model = cubs_resnet18(4, stem="imagenet", width=8)
    meta = {"task": "t4", "width": 8}
    for mining in ("hard", "semihard"):
        torch.rand(100)  # the RNG wherever the previous mining left it
        assert t4_retrieval.phase_b(model, mining, data, args, rt, meta, tmp_path) == {"finished": False}
    hard, semihard = calls
    cfg = hard["cfg"]
    assert (cfg.epochs, cfg.lr, cfg.optimizer, cfg.weight_decay, cfg.warmup_epochs) == (5, 0.002, "sgd", 0.003, 0.5)
    assert hard["loader"] is data.pk_train and hard["run_dir"] == tmp_path / "phase_b_hard"
    assert semihard["run_dir"] == tmp_path / "phase_b_semihard"
    # a refused resume names the --embed-* flags (given above) that set those fields
    assert hard["kw"] == {"score_key": "holdout_r1", "top1": False, "flag_names": {
        "epochs": "--embed-epochs", "lr": "--embed-lr", "optimizer": "--embed-optimizer",
        "weight_decay": "--embed-weight-decay", "warmup_epochs": "--embed-warmup-epochs"}}
    # the meta a resume compares: every Phase B setting, the mining, and the Phase A weights
    # it started from (a Phase A trained again must not be resumed into)
    assert hard["meta"] == {"task": "t4", "width": 8, "phase": "b", "mining": "hard", "embedding_dim": 16,
                            "classes_per_batch": 3, "images_per_class": 5, "alpha": 1.5, "beta": 40.0,
                            "lam": 0.25, "epsilon": 0.05, "phase_a_sha256": weights_sha256(model)}
    assert semihard["meta"]["mining"] == "semihard" and meta == {"task": "t4", "width": 8}
    # the loss: --alpha, --beta, --lam, --epsilon and this phase's mining, each in its place
    torch.manual_seed(0)
    emb, labels = torch.nn.functional.normalize(torch.randn(12, 16), dim=1), torch.arange(12) % 3
    for call, mining in ((hard, "hard"), (semihard, "semihard")):
        expected = multi_similarity_loss(emb, labels, 1.5, 40.0, 0.25, mining, 0.05)
        assert torch.equal(call["loss_fn"](emb, labels), expected)
    # early stopping scores the holdout (never the test split), with the embedding itself
    assert set(hard["score"](hard["model"])) == {"holdout_r1"}
    assert seen == [(data.holdout_all, False)]
    # the head: --embedding-dim wide; drawn after seeding, so every mining starts from the same one
    assert hard["model"].projection.out_features == 16
    assert all(torch.equal(hard["state"][k], semihard["state"][k]) for k in hard["state"])


def test_t4_phase_a_trains_the_classifier_recipe_and_selects_by_holdout(tmp_path, monkeypatch):
    import t4_retrieval
    from common import evaluate, runtime
    from common.cubs import cubs_resnet18
    args = _t4_args(tmp_path, "--epochs", "3", "--lr", "0.3", "--label-smoothing", "0.2", "--embed-epochs", "5",
                    "--embed-lr", "0.002")
    calls, scored = [], []
    _recording_fit_phase(monkeypatch, calls)
    monkeypatch.setattr(evaluate, "holdout_scorer", lambda loader, rt, *a: scored.append(loader) or "scorer")
    loaders = SimpleNamespace(train=object(), holdout=object(), test=object())
    data = SimpleNamespace(loaders=loaders, splits=SimpleNamespace(train=SimpleNamespace(classes=[0, 1, 2, 3])))
    model = cubs_resnet18(4, stem="imagenet", width=8)
    assert t4_retrieval.phase_a(model, data, args, runtime.Runtime(torch.device("cpu")), {"task": "t4"},
                                tmp_path) == {"finished": False}
    (call,) = calls
    assert call["model"] is model and call["loader"] is loaders.train and scored == [loaders.holdout]
    assert call["score"] == "scorer" and call["run_dir"] == tmp_path / "phase_a" and call["meta"] == {"task": "t4"}
    assert isinstance(call["loss_fn"], torch.nn.CrossEntropyLoss) and call["loss_fn"].label_smoothing == 0.2
    assert (call["cfg"].epochs, call["cfg"].lr, call["cfg"].compile) == (3, 0.3, False)


@pytest.mark.parametrize("flags, minings", [
    ([], ["ms", "none", "hard", "semihard"]),  # --smoke turns --compare-mining on; --mining's run first
    (["--mining", "hard", "--no-compare-mining"], ["hard"]),
    (["--mining", "semihard"], ["semihard", "none", "ms", "hard"]),
])
def test_t4_every_mining_starts_from_phase_as_weights_and_mining_is_the_one_reported(flags, minings, tmp_path,
                                                                                     monkeypatch):
    import t4_retrieval
    from common.loss import MINING_CHOICES
    assert list(MINING_CHOICES) == ["none", "ms", "hard", "semihard"]
    splits = SimpleNamespace(train=SimpleNamespace(classes=list(range(4)), files=[]),
                             test=SimpleNamespace(files=[], classes=[]), fingerprint=lambda: "4 classes")
    test_all, embedded, events = object(), [], []
    loaders = SimpleNamespace(**{name: SimpleNamespace(close=lambda name=name: events.append(f"close {name}"))
                                 for name in ("train", "holdout")})
    monkeypatch.setattr(t4_retrieval, "load_data", lambda args, rt, out: SimpleNamespace(
        splits=splits, test_all=test_all, loaders=loaders))
    monkeypatch.setattr(t4_retrieval.evaluate, "embed", lambda model, loader, rt, features=False:
                        embedded.append((loader, features)) or (None, None))
    monkeypatch.setattr(t4_retrieval, "recall_at_k", lambda *a, **k: {1: 0.5})
    trained = {}

    def phase_a(model, data, args, rt, meta, out):
        with torch.no_grad():  # what Phase A learned
            for p in model.parameters():
                p.fill_(0.25)
        trained["a"] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"finished": True}

    def phase_b(model, mining, data, args, rt, meta, out):
        events.append(mining)
        trained[mining] = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():  # what this mining's Phase B changed
            for p in model.parameters():
                p.add_(1.0)
        return {"finished": True, "mining": mining}
    monkeypatch.setattr(t4_retrieval, "phase_a", phase_a)
    monkeypatch.setattr(t4_retrieval, "phase_b", phase_b)
    monkeypatch.setattr(t4_retrieval, "write_results", lambda model, meta, init, r0, a, b, data, args, rt:
                        {"args": args, "results_b": b})
    got = t4_retrieval.main(["--smoke", "--out", str(tmp_path), "--width", "8", "--init", "scratch",
                             "--t3-results", str(tmp_path / "none.json"), *flags])
    assert list(got["results_b"]) == minings and got["args"].mining == minings[0]
    # Phase A's loaders let go of their DALI readers before Phase B starts
    assert events == ["close train", "close holdout", *minings]
    assert {m: r["mining"] for m, r in got["results_b"].items()} == {m: m for m in minings}
    for mining in minings:
        assert all(torch.equal(trained[mining][k], trained["a"][k]) for k in trained["a"]), mining
    # the baseline before Phase A: the pooled features of the test split, as Phase A's own test
    assert embedded == [(test_all, True)]


def test_t3_every_placement_and_variant_starts_from_the_same_draws(tmp_path, monkeypatch):
    # train_and_test seeds before building: --placement all / --variant both compare networks
    # from the same initial tensors, whatever the run before consumed of the RNG.
    import t3_cubs
    from common import runtime
    built = []

    def capture(*args, **kwargs):
        built.append(t3_cubs_build(*args, **kwargs).state_dict())
        raise Stop
    t3_cubs_build = t3_cubs.cubs_resnet18
    monkeypatch.setattr(t3_cubs, "cubs_resnet18", capture)
    args = SimpleNamespace(seed=5, width=8, d=64, gate_init=3.0)
    rt = runtime.Runtime(torch.device("cpu"))
    for placement, variant in (("serial", "plain"), ("reverse", "plus")):
        torch.rand(100)
        with pytest.raises(Stop):
            t3_cubs.train_and_test(args, rt, SimpleNamespace(train=SimpleNamespace(classes=list(range(10)))),
                                   None, placement, variant)
    torch.manual_seed(5)
    vanilla = t3_cubs_build(10, width=8, d=64, placement="serial", variant="plain", gate_logit=3.0).state_dict()
    assert all(torch.equal(built[0][k], vanilla[k]) for k in vanilla)
    assert all(torch.equal(built[1][k], vanilla[k]) for k in ("conv1.weight", "fc.weight", "layer4.1.conv2.weight"))


def test_t3_gate_init_accepts_logits_up_to_100_and_refuses_beyond():
    import argparse

    import t3_cubs
    assert t3_cubs.gate_logit("100") == 100.0 and t3_cubs.gate_logit("-100") == -100.0
    for text in ("100.5", "-101"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be within"):
            t3_cubs.gate_logit(text)


def test_t4_results_report_the_mining_of_mining_and_each_count_from_its_own_split(tmp_path, monkeypatch):
    import json

    import t4_retrieval
    from common import runtime
    args = _t4_args(tmp_path, "--mining", "hard", "--seed", "9")
    grids = []
    monkeypatch.setattr(t4_retrieval.plots, "retrieval_grid", lambda *a, **k: grids.append((a, k)))
    split = lambda n, classes: SimpleNamespace(files=[f"{i}.jpg" for i in range(n)],  # noqa: E731
                                               classes=list(range(classes)), labels=[i % classes for i in range(n)])
    data = SimpleNamespace(splits=SimpleNamespace(train=split(30, 5), holdout=split(10, 5), test=split(12, 3)),
                           loaders=SimpleNamespace(train=SimpleNamespace(backend="torch")))

    def fitted(score, epoch, params=None):
        r = {"test_recall": {1: score}, "best_score": score, "best_epoch": epoch, "epochs_run": epoch + 1,
             "train_time_s": float(epoch), "finished": True}
        if params:
            r.update(embeddings=(torch.full((12, 2), score), torch.arange(12) % 3), embedding_params=params)
        return r
    results_b = {"hard": fitted(0.6, 2, params=111), "ms": fitted(0.7, 3, params=222)}
    init = {"init": "scratch"}
    meta = {"placement": "reverse", "variant": "plus", "d": 64}
    model = torch.nn.Linear(3, 2)  # 8 parameters
    got = t4_retrieval.write_results(model, meta, init, {1: 0.3}, fitted(0.5, 1), results_b, data, args,
                                     runtime.Runtime(torch.device("cpu")))
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(got))
    assert (got["placement"], got["variant"], got["d"], got["init"], got["params"]) == (
        "reverse", "plus", 64, "scratch", 8)
    assert (got["test_images"], got["test_classes"], got["train_images"], got["train_classes"]) == (12, 3, 30, 5)
    assert got["recall_at_1_chance"] == pytest.approx(3 * 4 * 3 / (12 * 11))  # 3 classes of 4
    assert got["init_test_recall"] == {1: 0.3} and got["embedding_params"] == 111
    assert got["phase_a"] == {"test_recall": {1: 0.5}, "holdout_acc": 0.5, "best_epoch": 1, "epochs_run": 2,
                              "train_time_s": 1.0}
    assert got["phase_b"] == {"test_recall": {1: 0.6}, "holdout_r1": 0.6, "mining": "hard", "best_epoch": 2,
                              "epochs_run": 3, "train_time_s": 2.0}
    assert [m["mining"] for m in got["mining_comparison"]] == ["hard", "ms"]
    assert got["mining_comparison"][1]["holdout_r1"] == 0.7 and got["loader"] == "torch" and got["finished"]
    (args_, kwargs), = grids
    assert torch.equal(args_[0], results_b["hard"]["embeddings"][0]) and args_[2] == data.splits.test.files
    assert args_[3] == tmp_path / "retrieval.png" and kwargs["seed"] == 9 and "hard mining" in kwargs["embedding"]


def _fit_of(script, argv, monkeypatch):
    """script.main(argv) up to engine.fit: its arguments, the loaders it was given, the split
    each holdout scorer scores."""
    from common import engine, evaluate, task_data
    made, scored, models = [], [], []
    real_loaders, real_scorer = task_data.classifier_loaders, evaluate.holdout_scorer
    real_opt = engine.optimizer_and_schedule

    def loaders(*a, **k):
        made.append(real_loaders(*a, **k))
        return made[-1]

    def scorer(loader, rt, *a):
        scored.append(loader)
        return real_scorer(loader, rt, *a)

    def fit(net, loader, loss_fn, optimizer, scheduler, scaler, score, cfg, out, rt, meta, **kw):
        raise Stop(dict(model=models[-1], loader=loader, loss_fn=loss_fn, cfg=cfg, out=out, meta=meta))
    monkeypatch.setattr(task_data, "classifier_loaders", loaders)
    monkeypatch.setattr(evaluate, "holdout_scorer", scorer)
    monkeypatch.setattr(engine, "fit", fit)
    monkeypatch.setattr(engine, "optimizer_and_schedule", lambda model, *a: models.append(model) or real_opt(model, *a))
    with pytest.raises(Stop) as stopped:
        script.main(argv)
    (ld,) = made
    return stopped.value.args[0], ld, scored


@pytest.mark.parametrize("script", ["t1_custom_cnn", "t2_resnet18", "t3_cubs"])
def test_classifier_scripts_train_their_flags_select_by_holdout_and_record_them_in_meta(script, tmp_path,
                                                                                       monkeypatch):
    import importlib
    mod = importlib.import_module(script)
    extra = {"t1_custom_cnn": ["--dropout", "0.3"], "t2_resnet18": [],
             "t3_cubs": ["--placement", "reverse", "--variant", "plain", "--d", "64", "--gate-init", "1.5"]}[script]
    argv = ["--smoke", "--backend", "torch", "--out", str(tmp_path), "--width", "8", "--epochs", "3", "--lr", "0.07",
            "--label-smoothing", "0.15", "--seed", "4", "--batch-size", "20", *extra]
    got, loaders, scored = _fit_of(mod, argv, monkeypatch)
    assert got["loader"] is loaders.train and scored == [loaders.holdout]  # the epoch is chosen on the holdout
    assert got["loss_fn"].label_smoothing == 0.15
    assert (got["cfg"].epochs, got["cfg"].lr) == (3, 0.07)
    # what a resume compares: a run with other data settings or another network is refused
    recipe = dict(batch_size=20, label_smoothing=0.15, holdout_per_class=5, color_jitter=0.0, seed=4, width=8,
                  num_classes=10)
    assert {k: got["meta"][k] for k in recipe} == recipe
    if script == "t1_custom_cnn":
        assert got["meta"]["dropout"] == 0.3 and got["out"] == str(tmp_path)
        assert [m.p for m in got["model"].modules() if isinstance(m, torch.nn.Dropout)] == [0.3]
    if script == "t3_cubs":
        assert got["out"] == tmp_path / "reverse_plain"
        assert (got["meta"]["placement"], got["meta"]["d"], got["meta"]["gate_init"]) == ("reverse", 64, 1.5)


def _earlier_runs(out: Path, folders, summaries) -> None:
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
        for name in ("last.pt", "best.pt", "metrics.jsonl"):
            (out / folder / name).write_bytes(b"earlier run")
    for name in summaries:
        (out / name).write_text("earlier")


def _left(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_t3_fresh_discards_every_run_of_this_command_and_the_comparison_only(tmp_path, monkeypatch, capsys):
    import t3_cubs
    from common import engine
    summaries = ("placements.json", "placements.md", "placements.png")
    _earlier_runs(tmp_path, ["serial_plain", "reverse_plain", "parallel_plain", "serial_plus"], summaries)

    def fit(*a, **k):
        raise Stop
    monkeypatch.setattr(engine, "fit", fit)
    with pytest.raises(Stop):
        t3_cubs.main(["--smoke", "--backend", "torch", "--out", str(tmp_path), "--width", "8", "--fresh",
                      "--placement", "all", "--variant", "plain"])
    assert [p for p in _left(tmp_path) if not p.startswith("smoke_data")] == [
        "serial_plus/best.pt", "serial_plus/last.pt", "serial_plus/metrics.jsonl"]  # not this command's
    # and says so, the comparison included
    assert (f"--fresh: removed the earlier comparison's placements.json, placements.md, placements.png "
            f"from {tmp_path}") in capsys.readouterr().out
    # --fresh beside --evaluate is refused before anything is deleted (it used to be ignored)
    _earlier_runs(tmp_path, ["reverse_plain"], summaries)
    before = _left(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        t3_cubs.main(["--smoke", "--backend", "torch", "--out", str(tmp_path), "--width", "8", "--fresh",
                      "--placement", "reverse", "--evaluate", str(tmp_path / "reverse_plain" / "best.pt")])
    assert exit_.value.code == 2 and _left(tmp_path) == before


def test_t4_fresh_discards_both_phases_of_every_mining_and_the_summaries(tmp_path, monkeypatch, capsys):
    import t4_retrieval
    splits = SimpleNamespace(train=SimpleNamespace(classes=list(range(4)), files=[]),
                             test=SimpleNamespace(files=[], classes=[]), fingerprint=lambda: "4 classes")
    monkeypatch.setattr(t4_retrieval, "load_data", lambda args, rt, out: SimpleNamespace(splits=splits, test_all=None))
    monkeypatch.setattr(t4_retrieval.evaluate, "embed", lambda *a, **k: (None, None))
    monkeypatch.setattr(t4_retrieval, "recall_at_k", lambda *a, **k: {1: 0.5})

    def phase_a(*a):
        raise Stop
    monkeypatch.setattr(t4_retrieval, "phase_a", phase_a)
    _earlier_runs(tmp_path, ["phase_a", "phase_b_none", "phase_b_ms", "phase_b_hard", "phase_b_semihard", "other"],
                  ("results.json", "retrieval.png"))
    with pytest.raises(Stop):
        t4_retrieval.main(["--smoke", "--out", str(tmp_path), "--width", "8", "--init", "scratch", "--fresh",
                           "--no-compare-mining", "--t3-results", str(tmp_path / "none.json")])
    assert _left(tmp_path) == ["other/best.pt", "other/last.pt", "other/metrics.jsonl"]
    assert f"--fresh: removed the earlier summary's results.json, retrieval.png from {tmp_path}" in capsys.readouterr().out


def test_t4_evaluates_resized_centre_crops_and_batches_p_classes_of_k(tmp_path):
    # --image-size 64: evaluation images resized to 73 (256/224 of it), then centre-cropped
    import t4_retrieval
    from common import runtime
    args = t4_retrieval.parse_args(["--smoke", "--backend", "torch", "--out", str(tmp_path),
                                    "--classes-per-batch", "3", "--images-per-class", "5"])
    data = t4_retrieval.load_data(args, runtime.Runtime(torch.device("cpu")), tmp_path)
    assert (data.settings.image_size, data.settings.eval_resize) == (64, 73)
    assert data.pk_train.batch_size == 15
