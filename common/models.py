"""Backbones for Tiny ImageNet classification and metric-learning embeddings.

Shapes (B = batch):
  ResNet18, stem="cifar", 64x64 input:
    x           B x 3 x 64 x 64
    stem        B x w x 64 x 64          conv3x3/1, BN, ReLU, no max-pool
    layer1      B x w x 64 x 64          two BasicBlocks
    layer2      B x 2w x 32 x 32
    layer3      B x 4w x 16 x 16
    layer4      B x 8w x 8 x 8
    features()  B x 8w                   global average pool
    forward()   B x num_classes
  ResNet18, stem="imagenet", 224x224 input: conv7x7/2 + max-pool 3x3/2 give 56x56 at
    layer1, then 28, 14, 7. With width=64 and num_classes=1000 the state dict has exactly
    the names and shapes of torchvision.models.resnet18, so its weights load strictly.
  CustomCNN, 64x64 input: B x w x 64 x 64 -> 2w x 32 x 32 -> 4w x 16 x 16 -> 8w x 8 x 8,
    features() B x 8w, forward() B x num_classes.
  EmbeddingNet: B x 3 x H x W -> B x dim, each row of unit L2 norm.

w is the `width` argument (64 by default).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed by a BatchNorm whose shift makes it redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def _init_conv_and_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN [-attention] + shortcut, then ReLU.

    B x in_channels x H x W -> B x out_channels x H/stride x W/stride.
    The attention module (if any) acts on the residual branch only, after the second BN and
    before the addition, so the shortcut path stays an identity for gradient flow.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # ResNet18 sets it to a module; left None it is no submodule, so a vanilla block has
        # exactly torchvision's keys.
        self.attention: nn.Module | None = None
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                _conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.attention is not None:
            out = self.attention(out)
        return self.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 (layers [2, 2, 2, 2]) with an optional attention module in every block.

    stem="cifar" (default, for 64x64): conv3x3 stride 1 + BN + ReLU, no max-pool, so layer1
    runs at the full 64x64 and layer4 ends at 8x8. stem="imagenet" (for 224x224): conv7x7
    stride 2 + BN + ReLU + max-pool 3x3/2, as torchvision.
    attention(channels) is called once per BasicBlock (8 calls, after all other tensors are
    drawn) to build that block's module.
    zero_init_residual sets the last BN gamma of each residual branch to 0, so every block
    starts as an identity map; this helps when training from scratch.
    """

    def __init__(
        self,
        num_classes: int = 200,
        stem: str = "cifar",
        width: int = 64,
        attention: Callable[[int], nn.Module] | None = None,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if stem == "cifar":
            self.conv1 = _conv3x3(3, width)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

        widths = (width, 2 * width, 4 * width, 8 * width)
        in_channels = width
        for index, (channels, stride) in enumerate(zip(widths, (1, 2, 2, 2)), start=1):
            blocks = []
            for block_stride in (stride, 1):
                blocks.append(BasicBlock(in_channels, channels, block_stride))
                in_channels = channels
            setattr(self, f"layer{index}", nn.Sequential(*blocks))

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1]
        self.fc = nn.Linear(self.feature_dim, num_classes)

        # Only the ResNet's own convs/BNs: attention modules keep the init they chose.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                _init_conv_and_bn(m.conv1)
                _init_conv_and_bn(m.bn1)
                _init_conv_and_bn(m.conv2)
                _init_conv_and_bn(m.bn2)
                if m.downsample is not None:
                    _init_conv_and_bn(m.downsample)
                if zero_init_residual:
                    nn.init.zeros_(m.bn2.weight)
        _init_conv_and_bn(self.conv1)
        _init_conv_and_bn(self.bn1)

        # Attention modules are drawn last, after every ResNet tensor: at the same seed a
        # network with them starts from exactly the vanilla network's tensors, so T3 against
        # T2 is a paired comparison that differs only by what the attention does.
        if attention is not None:
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                for block in layer:
                    block.attention = attention(block.conv2.out_channels)

    def features(self, x: Tensor) -> Tensor:
        """B x 3 x H x W -> B x feature_dim (global-average-pooled, before fc)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        """B x 3 x H x W -> B x num_classes logits."""
        return self.fc(self.features(x))


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        _conv3x3(in_channels, out_channels, stride),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SqueezeExcitation(nn.Module):
    """Channel gate: x * sigmoid(MLP(avgpool(x))). B x C x H x W -> same shape."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s), inplace=True)))


