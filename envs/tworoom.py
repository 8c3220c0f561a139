"""TwoRoom: a point agent in a square arena split in two rooms by a wall with a door.

The arena is 224 x 224 workspace units, so a unit is a pixel of a 224-px frame. The wall runs down
the middle (x in [108, 116]) with a door 40 units wide at its centre. Actions are bounded
displacements in [−1, 1]² times 12 units, tracked by a stiff PD controller; walls stop the agent.
Success: the agent within 16 units of the goal position (7.1% of the frame's width).

State (4): agent x, y, vx, vy. Proprioception: the same.
"""

import numpy as np
from gymnasium import spaces

from envs.base import VISUAL, MujocoEnv, arena_xml

ARENA = 224.0
UNIT = 100.0  # workspace units per MuJoCo length unit
AGENT_RADIUS = 6.0
STEP = 12.0  # largest displacement per action
WALL_X = (108.0, 116.0)
DOOR_Y = (92.0, 132.0)
BORDER = 4.0
SUCCESS_DISTANCE = 16.0


class TwoRoomEnv(MujocoEnv):
    state_names = ["x", "y", "vx", "vy"]
    angle_dims = ()
    parts = {"agent": (0, 1)}
    physics_dt = 0.01
    physics_steps = 10
    state_scale = UNIT

    def __init__(self, image_size: int = 64):
        super().__init__(image_size)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float64)

    def xml(self) -> str:
        u = lambda v: v / UNIT  # noqa: E731
        half = u(ARENA / 2)
        wall_x, wall_half = u(sum(WALL_X) / 2), u((WALL_X[1] - WALL_X[0]) / 2)
        lower_half, upper_half = u(DOOR_Y[0] / 2), u((ARENA - DOOR_Y[1]) / 2)
        wall = 'rgba=".2 .2 .2 1"'
        return f"""
<mujoco model="tworoom">
  <option gravity="0 0 0" integrator="implicitfast"/>
  {VISUAL}
  <worldbody>{arena_xml(half, half, wall=u(BORDER))}
    <geom type="box" pos="{wall_x} {lower_half} 0" size="{wall_half} {lower_half} 0.2" {wall}/>
    <geom type="box" pos="{wall_x} {2 * half - upper_half} 0" size="{wall_half} {upper_half} 0.2" {wall}/>
    <body name="agent">
      <joint name="agent_x" type="slide" axis="1 0 0" damping="100"/>
      <joint name="agent_y" type="slide" axis="0 1 0" damping="100"/>
      <geom type="sphere" size="{u(AGENT_RADIUS)}" mass="1" rgba=".85 .2 .2 1"/>
    </body>
  </worldbody>
  <actuator>
    <position joint="agent_x" kp="2500"/>
    <position joint="agent_y" kp="2500"/>
  </actuator>
</mujoco>"""

    def sample_state(self, rng: np.random.Generator) -> np.ndarray:
        return np.concatenate([free_position(rng), np.zeros(2)])

    def apply_action(self, action: np.ndarray) -> None:
        self.data.ctrl[:] = self.data.qpos[:2] + STEP / UNIT * action

    def success(self, state: np.ndarray, goal: np.ndarray) -> bool:
        return self.distance(state, goal) < SUCCESS_DISTANCE

    def distance(self, state: np.ndarray, goal: np.ndarray) -> float:
        return float(np.linalg.norm(np.asarray(state)[:2] - np.asarray(goal)[:2]))

    def proprio(self, state: np.ndarray) -> np.ndarray:
        return state[:4]


def free_position(rng: np.random.Generator, margin: float = 2.0) -> np.ndarray:
    """A random agent position in either room, clear of every wall."""
    clearance = BORDER * 2 + AGENT_RADIUS + margin
    while True:
        xy = rng.uniform(clearance, ARENA - clearance, size=2)
        if not WALL_X[0] - AGENT_RADIUS - margin < xy[0] < WALL_X[1] + AGENT_RADIUS + margin:
            return xy


def room(x: float) -> int:
    return 0 if x < sum(WALL_X) / 2 else 1


class TwoRoomExpert:
    """Walks to a random goal, through the door when the goal is in the other room; a new goal once
    there (or after `patience` steps). Gaussian noise on every action."""

    def __init__(self, rng: np.random.Generator, noise: float = 0.1, patience: int = 60):
        self.rng, self.noise, self.patience = rng, noise, patience

    def reset(self, state: np.ndarray) -> None:
        self._new_goal()

    def _new_goal(self) -> None:
        self.goal = free_position(self.rng, margin=6.0)
        self.steps = 0

    def __call__(self, state: np.ndarray) -> np.ndarray:
        position = state[:2]
        self.steps += 1
        if np.linalg.norm(self.goal - position) < 6 or self.steps > self.patience:
            self._new_goal()
        waypoint = self.goal
        door_y = sum(DOOR_Y) / 2
        if room(position[0]) != room(self.goal[0]):
            side = -1 if room(position[0]) == 0 else 1
            entry = np.array([sum(WALL_X) / 2 + side * 20, door_y])
            # line up with the door before going through it
            in_line = abs(position[1] - door_y) < 8 and abs(position[0] - sum(WALL_X) / 2) < 24
            waypoint = np.array([sum(WALL_X) / 2 - side * 20, door_y]) if in_line else entry
        action = (waypoint - position) / STEP + self.rng.normal(0, self.noise, size=2)
        return np.clip(action, -1, 1)
