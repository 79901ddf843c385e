"""Shapes, torchvision compatibility and interfaces of common/models.py."""

import pytest
import torch
import torch.nn.functional as F
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


def _reference_custom_cnn_parameters(num_classes: int, w: int) -> int:
    """The class docstring's layout, counted by hand: 3x3 convs without bias, BN (2 per
    channel), 1x1 fusions, squeeze-excitation MLPs (hidden max(c // 4, 8), with biases)."""
    def conv_bn_relu(i, o):
        return 9 * i * o + 2 * o

    def gate(c):
        h = max(c // 4, 8)
        return c * h + h + h * c + c

    def mix(i, o, m, units=3):
        return conv_bn_relu(i, m) + (units - 1) * conv_bn_relu(m, m) + (i + units * m) * o + 2 * o + gate(o)

    return (conv_bn_relu(3, w) + mix(w, w, w // 2)
            + conv_bn_relu(w, 2 * w) + 2 * mix(2 * w, 2 * w, w)
            + conv_bn_relu(2 * w, 4 * w) + 3 * mix(4 * w, 4 * w, 2 * w)
            + conv_bn_relu(4 * w, 8 * w) + 2 * mix(8 * w, 8 * w, 4 * w)
            + 8 * w * num_classes + num_classes)


@pytest.mark.parametrize("width", [16, 64])
def test_custom_cnn_has_the_documented_layout_and_parameter_count(width):
    # 1, 2, 3, 2 MixBlocks of 3 units; 36 main-path convs, 52 with the gates' (the report's);
    # 10.8M parameters at width 64 (the docstring, the report).
    model = CustomCNN(num_classes=200, width=width)
    assert [len(getattr(model, f"stage{i}")) for i in (1, 2, 3, 4)] == [1, 2, 3, 2]
    assert all(len(m.units) == 3 for m in model.modules() if isinstance(m, MixBlock))
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 52 and len([n for n in convs if ".gate." not in n]) == 36
    assert count_parameters(model) == _reference_custom_cnn_parameters(200, width)
    if width == 64:
        assert round(count_parameters(model) / 1e6, 1) == 10.8


def test_mixblock_computes_relu_bn_fusion_of_every_unit_then_the_gate():
    # A functional re-implementation from the block's own tensors, in eval mode with non-trivial
    # BatchNorm statistics: each unit is conv-BN-ReLU on the previous unit's output, the fusion
    # is a ReLU'd 1x1 conv + BN of [x, u1, u2, u3], the gate an average-pool squeeze-excitation.
    torch.manual_seed(0)
    block = MixBlock(4, 6, 3, units=3)
    _randomise_batchnorm(block)
    with torch.no_grad():
        block.gate.expand.weight.normal_()  # a gate that depends on its input
    block.eval()

    def bn(m, x):
        return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, training=False, eps=m.eps)

    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        outputs = [x]
        for unit in block.units:
            outputs.append(F.relu(bn(unit[1], F.conv2d(outputs[-1], unit[0].weight, padding=1))))
        fused = F.relu(bn(block.fuse[1], F.conv2d(torch.cat(outputs, 1), block.fuse[0].weight)))
        gate = block.gate
        squeeze = fused.mean((2, 3), keepdim=True)
        expected = fused * torch.sigmoid(F.conv2d(F.relu(F.conv2d(squeeze, gate.reduce.weight, gate.reduce.bias)),
                                                  gate.expand.weight, gate.expand.bias))
        torch.testing.assert_close(block(x), expected)


def test_cifar_stem_resnet18_is_torchvisions_with_a_3x3_stride_1_stem_and_no_maxpool():
    # T2's network: torchvision's ResNet-18 with conv1 = 3x3/1 and the max-pool removed. Same
    # weights give the same logits, so every block (strides, shortcuts, BN placement) and the
    # head match torchvision's with the CIFAR-style stem too, not only with the ImageNet one.
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None, num_classes=10)
    reference.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    _randomise_batchnorm(reference)
    model = ResNet18(num_classes=10, stem="cifar")
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))
        torch.testing.assert_close(model.features(x), torch.flatten(
            reference.avgpool(reference.layer4(reference.layer3(reference.layer2(reference.layer1(
                reference.relu(reference.bn1(reference.conv1(x)))))))), 1))


def test_custom_cnn_features_are_stage4s_spatial_mean_and_logits_their_linear_map():
    torch.manual_seed(0)
    model = CustomCNN(num_classes=5, width=8)
    _randomise_batchnorm(model)
    model.eval()
    stage4 = []
    hook = model.stage4.register_forward_hook(lambda _m, _i, out: stage4.append(out))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = model.features(x)
        hook.remove()
        torch.testing.assert_close(features, stage4[0].mean((2, 3)))  # global average, not max, pooling
        torch.testing.assert_close(model(x), F.linear(features, model.fc.weight, model.fc.bias))
