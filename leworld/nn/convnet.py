"""ResNet-style convolutional backbone: a stem, stages of basic residual blocks, and a head that pools
the last feature map into one vector (its average, keypoints, or the small map itself)."""

import torch
import torch.nn.functional as F
from einops import rearrange
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


STEMS = ("imagenet", "stride2", "small")
HEADS = ("average", "keypoints", "flatten")


def coordinate_channels(images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C + 2, H, W): each pixel's x and y in [-1, 1] appended (CoordConv), so that
    convolutions, which see the same thing everywhere, can tell where in the frame it is."""
    b, _, height, width = images.shape
    y, x = torch.meshgrid(torch.linspace(-1, 1, height, device=images.device, dtype=images.dtype),
                          torch.linspace(-1, 1, width, device=images.device, dtype=images.dtype), indexing="ij")
    grid = torch.stack([x, y]).expand(b, 2, height, width)
    return torch.cat([images, grid], dim=1)


class SpatialSoftmax(nn.Module):
    """Feature map (B, C, H, W) -> keypoints (B, 2K): K attention maps (a 1x1 convolution, softmax over
    the positions) and each one's expected x and y in [-1, 1]. Diffusion Policy's PushT encoder ends
    this way: a position read as a weighted mean is finer than the map's cells."""

    def __init__(self, in_width: int, keypoints: int):
        super().__init__()
        self.attention = nn.Conv2d(in_width, keypoints, 1)

    def forward(self, features: Tensor) -> Tensor:
        _, _, height, width = features.shape
        weights = rearrange(self.attention(features), "b k h w -> b k (h w)").softmax(-1)
        y, x = torch.meshgrid(torch.linspace(-1, 1, height, device=features.device, dtype=features.dtype),
                              torch.linspace(-1, 1, width, device=features.device, dtype=features.dtype), indexing="ij")
        positions = torch.stack([x.flatten(), y.flatten()], dim=-1)  # (H·W, 2)
        return rearrange(weights @ positions, "b k xy -> b (k xy)")


class ConvNet(nn.Module):
    """Images (B, C, H, W) -> feature (B, feature_dim). Defaults are ResNet-18.

    stem: "imagenet" is ResNet's 7x7 stride-2 convolution and max-pool (for 128-224 px: it leaves a
    quarter of the side); "stride2" one 3x3 stride-2 convolution (half the side, as TD-MPC2's and DrQ's
    encoders start); "small" one 3x3 stride-1 convolution (the whole image, 4x stride2's cost).
    head: "average" pools the last map globally (what the map holds, not where); "keypoints" reads
    `keypoints` spatial-softmax positions from it; "flatten" keeps the map itself, average-pooled to
    grid x grid. coords: append pixel coordinates to the input (CoordConv).
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        stem: str = "imagenet",
        head: str = "average",
        keypoints: int = 32,
        grid: int = 4,
        coords: bool = False,
        in_channels: int = 3,
    ):
        super().__init__()
        if len(widths) != len(depths):
            raise LeworldError(f"convnet widths {list(widths)} and depths {list(depths)} differ in length")
        if stem not in STEMS or head not in HEADS:
            raise LeworldError(f"convnet stem={stem!r}, head={head!r}: the stem is one of {', '.join(STEMS)} and the "
                               f"head one of {', '.join(HEADS)}")
        self.coords = coords
        in_channels += 2 if coords else 0
        stem_conv = {"imagenet": (7, 2, 3), "stride2": (3, 2, 1), "small": (3, 1, 1)}[stem]  # kernel, stride, padding
        layers = [nn.Conv2d(in_channels, widths[0], *stem_conv, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        if stem == "imagenet":
            layers.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*layers)
        blocks, in_width = [], widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                blocks.append(BasicBlock(in_width, width, stride=2 if stage > 0 and i == 0 else 1))
                in_width = width
        self.blocks = nn.Sequential(*blocks)
        self.head, self.grid = head, grid
        self.keypoints = SpatialSoftmax(widths[-1], keypoints) if head == "keypoints" else None
        self.feature_dim = {"average": widths[-1], "keypoints": 2 * keypoints, "flatten": widths[-1] * grid * grid}[head]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> Tensor:
        if self.coords:
            images = coordinate_channels(images)
        # channels-last (NHWC) activations: oneDNN's convolutions and max-pool run 1.3x faster on
        # them at the CPU preset. Frames from leworld's (H, W, 3) datasets and envs already are;
        # this keeps any other caller's (B, 3, H, W) input on the fast path.
        features = self.blocks(self.stem(images.contiguous(memory_format=torch.channels_last)))  # (B, C, h, w)
        if self.head == "keypoints":
            return self.keypoints(features)  # (B, 2K)
        if self.head == "flatten":
            return rearrange(F.adaptive_avg_pool2d(features, self.grid), "b c h w -> b (c h w)")
        return features.mean((-2, -1))  # global average pool: (B, widths[-1])
