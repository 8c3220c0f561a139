"""Reacher: a two-link planar arm seen from above, driven by joint torques.

Links of 0.10 and 0.11 m on a base at the centre of a 0.6 m square arena; the shoulder turns freely,
the elbow within ±2.8 rad. Actions are torques in [−1, 1]² (times the motors' gear); joint damping
caps the speed near 4 rad/s. Physics at 100 Hz, control at 20 Hz. Success: every joint within
0.05 rad of the goal configuration (angles compared modulo 2π).

State (4): shoulder and elbow angles, then their velocities. Proprioception: the same.
"""

import numpy as np
from gymnasium import spaces

from envs.base import VISUAL, MujocoEnv, arena_xml, wrap_angle

ELBOW_LIMIT = 2.8
SUCCESS_ANGLE = 0.05


class ReacherEnv(MujocoEnv):
    state_names = ["shoulder", "elbow", "shoulder_velocity", "elbow_velocity"]
    angle_dims = (0, 1)  # compared modulo 2π
    parts = {"arm": (0, 1)}
    physics_dt = 0.01
    physics_steps = 5

    def __init__(self, image_size: int = 64):
        super().__init__(image_size)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float64)

    def xml(self) -> str:
        joint = 'damping="0.5" armature="0.05"'
        return f"""
<mujoco model="reacher">
  <option gravity="0 0 0" integrator="implicitfast"/>
  {VISUAL}
  <default><geom contype="0" conaffinity="0"/></default>
  <worldbody>{arena_xml(0.0, 0.3)}
    <geom type="cylinder" pos="0 0 0" size="0.02 0.01" rgba=".2 .2 .2 1"/>
    <body name="arm">
      <joint name="shoulder" type="hinge" axis="0 0 1" {joint}/>
      <geom type="capsule" fromto="0 0 0 0.1 0 0" size="0.012" mass="0.03" rgba=".0 .45 .7 1"/>
      <body name="forearm" pos="0.1 0 0">
        <joint name="elbow" type="hinge" axis="0 0 1" limited="true" range="{-ELBOW_LIMIT} {ELBOW_LIMIT}" {joint}/>
        <geom type="capsule" fromto="0 0 0 0.11 0 0" size="0.01" mass="0.03" rgba=".0 .6 .5 1"/>
        <geom type="sphere" pos="0.11 0 0" size="0.016" mass="0.005" rgba=".9 .5 .1 1"/>
      </body>
    </body>
  </worldbody>
  <actuator>
    <motor joint="shoulder" gear="2" ctrlrange="-1 1" ctrllimited="true"/>
    <motor joint="elbow" gear="2" ctrlrange="-1 1" ctrllimited="true"/>
  </actuator>
</mujoco>"""

    def sample_state(self, rng: np.random.Generator) -> np.ndarray:
        return np.array([rng.uniform(-np.pi, np.pi), rng.uniform(-ELBOW_LIMIT + 0.3, ELBOW_LIMIT - 0.3), 0.0, 0.0])

    def apply_action(self, action: np.ndarray) -> None:
        self.data.ctrl[:] = action

    def success(self, state: np.ndarray, goal: np.ndarray) -> bool:
        return self.distance(state, goal) < SUCCESS_ANGLE

    def distance(self, state: np.ndarray, goal: np.ndarray) -> float:
        """The largest joint-angle error."""
        return float(np.abs(wrap_angle(np.asarray(state)[:2] - np.asarray(goal)[:2])).max())

    def proprio(self, state: np.ndarray) -> np.ndarray:
        return state[:4]


class ReacherExpert:
    """A noisy joint-space PD controller toward random joint targets; a new target once there (or
    after `patience` steps)."""

    def __init__(self, rng: np.random.Generator, noise: float = 0.1, patience: int = 40,
                 kp: float = 2.0, kd: float = 0.4):
        self.rng, self.noise, self.patience, self.kp, self.kd = rng, noise, patience, kp, kd

    def reset(self, state: np.ndarray) -> None:
        self._new_target()

    def _new_target(self) -> None:
        self.target = np.array([self.rng.uniform(-np.pi, np.pi), self.rng.uniform(-ELBOW_LIMIT + 0.3, ELBOW_LIMIT - 0.3)])
        self.steps = 0

    def __call__(self, state: np.ndarray) -> np.ndarray:
        self.steps += 1
        error = wrap_angle(self.target - state[:2])
        error[1] = self.target[1] - state[1]  # the elbow cannot wrap past its limits
        if (np.all(np.abs(error) < SUCCESS_ANGLE) and np.all(np.abs(state[2:]) < 0.2)) or self.steps > self.patience:
            self._new_target()
        action = self.kp * error - self.kd * state[2:4] + self.rng.normal(0, self.noise, size=2)
        return np.clip(action, -1, 1)
