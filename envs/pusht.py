"""PushT: a disc agent pushes a T-shaped block across a 512 x 512 workspace (seen from above).

The conventions of the pymunk PushT of Diffusion Policy, DINO-WM and LeWM, in MuJoCo:
- the T is a 120 x 30 bar over a 30 x 90 stem, mass 1, friction 1; its pose (x, y, angle) is that
  of its centre of mass;
- the agent is a disc of radius 15 and mass 1 driven toward a target by a PD controller
  (acceleration = 100·(target − position) − 20·velocity), physics at 100 Hz, control at 10 Hz;
- actions are relative, in [−1, 1]²: target = agent position + 100·action;
- no gravity, and strong damping with friction loss on the block's planar joints, so that the block
  moves only while it is pushed (pymunk's zero space damping);
- success: ‖(agent xy, block xy) − goal‖₂ < 20 and block angle error < π/9 (angles modulo 2π).

State (10): agent x, y; block x, y, angle; then their velocities. Proprioception: the agent's
position and velocity.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from gymnasium import spaces

from envs.base import VISUAL, MujocoEnv, arena_xml, wrap_angle

WORKSPACE = 512.0
UNIT = 100.0  # workspace units per MuJoCo length unit (MuJoCo cameras see at most 180 units)
AGENT_RADIUS = 15.0
ACTION_SCALE = 100.0
STAGING = AGENT_RADIUS + 45  # how far out along its normal the expert lines up a push
INNER = (10.0 + AGENT_RADIUS + 2, WORKSPACE - 10.0 - AGENT_RADIUS - 2)  # where the agent's centre fits
BAR = (120.0, 30.0)  # width, height of the top bar
STEM = (30.0, 90.0)  # width, height of the stem below its middle
# centre of mass below the bar's centre, so that the block's origin is its centre of mass
_COM_DROP = (STEM[0] * STEM[1] * (BAR[1] + STEM[1]) / 2) / (BAR[0] * BAR[1] + STEM[0] * STEM[1])
BAR_CENTRE = np.array([0.0, _COM_DROP])
STEM_CENTRE = np.array([0.0, _COM_DROP - (BAR[1] + STEM[1]) / 2])
BAR_MASS = BAR[0] * BAR[1] / (BAR[0] * BAR[1] + STEM[0] * STEM[1])
# radius of gyration about the centre of mass (mass 1)
GYRATION = np.sqrt(
    BAR_MASS * (sum(s**2 for s in BAR) / 12 + BAR_CENTRE[1] ** 2)
    + (1 - BAR_MASS) * (sum(s**2 for s in STEM) / 12 + STEM_CENTRE[1] ** 2)
)


class PushTEnv(MujocoEnv):
    state_names = ["agent_x", "agent_y", "block_x", "block_y", "block_angle",
                   "agent_vx", "agent_vy", "block_vx", "block_vy", "block_spin"]
    angle_dims = (4,)  # compared modulo 2π
    parts = {"agent": (0, 1), "block": (2, 3, 4)}
    object_dims = (2, 3)
    physics_dt = 0.01
    physics_steps = 10
    state_scale = [UNIT] * 4 + [1.0] + [UNIT] * 4 + [1.0]  # MuJoCo units to workspace units

    def __init__(self, image_size: int = 64, block_damping: float = 30.0, block_friction_loss: float = 20.0):
        self.block_damping, self.block_friction_loss = block_damping, block_friction_loss
        super().__init__(image_size)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float64)

    def xml(self) -> str:
        """The model in MuJoCo units (the workspace divided by UNIT). Damping and PD gains do not
        depend on the unit of length; friction loss is a force, and turning takes damping in
        proportion to the squared radius of gyration, so the block decays alike in all three axes."""
        u = lambda v: v / UNIT  # noqa: E731
        gyration = u(GYRATION)
        lin = f'damping="{self.block_damping}" frictionloss="{u(self.block_friction_loss)}"'
        ang = f'damping="{self.block_damping * gyration**2}" frictionloss="{u(self.block_friction_loss) * gyration}"'
        return f"""
