"""Per-epoch diagnostics of ResNet-style networks (T2, T3, T4's Phase A): how open the CUBS
gates are, and how much gradient reaches each residual branch. Logged in metrics.jsonl under
"diagnostics", so a CUBS run can be read against vanilla ResNet-18 epoch by epoch.

    diagnostics(model, images, labels) -> {
        "branch_grad_norm": {"layer1": float, ..., "layer4": float},
        "gates": {"layer1": {"channel": {"mean", "std"}, "spatial": {"mean", "std"}}, ...},
        "gamma": {"layer1.0.attention.first": float, ...}}   (plus blocks only)

images: B x 3 x H x W, labels: B (one fixed holdout batch). branch_grad_norm is the L2 norm
of the cross-entropy gradient of the residual-branch convs and BNs of a stage's two
BasicBlocks (attention parameters left out, so CUBS and vanilla compare like for like).
gates: mean and standard deviation of every element of the multiplicative gates
(Block 1: B x C x 1 x 1, Block 2: B x 1 x H x W) of a stage's blocks, in eval mode.
gamma: the modulation's scale of every plus block, by module name: its effective_gamma(),
tanh(gamma) (the gate is 1 + scale * tanh(z / 2)); the key is there only when the
model has plus blocks.
None of them changes the model: BatchNorm statistics and the RNG streams are restored, and
gradients are cleared.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.cubs import CUBSBlock1, CUBSBlock1Plus, CUBSBlock2, CUBSBlock2Plus
from common.models import BasicBlock

_CHANNEL_BLOCKS = (CUBSBlock1, CUBSBlock1Plus)
_GATED_BLOCKS = (CUBSBlock1, CUBSBlock1Plus, CUBSBlock2, CUBSBlock2Plus)
_PLUS_BLOCKS = (CUBSBlock1Plus, CUBSBlock2Plus)


def diagnostics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Both measurements on one batch; see the module docstring."""
    devices = [images.device] if images.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        result = {"branch_grad_norm": branch_grad_norms(model, images, labels),
                  "gates": gate_statistics(model, images)}
    gammas = gamma_values(model)
    if gammas:
        result["gamma"] = gammas
    return result


def gamma_values(model: nn.Module) -> dict[str, float]:
    """Module name -> the modulation's scale of every plus block (empty for other models)."""
    return {name: m.effective_gamma().item() for name, m in model.named_modules()
            if isinstance(m, _PLUS_BLOCKS)}


def branch_grad_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Stage name -> gradient norm of its residual branches, in train mode (as in training)."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    saved_grads = {p: p.grad for p in model.parameters()}
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        F.cross_entropy(model(images).float(), labels).backward()
        squares: dict[str, float] = {}
        for name, block in model.named_modules():
            if isinstance(block, BasicBlock):
                stage = name.split(".")[0]
                for part in (block.conv1, block.bn1, block.conv2, block.bn2):
                    squares[stage] = squares.get(stage, 0.0) + sum(
                        p.grad.double().pow(2).sum().item() for p in part.parameters() if p.grad is not None)
        return {stage: math.sqrt(total) for stage, total in squares.items()}
    finally:
        for p, grad in saved_grads.items():
            p.grad = grad
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        model.train(was_training)


@torch.no_grad()
def gate_statistics(model: nn.Module, images: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """Stage -> {"channel" | "spatial": {"mean", "std"}} of the gates, in eval mode."""
    inputs: dict[str, torch.Tensor] = {}
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, _GATED_BLOCKS)}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
             for name, m in blocks.items()]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    gates: dict[tuple[str, str], list[torch.Tensor]] = {}
    for name, block in blocks.items():
        kind = "channel" if isinstance(block, _CHANNEL_BLOCKS) else "spatial"
        gates.setdefault((name.split(".")[0], kind), []).append(block.gate(inputs[name]).float().flatten())
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for (stage, kind), values in sorted(gates.items()):
        flat = torch.cat(values)
        stats.setdefault(stage, {})[kind] = {"mean": flat.mean().item(), "std": flat.std().item()}
    return stats
