"""Every network the task scripts train, rebuilt from the keys that describe it: a
checkpoint's meta or a results.json (common/schema.py, ModelMeta), as a mapping.

    model = build_model({"task": "t2", "model": "resnet18", "num_classes": 200, "width": 64})
    embedder = build_model(t4_results, phase="b")   # T4 Phase B: the network + embedding head

The report (common/architecture.py) rebuilds the scripts' models with it for layer,
parameter and FLOP counts; a rebuilt model is the trained one (same layers, same parameter
count, same initialisation for the same seed): tests/test_schema.py checks the parameter
count each T1-T3 run recorded, tests/test_networks.py the networks T4's files describe.

Keys read:
    task         t1, t2, t3 (CIFAR-style stem, 64 px) or t4 (ImageNet stem, 224 px)
    model        custom_cnn, resnet18 or cubs_resnet18_<placement>_<variant> (T4 may omit it)
    num_classes  output classes; T4's results.json names them train_classes
    width        channels of the first stage
    dropout      T1, before the classifier
    placement, variant, d, gate_init   the CUBS blocks (T3, T4); gate_init only for plain
    phase, embedding_dim               T4 Phase B
A key missing at the top level is looked up in meta["args"] (the command's flags, which
results.json stores), then left to the model's default.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from common.cubs import cubs_resnet18
from common.models import CustomCNN, EmbeddingNet, ResNet18


def model_name(meta: Mapping[str, Any]) -> str:
    """'custom_cnn', 'resnet18' or 'cubs_resnet18_<placement>_<variant>' (T4's results.json
    names only the placement and the variant)."""
    if "model" in meta:
        return str(meta["model"])
    if meta.get("task") == "t4":
        return f"cubs_resnet18_{meta.get('placement')}_{meta.get('variant')}"
    return "?"


def build_model(meta: Mapping[str, Any], phase: str = "") -> nn.Module:
    """The network described by `meta`; phase "b" (or meta["phase"] == "b") wraps T4's in its
    L2-normalised embedding head. Raises KeyError if a needed key is missing and ValueError
    for a model it does not know."""
    keys = _keys(meta)
    name = model_name(meta)
    num_classes = keys["num_classes"] if "num_classes" in keys else keys["train_classes"]
    if name == "custom_cnn":
        return CustomCNN(num_classes, width=keys["width"], **_present(keys, dropout="dropout"))
    if name == "resnet18":
        return ResNet18(num_classes, stem="cifar", width=keys["width"])
    if not name.startswith("cubs_resnet18"):
        raise ValueError(f"no network is called {name!r}")
    t4 = keys.get("task") == "t4"
    net = cubs_resnet18(num_classes, stem="imagenet" if t4 else "cifar",
                        placement=keys["placement"], variant=keys["variant"], width=keys["width"],
                        **_present(keys, d="d", gate_logit="gate_init"))
    if t4 and "b" in (phase, keys.get("phase")):
        return EmbeddingNet(net, dim=keys["embedding_dim"])
    return net


# What build_model reads: two metas that agree on these rebuild the same network.
MODEL_KEYS = ("task", "model", "num_classes", "train_classes", "width", "dropout", "placement",
              "variant", "d", "gate_init", "phase", "embedding_dim")


def model_keys(meta: Mapping[str, Any], phase: str = "") -> dict[str, Any]:
    """The MODEL_KEYS of `meta` (found as build_model finds them) and the phase asked for:
    equal for two calls of build_model iff they build the same network."""
    keys = _keys(meta)
    return {**{k: keys.get(k) for k in MODEL_KEYS}, "model": model_name(meta), "phase asked": phase}


def _keys(meta: Mapping[str, Any]) -> dict[str, Any]:
    # The top level wins over args: args hold the flags as typed (T3's --placement all, say).
    return {**(meta.get("args") or {}), **meta}


def _present(keys: Mapping[str, Any], **names: str) -> dict[str, Any]:
    """{argument: keys[key]} for each argument=key whose key is present, so that a missing
    one keeps the model's default."""
    return {argument: keys[key] for argument, key in names.items() if key in keys}