<mujoco model="pusht">
  <option gravity="0 0 0" integrator="implicitfast"/>
  {VISUAL}
  <default><geom friction="1 0.005 0.0001" solref="0.02 1"/></default>
  <worldbody>{arena_xml(u(WORKSPACE / 2), u(WORKSPACE / 2), wall=u(5.0))}
    <body name="agent">
      <joint name="agent_x" type="slide" axis="1 0 0" damping="20"/>
      <joint name="agent_y" type="slide" axis="0 1 0" damping="20"/>
      <geom type="sphere" size="{u(AGENT_RADIUS)}" mass="1" rgba=".25 .41 .88 1"/>
    </body>
    <body name="block">
      <joint name="block_x" type="slide" axis="1 0 0" {lin}/>
      <joint name="block_y" type="slide" axis="0 1 0" {lin}/>
      <joint name="block_angle" type="hinge" axis="0 0 1" {ang}/>
      <geom type="box" pos="0 {u(BAR_CENTRE[1])} 0" size="{u(BAR[0] / 2)} {u(BAR[1] / 2)} 0.1" mass="{BAR_MASS}" rgba=".47 .53 .6 1"/>
      <geom type="box" pos="0 {u(STEM_CENTRE[1])} 0" size="{u(STEM[0] / 2)} {u(STEM[1] / 2)} 0.1" mass="{1 - BAR_MASS}" rgba=".47 .53 .6 1"/>
    </body>
  </worldbody>
  <actuator>
    <position joint="agent_x" kp="100"/>
    <position joint="agent_y" kp="100"/>
  </actuator>
