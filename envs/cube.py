"""Cube: a two-finger gripper picks a 4 cm cube up from a table and places it at a goal position.

OGBench's cube-single, built in MuJoCo without dm_control: a table 50 cm square, one cube of 4 cm
(50 g, friction 1.2) resting on it, and a gripper that moves in 3-D and opens and closes. The
gripper is a position-controlled end effector (no arm): a palm on three slide joints, holding two
fingers that slide toward each other along x. A fixed perspective camera looks at the table from
the front and above; a light casts shadows so that height can be read from a single frame (a cube
held in the air and one further back on the table look alike without them).

Actions, in [−1, 1]⁴: end-effector displacement (x, y, z) times 3 cm, tracked by a stiff PD
controller, and a gripper command (−1 open, +1 closed) that sets the fingers' target opening.
Physics at 200 Hz, control at 20 Hz, gravity on. Success: the cube's centre within 4 cm of the
goal's (as OGBench).

State (23), in centimetres for lengths: gripper x, y, z (the point between the fingertips), the
two fingers' openings, the cube's position and orientation (quaternion w, x, y, z); then the
velocities (gripper 3, fingers 2, cube linear 3 and angular 3, rad/s). Proprioception: the
gripper's position and opening (the two fingers' sum).
"""

import numpy as np
from gymnasium import spaces

from envs.base import MujocoEnv

UNIT = 100.0  # state units (cm) per MuJoCo length unit (m)
HALF = 0.02  # the cube's half side, m
TABLE = 0.25  # the table's half side, m
CUBE_RANGE = 0.15  # the cube starts and is placed within ±this of the centre, m
REACH = (0.2, 0.2, (0.005, 0.25))  # the gripper's x, y half ranges and z range, m
STEP = 0.03  # the largest displacement per action, m
OPEN = 0.045  # each finger's largest opening from the centre line, m
SUCCESS_DISTANCE = 4.0  # cm


