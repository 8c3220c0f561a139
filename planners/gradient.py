"""Gradient planning: Adam on the action sequence itself, through the differentiable cost.

Several restarts run side by side as the sample axis of one cost call (the first starts from the
warm start or zero, the others from Gaussian noise); after every step the plans are put back inside
the bounds, and the cheapest plan seen at any step is returned.
"""

import torch
from torch import Tensor

from planners.base import Bounds, CostFn, Planner


class GradientPlanner(Planner):
    def __init__(self, action_dim: int, restarts: int = 8, steps: int = 30, lr: float = 0.1, std: float = 1.0,
                 bounds: Bounds | None = None, seed: int = 0, device="cpu"):
        super().__init__(action_dim, bounds, seed, device)
        self.restarts, self.steps, self.lr, self.std = restarts, steps, lr, std

    def plan(self, cost_fn: CostFn, batch_size: int, horizon: int, init: Tensor | None = None) -> Tensor:
        """cost_fn: plans (B, S, H, A) -> costs (B, S), differentiable; init: (B, H, A). -> plans (B, H, A)."""
        shape = (batch_size, self.restarts, horizon, self.action_dim)
        plans = self.std * torch.randn(shape, generator=self.generator, device=self.device)
        plans[:, 0] = 0 if init is None else init.to(self.device)
        plans = self.bounds.clamp(plans).requires_grad_(True)
        optimizer = torch.optim.Adam([plans], lr=self.lr)
        best = plans.detach()[:, 0].clone()  # (B, H, A)
        best_cost = torch.full((batch_size,), float("inf"), device=self.device)
        for step in range(self.steps + 1):
            with torch.enable_grad():
                costs = cost_fn(plans)  # (B, R)
            with torch.no_grad():
                lowest, index = costs.detach().nan_to_num(nan=float("inf")).min(1)
                better = lowest < best_cost
                best[better] = plans[better, index[better]]
                best_cost = torch.where(better, lowest, best_cost)
            if step == self.steps:
                break
            optimizer.zero_grad(set_to_none=True)
            costs.sum().backward()  # restarts and environments are independent: one backward serves all
            optimizer.step()
            with torch.no_grad():
                plans.copy_(self.bounds.clamp(plans))
        return best
