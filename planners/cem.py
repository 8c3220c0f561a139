"""Cross-entropy method: sample plans around a Gaussian, keep the cheapest, refit, repeat.

LeWM's planner: 300 samples, the 30 cheapest refit the mean and std, 30 iterations, starting from
mean 0 and std 1 in normalised action space, with the first sample of every iteration set to the
mean so that a good warm start is never lost. The plan is the final mean.
"""

import torch
from torch import Tensor

from planners.common import Bounds, CostFn, gather_samples, sample_around


class CEM:
    def __init__(self, action_dim: int, samples: int = 300, elites: int = 30, iterations: int = 30,
                 std: float = 1.0, bounds: Bounds | None = None, seed: int = 0, device="cpu"):
        if not 0 < elites <= samples:
            raise ValueError(f"CEM needs 0 < elites <= samples, got elites={elites}, samples={samples}")
        self.action_dim, self.samples, self.elites, self.iterations, self.std = action_dim, samples, elites, iterations, std
        self.bounds = bounds or Bounds.unbounded(action_dim, device)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.device = torch.device(device)

    @torch.no_grad()
    def plan(self, cost_fn: CostFn, batch_size: int, horizon: int, init: Tensor | None = None) -> Tensor:
        """cost_fn: plans (B, S, H, A) -> costs (B, S); init: a warm start (B, H, A). -> plans (B, H, A)."""
        shape = (batch_size, horizon, self.action_dim)
        mean = torch.zeros(shape, device=self.device) if init is None else self.bounds.clamp(init.to(self.device))
        std = torch.full(shape, self.std, device=self.device)
        for _ in range(self.iterations):
            candidates = sample_around(mean, std, self.samples, self.bounds, self.generator)  # (B, S, H, A)
            costs = cost_fn(candidates).nan_to_num(nan=float("inf"))  # (B, S)
            elites = gather_samples(candidates, costs.topk(self.elites, dim=1, largest=False).indices)  # (B, K, H, A)
            mean, std = elites.mean(1), elites.std(1) if self.elites > 1 else std
        return mean
