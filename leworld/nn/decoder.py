"""A pixel decoder for one latent vector: what a JEPA world model imagines, drawn. It is trained
after the world model on its frozen latents (leworld/decode.py) and never touches its training."""

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class FrameDecoder(nn.Module):
    """Latent (N, D) -> frame (N, 3, S, S) in [0, 1]: a linear map to a 4 x 4 grid of widths[0]
    channels, then for each width a 2x nearest upsampling and a 3 x 3 convolution (GroupNorm, GELU),
    a last 3 x 3 convolution to RGB logits, resized to S if the upsamplings do not land on it. The
    logits are added to those of the mean training frame (`mean`, set before training) and the last
    convolution starts at zero: it starts by drawing the mean frame and learns what differs from it,
    which is most of what a small agent on a fixed background is."""

    def __init__(self, latent_dim: int, image_size: int, widths: list[int]):
        super().__init__()
        self.register_buffer("mean", torch.full((3, image_size, image_size), 0.5))  # (3, S, S) in (0, 1)
        self.image_size, self.width = image_size, widths[0]
        self.start = nn.Linear(latent_dim, widths[0] * 16)
        blocks = []
        for c_in, c_out in zip(widths, [*widths[1:], widths[-1]]):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                       nn.GroupNorm(min(8, c_out), c_out), nn.GELU()]
        self.body = nn.Sequential(*blocks)
        self.out = nn.Conv2d(widths[-1], 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: Tensor) -> Tensor:
        x = rearrange(self.start(z), "n (c h w) -> n c h w", c=self.width, h=4, w=4)
        x = self.out(self.body(x))  # (N, 3, 4·2^len(widths), same)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return torch.sigmoid(torch.logit(self.mean.clamp(1e-3, 1 - 1e-3)) + x)

    @torch.no_grad()
    def draw(self, latents: Tensor) -> np.ndarray:
        """Latents (N, D) -> frames (N, S, S, 3) uint8."""
        frames = self(latents.float()).clamp(0, 1).mul(255).round().byte().cpu()
        return rearrange(frames, "n c h w -> n h w c").numpy()
