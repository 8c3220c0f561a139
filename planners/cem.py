"""Cross-entropy method: sample plans around a Gaussian, keep the cheapest, refit the mean and std
to them, repeat (planners/base.py's GaussianPlanner).

LeWM's planner: 300 samples, the 30 cheapest refit the mean and std, 30 iterations, starting from
mean 0 and std 1 in normalised action space.
"""

from torch import Tensor

from planners.base import Bounds, GaussianPlanner


class CEM(GaussianPlanner):
    def __init__(self, action_dim: int, samples: int = 300, elites: int = 30, iterations: int = 30,
                 std: float = 1.0, bounds: Bounds | None = None, seed: int = 0, device="cpu"):
        super().__init__(action_dim, samples, elites, iterations, std, bounds, seed, device)

    def refit(self, elites: Tensor, elite_costs: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        if self.elites == 1:  # one elite has no spread: keep the std
            return elites.mean(1), std
        return elites.mean(1), elites.std(1)
