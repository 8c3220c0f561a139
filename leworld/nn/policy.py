"""A goal-conditioned policy on a world model's latents: where the agent is, where it should be
(latents (B, D) each) and how many env steps are left to get there -> the action chunks of one
plan (B, H, fs·A), normalised as the planner searches them. Trained after the world model, on its
frozen latents (leworld/prior.py), to propose plans: the mean CEM starts from, or a planner-free
controller of its own (a goal-conditioned inverse dynamics model, GC-IDM, when re-asked every chunk).

The steps left matter because the same goal asks for different actions when it must be reached in
one chunk than in five; near the end of an episode the policy is told what is left.

An expert with several ways to the same goal (PushT's pushes from either side) has no mean plan
worth executing; with `heads` > 1 the policy proposes that many plans (B, K, H, fs·A), each trained
only where it was the closest (winner takes all, leworld/prior.py), and the world model chooses
among them (planners/mpc.py)."""

import torch
from einops import rearrange
from torch import Tensor, nn


class GoalPolicy(nn.Module):
    def __init__(self, latent_dim: int, horizon: int, chunk_dim: int, hidden: list[int], dropout: float = 0.0,
                 frameskip: int = 1, heads: int = 1):
        super().__init__()
        self.horizon, self.frameskip, self.heads = horizon, frameskip, heads
        layers, width = [], 2 * latent_dim + 1  # the latent, the way to go, the share of the horizon left
        for size in hidden:
            layers += [nn.Linear(width, size), nn.LayerNorm(size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, heads * horizon * chunk_dim))

    def chunks_left(self, steps_to_go: Tensor) -> Tensor:
        """Env steps still to the goal (B,) -> whole chunks left (B,), at least one, at most the horizon."""
        return torch.div(steps_to_go + self.frameskip - 1, self.frameskip, rounding_mode="floor").clamp(1, self.horizon)

    def forward(self, latent: Tensor, goal: Tensor, chunks_left: Tensor | None = None) -> Tensor:
        """latent, goal (B, D), chunks_left (B,) in 1..H (None: the whole horizon) -> plans (B, K, H, fs·A),
        one per head, of which the first chunks_left chunks lead to the goal."""
        if chunks_left is None:
            chunks_left = torch.full(latent.shape[:1], self.horizon, device=latent.device)
        share = (chunks_left.to(latent.dtype) / self.horizon)[:, None]  # (B, 1)
        plan = self.net(torch.cat([latent, goal - latent, share], dim=-1))
        return rearrange(plan, "b (k h c) -> b k h c", k=self.heads, h=self.horizon)
