"""common/schema.py is the one definition of results.json and checkpoint meta: what the smoke
runs wrote has exactly its keys, and the scripts show their whole recipe."""
import importlib
import json

import pytest

from common import schema
from common.checkpoint import load_checkpoint
from common.networks import build_model


def _check_keys(record: dict, typed: type, where: str) -> None:
    keys = set(record)
    assert keys <= schema.keys(typed), f"{where}: keys outside {typed.__name__}: {keys - schema.keys(typed)}"
    assert typed.__required_keys__ <= keys, f"{where}: missing {typed.__required_keys__ - keys}"


def _classifier_runs(runs):
    return [runs / "t1", runs / "t2", *sorted(p.parent for p in (runs / "t3").glob("*_*/results.json"))]


def test_classifier_results_and_checkpoint_meta_follow_the_schema(runs):
    for out in _classifier_runs(runs):
        results = json.loads((out / "results.json").read_text())
        _check_keys(results, schema.ClassifierResults, str(out / "results.json"))
        meta = load_checkpoint(out / "best.pt")["meta"]
        _check_keys(meta, schema.CheckpointMeta, str(out / "best.pt"))
        # results.json repeats the checkpoint's meta, and the meta rebuilds the trained network
        assert {k: results[k] for k in meta} == meta
        assert sum(p.numel() for p in build_model(meta).parameters()) == results["params"]


def test_retrieval_results_and_both_phases_meta_follow_the_schema(runs):
    results = json.loads((runs / "t4" / "results.json").read_text())
    _check_keys(results, schema.RetrievalResults, "t4 results.json")
    # The report rebuilds T4's network from results.json: with T3's d (the smoke runs' is not
    # the default 512), not the default's.
    assert sum(p.numel() for p in build_model(results).parameters()) == results["params"]
    for phase in [results["phase_a"], results["phase_b"], *results["mining_comparison"]]:
        _check_keys(phase, schema.PhaseResult, "a phase of t4 results.json")
    for folder in ("phase_a", "phase_b_ms", "phase_b_hard"):
        meta = load_checkpoint(runs / "t4" / folder / "best.pt")["meta"]
        _check_keys(meta, schema.CheckpointMeta, folder)
        assert meta["init"] == results["init"] and meta.get("phase") == ("b" if "_b_" in folder else None)


@pytest.mark.parametrize("script", ["t1_custom_cnn", "t2_resnet18", "t3_cubs", "t4_retrieval"])
def test_every_script_shows_every_training_default_in_its_recipe(script):
    recipe = importlib.import_module(script).RECIPE
    assert set(schema.RECIPE_FLAGS) <= recipe.keys()
    if script in ("t1_custom_cnn", "t3_cubs"):  # compared with T2: the same training settings
        t2 = importlib.import_module("t2_resnet18").RECIPE
        shared = [k for k in schema.RECIPE_FLAGS if not (k == "width" and script == "t1_custom_cnn")]
        assert {k: recipe[k] for k in shared} == {k: t2[k] for k in shared}


def test_keys_are_every_key_a_schema_allows_its_bases_and_optional_ones_included():
    # --evaluate compares a checkpoint's network with the flags' by keys(ModelMeta), whose keys
    # are all optional (total=False): keys() must not drop them, or nothing would be compared.
    assert schema.keys(schema.ModelMeta) == {"task", "model", "num_classes", "width", "image_size", "dropout",
                                             "placement", "variant", "d", "gate_init", "phase", "embedding_dim"}
    assert schema.keys(schema.CheckpointMeta) == (schema.keys(schema.ModelMeta) | schema.keys(schema.DataRecipe)
                                                  | schema.keys(schema.RetrievalMeta))
    assert {"params", "args", "seed", "width", "test_acc", "best_epoch"} <= schema.keys(schema.ClassifierResults)
    assert {"init_skipped", "phase_a", "train_classes", "params"} <= schema.keys(schema.RetrievalResults)
