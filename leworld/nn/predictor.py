"""Action-conditioned causal transformer over time: LeWM's predictor.

Each frame's latent is a token. Every block attends causally (a frame sees itself and the frames
before it) and is modulated by the embedding of the action that follows its frame, by AdaLN-zero:
the action sets a shift, a scale and a gate for both the attention and the MLP, and the layer that
makes them starts at zero, so that at initialisation every block is the identity.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from leworld import LeworldError


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise LeworldError(f"predictor width {width} is not divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, W)
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class ConditionedBlock(nn.Module):
    """Pre-norm transformer block; the norms' shift and scale, and the residual gates, come from the
    conditioning (the action embedding)."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_hidden, width), nn.Dropout(dropout))
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)  # AdaLN-zero: gates start at 0, the block at identity
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:  # x, condition (B, T, W)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(condition)).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class Predictor(nn.Module):
    """Latents (B, T, D) and action embeddings (B, T, W) -> features (B, T, W) of the next latents,
    T up to `max_len` (the history)."""

    def __init__(self, latent_dim: int, width: int, depth: int, heads: int, mlp_hidden: int, max_len: int,
                 dropout: float = 0.1):
        super().__init__()
        self.max_len = max_len
        self.input = nn.Linear(latent_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, width))  # learned, one per position in time
        self.blocks = nn.ModuleList(ConditionedBlock(width, heads, mlp_hidden, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, latents: Tensor, actions: Tensor) -> Tensor:
        steps = latents.shape[1]
        if steps > self.max_len:
            raise LeworldError(f"the predictor takes at most {self.max_len} frames at once, got {steps}")
        x = self.input(latents) + self.pos_embed[:, :steps]
        for block in self.blocks:
            x = block(x, actions)
        return self.norm(x)
