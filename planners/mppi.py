"""MPPI as TD-MPC2 runs it: sample plans around a Gaussian, keep the cheapest, and refit the mean
and std to them weighted by exp(−temperature · (cost − lowest cost)); the std stays within
[min_std, max_std]. Defaults are TD-MPC2's: 512 samples, 64 elites, 6 iterations, temperature 0.5.
The plan is the final weighted mean (TD-MPC2 samples one elite instead; the mean is deterministic
and what a receding-horizon loop executes best)."""

import torch
from torch import Tensor

from planners.base import Bounds, GaussianPlanner


class MPPI(GaussianPlanner):
    def __init__(self, action_dim: int, samples: int = 512, elites: int = 64, iterations: int = 6,
                 temperature: float = 0.5, std: float = 2.0, min_std: float = 0.05, max_std: float = 2.0,
                 bounds: Bounds | None = None, seed: int = 0, device="cpu"):
        if not 0 < min_std <= max_std:
            raise ValueError(f"MPPI needs 0 < min_std <= max_std, got min_std={min_std}, max_std={max_std}")
        super().__init__(action_dim, samples, elites, iterations, std, bounds, seed, device)
        self.temperature, self.min_std, self.max_std = temperature, min_std, max_std

    def refit(self, elites: Tensor, elite_costs: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        weights = torch.softmax(-self.temperature * (elite_costs - elite_costs[:, :1]), dim=1)[..., None, None]
        mean = (weights * elites).sum(1)
        return mean, (weights * (elites - mean[:, None]).square()).sum(1).sqrt().clamp(self.min_std, self.max_std)
