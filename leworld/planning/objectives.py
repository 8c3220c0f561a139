"""What a planner minimises, built once per batch of tasks (their goals) and turned into a cost
function once per solve (planners/mpc.py's Objective): a world model's latent distance to the goal
(LatentObjective), the same distance with the simulator in place of the model's predictor
(EncodedSimulatorObjective, the ceiling of the model's encoder), or, for the oracle, the simulator's
own goal cost (SimulatorObjective). All are made as Objective(model, goals, device, compile)."""

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from einops import rearrange

import envs
from leworld.models import WorldModel
from leworld.runtime import autocast


@dataclass
class Goals:
    """The goals of a batch of b tasks, as the dataset recorded them."""

    pixels: np.ndarray  # (b, H, W, 3) uint8, the goal frames
    states: np.ndarray  # (b, S) float64, the goal states
    proprio: np.ndarray | None  # (b, Q), the goals' proprioception where the dataset has it
    proprio_of: Callable[[np.ndarray], np.ndarray] | None  # an env's state (S,) -> its proprioception (Q,)


class LatentObjective:
    """The planning cost of a world model: its `distance` between the last imagined latent and the
    goal's. Goals are encoded once when it is made, the observed frames once per solve. Models
    that read proprioception get it (from the goals, and from the observed states by proprio_of);
    the others ignore it."""

    def __init__(self, model, goals: Goals, device: torch.device, compile: bool = False, reference: bool = False,
                 rows_per_call: int | None = None, prior=None):
        """compile: torch.compile the cost (on CUDA with CUDA graphs: a planner's shapes do not change);
        reference: the straightforward rollout (WorldModel.plan_cost), not the model's own faster one;
        rows_per_call: cost the plans of as many environments at a time as make about this many
        (environment, plan) rows, so that a CPU's intermediates stay in its caches (None: all at once);
        prior: a policy (leworld/nn/policy.py) that proposes each solve's first plan."""
        self.model, self.device, self.proprio_of, self.rows = model, device, goals.proprio_of, rows_per_call
        self.prior = prior
        self.uncompiled_cost = functools.partial(WorldModel.plan_cost, model) if reference else model.plan_cost
        self.plan_cost = self.uncompiled_cost
        if compile:
            compiled = torch.compile(self.uncompiled_cost, dynamic=False,
                                     mode="reduce-overhead" if device.type == "cuda" else None)
            # CUDA graphs write each call's output into the same memory: a planner may keep costs longer
            self.plan_cost = lambda *args: compiled(*args).clone()
        proprio = None if goals.proprio is None else goals.proprio[:, None]
        self.goals = self.encode(goals.pixels[:, None], proprio)[:, 0]

    @torch.no_grad()
    def encode(self, pixels: np.ndarray, proprio: np.ndarray | None = None) -> torch.Tensor:
        """uint8 frames (B, T, H, W, 3) and proprio (B, T, Q) -> latents (B, T, *L) in float32."""
        frames = rearrange(torch.from_numpy(pixels).to(self.device), "b t h w c -> b t c h w")
        if proprio is not None:
            proprio = torch.as_tensor(proprio, dtype=torch.float32, device=self.device)
        with autocast(self.device):
            return self.model.encode(frames, proprio).float()

    @torch.no_grad()
    def propose(self, observed: dict, index: np.ndarray) -> torch.Tensor | None:
        """The prior's plans (b, K, H, fs·A), one per head, from the last observed frame to the goal in
        the steps left of its horizon (at least one chunk, once they are spent); None without a prior."""
        if self.prior is None:
            return None
        proprio = None if self.proprio_of is None else np.apply_along_axis(self.proprio_of, -1, observed["state"][:, -1:])
        latent = self.encode(observed["pixels"][:, -1:], proprio)[:, 0]  # (b, D)
        taken = torch.as_tensor(observed.get("steps", np.zeros(len(index), dtype=int)), device=self.device)  # (b,)
        left = self.prior.chunks_left(self.prior.horizon * self.prior.frameskip - taken)
        return self.prior(latent, self.goals[torch.as_tensor(index, device=self.device)], left)

    def cost_fn(self, observed: dict, chunks: torch.Tensor | None, index: np.ndarray):
        proprio = None if self.proprio_of is None else np.apply_along_axis(self.proprio_of, -1, observed["state"])
        context = self.encode(observed["pixels"], proprio)  # (b, T, *L)
        goal = self.goals[torch.as_tensor(index, device=self.device)]
        taken = None if chunks is None else chunks.to(self.device)

        def cost(plans: torch.Tensor) -> torch.Tensor:  # (b, S, H, fs·A) -> (b, S)
            per_call = len(plans) if self.rows is None else max(1, self.rows // plans.shape[1])  # environments
            with autocast(self.device):
                return torch.cat([self.plan_cost(context[i:i + per_call], goal[i:i + per_call], plans[i:i + per_call],
                                                 None if taken is None else taken[i:i + per_call]).float()
                                  for i in range(0, len(plans), per_call)])

        return cost

    @torch.no_grad()
    def open_loop(self, observed: dict, plans: torch.Tensor, index: np.ndarray) -> dict[str, np.ndarray]:
        """What the model imagined of executed plans against what the simulator then showed.
        observed: {"pixels": (b, K + 1, H, W, 3), "state": (b, K + 1, S)}, the frame before the plan and
        one after each of its K chunks; plans (b, K, fs·A). -> in the model's distance, per chunk: the
        imagined latent's to the seen one ("error", (b, K)) and the seen one's to the start's
        ("moved", (b, K): what "nothing changes" would get wrong); and the seen end's cost to the
        goal ("achieved", (b,)), beside which the plan's cost is what the model expected."""
        proprio = None if self.proprio_of is None else np.apply_along_axis(self.proprio_of, -1, observed["state"])
        seen = self.encode(observed["pixels"], proprio)  # (b, K + 1, *L)
        with autocast(self.device):
            imagined = self.model.rollout(seen[:, :1], plans.to(self.device)).float()  # (b, K, *L)
        start = seen[:, :1].expand_as(seen[:, 1:])
        goal = self.goals[torch.as_tensor(index, device=self.device)]
        return {"error": self.model.distance(imagined, seen[:, 1:]).cpu().numpy(),
                "moved": self.model.distance(start, seen[:, 1:]).cpu().numpy(),
                "achieved": self.model.distance(seen[:, -1], goal).cpu().numpy()}


class EncodedSimulatorObjective(LatentObjective):
    """A world model's planning cost with a perfect predictor (eval imagine=simulator): each candidate
    plan is simulated from the observed state, the frame it ends on is rendered and encoded, and the
    model's distance of that latent to the goal's is the cost. What the model's latent distance allows
    when nothing is wrong with its predictions: a failure here is the encoder's (its distance does not
    lead to the goal, or its landscape defeats the search), not the predictor's. As slow as the oracle
    plus a render and an encoding per plan."""

    def __init__(self, model, goals: Goals, device: torch.device, compile: bool = False, reference: bool = False,
                 rows_per_call: int | None = None, prior=None):
        super().__init__(model, goals, device, rows_per_call=rows_per_call, prior=prior)
        self.sim = envs.make(model.env.name, **model.env.kwargs)

    def cost_fn(self, observed: dict, chunks: torch.Tensor | None, index: np.ndarray):
        starts, goal = observed["state"][:, -1], self.goals[torch.as_tensor(index, device=self.device)]

        def cost(plans: torch.Tensor) -> torch.Tensor:  # (b, S, H, fs·A) -> (b, S)
            raw = self.model.codec.to_env(plans)  # (b, S, H·fs, A): what the MPC loop would execute
            costs = []
            for start, samples, target in zip(starts, raw, goal):
                ends, frames = [], []
                for actions in samples:
                    ends.append(self.sim.simulate(start, actions))  # the env is left there: its frame is the end's
                    frames.append(self.sim.render())
                frames = np.stack(frames)  # (S, H, W, 3)
                proprio = None if self.proprio_of is None else np.stack([self.proprio_of(end) for end in ends])[:, None]
                latents = self.encode(frames[:, None], proprio)[:, 0]  # (S, *L)
                costs.append(self.model.distance(latents, target.expand_as(latents)))
            return torch.stack(costs)

        return cost


class SimulatorObjective:
    """The oracle's planning cost: each candidate plan simulated from the observed state in a copy
    of the environment (physics only, nothing drawn) and scored by the env's goal cost. Exact, and
    slow: it is the ceiling of what the planner and the protocol allow, not a model."""

    def __init__(self, oracle, goals: Goals, device: torch.device | None = None, compile: bool = False,
                 rows_per_call: int | None = None):
        """oracle: what it plans for (leworld.planning.oracle.Oracle: its env and action codec);
        device, compile and rows_per_call: as LatentObjective's, unused (the simulator runs on the CPU)."""
        self.sim, self.goals, self.codec = envs.make(oracle.env.name, **oracle.env.kwargs), goals.states, oracle.codec

    def cost_fn(self, observed: dict, chunks: torch.Tensor | None, index: np.ndarray):
        starts, goals = observed["state"][:, -1], self.goals[index]  # (b, S), (b, S)

        def cost(plans: torch.Tensor) -> torch.Tensor:  # (b, S, H, fs·A) -> (b, S)
            raw = self.codec.to_env(plans)  # (b, S, H·fs, A): what the MPC loop would execute
            costs = [[self.sim.goal_cost(self.sim.simulate(start, actions), goal) for actions in samples]
                     for start, goal, samples in zip(starts, goals, raw)]
            return torch.tensor(costs, dtype=torch.float32, device=plans.device)

        return cost
