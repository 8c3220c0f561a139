"""What every encoder does to frames before its first layer: uint8 to float, resized to the size it
was built for, standardised with ImageNet's statistics (what pretrained ViTs such as DINOv2 expect)."""

import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float(images: Tensor) -> Tensor:
    """uint8 images (..., 3, H, W) -> float in [0, 1]."""
    return images.float() / 255.0


def normalize(images: Tensor) -> Tensor:
    """Float images in [0, 1] (..., 3, H, W) -> standardised with the ImageNet statistics."""
    mean = images.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = images.new_tensor(IMAGENET_STD)[:, None, None]
    return (images - mean) / std


def resize(images: Tensor, size: int) -> Tensor:
    """Float images (B, 3, H, W) -> (B, 3, size, size), antialiased."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
