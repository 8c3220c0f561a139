"""Model-predictive control over a batch of environments.

    observe ──▶ cost of candidate plans (objective) ──▶ planner ──▶ execute the first k chunks ──┐
       ▲                                                                                         │
       └─────────────────────────────── until success or the step budget ◀──────────────────────┘

Plans are in normalised action chunks (fs·A per chunk); `to_env` turns them into raw env actions.
An objective builds the cost function from what the environments showed so far, once per solve
(the world model encodes the frames there, never inside the planner's iterations); the goal is the
objective's business, fixed when it is made. Success is latched: an environment that reached its
goal once counts as solved and is not stepped again.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from planners.base import CostFn


class Objective(Protocol):
    def cost_fn(self, observed: dict[str, np.ndarray], chunks: Tensor | None, index: np.ndarray) -> CostFn:
        """observed: the last frames of the environments in `index`, {"pixels": (b, T, H, W, 3) uint8,
        "state": (b, T, S), "steps": (b,) env steps taken so far}; chunks: the action chunks taken between those frames (b, T − 1, fs·A),
        None when T = 1.
        -> the cost of plans (b, S, H, fs·A) for those environments."""

    # Optional: propose(observed, index) -> candidate plans (b, K, H, fs·A) for the planner to start
    # from (a policy prior's), of which the cheapest by this solve's cost is taken, or None; an
    # objective without it leaves the planner its usual start.


@dataclass
class MPCResult:
    success: np.ndarray  # (B,) bool, latched
    steps: np.ndarray  # (B,) env steps taken (until success, or the budget)
    final_state: np.ndarray  # (B, S) state when stepping stopped
    solve_seconds: list[float]  # wall time of each solve (all active environments at once)
    frames: list[list[np.ndarray]] = field(default_factory=list)  # per environment, every frame, if recorded
    first_plan: Tensor | None = None  # (B, H, fs·A) the plan of the first solve
    first_costs: Tensor | None = None  # (B, 1 + P) its cost, then those of `compare`'s plans, by the first solve's cost
    # per environment, the frame (and state) before the first plan and after each of its chunks stepped whole
    first_frames: list[list[np.ndarray]] = field(default_factory=list)
    first_states: list[list[np.ndarray]] = field(default_factory=list)


def run_mpc(envs: list, objective: Objective, planner, to_env: Callable[[Tensor], np.ndarray], *, horizon: int,
            receding_horizon: int, budget: int, frameskip: int, history: int, record: bool = False,
            synchronize: Callable[[], None] = lambda: None, compare: Tensor | None = None,
            goal_steps: int | None = None) -> MPCResult:
    """Run B environments (already reset to their starts and goals, observations in envs' last
    frames) under MPC. to_env: chunks (B, k, fs·A) -> raw actions (B, k·fs, A). history: frames the
    objective is shown (the last ones, one per chunk). synchronize: waits for an accelerator, so
    that solve times are real. compare: plans (B, P, H, fs·A) that the first solve's cost function
    scores beside the plan it chose (untimed), e.g. the recorded actions that reach each goal.
    goal_steps: when the goal is due; each solve then plans only the chunks left (at least one)."""
    if not 0 < receding_horizon <= horizon:
        raise ValueError(f"receding_horizon must be in 1..horizon={horizon}, got {receding_horizon}")
    b = len(envs)
    pixels = [[env.render()] for env in envs]  # per environment, frames one chunk apart
    states = [[env.get_state()] for env in envs]
    chunks: list[list[Tensor]] = [[] for _ in envs]  # the action chunk after each of those frames
    frames = [[pixels[i][0]] for i in range(b)] if record else []
    success, steps = np.zeros(b, dtype=bool), np.zeros(b, dtype=int)

    def execute(i: int, raw: np.ndarray, planned: Tensor) -> None:
        """Step environment i through action chunks (raw (k·fs, A), planned (k, fs·A)) until
        success or the budget; keep a frame for the objective after every whole chunk."""
        for k in range(len(planned)):
            for j in range(frameskip):
                obs, _, _, _, info = envs[i].step(raw[k * frameskip + j])
                steps[i] += 1
                success[i] |= bool(info["success"])
                if record:
                    frames[i].append(obs)
                if success[i] or steps[i] >= budget:
                    return
            pixels[i].append(obs)
            states[i].append(info["state"])
            chunks[i].append(planned[k].cpu())

    solve_seconds, plan, first, executing = [], None, {}, receding_horizon
    while (active := np.flatnonzero(~success & (steps < budget))).size:
        seen = min(history, *(len(pixels[i]) for i in active))  # frames shown to the objective
        observed = {"pixels": np.stack([pixels[i][-seen:] for i in active]),
                    "state": np.stack([states[i][-seen:] for i in active]), "steps": steps[active]}
        taken = torch.stack([torch.stack(chunks[i][-(seen - 1):]) for i in active]) if seen > 1 else None
        synchronize()
        start = time.perf_counter()
        cost_fn = objective.cost_fn(observed, taken, active)
        length = horizon if goal_steps is None else chunks_to(goal_steps - steps[active].max(), frameskip, horizon)
        warm = warm_start(objective.propose(observed, active) if hasattr(objective, "propose") else None, cost_fn,
                          None if plan is None else shift(plan[active], executing), length)
        new_plan = planner.plan(cost_fn, len(active), length, init=warm).detach()  # (b, length, fs·A)
        synchronize()
        solve_seconds.append(time.perf_counter() - start)
        plan = torch.zeros(b, horizon, new_plan.shape[-1], device=new_plan.device) if plan is None else plan
        plan[torch.as_tensor(active, device=plan.device)] = F.pad(new_plan, (0, 0, 0, horizon - length))  # zeros after
        executing = min(receding_horizon, length)
        executed = new_plan[:, :executing]
        raw = to_env(executed)  # (b, k·fs, A)
        for row, i in enumerate(active):
            execute(i, raw[row], executed[row])
        first = first or first_solve(cost_fn, new_plan, compare, pixels, states)
    return MPCResult(success, steps, np.stack([env.get_state() for env in envs]), solve_seconds, frames, **first)


def first_solve(cost_fn: CostFn, plan: Tensor, compare: Tensor | None, pixels: list, states: list) -> dict:
    """What a failure anatomy needs of the first solve (every environment): its plan, its cost and
    the costs of `compare`'s plans by the same cost function, and what stepping the plan showed."""
    with torch.no_grad():
        costs = None if compare is None else cost_fn(torch.cat([plan[:, None], compare.to(plan)], dim=1)).cpu()
    return {"first_plan": plan, "first_costs": costs, "first_frames": [list(p) for p in pixels],
            "first_states": [list(s) for s in states]}


