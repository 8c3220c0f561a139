"""Planners find known optima; the MPC loop solves easy tasks with a cost from the real simulator."""

import copy

import mujoco
import numpy as np
import pytest
import torch

import envs
from leworld.codec import ActionCodec
from envs import tworoom
from planners import CEM, MPPI, PLANNERS, Bounds, GradientPlanner, RandomActions
from planners.mpc import cheapest, run_mpc, shift

B, H, A = 4, 3, 2


def bowl(targets):
    """A quadratic bowl per problem: cost of plans (B, S, H, A) = squared distance to targets (B, H, A)."""
    return lambda plans: (plans - targets[:, None]).square().sum((-2, -1))


PLANNER_SETTINGS = {
    "cem": dict(samples=300, elites=30, iterations=30),
    "mppi": dict(samples=512, elites=64, iterations=20),
    "gradient": dict(restarts=4, steps=200, lr=0.05),
}


@pytest.mark.parametrize("name", PLANNER_SETTINGS)
def test_planner_finds_the_bottom_of_a_bowl(name):
    targets = torch.randn(B, H, A, generator=torch.Generator().manual_seed(1)).clamp(-1.5, 1.5)
    planner = PLANNERS[name](A, seed=0, **PLANNER_SETTINGS[name])
    plans = planner.plan(bowl(targets), B, H)
    assert plans.shape == (B, H, A)
    assert (plans - targets).abs().max() < 0.05, (plans - targets).abs().max()


@pytest.mark.parametrize("name", PLANNER_SETTINGS)
def test_planner_respects_bounds_and_is_deterministic(name):
    bounds = Bounds(torch.tensor([-0.5, -1.0]), torch.tensor([0.5, 1.0]))
    targets = torch.full((B, H, A), 3.0)  # outside the box: the best plan sits on its upper corner
    make = lambda: PLANNERS[name](A, bounds=bounds, seed=7, **PLANNER_SETTINGS[name])  # noqa: E731
    plans = make().plan(bowl(targets), B, H)
    assert (plans <= bounds.high + 1e-6).all() and (plans >= bounds.low - 1e-6).all()
    assert torch.allclose(plans, bounds.high.expand_as(plans), atol=0.05)
    assert torch.equal(plans, make().plan(bowl(targets), B, H))


def test_warm_start_is_kept_when_it_is_already_optimal():
    targets = torch.randn(B, H, A, generator=torch.Generator().manual_seed(2))
    plans = CEM(A, samples=16, elites=4, iterations=2, seed=0).plan(bowl(targets), B, H, init=targets)
    assert (plans - targets).abs().max() < 0.3  # a cold start with 2 iterations of 16 samples is far off
    cold = CEM(A, samples=16, elites=4, iterations=2, seed=0).plan(bowl(targets), B, H)
    assert (cold - targets).abs().max() > (plans - targets).abs().max()


def test_cost_is_called_once_per_iteration_on_the_whole_batch():
    calls = []

    def cost(plans):
        calls.append(plans.shape)
        return plans.square().sum((-2, -1))

    CEM(A, samples=50, elites=5, iterations=3).plan(cost, B, H)
    MPPI(A, samples=40, elites=8, iterations=2).plan(cost, B, H)
    GradientPlanner(A, restarts=3, steps=2).plan(cost, B, H)
    assert calls == [(B, 50, H, A)] * 3 + [(B, 40, H, A)] * 2 + [(B, 3, H, A)] * 3


def test_random_actions_and_shift():
    bounds = Bounds(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 2.0]))
    plans = RandomActions(A, bounds, seed=0).plan(None, 1000, H)
    assert (plans[..., 1] >= 0).all() and (plans[..., 1] <= 2).all() and abs(plans[..., 1].mean() - 1) < 0.05
    plan = torch.arange(6.0).reshape(1, 3, 2)
    assert shift(plan, 2).tolist() == [[[4.0, 5.0], [0.0, 0.0], [0.0, 0.0]]]


# ---- the MPC loop, with the real simulator as the model --------------------------------------


class SimulatorObjective:
    """Cost of a plan = distance between the goal and the state it reaches in a copy of the real
    environment (physics only, no rendering): no learning involved."""

    def __init__(self, env_name, goals, distance, codec):
        self.sim = envs.make(env_name, image_size=16)
        self.goals, self.distance, self.codec = goals, distance, codec

    def cost_fn(self, observed, chunks, index):
        starts = observed["state"][:, -1]  # (b, S)

        def cost(plans):  # (b, S, H, fs·A) chunks of the codec
            raw = self.codec.to_env(plans)  # (b, S, H·fs, A), what run_mpc will execute
            b, s = raw.shape[:2]
            costs = np.zeros((b, s))
            for row in range(b):
                for sample in range(s):
                    self.sim.set_state(starts[row])
                    for action in raw[row, sample]:
                        self.sim.apply_action(action)
                        mujoco.mj_step(self.sim.model, self.sim.data, nstep=self.sim.physics_steps)
                    costs[row, sample] = self.distance(self.sim.get_state(), self.goals[index[row]])
            return torch.as_tensor(costs)

        return cost


