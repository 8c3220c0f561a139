"""A planner-free row: the policy prior's plan (leworld/prior.py), which reaches the planner as its
warm start, executed as it is. Beside CEM it says what search adds to the prior."""

from torch import Tensor

from planners.base import CostFn, Planner


class PriorPlan(Planner):
    def plan(self, cost_fn: CostFn, batch_size: int, horizon: int, init: Tensor | None = None) -> Tensor:
        """-> init (B, H, A) inside the bounds; cost_fn is never called."""
        if init is None:
            raise ValueError("planner=prior executes a policy prior's plans, and none was given (eval loads the run's "
                             "prior/: train it with python -m leworld.prior ckpt=<run>)")
        return self.bounds.clamp(init.to(self.device))
