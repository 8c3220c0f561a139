"""Action-conditioned causal transformer over time: LeWM's predictor.

Each frame's latent is a token. Every block attends causally (a frame sees itself and the frames
before it) and is modulated by the embedding of the action that follows its frame, by AdaLN-zero:
the action sets a shift, a scale and a gate for both the attention and the MLP, and the layer that
makes them starts at zero, so that at initialisation every block is the identity.

Where a token sits in time is told one of two ways (`positions`):
- "learned" (LeWM's): a learned embedding per place in the window of at most `history` frames that
  the predictor is shown. Every imagined step shows it a new window, so every token is computed again.
- "rotary": rotary embeddings of the frame's index in time inside attention, and each frame attends
  to the `history` frames up to itself (a sliding window over however many frames it is given).
  Nothing a frame computes depends on what comes after it, so an imagined rollout keeps every
  layer's keys and values and each step costs one token (leworld/nn/imagine.py).
On the clips of `history` frames that training sees, the two differ only in how positions are told.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from leworld import LeworldError

POSITIONS = ("learned", "rotary")


def rotate(x: Tensor, positions: Tensor, base: float = 10_000.0) -> Tensor:
    """Rotary position embedding: x (..., T, d) with d even, positions (T,) frame indices -> (..., T, d),
    each pair of channels turned by position x its frequency (RoFormer's rotate-half layout)."""
    half = x.shape[-1] // 2
    frequencies = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # (d/2,)
    angles = positions.to(torch.float32)[:, None] * frequencies  # (T, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def window_mask(query_positions: Tensor, key_positions: Tensor, window: int) -> Tensor:
    """(Tq, Tk) True where a query at a frame index may attend to a key: the key's frame is the
    query's or one of the `window` − 1 before it."""
    offset = query_positions[:, None] - key_positions[None, :]
    return (offset >= 0) & (offset < window)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, rotary: bool = False):
        super().__init__()
        if width % heads or rotary and (width // heads) % 2:
            raise LeworldError(f"predictor width {width} is not divisible by heads={heads}"
                               + (" into heads of an even width (rotary positions)" if rotary else ""))
        self.heads, self.dropout, self.rotary = heads, dropout, rotary
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def heads_of(self, x: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, W) -> q, k, v (B, heads, T, W / heads), q and k rotated by `positions` (T,) if rotary."""
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if self.rotary:
            q, k = rotate(q, positions), rotate(k, positions)
        return q, k, v

    def forward(self, x: Tensor, positions: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x (B, T, W); mask (T, T), True where attention is allowed; None: causal."""
        q, k, v = self.heads_of(x, positions)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class ConditionedBlock(nn.Module):
    """Pre-norm transformer block; the norms' shift and scale, and the residual gates, come from the
    conditioning (the action embedding)."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, dropout: float, rotary: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = CausalSelfAttention(width, heads, dropout, rotary)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_hidden, width), nn.Dropout(dropout))
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)  # AdaLN-zero: gates start at 0, the block at identity
        nn.init.zeros_(self.modulation.bias)

    def modulations(self, condition: Tensor) -> Tensor:
        """The condition (..., W) -> its shifts, scales and gates (..., 6W): a token's depend on its action alone."""
        return self.modulation(F.silu(condition))

    def attention_input(self, x: Tensor, modulations: Tensor) -> Tensor:
        shift, scale = modulations.chunk(6, dim=-1)[:2]
        return self.norm1(x) * (1 + scale) + shift

    def finish(self, x: Tensor, attended: Tensor, modulations: Tensor) -> Tensor:
        """The residual of the attention output `attended` (B, T, W, projected), then the MLP's."""
        gate1, shift2, scale2, gate2 = modulations.chunk(6, dim=-1)[2:]
        x = x + gate1 * attended
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)

    def forward(self, x: Tensor, condition: Tensor, positions: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:  # x, condition (B, T, W)
        modulations = self.modulations(condition)
        return self.finish(x, self.attn(self.attention_input(x, modulations), positions, mask), modulations)


class Predictor(nn.Module):
    """Latents (B, T, D) and action embeddings (B, T, W) -> features (B, T, W) of the next latents.
    With learned positions T is at most `history`; with rotary ones any T, each frame seeing the
    `history` frames up to itself."""

    def __init__(self, latent_dim: int, width: int, depth: int, heads: int, mlp_hidden: int, history: int,
                 dropout: float = 0.1, positions: str = "learned"):
        super().__init__()
        if positions not in POSITIONS:
            raise LeworldError(f"model.predictor.positions={positions}; choose one of: {', '.join(POSITIONS)}")
        self.history, self.positions = history, positions
        self.input = nn.Linear(latent_dim, width)
        if positions == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, history, width))  # learned, one per place in the window
        rotary = positions == "rotary"
        self.blocks = nn.ModuleList(ConditionedBlock(width, heads, mlp_hidden, dropout, rotary) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        if positions == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)  # after the blocks: the random draws of earlier versions

    def forward(self, latents: Tensor, actions: Tensor) -> Tensor:
        steps = latents.shape[1]
        x, frames, mask = self.input(latents), None, None
        if self.positions == "learned":
            if steps > self.history:
                raise LeworldError(f"the predictor takes at most {self.history} frames at once, got {steps}")
            x = x + self.pos_embed[:, :steps]
        else:
            frames = torch.arange(steps, device=latents.device)
            mask = window_mask(frames, frames, self.history) if steps > self.history else None  # None: causal
        for block in self.blocks:
            x = block(x, actions, frames, mask)
        return self.norm(x)