</mujoco>"""

    def sample_state(self, rng: np.random.Generator) -> np.ndarray:
        """Agent and block at random, not touching (as the original's reset)."""
        while True:
            agent = rng.uniform(50, 450, size=2)
            block = rng.uniform(100, 400, size=2)
            angle = rng.uniform(-np.pi, np.pi)
            if PUSHT_T.distance(agent, block, angle) > AGENT_RADIUS + 5:
                return np.concatenate([agent, block, [angle], np.zeros(5)])

    def apply_action(self, action: np.ndarray) -> None:
        self.data.ctrl[:] = self.data.qpos[:2] + ACTION_SCALE / UNIT * action

    def success(self, state: np.ndarray, goal: np.ndarray) -> bool:
        return pusht_success(state, goal)

    def distance(self, state: np.ndarray, goal: np.ndarray) -> float:
        """The position error that success thresholds: 4-D (agent xy, block xy)."""
        return float(np.linalg.norm(np.asarray(state)[:4] - np.asarray(goal)[:4]))

    def goal_cost(self, state: np.ndarray, goal: np.ndarray) -> float:
        """Position error over its threshold (20) plus angle error over its threshold (π/9):
        both parts of the criterion, each below 1 where it is met."""
        return self.distance(state, goal) / 20 + abs(wrap_angle(state[4] - goal[4])) / (np.pi / 9)

    def proprio(self, state: np.ndarray) -> np.ndarray:
        return state[[0, 1, 5, 6]]


def pusht_success(state: np.ndarray, goal: np.ndarray) -> bool:
    """DINO-WM's criterion: the 4-D distance of (agent xy, block xy) under 20 and the block's angle
    within π/9 of the goal's, modulo 2π."""
    position_error = np.linalg.norm(np.asarray(state)[:4] - np.asarray(goal)[:4])
    angle_error = abs(wrap_angle(state[4] - goal[4]))
    return bool(position_error < 20 and angle_error < np.pi / 9)


# ---- geometry of the T -----------------------------------------------------------------------


def _rotation(angle) -> np.ndarray:
    """(..., 2, 2) rotation matrices for angles (...)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def to_block_frame(points: np.ndarray, block_xy: np.ndarray, angle) -> np.ndarray:
    """World points (..., 2) in the frame of blocks at (block_xy (..., 2), angle (...))."""
    return np.einsum("...i,...ij->...j", np.asarray(points) - block_xy, _rotation(angle))


def to_world(points: np.ndarray, block_xy: np.ndarray, angle) -> np.ndarray:
    return np.einsum("...ij,...j->...i", _rotation(angle), np.asarray(points)) + block_xy


@dataclass(frozen=True)
class TBlock:
    """The T (a 120 x 30 bar over the middle of a 30 x 90 stem) in the block's own frame, the frame
    its pose (x, y, angle) places: where the bar's and the stem's centres are, the point the block
    turns about, and its radius of gyration about that point. Two PushTs place the frame apart
    (leworld's at the centre of mass, gym-pusht's at the bar's outer edge)."""

    bar_centre: tuple[float, float]
    stem_centre: tuple[float, float]
    pivot: tuple[float, float]
    gyration: float

    def outline(self) -> np.ndarray:
        """(8, 2) corners, counter-clockwise, from the bar's outer left corner."""
        (_, bar_y), (_, stem_y) = self.bar_centre, self.stem_centre
        down = np.sign(bar_y - stem_y)  # +1 where the stem hangs below the bar
        top, joint, foot = bar_y + down * BAR[1] / 2, bar_y - down * BAR[1] / 2, stem_y - down * STEM[1] / 2
        corners = np.array([[-BAR[0] / 2, top], [-BAR[0] / 2, joint], [-STEM[0] / 2, joint], [-STEM[0] / 2, foot],
                            [STEM[0] / 2, foot], [STEM[0] / 2, joint], [BAR[0] / 2, joint], [BAR[0] / 2, top]])
        return corners if down > 0 else corners[::-1]  # mirrored, the same order would run clockwise

    def distance(self, points: np.ndarray, block_xy: np.ndarray, angle) -> np.ndarray:
        """Distance from world points (..., 2) to the T at (block_xy (..., 2), angle (...)),
        negative inside; shapes broadcast."""
        local = to_block_frame(points, block_xy, angle)

        def to_box(centre, size):
            q = np.abs(local - np.asarray(centre)) - np.asarray(size) / 2
            outside = np.linalg.norm(np.maximum(q, 0), axis=-1)
            return outside + np.minimum(q.max(-1), 0)

        return np.minimum(to_box(self.bar_centre, BAR), to_box(self.stem_centre, STEM))

    @cached_property
    def contacts(self) -> tuple[np.ndarray, np.ndarray]:
        """Points along the outline, `CONTACT_SPACING` apart, and their outward normals, in the
        block's frame: those the disc can come straight in to, along the normal from its staging point."""
        points, normals = [], []
        corners = self.outline()
        for a, b in zip(corners, np.roll(corners, -1, axis=0)):
            edge = b - a
            length = np.linalg.norm(edge)
            n = int(length // CONTACT_SPACING)
            for t in (np.arange(n) + 0.5) / n:
                points.append(a + t * edge)
                normals.append(np.array([edge[1], -edge[0]]) / length)  # right of travel: outward (CCW)
        points, normals = np.array(points), np.array(normals)
        approach = np.linspace(AGENT_RADIUS + 1, STAGING, 12)[:, None, None]  # (K, 1, 1) distances out
        path = points + normals * approach  # (K, C, 2) disc centres on the way in
        reachable = (self.distance(path, np.zeros(2), 0.0) >= AGENT_RADIUS).all(0)
        return points[reachable], normals[reachable]


# leworld's T: its frame at the centre of mass, the stem below the bar
PUSHT_T = TBlock(bar_centre=tuple(BAR_CENTRE), stem_centre=tuple(STEM_CENTRE), pivot=(0.0, 0.0), gyration=GYRATION)
CONTACT_SPACING = 6.0


# ---- scripted policies -----------------------------------------------------------------------


class PushTExpert:
    """A noisy scripted pusher: picks a random target pose for the block, walks around the block to
    the contact point whose push best reduces the pose error, lines up behind it, pushes, and
    re-plans; a new target once it gets close (or after `patience` steps), so that episodes visit
    varied poses.

    Pushes are scored with a quasi-static model: a push at c along −n moves the block along −n and
    turns it by the torque (c − com) × (−n) / r_gyration². A contact that yields no push for
    `give_up` steps (a wall in the way, say) is dropped for the next best. `block` is the T's
    geometry in the frame the state's pose places (a subclass sets another).
    """

    block = PUSHT_T

    def __init__(self, rng: np.random.Generator, noise: float = 0.1, patience: int = 80, replan_every: int = 5,
                 give_up: int = 30):
        self.rng, self.noise, self.patience = rng, noise, patience
        self.replan_every, self.give_up = replan_every, give_up

    def reset(self, state: np.ndarray) -> None:
        self._new_target()

    def _new_target(self) -> None:
        self.target = np.concatenate([self.rng.uniform(130, 382, size=2), [self.rng.uniform(-np.pi, np.pi)]])
        self.steps_on_target = 0
        self.contact, self.failed = None, set()

    def __call__(self, state: np.ndarray) -> np.ndarray:
        agent, block, angle = state[:2], state[2:4], state[4]
        centre = block + _rotation(angle) @ self.block.pivot  # what targets place
        contacts, normals = self.block.contacts
        self.steps_on_target += 1
        near = (np.linalg.norm(self.target[:2] - centre) < 15 and abs(wrap_angle(self.target[2] - angle)) < 0.2)
        if near or self.steps_on_target > self.patience:
            self._new_target()
        if self.contact is not None and self.steps_on_contact - self.pushes > self.give_up:
            self.failed.add(self.contact)
            self.contact = None
        if self.contact is None or self.pushes >= self.replan_every:
            self.contact = self._best_contact(block, centre, angle)
            self.pushes = self.steps_on_contact = 0
        self.steps_on_contact += 1

        point = to_world(contacts[self.contact], block, angle)
        normal = _rotation(angle) @ normals[self.contact]
        behind = point + normal * (AGENT_RADIUS + 6)
        offset = agent - behind
        out, across = offset @ normal, abs(normal[0] * offset[1] - normal[1] * offset[0])
        if np.linalg.norm(agent - behind) < 8 or np.linalg.norm(agent - point) < AGENT_RADIUS + 3:
            goal = point - normal * 30  # push through the contact
            self.pushes += 1
        elif -2 < out < STAGING and across < 6:
            goal = behind  # on the approach line: straight in
        else:
            staging = np.clip(point + normal * STAGING, *INNER)
            goal = self._path_to(agent, staging, block, centre, angle)
        action = (goal - agent) / ACTION_SCALE + self.rng.normal(0, self.noise, size=2)
        return np.clip(action, -1, 1)

    def _best_contact(self, block: np.ndarray, centre: np.ndarray, angle: float) -> int:
        contacts, normals = self.block.contacts
        gyration = self.block.gyration
        position_error = self.target[:2] - centre
        angle_error = wrap_angle(self.target[2] - angle)
        push = -(normals @ _rotation(angle).T)  # world direction each contact pushes in
        arm = (contacts - self.block.pivot) @ _rotation(angle).T
        turn = (arm[:, 0] * push[:, 1] - arm[:, 1] * push[:, 0]) / gyration**2  # radians per unit push
        # pose error and motion per unit push, with angles weighted by the radius of gyration
        error = np.concatenate([position_error, [gyration * angle_error]])
        motion = np.concatenate([push, gyration * turn[:, None]], axis=1)
        progress = motion @ error / np.linalg.norm(motion, axis=1)
        progress[list(self.failed)] = -np.inf
        # the agent must fit between the block and the walls behind a contact
        behind = to_world(contacts + normals * (AGENT_RADIUS + 6), block, angle)
        inside = ((behind > INNER[0]) & (behind < INNER[1])).all(1)
        progress[~inside] = -np.inf
        return int(np.argmax(progress))

    def _path_to(self, agent: np.ndarray, waypoint: np.ndarray, block: np.ndarray, centre: np.ndarray,
                 angle: float) -> np.ndarray:
        """The waypoint if the straight way is clear of the block, else a step around the block."""
        steps = np.linspace(0, 1, 24)[:, None]
        segment = agent + steps * (waypoint - agent)
        if self.block.distance(segment, block, angle).min() > AGENT_RADIUS + 2:
            return waypoint
        radius = 95.0  # clear of the T from its pivot
        heading = np.arctan2(*(agent - centre)[::-1])
        wanted = np.arctan2(*(waypoint - centre)[::-1])
        heading += np.clip(wrap_angle(wanted - heading), -0.6, 0.6)
        return centre + radius * np.array([np.cos(heading), np.sin(heading)])
