"""Vision Transformer with a CLS token.

Parameter names follow the DINOv2 / timm layout (cls_token, pos_embed, blocks.i.attn.qkv,
blocks.i.ls1.gamma, register_tokens, ...), so pretrained weights in that format map onto it by
name. Position embeddings are learned for `image_size` and interpolated for any other size
(multi-crop views, other resolutions). DINOv2's options are here too: layer scale (a learned
per-channel factor on each residual branch) and register tokens (extra learned tokens after the
CLS token, without position embedding, dropped from the output).
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from leworld import LeworldError


class Attention(nn.Module):
    """Multi-head self-attention; heads of dim / heads channels unless `head_dim` sets their width."""

    def __init__(self, dim: int, heads: int, head_dim: int | None = None):
        super().__init__()
        if head_dim is None and dim % heads:
            raise LeworldError(f"ViT width {dim} is not divisible by heads={heads}")
        inner = heads * (head_dim or dim // heads)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # x (B, L, dim); mask (L, L), True: may attend
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, L, dim / heads)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block, with layer scale when `layer_scale` (its initial value) is set."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, layer_scale: float | None = None,
                 head_dim: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, head_dim)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Images (B, C, H, W) -> CLS feature (B, dim). Defaults are ViT-Tiny/14 at 224 px."""

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 14,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        in_channels: int = 3,
        layer_scale: float | None = None,
        registers: int = 0,
        eps: float = 1e-6,  # the LayerNorms' (DINOv2's; Hugging Face's ViT uses 1e-12)
    ):
        super().__init__()
        if image_size % patch_size:
            raise LeworldError(f"ViT image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.feature_dim = dim
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))  # CLS first, then patches
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, layer_scale, eps=eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if registers:
            nn.init.trunc_normal_(self.register_tokens, std=0.02)

    def position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """(1, 1 + grid_h·grid_w, dim): the learned table, bicubically resized for another grid."""
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = rearrange(patch_pos, "1 (h w) d -> 1 d h w", h=self.grid)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, rearrange(patch_pos, "1 d h w -> 1 (h w) d")], dim=1)

    def forward_tokens(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1 + P, dim), CLS first (registers dropped)."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise LeworldError(f"image size {height}x{width} is not a multiple of the ViT patch size {self.patch_size}")
        patches = self.patch_embed(images)  # (B, dim, H/p, W/p)
        grid_h, grid_w = patches.shape[-2:]
        x = rearrange(patches, "b d h w -> b (h w) d")
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.position_embedding(grid_h, grid_w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x if self.register_tokens is None else torch.cat([x[:, :1], x[:, 1 + self.register_tokens.shape[1]:]], 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_tokens(images)[:, 0]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
