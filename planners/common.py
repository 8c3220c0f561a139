"""What the planners share: action bounds, the cost-function type, and picking samples by index."""

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


def gather_samples(samples: Tensor, index: Tensor) -> Tensor:
    """samples (B, S, H, A), index (B, K) -> the chosen samples (B, K, H, A)."""
    return samples.gather(1, index[..., None, None].expand(-1, -1, *samples.shape[2:]))


def sample_around(mean: Tensor, std: Tensor, samples: int, bounds: Bounds, generator: torch.Generator) -> Tensor:
    """Gaussian plans around mean (B, H, A) with std (B, H, A), inside the bounds -> (B, S, H, A);
    sample 0 is the mean itself, so that a good warm start is never lost."""
    noise = torch.randn((mean.shape[0], samples, *mean.shape[1:]), generator=generator, device=mean.device)
    candidates = mean[:, None] + std[:, None] * noise
    candidates[:, 0] = mean
    return bounds.clamp(candidates)
