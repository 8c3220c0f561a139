"""leworld's environments (MuJoCo's, and gym-pusht's PushT with the community extra) and their
scripted data-collection policies.

    import envs, gymnasium
    env = gymnasium.make("leworld/PushT-v0", image_size=64)   # or envs.make("pusht", image_size=64)

Each environment renders pixels offscreen, reports its physical state in `info["state"]` (and its
proprioception in `info["proprio"]`), restores a state exactly with reset(options={"state": s}),
and judges success with the pure function env.success(state, goal_state).
"""

import gymnasium as gym
import numpy as np

from envs.base import Env, EnvError, MujocoEnv, RandomPolicy
from envs.cube import CubeEnv, CubeExpert, CubeExplorer
from envs.gym_pusht import GymPushTEnv, GymPushTExpert
from envs.pusht import PushTEnv, PushTExpert
from envs.reacher import ReacherEnv, ReacherExpert
from envs.tworoom import TwoRoomEnv, TwoRoomExpert

ENVS = {"pusht": PushTEnv, "tworoom": TwoRoomEnv, "reacher": ReacherEnv, "cube": CubeEnv, "gym_pusht": GymPushTEnv}
EXPERTS = {"pusht": PushTExpert, "tworoom": TwoRoomExpert, "reacher": ReacherExpert, "cube": CubeExpert,
           "gym_pusht": GymPushTExpert}
# exploration where random actions would seldom touch what matters (the others explore at random)
EXPLORERS = {"cube": CubeExplorer}
IDS = {"pusht": "leworld/PushT-v0", "tworoom": "leworld/TwoRoom-v0", "reacher": "leworld/Reacher-v0",
       "cube": "leworld/Cube-v0", "gym_pusht": "leworld/GymPushT-v0"}

for _name, _id in IDS.items():
    if _id not in gym.registry:
        gym.register(_id, entry_point=f"{ENVS[_name].__module__}:{ENVS[_name].__name__}")


def make(name: str, **kwargs) -> Env:
    """An environment by short name (pusht, tworoom, reacher, cube, gym_pusht) without gymnasium's wrappers."""
    if name not in ENVS:
        raise EnvError(f"unknown environment {name!r}; choose one of: {', '.join(ENVS)}")
    return ENVS[name](**kwargs)


def make_policy(name: str, env: Env, rng: np.random.Generator, expert: bool, noise: float = 0.1):
    """The scripted expert of an environment (with Gaussian action noise `noise`), or exploration."""
    if expert:
        return EXPERTS[name](rng, noise=noise)
    return EXPLORERS[name](rng) if name in EXPLORERS else RandomPolicy(rng, env.action_space)


__all__ = ["ENVS", "EXPERTS", "EXPLORERS", "IDS", "Env", "EnvError", "MujocoEnv", "RandomPolicy", "make", "make_policy",
           "PushTEnv", "TwoRoomEnv", "ReacherEnv", "CubeEnv", "GymPushTEnv"]
