"""Batched multi-crop augmentations on tensors, on CPU or GPU (torchvision has no CPU build here).

Every function takes a batch of float images (B, 3, H, W) in [0, 1] and draws one random setting
per image from the generator it is given, so a whole batch is augmented by a few tensor ops.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from leworld.nn.preprocess import normalize, to_float

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as in torchvision's grayscale


def _uniform(low: float, high: float, n: int, g: torch.Generator, device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def _chance(p: float, n: int, g: torch.Generator, device) -> Tensor:
    """(n, 1, 1, 1) boolean mask, true with probability p."""
    return (torch.rand(n, generator=g, device=device) < p)[:, None, None, None]


def random_resized_crop(
    images: Tensor, size: int, scale: tuple[float, float], g: torch.Generator, flip: float = 0.5,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """One random crop per image (area fraction in `scale`, aspect in `ratio`), resized to size² and
    mirrored with probability `flip`: one affine grid sample for the whole batch."""
    b, _, height, width = images.shape
    device = images.device
    area = _uniform(*scale, b, g, device)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), b, g, device))
    # crop width and height as fractions of the image's (a crop larger than the image is clipped)
    crop_w = torch.sqrt(area * aspect * height / width).clamp(max=1.0)
    crop_h = torch.sqrt(area / aspect * width / height).clamp(max=1.0)
    # in grid_sample's [-1, 1] coordinates a crop of fraction f spans 2f, so its centre lies in ±(1 - f)
    center_x = (torch.rand(b, generator=g, device=device) * 2 - 1) * (1 - crop_w)
    center_y = (torch.rand(b, generator=g, device=device) * 2 - 1) * (1 - crop_h)
    mirror = torch.where(torch.rand(b, generator=g, device=device) < flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = crop_w * mirror
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def grayscale(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> luma repeated on three channels."""
    luma = torch.einsum("bchw,c->bhw", images, images.new_tensor(LUMA))
    return luma[:, None].expand_as(images)


def _rotate_hue(images: Tensor, turns: Tensor) -> Tensor:
    """Hue shift by `turns` (B,) of a full turn, as a rotation of the chroma plane of YIQ.

    Close to torchvision's HSV hue shift for the small shifts used here (±0.1), and a 3x3 matrix per
    image instead of an HSV round trip.
    """
    to_yiq = images.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    angle = 2 * math.pi * turns
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(turns), 3, 3, device=images.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq  # (B, 3, 3), acting on RGB
    return torch.einsum("bij,bjhw->bihw", matrix, images)


def color_jitter(
    images: Tensor, g: torch.Generator, brightness: float, contrast: float, saturation: float, hue: float
) -> Tensor:
    """torchvision's ColorJitter, batched: four adjustments in a random order (one order per batch)."""
    b, device = len(images), images.device
    factor = lambda strength: _uniform(1 - strength, 1 + strength, b, g, device)[:, None, None, None]

    def adjust_brightness(x):
        return x * factor(brightness)

    def adjust_contrast(x):
        mean = grayscale(x).mean((1, 2, 3), keepdim=True)
        return mean + factor(contrast) * (x - mean)

    def adjust_saturation(x):
        gray = grayscale(x)
        return gray + factor(saturation) * (x - gray)

    def adjust_hue(x):
        return _rotate_hue(x, _uniform(-hue, hue, b, g, device))

    adjustments = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    for i in torch.randperm(4, generator=g, device=device).tolist():
        images = adjustments[i](images).clamp(0, 1)
    return images


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image with its own sigma (B,) in pixels: a separable convolution grouped by image."""
    b, c, height, width = images.shape
    radius = max(1, min(int(math.ceil(3 * float(sigma.max()))), (min(height, width) - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))  # (B, K)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B·C, K): one per image channel
    x = rearrange(images, "b c h w -> 1 (b c) h w")
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return rearrange(x, "1 (b c) h w -> b c h w", b=b)


class MultiCrop:
    """LeJEPA's views of a batch: `global_views` large crops and `local_views` small crops, each with
    flip, colour jitter, grayscale, blur and solarize, normalised for the backbone.

    cfg (configs/pretrain.yaml `views` and `augment`):
        views.global: {count, size, scale}; views.local: {count, size, scale}
        augment: {flip, jitter: {p, brightness, contrast, saturation, hue}, grayscale, blur: {p, sigma},
                  solarize}; blur sigma is given for a 224-px view and scales with the view size.
    """

    def __init__(self, views, augment):
        self.views, self.augment = views, augment

    def view(self, images: Tensor, size: int, scale, g: torch.Generator) -> Tensor:
        aug, b, device = self.augment, len(images), images.device
        x = random_resized_crop(images, size, tuple(scale), g, flip=aug.flip)
        jittered = color_jitter(x, g, aug.jitter.brightness, aug.jitter.contrast, aug.jitter.saturation, aug.jitter.hue)
        x = torch.where(_chance(aug.jitter.p, b, g, device), jittered, x)
        x = torch.where(_chance(aug.grayscale, b, g, device), grayscale(x), x)
        sigma = _uniform(*aug.blur.sigma, b, g, device) * size / 224
        x = torch.where(_chance(aug.blur.p, b, g, device), gaussian_blur(x, sigma), x)
        x = torch.where(_chance(aug.solarize, b, g, device) & (x >= 0.5), 1 - x, x)
        return normalize(x)

    def __call__(self, images: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """uint8 images (B, 3, H, W) -> global views (Vg, B, 3, G, G) and local views (Vl, B, 3, L, L)
        (None when there are no local views)."""
        x = to_float(images)
        spec_g, spec_l = self.views["global"], self.views["local"]
        global_views = torch.stack([self.view(x, spec_g.size, spec_g.scale, g) for _ in range(spec_g.count)])
        if spec_l.count == 0:
            return global_views, None
        local_views = torch.stack([self.view(x, spec_l.size, spec_l.scale, g) for _ in range(spec_l.count)])
        return global_views, local_views


def shift_clips(clips: Tensor, pad: int, g: torch.Generator | None = None) -> Tensor:
    """DrQ's random shift, one per clip: each clip (B, T, C, H, W) moved by up to `pad` pixels in x and
    y, the edge pixels repeated where the frame slides in (what padding by `pad` and cropping back does).
    Every frame of a clip moves alike, so the motion between its frames is the clip's own. Any dtype:
    it only indexes."""
    b, _, _, height, width = clips.shape
    dy, dx = (torch.randint(-pad, pad + 1, (2, b, 1), generator=g, device=clips.device))
    rows = (torch.arange(height, device=clips.device) + dy).clamp(0, height - 1)  # (B, H)
    cols = (torch.arange(width, device=clips.device) + dx).clamp(0, width - 1)  # (B, W)
    batch = torch.arange(b, device=clips.device)[:, None, None]
    shifted = clips[batch, :, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: (B, H, W, T, C)
    return rearrange(shifted, "b h w t c -> b t c h w")
