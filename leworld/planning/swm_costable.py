"""Any leworld world model as stable-worldmodel's `Costable` (stable_worldmodel/protocols.py, 0.1.1),
so that its solvers (CEMSolver, MPPISolver, ...) and WorldModelPolicy plan with a leworld checkpoint:

    model = load_world_model("runs/train/<run>")
    solver = stable_worldmodel.solver.CEMSolver(SwmCostable(model), num_samples=300, topk=30, n_steps=30)
    policy = stable_worldmodel.policy.WorldModelPolicy(solver, PlanConfig(horizon=5, action_block=model.frameskip,
                                                       ...), process={"action": SwmCostable(model).action_scaler()})

What their solvers pass and what this does with it:
- `info_dict["pixels"]`, `info_dict["goal"]`: the frames as the World renders them, uint8, channels
  last (B, S, T, H, W, 3) or first (B, S, T, 3, H, W), every sample a copy (their solvers expand the
  batch); the model encodes the last observed frame and the last goal frame once per solve (cached
  in the dict, which their solvers reuse across iterations). Leave WorldModelPolicy's `transform`
  out: leworld models standardise frames themselves. Raw `proprio` (B, S, T, Q), if given, goes to
  models that read it.
- `action_candidates` (B, S, H, fs·A): action blocks in the model's normalised chunk space (their
  action_block = the model's frameskip); `action_scaler()` is the `process["action"]` that maps
  them to raw actions and back (leworld.codec.ActionCodec's mean and std).
- returns the model's `plan_cost` (B, S): the distance of each plan's last imagined latent to the goal's.
"""

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from leworld import LeworldError
from leworld.models import WorldModel


class SwmCostable(nn.Module):
    def __init__(self, model: WorldModel):
        super().__init__()
        self.model = model  # a submodule: their solvers read the dtype from parameters()

    @torch.no_grad()
    def get_cost(self, info_dict: dict, action_candidates: Tensor) -> Tensor:
        if "leworld_goal" not in info_dict:
            info_dict["leworld_context"] = self.encode_last(info_dict, "pixels")  # (B, 1, *L)
            info_dict["leworld_goal"] = self.encode_last(info_dict, "goal")[:, 0]  # (B, *L)
        plans = action_candidates.to(next(self.model.parameters()).device, torch.float32)
        return self.model.plan_cost(info_dict["leworld_context"], info_dict["leworld_goal"], plans)

    def encode_last(self, info_dict: dict, key: str) -> Tensor:
        """The last frame of info_dict[key] (B, S, T, ...) as latents (B, 1, *L), the first sample's copy."""
        frames = torch.as_tensor(info_dict[key])[:, 0, -1:]  # (B, 1, H, W, 3) or (B, 1, 3, H, W)
        if frames.dtype != torch.uint8:
            raise LeworldError(f"info_dict[{key!r}] holds {frames.dtype} frames; leworld models take them as rendered "
                               "(uint8): leave WorldModelPolicy's transform out")
        if frames.shape[-1] == 3:
            frames = rearrange(frames, "b t h w c -> b t c h w")
        proprio = info_dict.get("proprio")
        if proprio is not None:
            proprio = torch.as_tensor(proprio, dtype=torch.float32)[:, 0, -1:]
        device = next(self.model.parameters()).device
        return self.model.encode(frames.to(device), None if proprio is None else proprio.to(device)).float()

    def action_scaler(self) -> "ActionScaler":
        return ActionScaler(np.asarray(self.model.codec.mean), np.asarray(self.model.codec.std))


class ActionScaler:
    """stable-worldmodel's Transformable for actions: raw (..., A) <-> the codec's normalised actions."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean, self.std = mean, std

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def inverse_transform(self, x: np.ndarray) -> np.ndarray:
        return x * self.std + self.mean
