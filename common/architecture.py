"""The architecture of every run as both reports show it, computed here, not read from JSON:
the model is rebuilt with the run's settings (common/networks.py) and counted.

    summaries = architectures(collect("runs"))   # [(run, phase, Architecture or None), ...]

Counted: conv / linear / BatchNorm layers, CUBS attention blocks (Block 1 and Block 2
modules), squeeze-excitation gates, parameters, and forward GFLOPs for one image at the run's
input size. FlopCounterMode counts a multiply-add as 2 FLOPs and only convolutions, matrix
products and attention kernels; BatchNorm, activations, pooling and softmax are not counted.
The plain CUBS blocks' Taylor-series similarity is counted as eager mode on the CPU runs it:
two batched matmuls, 8 L p FLOPs per block together (L positions or descriptor entries, p
terms set by the logits: common/cubs.py, taylor_terms), 0.03 % of the serial plain network
at 64 px (compiled, or on CUDA, the same sums are elementwise and not counted).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from common.cubs import CUBSBlock1, CUBSBlock1Plus, CUBSBlock2, CUBSBlock2Plus
from common.flops import forward_flops
from common.models import SqueezeExcitation, count_parameters
from common.networks import build_model, model_keys, model_name
from common.runs_folder import Run, RunsFolder

PHASE_LABELS = {"a": " (Phase A classifier)", "b": " (Phase B embedding)"}


@dataclass
class Architecture:
    label: str
    input_size: int
    conv: int
    linear: int
    batchnorm: int
    attention: int  # CUBS Block 1 / Block 2 modules
    se_gates: int
    params: int
    flops: float


# (run, phase, its architecture): phase "" for T1-T3, "a" and "b" for T4's two networks;
# None where the model could not be rebuilt.
Summaries = list[tuple[Run, str, Architecture | None]]


def summarise(model: nn.Module, label: str, image_size: int) -> Architecture:
    mods = list(model.modules())
    n = lambda *types: sum(isinstance(m, types) for m in mods)  # noqa: E731
    return Architecture(
        label=label, input_size=image_size, conv=n(nn.Conv2d), linear=n(nn.Linear),
        batchnorm=n(nn.BatchNorm2d),
        attention=n(CUBSBlock1, CUBSBlock2, CUBSBlock1Plus, CUBSBlock2Plus),
        se_gates=n(SqueezeExcitation), params=count_parameters(model),
        flops=forward_flops(model, image_size))


def architectures(runs: RunsFolder) -> Summaries:
    """The summary of every run's network(s), each distinct network rebuilt and counted once
    (counting FLOPs runs the model); a model that cannot be rebuilt is noted in runs.problems."""
    out, cache = [], {}
    for run in runs.classifiers + runs.retrievals:
        phases = ["a", "b"] if run.task == "t4" else [""]
        for phase in phases:
            size = run.results.get("image_size", run.args.get("image_size"))
            try:
                torch.manual_seed(0)
                key = json.dumps([model_keys(run.results, phase), size], default=str)
                if key not in cache:
                    label = model_name(run.results) + PHASE_LABELS.get(phase, "")
                    cache[key] = None if size is None else \
                        summarise(build_model(run.results, phase), label, int(size))
                out.append((run, phase, cache[key]))
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                runs.problems.append(f"could not rebuild the model of {run.name}: {err!r}")
                out.append((run, phase, None))
    return out