@pytest.mark.parametrize("env_name", ["tworoom", "reacher"])
def test_mpc_with_the_simulator_solves_easy_instances(env_name):
    frameskip = 2
    rng = np.random.default_rng(0)
    batch = [envs.make(env_name, image_size=16) for _ in range(3)]
    starts, goals = [], []
    for env in batch:
        start = env.sample_state(rng)
        goal = copy.deepcopy(start)
        if env_name == "tworoom":  # 50 units away (4 full steps) in the same room
            while True:
                angle = rng.uniform(-np.pi, np.pi)
                goal[:2] = start[:2] + 50 * np.array([np.cos(angle), np.sin(angle)])
                if (20 < goal[:2]).all() and (goal[:2] < 204).all() and tworoom.room(goal[0]) == tworoom.room(start[0]) \
                        and abs(goal[0] - 112) > 15:
                    break
        else:  # each joint 0.6-1 rad away
            goal[:2] = start[:2] + rng.choice([-1, 1], 2) * rng.uniform(0.6, 1.0, 2)
        env.reset(options={"state": start, "goal": goal})
        starts.append(start)
        goals.append(goal)
    distance = (lambda s, g: np.linalg.norm(s[:2] - g[:2])) if env_name == "tworoom" else \
        (lambda s, g: np.abs(envs.base.wrap_angle(s[:2] - g[:2])).max() + 0.1 * np.abs(s[2:]).sum())
    # eval's action mapping, with statistics that make normalised and raw actions differ
    codec = ActionCodec((0.2, -0.1), (0.5, 0.6), (-1.0, -1.0), (1.0, 1.0), frameskip)
    objective = SimulatorObjective(env_name, np.stack(goals), distance, codec)
    bounds = Bounds(*codec.bounds())
    planner = CEM(codec.block_dim, samples=24, elites=6, iterations=4, std=1.2, bounds=bounds, seed=0)
    to_env = codec.to_env
    result = run_mpc(batch, objective, planner, to_env, horizon=3, receding_horizon=1, budget=40,
                     frameskip=frameskip, history=1, record=True)
    assert result.success.all(), (result.final_state, goals)
    for env, start, goal in zip(batch, starts, goals):
        env.reset(options={"state": start, "goal": goal})
    floor = run_mpc(batch, objective, RandomActions(codec.block_dim, bounds, seed=0), to_env, horizon=3,
                    receding_horizon=1, budget=40, frameskip=frameskip, history=1)
    assert floor.steps.sum() > result.steps.sum() and not floor.success.all()  # the instances are not trivial
    assert (result.steps < 40).all() and len(result.solve_seconds) >= 2
    for i, env in enumerate(batch):  # stepping stopped at success, and the recorded frames follow the steps
        assert env.success(result.final_state[i], goals[i])
        assert len(result.frames[i]) == result.steps[i] + 1


def test_mpc_without_success_uses_the_whole_budget():
    env = envs.make("tworoom", image_size=16)
    start = env.sample_state(np.random.default_rng(3))
    env.reset(options={"state": start, "goal": start + np.array([500.0, 0, 0, 0])})  # unreachable
    codec = ActionCodec((0.0, 0.0), (1.0, 1.0), (-1.0, -1.0), (1.0, 1.0), 2)
    result = run_mpc([env], SimulatorObjective("tworoom", start[None], lambda s, g: 0.0, codec),
                     RandomActions(4, Bounds(*codec.bounds()), seed=0), codec.to_env,
                     horizon=2, receding_horizon=2, budget=9, frameskip=2, history=3)
    assert not result.success[0] and result.steps[0] == 9 and len(result.solve_seconds) == 3


def test_mpc_plans_only_the_chunks_left_until_the_goal_is_due():
    """goal_steps: each solve's horizon is the chunks left to the step the goal is due (at least one),
    its warm start the rest of the last plan cut to that length, and it executes at most that many."""
    env = envs.make("tworoom", image_size=16)
    start = env.sample_state(np.random.default_rng(3))
    env.reset(options={"state": start, "goal": start + np.array([500.0, 0, 0, 0])})  # unreachable
    codec = ActionCodec((0.0, 0.0), (1.0, 1.0), (-1.0, -1.0), (1.0, 1.0), 2)
    seen = []

    class Spy(RandomActions):
        def plan(self, cost_fn, batch_size, horizon, init=None):
            plan = super().plan(cost_fn, batch_size, horizon, init)
            seen.append((horizon, None if init is None else tuple(init.shape), tuple(cost_fn(plan[:, None]).shape)))
            return plan

    result = run_mpc([env], SimulatorObjective("tworoom", start[None], lambda s, g: 0.0, codec),
                     Spy(4, Bounds(*codec.bounds()), seed=0), codec.to_env, horizon=3, receding_horizon=2,
                     budget=13, frameskip=2, history=1, goal_steps=7)
    # 7 steps are 4 chunks: capped at 3; after 2 chunks 3 steps are left (2 chunks), then it is due (1 chunk)
    assert [h for h, _, _ in seen] == [3, 2, 1, 1, 1] and result.steps[0] == 13
    assert [init for _, init, _ in seen] == [None, (1, 2, 4), (1, 1, 4), (1, 1, 4), (1, 1, 4)]
    assert all(costs == (1, 1) for _, _, costs in seen)


def test_of_several_proposed_plans_the_cost_picks_the_cheapest():
    targets = torch.randn(B, H, A, generator=torch.Generator().manual_seed(0))
    candidates = torch.stack([targets + 0.5, targets - 0.1, targets * 3], dim=1)  # (B, 3, H, A): the second is best
    torch.testing.assert_close(cheapest(candidates, bowl(targets)), targets - 0.1)

    def never(plans):
        raise AssertionError("one candidate needs no cost")

    torch.testing.assert_close(cheapest(candidates[:, 2:], never), targets * 3)