def warm_start(proposed: Tensor | None, cost_fn: CostFn, rest: Tensor | None, length: int) -> Tensor | None:
    """Where a solve of `length` chunks starts: the cheapest of the proposed plans (b, K, H, A), else
    the rest of the last plan (b, H, A), else None (the planner's own start)."""
    if proposed is not None:
        return cheapest(proposed[:, :, :length], cost_fn)
    return None if rest is None else rest[:, :length]


def cheapest(candidates: Tensor, cost_fn: CostFn) -> Tensor:
    """The plan (B, H, A) of candidates (B, K, H, A) that cost_fn scores lowest (the only one if K = 1)."""
    if candidates.shape[1] == 1:
        return candidates[:, 0]
    with torch.no_grad():
        best = cost_fn(candidates).nan_to_num(nan=float("inf")).argmin(1)  # (B,)
    return candidates[torch.arange(len(candidates), device=candidates.device), best]


def shift(plan: Tensor, executed: int) -> Tensor:
    """The rest of a plan (B, H, A) after `executed` chunks, padded with zeros (the mean of
    normalised actions): the warm start of the next solve."""
    return torch.cat([plan[:, executed:], torch.zeros_like(plan[:, :executed])], dim=1)


def chunks_to(steps: int, frameskip: int, horizon: int) -> int:
    """Whole chunks that cover `steps` env steps, at least one, at most `horizon`."""
    return min(max(-(-steps // frameskip), 1), horizon)
