"""Planners over action sequences, and the receding-horizon loop that runs them.

Every planner has plan(cost_fn, batch_size, horizon, init=None) -> plans (B, H, A), where
cost_fn maps candidate plans (B, S, H, A) to costs (B, S): B problems (environments) and S samples
are solved together in single tensor operations. Planners know nothing of models or environments.
"""

from planners.base import Bounds, CostFn, GaussianPlanner, Planner
from planners.cem import CEM
from planners.gradient import GradientPlanner
from planners.mppi import MPPI
from planners.prior import PriorPlan
from planners.random_actions import RandomActions

PLANNERS = {"cem": CEM, "mppi": MPPI, "gradient": GradientPlanner, "random_actions": RandomActions, "prior": PriorPlan}

__all__ = ["CEM", "MPPI", "PLANNERS", "Bounds", "CostFn", "GaussianPlanner", "GradientPlanner", "Planner",
           "PriorPlan", "RandomActions"]
