"""MPPI as TD-MPC2 runs it: sample plans around a Gaussian, keep the cheapest, and refit the mean
and std to them weighted by exp(−temperature · (cost − lowest cost)); the std stays within
[min_std, max_std]. Defaults are TD-MPC2's: 512 samples, 64 elites, 6 iterations, temperature 0.5.
The plan is the final weighted mean (TD-MPC2 samples one elite instead; the mean is deterministic
and what a receding-horizon loop executes best)."""

import torch
from torch import Tensor

from planners.common import Bounds, CostFn, gather_samples, sample_around


class MPPI:
    def __init__(self, action_dim: int, samples: int = 512, elites: int = 64, iterations: int = 6,
                 temperature: float = 0.5, std: float = 2.0, min_std: float = 0.05, max_std: float = 2.0,
                 bounds: Bounds | None = None, seed: int = 0, device="cpu"):
        if not 0 < elites <= samples:
            raise ValueError(f"MPPI needs 0 < elites <= samples, got elites={elites}, samples={samples}")
        if not 0 < min_std <= max_std:
            raise ValueError(f"MPPI needs 0 < min_std <= max_std, got min_std={min_std}, max_std={max_std}")
        self.action_dim, self.samples, self.elites, self.iterations = action_dim, samples, elites, iterations
        self.temperature, self.std, self.min_std, self.max_std = temperature, std, min_std, max_std
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
            elite_costs, index = costs.topk(self.elites, dim=1, largest=False)  # (B, K), cheapest first
            elites = gather_samples(candidates, index)  # (B, K, H, A)
            weights = torch.softmax(-self.temperature * (elite_costs - elite_costs[:, :1]), dim=1)[..., None, None]
            mean = (weights * elites).sum(1)
            std = (weights * (elites - mean[:, None]).square()).sum(1).sqrt().clamp(self.min_std, self.max_std)
        return mean
