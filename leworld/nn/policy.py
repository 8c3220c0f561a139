"""A goal-conditioned policy on a world model's latents: where the agent is and where it should be
(latents (B, D) each) -> the action chunks of one plan (B, H, fs·A), normalised as the planner
searches them. Trained after the world model, on its frozen latents (leworld/prior.py), to propose
plans: the mean CEM starts from, or a planner-free plan of its own."""

import torch
from einops import rearrange
from torch import Tensor, nn


class GoalPolicy(nn.Module):
    def __init__(self, latent_dim: int, horizon: int, chunk_dim: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        self.horizon = horizon
        layers, width = [], 2 * latent_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.LayerNorm(size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, horizon * chunk_dim))

    def forward(self, latent: Tensor, goal: Tensor) -> Tensor:
        """latent, goal (B, D) -> plan (B, H, fs·A). It reads the goal as the way still to go."""
        plan = self.net(torch.cat([latent, goal - latent], dim=-1))
        return rearrange(plan, "b (h c) -> b h c", h=self.horizon)
