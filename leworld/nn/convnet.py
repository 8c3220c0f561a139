"""ResNet-style convolutional backbone: a stem, stages of basic residual blocks, global pooling."""

import torch
from torch import Tensor, nn

from leworld import LeworldError


class BasicBlock(nn.Module):
    def __init__(self, in_width: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = nn.Identity()
        if stride != 1 or in_width != width:
            self.shortcut = nn.Sequential(nn.Conv2d(in_width, width, 1, stride, bias=False), nn.BatchNorm2d(width))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ConvNet(nn.Module):
    """Images (B, C, H, W) -> pooled feature (B, widths[-1]). Defaults are ResNet-18.

    stem="imagenet" is the 7x7 stride-2 convolution and max-pool of ResNet (for 128-224 px);
    stem="small" is one 3x3 stride-1 convolution (for 32-96 px, where ResNet's stem would throw
    away most of the image).
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        stem: str = "imagenet",
        in_channels: int = 3,
    ):
        super().__init__()
        if len(widths) != len(depths):
            raise LeworldError(f"convnet widths {list(widths)} and depths {list(depths)} differ in length")
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        elif stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
            )
        else:
            raise LeworldError(f"convnet stem={stem!r} is unknown; use imagenet or small")
        blocks, in_width = [], widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                blocks.append(BasicBlock(in_width, width, stride=2 if stage > 0 and i == 0 else 1))
                in_width = width
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> Tensor:
        # channels-last (NHWC) activations: oneDNN's convolutions and max-pool run 1.3x faster on
        # them at the CPU preset. Frames from leworld's (H, W, 3) datasets and envs already are;
        # this keeps any other caller's (B, 3, H, W) input on the fast path.
        images = images.contiguous(memory_format=torch.channels_last)
        return self.blocks(self.stem(images)).mean((-2, -1))  # global average pool: (B, widths[-1])
