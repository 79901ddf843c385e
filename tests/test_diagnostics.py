"""Training diagnostics: gate statistics and residual-branch gradient norms, against values
known at initialisation, and the promise that measuring changes nothing."""
import math

import pytest
import torch

from common.checkpoint import load_matching_tensors
from common.cubs import cubs_resnet18
from common.diagnostics import branch_grad_norms, diagnostics, gate_statistics
from common.models import ResNet18

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def _pair(placement: str, gate_logit):
    """Vanilla ResNet-18 and a CUBS one whose convs, BNs and classifier are the same tensors."""
    torch.manual_seed(0)
    vanilla = ResNet18(num_classes=5, width=8)
    cubs = cubs_resnet18(5, placement=placement, width=8, d=32, gate_logit=gate_logit)
    load_matching_tensors(cubs, vanilla.state_dict())
    return vanilla, cubs


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=generator), torch.arange(6) % 5


def test_open_gates_start_at_sigmoid_of_the_gate_logit_everywhere():
    _, cubs = _pair("serial", 3.0)
    stats = gate_statistics(cubs, _batch()[0])
    assert list(stats) == STAGES
    for stage in STAGES:
        for kind in ("channel", "spatial"):
            # Behind a zero-init BN the block input is 0: Block 1's logit is its bias,
            # Block 2's a = sum softmax * ReLU(v bias) = v bias.
            assert stats[stage][kind]["mean"] == pytest.approx(1 / (1 + math.exp(-3.0)), abs=1e-6)
            assert stats[stage][kind]["std"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("placement, combine", [("serial", lambda a, b: a * b),
                                                ("reverse", lambda a, b: a * b),
                                                ("parallel", lambda a, b: a + b)])
@pytest.mark.parametrize("gate_logit", [3.0, 0.5])
def test_at_init_each_branch_gradient_is_vanillas_times_the_gates(placement, combine, gate_logit):
    # At init every residual branch outputs 0 (bn2's gamma is 0), so the CUBS network
    # computes what vanilla computes, and d y / d x = gate for y = x * gate(x) at x = 0:
    # the branch gradient is vanilla's scaled by gate1 * gate2 (serial, reverse) or
    # gate1 + gate2 (parallel). This is the slowdown the open-gate init removes.
    vanilla, cubs = _pair(placement, gate_logit)
    images, labels = _batch()
    reference, scaled = branch_grad_norms(vanilla, images, labels), branch_grad_norms(cubs, images, labels)
    gate = 1 / (1 + math.exp(-gate_logit))
    # Block 2's v bias is the gate logit but passes a ReLU: the same value when positive.
    for stage in STAGES:
        assert reference[stage] > 0
        assert scaled[stage] / reference[stage] == pytest.approx(combine(gate, gate), rel=1e-4), stage


def test_measuring_changes_neither_the_model_nor_the_rng():
    _, cubs = _pair("serial", 3.0)
    cubs.train()
    before = {k: v.clone() for k, v in cubs.state_dict().items()}
    images, labels = _batch()
    rng = torch.get_rng_state()
    result = diagnostics(cubs, images, labels)
    assert torch.equal(torch.get_rng_state(), rng)
    assert cubs.training and all(p.grad is None for p in cubs.parameters())
    for k, v in cubs.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running statistics included
    assert set(result) == {"branch_grad_norm", "gates"}


def test_vanilla_has_gradient_norms_and_no_gates():
    vanilla, _ = _pair("serial", 3.0)
    result = diagnostics(vanilla, *_batch())
    assert result["gates"] == {} and list(result["branch_grad_norm"]) == STAGES


def test_plus_models_also_log_every_blocks_gamma():
    torch.manual_seed(0)
    plus = cubs_resnet18(5, placement="serial", variant="plus", width=8, d=64)
    result = diagnostics(plus, *_batch())
    names = [f"{stage}.{block}.attention.{which}" for stage in STAGES for block in (0, 1)
             for which in ("first", "second")]
    assert list(result["gamma"]) == names and set(result["gamma"].values()) == {0.0}
    with torch.no_grad():
        plus.layer2[1].attention.second.gamma.fill_(0.25)
    # The logged value is the modulation's scale, tanh(gamma).
    assert diagnostics(plus, *_batch())["gamma"]["layer2.1.attention.second"] == pytest.approx(math.tanh(0.25))
    # At gamma = 0 every plus gate is exactly 1.
    assert all(s[kind] == {"mean": 1.0, "std": 0.0} for s in result["gates"].values() for kind in s)


def test_branch_gradient_norm_is_the_norm_of_the_mean_losss_gradient_over_each_stages_branches():
    vanilla, _ = _pair("serial", 3.0)
    with torch.no_grad():  # open branches, so that every conv and BN of a branch has a gradient
        for m in vanilla.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    images, labels = _batch()
    measured = branch_grad_norms(vanilla, images, labels)
    vanilla.train()
    torch.nn.functional.cross_entropy(vanilla(images), labels).backward()  # the batch's mean loss
    for stage in STAGES:
        branch = [p for name, p in getattr(vanilla, stage).named_parameters()
                  if name.split(".")[1] in ("conv1", "bn1", "conv2", "bn2")]
        assert len(branch) == 2 * 6  # two blocks of conv1, bn1 (2), conv2, bn2 (2)
        expected = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in branch))
        assert measured[stage] == pytest.approx(expected, rel=1e-6), stage


def test_gate_statistics_are_the_mean_and_sample_std_of_a_stages_gate_values():
    _, cubs = _pair("serial", 0.5)
    with torch.no_grad():  # gates that vary from channel to channel and image to image
        for m in cubs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
        for name, p in cubs.named_parameters():
            if ".attention." in name:
                p.add_(torch.randn_like(p) * 0.5)
    images = _batch()[0]
    stats = gate_statistics(cubs, images)
    inputs = {}
    blocks = {f"{stage}.{i}": getattr(cubs, stage)[i].attention.first for stage in STAGES for i in (0, 1)}
    hooks = [b.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
             for name, b in blocks.items()]
    with torch.no_grad():
        cubs.eval()(images)
        for h in hooks:
            h.remove()
        for stage in STAGES:  # serial: the first block of each pair is Block 1, the channel gate
            values = torch.cat([blocks[f"{stage}.{i}"].gate(inputs[f"{stage}.{i}"]).double().flatten()
                                for i in (0, 1)])
            assert values.numel() == 2 * 6 * getattr(cubs, stage)[0].conv2.out_channels
            assert stats[stage]["channel"]["mean"] == pytest.approx(values.mean().item(), rel=1e-5)
            # the sample std (n - 1): over 96-768 values it differs from the population std by 0.07-0.5 %
            assert stats[stage]["channel"]["std"] == pytest.approx(values.std().item(), rel=1e-5)
            assert values.std().item() > 0.01


def test_measuring_leaves_the_rng_as_it_was_when_the_training_forward_draws_from_it():
    # Training draws its dropout masks and augmentations from the global RNG: a measurement
    # whose train-mode forward pass draws too (here a dropout in every block) must not move it.
    torch.manual_seed(0)
    model = ResNet18(num_classes=5, width=8, attention=lambda channels: torch.nn.Dropout(0.5))
    images, labels = _batch()
    rng = torch.get_rng_state()
    result = diagnostics(model, images, labels)
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(result["branch_grad_norm"]) == STAGES and result["gates"] == {}
