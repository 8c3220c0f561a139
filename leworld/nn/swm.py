"""stable-worldmodel's LeWM heads, layer for layer (stable_worldmodel/wm/lewm/module.py, 0.1.1):
the action `Embedder`, the `MLP` projectors and the AdaLN-zero `Predictor`. Attribute names and
nn.Sequential indices are theirs, so a state dict their `save_pretrained` wrote loads by name.

Where they differ from leworld's own (leworld/nn/predictor.py, models/lewm.py), which is why they
are not leworld's modules with options:
- attention and feed-forward each open with their own affine LayerNorm, inside the AdaLN-modulated
  norm of the block; the attention's q/k/v projection has no bias, and its heads are `dim_head`
  wide whatever the model width (16 × 64 in LeWM's config, 1024 channels inside a 192-wide model);
- the learned position embedding is added to the input latents, before `input_proj`;
- the action encoder is a kernel-1 Conv1d, then Linear, SiLU, Linear.
Shapes: B batch, T time, D latent width, W the transformer's width.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Causal multi-head self-attention over time, `heads` of `dim_head` channels."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        projects = not (heads == 1 and dim_head == dim)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if projects else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # x (B, T, W)
        q, k, v = rearrange(self.to_qkv(self.norm(x)), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.to_out(rearrange(out, "b h t d -> b t (h d)"))


class ConditionalBlock(nn.Module):
    """Pre-norm block whose norms' shift and scale and residual gates come from the condition
    (AdaLN-zero: the modulation starts at zero, the block at identity)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.attn = Attention(dim, heads, dim_head, dropout)
        self.mlp = FeedForward(dim, mlp_dim, dropout)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x, c (B, T, W)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class Transformer(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, depth: int, heads: int, dim_head: int,
                 mlp_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.layers = nn.ModuleList(ConditionalBlock(hidden_dim, heads, dim_head, mlp_dim, dropout) for _ in range(depth))
        self.input_proj = nn.Linear(input_dim, hidden_dim) if input_dim != hidden_dim else nn.Identity()
        self.cond_proj = nn.Linear(input_dim, hidden_dim) if input_dim != hidden_dim else nn.Identity()
        self.output_proj = nn.Linear(hidden_dim, output_dim) if hidden_dim != output_dim else nn.Identity()

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x, c (B, T, input_dim) -> (B, T, output_dim)
        x, c = self.input_proj(x), self.cond_proj(c)
        for block in self.layers:
            x = block(x, c)
        return self.output_proj(self.norm(x))


class Predictor(nn.Module):
    """Latents (B, T, D) and action embeddings (B, T, D), T at most `num_frames` -> (B, T, output_dim)."""

    def __init__(self, num_frames: int, depth: int, heads: int, mlp_dim: int, input_dim: int, hidden_dim: int,
                 output_dim: int | None = None, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0):
        super().__init__()
        self.num_frames = num_frames
        self.pos_embedding = nn.Parameter(torch.randn(1, num_frames, input_dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(input_dim, hidden_dim, output_dim or input_dim, depth, heads, dim_head,
                                       mlp_dim, dropout)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.transformer(self.dropout(x + self.pos_embedding[:, :x.shape[1]]), c)


class Embedder(nn.Module):
    """Action chunks (B, T, input_dim) -> embeddings (B, T, emb_dim)."""

    def __init__(self, input_dim: int = 10, smoothed_dim: int = 10, emb_dim: int = 10, mlp_scale: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv1d(input_dim, smoothed_dim, kernel_size=1)
        self.embed = nn.Sequential(nn.Linear(smoothed_dim, mlp_scale * emb_dim), nn.SiLU(),
                                   nn.Linear(mlp_scale * emb_dim, emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(rearrange(x.float(), "b t a -> b a t"))
        return self.embed(rearrange(x, "b a t -> b t a"))


NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, None: None}


class MLP(nn.Module):
    """(N, input_dim) -> (N, output_dim): Linear, norm (`norm`: batch, layer or None), GELU, Linear."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int | None = None, norm: str | None = "layer"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_dim, hidden_dim),
                                 NORMS[norm](hidden_dim) if NORMS[norm] else nn.Identity(),
                                 nn.GELU(), nn.Linear(hidden_dim, output_dim or input_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
