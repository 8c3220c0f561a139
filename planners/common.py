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