class MixBlock(nn.Module):
    """A chain of 3x3 conv units whose outputs are all concatenated and fused by a 1x1 conv.

    x (B x in x H x W) -> u1 = unit1(x), u2 = unit2(u1), ..., un (each B x mid x H x W)
    -> concat[x, u1, ..., un] (B x (in + n*mid) x H x W) -> 1x1 conv + BN + ReLU
    -> squeeze-excitation gate -> B x out x H x W.

    The chain gives growing receptive fields (3, 5, 7 px for n=3) and the single fusion sees
    all of them at once, so the block picks its scale per channel. Concatenating x itself
    into the fusion gives every block a one-layer path from input to output, which is how
    this network stays trainable without residual additions.
    """

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, units: int = 3) -> None:
        super().__init__()
        self.units = nn.ModuleList(
            _conv_bn_relu(in_channels if i == 0 else mid_channels, mid_channels) for i in range(units)
        )
        self.fuse = nn.Sequential(
            _conv1x1(in_channels + units * mid_channels, out_channels),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.gate = SqueezeExcitation(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        outputs = [x]
        for unit in self.units:
            outputs.append(unit(outputs[-1]))
        return self.gate(self.fuse(torch.cat(outputs, dim=1)))


class CustomCNN(nn.Module):
    """Our own Tiny ImageNet network: a stem, then four stages of MixBlocks, no skip-adds.

    Layout for a 64x64 input; w = width (64 by default: 10.8M parameters, 1.8 GMACs):
      stem    conv3x3 3->w, BN, ReLU                                  B x w  x 64 x 64
      stage1  1 MixBlock(w -> w,   mid w/2)                           B x w  x 64 x 64
      down    conv3x3 stride 2 w->2w, BN, ReLU                        B x 2w x 32 x 32
      stage2  2 MixBlocks(2w -> 2w, mid w)                            B x 2w x 32 x 32
      down    conv3x3 stride 2 2w->4w                                 B x 4w x 16 x 16
      stage3  3 MixBlocks(4w -> 4w, mid 2w)                           B x 4w x 16 x 16
      down    conv3x3 stride 2 4w->8w                                 B x 8w x 8 x 8
      stage4  2 MixBlocks(8w -> 8w, mid 4w)                           B x 8w x 8 x 8
      head    global average pool (features(), B x 8w), dropout, linear -> num_classes

    Why this shape:
    - Downsampling 64 -> 32 -> 16 -> 8 (no stride in the stem, no max-pool): Tiny ImageNet
      objects are often a few pixels wide at 64x64, and an ImageNet-style 4x stem would
      leave 16x16 maps before any real feature extraction. Only one cheap block runs at
      64x64, where each MAC is 4x the cost of one at 32x32.
    - Depth goes where resolution is low (1, 2, 3, 2 blocks): stage 3 at 16x16 is where
      object parts meet whole objects for 64 px images, and it is cheap per layer.
      36 conv layers in the main path (52 with the two 1x1 convs of each squeeze-excitation
      gate, as the report counts), but the shortest input-to-output path is 12 because
      every MixBlock concatenates its input into its fusion.
    - Widths double when resolution halves (w, 2w, 4w, 8w) so every stage costs about the
      same; the chain width is half the stage width so the concatenation is 2.5x the stage
      width and the 1x1 fusion stays cheap.
    - Regularisation: BatchNorm everywhere, squeeze-excitation (a data-dependent channel
      gate, cheap at these widths), dropout before the classifier; augmentation and weight
      decay belong to the training script.
    - Plain dense 3x3 convs rather than depthwise ones: at these widths they are fast on
      GPU (cuDNN), whereas many tiny depthwise ops are memory-bound.
    """

    def __init__(self, num_classes: int = 200, width: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        w = width
        self.stem = _conv_bn_relu(3, w)
        self.stage1 = nn.Sequential(MixBlock(w, w, w // 2))
        self.down2 = _conv_bn_relu(w, 2 * w, stride=2)
        self.stage2 = nn.Sequential(*(MixBlock(2 * w, 2 * w, w) for _ in range(2)))
        self.down3 = _conv_bn_relu(2 * w, 4 * w, stride=2)
        self.stage3 = nn.Sequential(*(MixBlock(4 * w, 4 * w, 2 * w) for _ in range(3)))
        self.down4 = _conv_bn_relu(4 * w, 8 * w, stride=2)
        self.stage4 = nn.Sequential(*(MixBlock(8 * w, 8 * w, 4 * w) for _ in range(2)))
        self.feature_dim = 8 * w
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        _init_conv_and_bn(self)
        for m in self.modules():
            if isinstance(m, SqueezeExcitation):
                # Every gate starts open, at sigmoid(3) = 0.95 for every channel. With fan-out
                # Kaiming weights the gate logits start at several units and switch random
                # channels off before training has seen an image; gates at 0.5 halve every
                # block. Both learned slower in our smoke runs (2-core VM; too noisy to
                # quote, README "T1" says why).
                nn.init.zeros_(m.expand.weight)
                nn.init.constant_(m.expand.bias, 3.0)

    def features(self, x: Tensor) -> Tensor:
        """B x 3 x H x W -> B x feature_dim (global-average-pooled, before dropout and fc)."""
        x = self.stage1(self.stem(x))
        x = self.stage2(self.down2(x))
        x = self.stage3(self.down3(x))
        x = self.stage4(self.down4(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        """B x 3 x H x W -> B x num_classes logits."""
        return self.fc(self.dropout(self.features(x)))


class EmbeddingNet(nn.Module):
    """backbone.features (B x feature_dim) -> linear -> L2 normalisation: B x dim.

    The backbone's fc is not used: it receives no gradient through this path (a trainer under
    DDP freezes it, so that DDP does not wait for its gradients).
    """

    def __init__(self, backbone: nn.Module, dim: int = 512) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Linear(backbone.feature_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """B x 3 x H x W -> B x dim, unit L2 norm per row."""
        return F.normalize(self.projection(self.backbone.features(x)), dim=1)