class CubeEnv(MujocoEnv):
    state_names = ["gripper_x", "gripper_y", "gripper_z", "finger_left", "finger_right",
                   "cube_x", "cube_y", "cube_z", "cube_qw", "cube_qx", "cube_qy", "cube_qz",
                   "gripper_vx", "gripper_vy", "gripper_vz", "finger_left_v", "finger_right_v",
                   "cube_vx", "cube_vy", "cube_vz", "cube_wx", "cube_wy", "cube_wz"]
    angle_dims = ()
    parts = {"gripper": (0, 1, 2), "cube": (5, 6, 7, 8, 9, 10, 11)}
    object_dims = (5, 6, 7)
    camera = "front"
    physics_dt = 0.005  # grasps hold at 200 Hz (tested); 2.4x cheaper for the oracle than 500 Hz
    physics_steps = 10
    # lengths in cm; quaternions and angular velocities as they are
    state_scale = [UNIT] * 8 + [1.0] * 4 + [UNIT] * 8 + [1.0] * 3

    def __init__(self, image_size: int = 64):
        super().__init__(image_size)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float64)

    def xml(self) -> str:
        (x_reach, y_reach, (z_low, z_high)) = REACH
        return f"""
<mujoco model="cube">
  <compiler angle="radian"/>
  <option integrator="implicitfast" cone="elliptic" impratio="10"/>
  <default>
    <default class="reach"><joint type="slide" damping="20" armature="0.01"/></default>
    <default class="grip">  <!-- what grasps and is grasped: torsional friction too, so a held cube does not spin -->
      <geom type="box" friction="1.2 0.01 0.001" condim="4"/>
      <default class="finger"><geom size="0.006 0.012 0.03" mass="0.05" rgba=".35 .35 .4 1"/></default>
    </default>
  </default>
  <visual>
    <quality shadowsize="{4 * self.image_size}"/>
    <headlight ambient=".5 .5 .5" diffuse=".3 .3 .3" specular="0 0 0"/>
    <rgba haze="0 0 0 0"/>
  </visual>
  <worldbody>
    <light pos="0.1 -0.1 1.0" dir="-0.1 0.1 -1" diffuse=".5 .5 .5" specular="0 0 0" castshadow="true"/>
    <camera name="front" pos="0 -0.6 0.45" xyaxes="1 0 0 0 0.51 0.86" fovy="48"/>
    <geom name="table" type="box" pos="0 0 -0.02" size="{TABLE} {TABLE} 0.02" rgba=".85 .82 .75 1"/>
    <geom name="floor" type="box" pos="0 0 -0.06" size="1 1 0.02" rgba=".45 .45 .45 1"
          contype="0" conaffinity="0"/>
    <geom name="backdrop" type="box" pos="0 {TABLE + 0.1} 0.2" size="0.6 0.01 0.4" rgba=".55 .65 .75 1"
          contype="0" conaffinity="0"/>
    <body name="gripper" gravcomp="1">
      <joint name="gripper_x" class="reach" axis="1 0 0" range="{-x_reach} {x_reach}"/>
      <joint name="gripper_y" class="reach" axis="0 1 0" range="{-y_reach} {y_reach}"/>
      <joint name="gripper_z" class="reach" axis="0 0 1" range="{z_low} {z_high}"/>
      <geom type="box" size="{OPEN + 0.012} 0.015 0.008" pos="0 0 0.068" mass="0.2" rgba=".2 .4 .8 1"
            contype="0" conaffinity="0"/>
      <body name="finger_left" gravcomp="1">
        <joint name="finger_left" type="slide" axis="-1 0 0" range="0 {OPEN}" damping="2"/>
        <geom class="finger" pos="-0.006 0 0.03"/>
      </body>
      <body name="finger_right" gravcomp="1">
        <joint name="finger_right" type="slide" axis="1 0 0" range="0 {OPEN}" damping="2"/>
        <geom class="finger" pos="0.006 0 0.03"/>
      </body>
    </body>
    <body name="cube" pos="0 0 {HALF}">
      <freejoint name="cube"/>
      <geom class="grip" size="{HALF} {HALF} {HALF}" mass="0.05" rgba=".85 .15 .15 1"/>
    </body>
  </worldbody>
  <contact><exclude body1="finger_left" body2="finger_right"/></contact>
  <actuator>
    <position joint="gripper_x" kp="300"/>
    <position joint="gripper_y" kp="300"/>
    <position joint="gripper_z" kp="300"/>
    <position joint="finger_left" kp="100" ctrlrange="0 {OPEN}"/>
    <position joint="finger_right" kp="100" ctrlrange="0 {OPEN}"/>
  </actuator>
</mujoco>"""

    def sample_state(self, rng: np.random.Generator) -> np.ndarray:
        """The cube at rest on the table, at a random place and turn about z; the gripper open,
        somewhere above the table."""
        gripper = [rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15), rng.uniform(0.08, 0.2)]
        cube = [*rng.uniform(-CUBE_RANGE, CUBE_RANGE, size=2), HALF]
        yaw = rng.uniform(-np.pi / 4, np.pi / 4)
        qpos = np.concatenate([gripper, [OPEN, OPEN], cube, [np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)]])
        return np.concatenate([qpos, np.zeros(11)]) * self.state_scale

    def apply_action(self, action: np.ndarray) -> None:
        target = self.data.qpos[:3] + STEP * action[:3]
        opening = OPEN * (1 - action[3]) / 2
        self.data.ctrl[:] = [*target, opening, opening]

    def success(self, state: np.ndarray, goal: np.ndarray) -> bool:
        return self.distance(state, goal) < SUCCESS_DISTANCE

    def distance(self, state: np.ndarray, goal: np.ndarray) -> float:
        """How far the cube's centre is from the goal's, cm."""
        return float(np.linalg.norm(np.asarray(state)[5:8] - np.asarray(goal)[5:8]))

    def goal_cost(self, state: np.ndarray, goal: np.ndarray) -> float:
        """The cube's error over its threshold, plus a tenth of the gripper's distance to the cube
        over the same: only the gripper moves the cube, and a plan that moves neither would
        otherwise score the same as one that reaches for it."""
        state = np.asarray(state)
        reach = np.linalg.norm(state[:3] - state[5:8])
        return (self.distance(state, goal) + 0.1 * reach) / SUCCESS_DISTANCE

    @classmethod
    def probe_targets(cls, states: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Every entry but the quaternion, whose components a linear probe cannot score (q and −q
        are one pose; a cube at rest keeps three of them near constant), and in its place what a
        frame shows of the cube's pose: its tilt (the angle of its most upright face normal from
        vertical) and its yaw, as cos and sin of 4 × yaw since a square face repeats every 90°."""
        w, x, y, z = states[:, 8:12].T
        # rows of the rotation matrix: the world x, y, z components of the cube's three axes, (N, 3) each
        axes_x = np.stack([1 - 2 * (y**2 + z**2), 2 * (x * y - w * z), 2 * (x * z + w * y)], 1)
        axes_y = np.stack([2 * (x * y + w * z), 1 - 2 * (x**2 + z**2), 2 * (y * z - w * x)], 1)
        axes_z = np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x**2 + y**2)], 1)
        tilt = np.arccos(np.clip(np.abs(axes_z).max(1), -1, 1))
        flat = np.abs(axes_z).argmin(1)  # the most horizontal of the cube's axes
        rows = np.arange(len(states))
        yaw4 = 4 * np.arctan2(axes_y[rows, flat], axes_x[rows, flat])
        keep = [i for i, name in enumerate(cls.state_names) if not name.startswith("cube_q")]
        targets = np.concatenate([states[:, keep], np.stack([tilt, np.cos(yaw4), np.sin(yaw4)], 1)], 1)
        return targets, [cls.state_names[i] for i in keep] + ["cube_tilt", "cube_yaw4.cos", "cube_yaw4.sin"]

    def proprio(self, state: np.ndarray) -> np.ndarray:
        return np.concatenate([state[:3], [state[3] + state[4]]])


class CubeExpert:
    """A noisy scripted pick-and-place: reach above the cube, descend, grasp, lift, carry to a
    random place on the table, lower, release, retreat; then again to a new place. A grasp that
    did not lift the cube (it slipped, or noise pushed it away) starts over from the reach, as does
    any phase that takes more than `patience` steps.

    Phases are (target of the gripper, gripper command, done when); targets in state units (cm).
    """

    HOVER = 10.0  # cm above the table to move at
    GRASP_Z = 1.5  # the gripper's height (between the fingertips) when closing on the cube

    def __init__(self, rng: np.random.Generator, noise: float = 0.1, patience: int = 25):
        self.rng, self.noise, self.patience = rng, noise, patience

    def reset(self, state: np.ndarray) -> None:
        self._start_over()

    def _start_over(self) -> None:
        self.place = self.rng.uniform(-CUBE_RANGE, CUBE_RANGE, size=2) * UNIT
        self.phase, self.steps = "reach", 0

    def _next(self, phase: str) -> None:
        self.phase, self.steps = phase, 0

    def __call__(self, state: np.ndarray) -> np.ndarray:
        gripper, cube = state[:3], state[5:8]
        self.steps += 1
        held = cube[2] > HALF * UNIT + 1 and np.linalg.norm(cube[:2] - gripper[:2]) < 2.5
        above_cube = np.linalg.norm(gripper[:2] - cube[:2]) < 0.8
        if self.phase == "reach":  # above the cube, open
            target, grip = [*cube[:2], self.HOVER], -1.0
            if above_cube:
                self._next("descend")
        elif self.phase == "descend":
            target, grip = [*cube[:2], self.GRASP_Z], -1.0
            if gripper[2] < self.GRASP_Z + 0.7:
                self._next("grasp")
            elif not above_cube and gripper[2] < 5:  # the cube moved away: up again
                self._next("reach")
        elif self.phase == "grasp":  # close in place
            target, grip = gripper, 1.0
            if self.steps >= 4:
                self._next("lift")
        elif self.phase == "lift":
            target, grip = [*gripper[:2], self.HOVER], 1.0
            if gripper[2] > self.HOVER - 1:
                self._next("carry" if held else "reach")
        elif self.phase == "carry":
            target, grip = [*self.place, self.HOVER], 1.0
            if not held:
                self._next("reach")
            elif np.linalg.norm(gripper[:2] - self.place) < 1.0:
                self._next("lower")
        elif self.phase == "lower":
            target, grip = [*self.place, HALF * UNIT + 0.5], 1.0
            if cube[2] < HALF * UNIT + 0.8:
                self._next("release")
        elif self.phase == "release":
            target, grip = gripper, -1.0
            if self.steps >= 3:
                self._next("retreat")
        else:  # retreat: up, then a new place
            target, grip = [*gripper[:2], self.HOVER], -1.0
            if gripper[2] > self.HOVER - 1:
                self._start_over()
        if self.steps > self.patience:
            self._start_over()
        move = (np.asarray(target) - gripper) / (STEP * UNIT) + self.rng.normal(0, self.noise, size=3)
        return np.clip(np.concatenate([move, [grip]]), -1, 1)


class CubeExplorer:
    """Exploration that still meets the cube: a smoothed random walk of the gripper drawn toward
    random points near the cube (and at random heights), with the gripper opened or closed at
    random every few steps. Random actions moved the cube in none of 20 episodes; this moved it
    in 14 (pushing and knocking it; it lifted it in none: that the expert's episodes show)."""

    def __init__(self, rng: np.random.Generator, noise: float = 0.5, smoothness: float = 0.7, switch: float = 0.15):
        self.rng, self.noise, self.smoothness, self.switch = rng, noise, smoothness, switch

    def reset(self, state: np.ndarray) -> None:
        self.drift, self.grip = np.zeros(3), -1.0
        self._new_lure(state)

    def _new_lure(self, state: np.ndarray) -> None:
        self.lure = np.array([*(state[5:7] + self.rng.normal(0, 3.0, size=2)), self.rng.uniform(0.5, 12.0)])

    def __call__(self, state: np.ndarray) -> np.ndarray:
        if self.rng.random() < self.switch:
            self.grip = -self.grip
        if self.rng.random() < 0.1 or np.linalg.norm(self.lure - state[:3]) < 1.5:
            self._new_lure(state)
        noise = self.rng.normal(0, self.noise, size=3)
        self.drift = self.smoothness * self.drift + np.sqrt(1 - self.smoothness**2) * noise
        pull = (self.lure - state[:3]) / (STEP * UNIT)
        return np.clip(np.concatenate([0.5 * pull + self.drift, [self.grip]]), -1, 1)
