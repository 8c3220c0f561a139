"""What the planners share: action bounds, the cost-function type, the set-up every planner has
(action width, bounds, a seeded generator on its device), and the loop of the Gaussian planners
(CEM, MPPI): sample plans around a mean, keep the cheapest, refit, repeat."""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

CostFn = Callable[[Tensor], Tensor]  # plans (B, S, H, A) -> costs (B, S)


@dataclass
class Bounds:
    """Per-dimension action limits (A,), in the space the planner searches (normalised actions)."""

    low: Tensor
    high: Tensor

    @classmethod
    def unbounded(cls, action_dim: int, device="cpu") -> "Bounds":
        return cls(torch.full((action_dim,), -float("inf"), device=device), torch.full((action_dim,), float("inf"), device=device))

    def clamp(self, actions: Tensor) -> Tensor:  # (..., A)
        return torch.maximum(torch.minimum(actions, self.high), self.low)


class Planner:
    """plan(cost_fn, batch_size, horizon, init=None) -> plans (B, H, A); cost_fn maps candidate plans
    (B, S, H, A) to costs (B, S), init is a warm start (B, H, A)."""

    def __init__(self, action_dim: int, bounds: Bounds | None = None, seed: int = 0, device="cpu"):
        self.action_dim, self.device = action_dim, torch.device(device)
        self.bounds = bounds or Bounds.unbounded(action_dim, device)
        self.generator = torch.Generator(device).manual_seed(seed)

    def plan(self, cost_fn: CostFn, batch_size: int, horizon: int, init: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class GaussianPlanner(Planner):
    """A Gaussian over plans, refit to its `elites` cheapest of `samples` draws for `iterations`
    rounds, starting from mean 0 (or the warm start) and `std`; the plan is the final mean. Sample 0
    of every round is the mean itself, so that a good warm start is never lost. A subclass says how
    it refits (refit)."""

    def __init__(self, action_dim: int, samples: int, elites: int, iterations: int, std: float,
                 bounds: Bounds | None = None, seed: int = 0, device="cpu"):
        if not 0 < elites <= samples:
            raise ValueError(f"{type(self).__name__} needs 0 < elites <= samples, got elites={elites}, samples={samples}")
        super().__init__(action_dim, bounds, seed, device)
        self.samples, self.elites, self.iterations, self.std = samples, elites, iterations, std

    @torch.no_grad()
    def plan(self, cost_fn: CostFn, batch_size: int, horizon: int, init: Tensor | None = None) -> Tensor:
        shape = (batch_size, horizon, self.action_dim)
        mean = torch.zeros(shape, device=self.device) if init is None else self.bounds.clamp(init.to(self.device))
        std = torch.full(shape, self.std, device=self.device)
        for _ in range(self.iterations):
            candidates = sample_around(mean, std, self.samples, self.bounds, self.generator)  # (B, S, H, A)
            costs = cost_fn(candidates).nan_to_num(nan=float("inf"))  # (B, S)
            elite_costs, index = costs.topk(self.elites, dim=1, largest=False)  # (B, K), cheapest first
            mean, std = self.refit(gather_samples(candidates, index), elite_costs, std)
        return mean

    def refit(self, elites: Tensor, elite_costs: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """Elites (B, K, H, A), their costs (B, K) and the current std (B, H, A) -> the new mean and std."""
        raise NotImplementedError


def gather_samples(samples: Tensor, index: Tensor) -> Tensor:
    """samples (B, S, H, A), index (B, K) -> the chosen samples (B, K, H, A)."""
    return samples.gather(1, index[..., None, None].expand(-1, -1, *samples.shape[2:]))


def sample_around(mean: Tensor, std: Tensor, samples: int, bounds: Bounds, generator: torch.Generator) -> Tensor:
    """Gaussian plans around mean (B, H, A) with std (B, H, A), inside the bounds -> (B, S, H, A);
    sample 0 is the mean itself."""
    noise = torch.randn((mean.shape[0], samples, *mean.shape[1:]), generator=generator, device=mean.device)
    candidates = mean[:, None] + std[:, None] * noise
    candidates[:, 0] = mean
    return bounds.clamp(candidates)
