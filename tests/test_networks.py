"""common/networks.py: build_model rebuilds each script's network from a checkpoint meta or a
results.json, the same network the script trained (layers, parameters, initialisation)."""
from __future__ import annotations

import pytest
import torch

from common.cubs import cubs_resnet18
from common.models import CustomCNN, EmbeddingNet, ResNet18
from common.networks import MODEL_KEYS, build_model, model_keys, model_name


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def built(meta: dict, phase: str = "") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(meta, phase)


def reference(make) -> torch.nn.Module:
    torch.manual_seed(0)
    return make()


@pytest.mark.parametrize("gate_init", [3.0, -1.0, None])
def test_plain_cubs_blocks_start_with_the_runs_gate_logit(gate_init):
    meta = {"task": "t3", "model": "cubs_resnet18_serial_plain", "placement": "serial",
            "variant": "plain", "num_classes": 5, "width": 8, "image_size": 32, "d": 32,
            "gate_init": gate_init}
    expected = reference(lambda: cubs_resnet18(5, stem="cifar", placement="serial", variant="plain",
                                               width=8, d=32, gate_logit=gate_init))
    assert same_weights(built(meta), expected)


def test_a_different_gate_init_is_a_different_network():
    meta = {"task": "t3", "model": "cubs_resnet18_reverse_plain", "placement": "reverse",
            "variant": "plain", "num_classes": 5, "width": 8, "d": 32}
    assert not same_weights(built({**meta, "gate_init": 3.0}), built({**meta, "gate_init": None}))
    assert model_keys({**meta, "gate_init": 3.0}) != model_keys({**meta, "gate_init": None})


def test_t1_and_t2_metas_give_their_networks():
    t1 = {"task": "t1", "model": "custom_cnn", "num_classes": 5, "width": 8, "dropout": 0.3}
    assert same_weights(built(t1), reference(lambda: CustomCNN(5, width=8, dropout=0.3)))
    assert built(t1).dropout.p == 0.3  # no weights: same_weights cannot see it
    t2 = {"task": "t2", "model": "resnet18", "num_classes": 5, "width": 8}
    assert same_weights(built(t2), reference(lambda: ResNet18(5, stem="cifar", width=8)))


def test_t4_results_json_and_checkpoint_meta_give_the_same_networks():
    results = {"task": "t4", "placement": "parallel", "variant": "plus", "train_classes": 6,
               "args": {"width": 8, "embedding_dim": 16, "placement": "auto"}}
    meta = {"task": "t4", "model": "cubs_resnet18_parallel_plus", "placement": "parallel",
            "variant": "plus", "num_classes": 6, "width": 8}
    assert model_name(results) == model_name(meta) == "cubs_resnet18_parallel_plus"
    net = reference(lambda: cubs_resnet18(6, stem="imagenet", placement="parallel", variant="plus",
                                          width=8))
    assert same_weights(built(results), net) and same_weights(built(meta), net)
    embedder = built(results, phase="b")
    assert isinstance(embedder, EmbeddingNet)
    phase_b = {**meta, "phase": "b", "embedding_dim": 16}
    assert same_weights(embedder, built(phase_b))


def test_an_unknown_network_or_a_missing_key_is_an_error():
    with pytest.raises(ValueError, match="no network is called 'vgg'"):
        build_model({"task": "t2", "model": "vgg", "num_classes": 5, "width": 8})
    with pytest.raises(KeyError, match="width"):
        build_model({"task": "t2", "model": "resnet18", "num_classes": 5})


def test_model_keys_change_with_every_key_that_makes_another_network():
    meta = {"task": "t4", "model": "cubs_resnet18_serial_plain", "num_classes": 6, "train_classes": 6,
            "width": 8, "dropout": 0.2, "placement": "serial", "variant": "plain", "d": 32,
            "gate_init": 3.0, "phase": "b", "embedding_dim": 16}
    changed = {"task": "t3", "model": "cubs_resnet18_serial_plus", "num_classes": 7, "train_classes": 7,
               "width": 16, "dropout": 0.3, "placement": "reverse", "variant": "plus", "d": 64,
               "gate_init": -1.0, "phase": "a", "embedding_dim": 32}
    assert set(MODEL_KEYS) == set(changed)
    for key, value in changed.items():
        assert model_keys({**meta, key: value}) != model_keys(meta), key


def test_model_keys_tell_t4s_phase_b_embedder_from_its_phase_a_network():
    # The report groups runs by model_keys: Phase A's classifier and Phase B's embedder are
    # built from the same results.json and differ only by the phase asked for.
    results = {"task": "t4", "placement": "serial", "variant": "plain", "train_classes": 6,
               "args": {"width": 8, "embedding_dim": 16}}
    assert isinstance(built(results, "b"), EmbeddingNet) and not isinstance(built(results), EmbeddingNet)
    assert model_keys(results, "b") != model_keys(results)
