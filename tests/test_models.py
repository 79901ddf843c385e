"""Shapes, torchvision compatibility and interfaces of common/models.py."""

import pytest
import torch
import torchvision
from torch import nn

from common.models import (BasicBlock, CustomCNN, EmbeddingNet, MixBlock, ResNet18, SqueezeExcitation,
                           count_parameters)


def _stage_shapes(model: nn.Module, stage_names: list[str], x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []
    hooks = [
        getattr(model, name).register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        for name in stage_names
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


RESNET_STAGES = ["layer1", "layer2", "layer3", "layer4"]


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    # Default BN (mean 0, var 1, gamma 1, beta 0) would hide mismatched BN parameters.
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)


@pytest.mark.parametrize("stem, width, classes, size, stages", [
    ("cifar", 64, 200, 64, [(64, 64), (128, 32), (256, 16), (512, 8)]),       # Tiny ImageNet
    ("imagenet", 16, 1000, 224, [(16, 56), (32, 28), (64, 14), (128, 7)]),    # T4, 224 px
])
def test_resnet18_stage_shapes(stem, width, classes, size, stages):
    model = ResNet18(num_classes=classes, stem=stem, width=width)
    x = torch.randn(1, 3, size, size)
    assert _stage_shapes(model, RESNET_STAGES, x) == [(1, c, hw, hw) for c, hw in stages]
    with torch.no_grad():
        assert model.features(x).shape == (1, 8 * width)
        assert model(x).shape == (1, classes)
    assert model.feature_dim == 8 * width == model.fc.in_features


def test_state_dict_names_and_shapes_match_torchvision():
    ours = {k: tuple(v.shape) for k, v in ResNet18(num_classes=1000, stem="imagenet").state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    assert ours == theirs


def test_torchvision_weights_load_strictly_and_give_identical_logits():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    _randomise_batchnorm(reference)
    model = ResNet18(num_classes=1000, stem="imagenet")
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.eval()(x)
        actual = model.eval()(x)
    assert torch.equal(actual, expected)


def test_zero_init_residual_flag_sets_last_bn_gamma_of_each_branch():
    for flag, value in ((True, 0.0), (False, 1.0)):
        blocks = [m for m in ResNet18(width=8, zero_init_residual=flag).modules() if isinstance(m, BasicBlock)]
        assert len(blocks) == 8
        for block in blocks:
            assert torch.all(block.bn2.weight == value)
            assert torch.all(block.bn1.weight == 1.0)


def test_attention_factory_is_called_per_block_and_acts_before_the_addition():
    calls = []

    def zero_attention(channels: int) -> nn.Module:
        calls.append(channels)
        return _Scale(0.0)

    model = ResNet18(width=8, attention=zero_attention, zero_init_residual=False).eval()
    assert calls == [8, 8, 16, 16, 32, 32, 64, 64]
    # A zeroed residual branch leaves relu(shortcut): the identity for a post-ReLU input.
    block = model.layer1[1]
    x = torch.rand(2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    assert any(k.endswith("attention.scale") for k in model.state_dict())
    assert not any("attention" in k for k in ResNet18(width=8).state_dict())


class _Scale(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_unknown_stem_is_rejected():
    with pytest.raises(ValueError, match="cifar"):
        ResNet18(stem="vgg")


def test_custom_cnn_stage_shapes_and_outputs():
    model = CustomCNN(num_classes=200, width=16)
    x = torch.randn(1, 3, 64, 64)
    assert _stage_shapes(model, ["stem", "stage1", "stage2", "stage3", "stage4"], x) == [
        (1, 16, 64, 64),
        (1, 16, 64, 64),
        (1, 32, 32, 32),
        (1, 64, 16, 16),
        (1, 128, 8, 8),
    ]
    with torch.no_grad():
        assert model.features(x).shape == (1, model.feature_dim) == (1, 128)
        assert model(x).shape == (1, 200)


def test_custom_cnn_parameter_count_in_intended_range():
    count = sum(p.numel() for p in CustomCNN(num_classes=200).parameters())
    assert 5_000_000 <= count <= 20_000_000, count


def test_custom_cnn_is_not_a_resnet():
    model = CustomCNN(width=16)
    resnet_blocks = (BasicBlock, torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
    assert not any(isinstance(m, resnet_blocks) for m in model.modules())


@pytest.mark.parametrize("backbone", [ResNet18(width=8), CustomCNN(width=16)], ids=["resnet18", "custom"])
def test_embedding_net_rows_have_unit_norm(backbone):
    torch.manual_seed(0)
    net = EmbeddingNet(backbone, dim=32)
    x = torch.randn(3, 3, 32, 32)
    embedding = net(x)
    assert embedding.shape == (3, 32)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(3), rtol=0, atol=1e-6)
    embedding.sum().backward()
    assert backbone.fc.weight.grad is None  # the classifier is not part of the embedding


@pytest.mark.parametrize("build", [lambda: ResNet18(width=64), lambda: ResNet18(stem="imagenet", width=64),
                                   lambda: CustomCNN(width=32)], ids=["resnet18-cifar", "resnet18-imagenet", "custom"])
def test_convs_start_with_kaiming_fan_out_weights_and_zero_biases(build):
    # torchvision's ResNet init: std sqrt(2 / (out_channels * kh * kw)), biases 0. PyTorch's
    # default would give the stem's 3 -> 64 conv about 1.9x that std, fan-in 4.6x.
    # CustomCNN's gate expansions are set apart (the next test).
    torch.manual_seed(0)
    for name, m in build().named_modules():
        if isinstance(m, nn.Conv2d) and not name.endswith("gate.expand"):
            out_channels, _, kh, kw = m.weight.shape
            expected = (2 / (out_channels * kh * kw)) ** 0.5
            # 5 standard errors of a sample std (1 / sqrt(2n)), at least 10 %
            tolerance = max(0.1, 5 / (2 * m.weight.numel()) ** 0.5)
            assert m.weight.std().item() == pytest.approx(expected, rel=tolerance), name
            if m.bias is not None:
                assert not m.bias.any(), name


def test_custom_cnn_gates_start_open_at_sigmoid_3_and_gate_with_a_sigmoid():
    torch.manual_seed(0)
    model = CustomCNN(num_classes=5, width=8)
    gates = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    assert len(gates) == 8
    for gate in gates:
        assert not gate.expand.weight.any() and (gate.expand.bias == 3.0).all()
    x = torch.randn(2, 8, 4, 4)
    gate = SqueezeExcitation(8)
    with torch.no_grad():
        gate.expand.bias.fill_(-3.0)  # tanh would turn these gates negative
        expected = x * torch.sigmoid(gate.expand(torch.relu(gate.reduce(x.mean((2, 3), keepdim=True)))))
        torch.testing.assert_close(gate(x), expected)
        assert ((gate(x) / x) > 0).all()
        torch.testing.assert_close(gates[0](x), x * torch.sigmoid(torch.tensor(3.0)))


def test_custom_cnn_applies_its_dropout_in_training_only():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = CustomCNN(num_classes=5, width=8, dropout=1.0).train()
    with torch.no_grad():  # every feature dropped: the logits are the classifier's bias
        torch.testing.assert_close(model(x), model.fc.bias.expand(2, 5))
        assert not torch.allclose(model.eval()(x), model.fc.bias.expand(2, 5))


def test_every_mixblock_unit_reaches_the_fusion():
    torch.manual_seed(0)
    block = MixBlock(4, 4, 2, units=3)
    block(torch.randn(2, 4, 8, 8)).square().sum().backward()
    for i, unit in enumerate(block.units):
        assert unit[0].weight.grad.abs().sum() > 0, f"unit {i} gets no gradient"
    assert block.fuse[0].weight.shape[1] == 4 + 3 * 2  # the input and every unit's output


def test_count_parameters_counts_frozen_ones_too():
    # T4's Phase B freezes the classifier it does not use; results.json's size is the network's.
    net = EmbeddingNet(ResNet18(5, width=8), dim=16)
    net.backbone.fc.requires_grad_(False)
    assert count_parameters(net) == sum(p.numel() for p in net.parameters()) == (
        sum(p.numel() for p in ResNet18(5, width=8).parameters()) + 64 * 16 + 16)
