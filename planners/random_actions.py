"""The floor every planning table carries: plans drawn uniformly inside the action bounds,
without looking at any cost."""

import torch
from torch import Tensor

from planners.base import Bounds, CostFn, Planner


class RandomActions(Planner):
    def __init__(self, action_dim: int, bounds: Bounds, seed: int = 0, device="cpu"):
        if not (bounds.low.isfinite().all() and bounds.high.isfinite().all()):
            raise ValueError("random actions need finite action bounds")
        super().__init__(action_dim, bounds, seed, device)

    def plan(self, cost_fn: CostFn, batch_size: int, horizon: int, init: Tensor | None = None) -> Tensor:
        """-> plans (B, H, A), uniform in the bounds; cost_fn and init are ignored."""
        unit = torch.rand((batch_size, horizon, self.action_dim), generator=self.generator, device=self.device)
        return self.bounds.low + unit * (self.bounds.high - self.bounds.low)
