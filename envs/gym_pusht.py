"""gym-pusht's PushT behind leworld's env contract: the pymunk PushT of Diffusion Policy, LeRobot,
DINO-WM and LeWM (stable-worldmodel's PushT descends from it), for numbers that sit beside theirs.
It needs the community extra: pip install 'leworld[community]'.

- Physics and frames are gym-pusht's own (pymunk 6, a 512-px pygame drawing resized by OpenCV
  to image_size, its fixed goal zone drawn in green); the PD loop of its step is run here so that
  the oracle does not pay for its reward (a shapely intersection) and observation at every step.
  One difference in the frames: gym-pusht's (and stable-worldmodel's) also mark pymunk's contact
  points, a dot of a few pixels at 512 px, which come from the solver's history, not the state;
  without them a frame is a function of the state alone, and a reset to a state draws it again.
- Actions are relative, in [−1, 1]²: target = agent position + 100·action (DINO-WM, LeWM and
  stable-worldmodel; gym-pusht itself takes the absolute target).
- The state (7) is stable-worldmodel's PushT state, so that its datasets import as they are:
  agent x, y; block x, y, angle (modulo 2π); agent vx, vy. The block's (x, y) is pymunk's body
  position, the middle of the bar's outer edge, not its centre of mass.
- Success, distance and the oracle's cost are those of leworld's PushT (the LeWM / DINO-WM
  criterion on the same first five entries); proprioception is (agent xy, agent velocity).

What a state leaves out: the block's velocity, and pymunk's cache of contact impulses. With a
space damping of 0 the block keeps no velocity of its own between steps, but it still moves for
one physics step (10 ms) after a push ends; so set_state reproduces a frame exactly, and what
follows it can differ a little from the recorded episode where the block was being pushed
(stable-worldmodel's reset-to-state has the same limit). Every set_state starts a fresh pymunk
space, so the same state and actions always give the same result.
"""

import os

import numpy as np
from gymnasium import spaces

from envs.base import EnvError, Env
from envs.pusht import ACTION_SCALE, AGENT_RADIUS, PushTEnv, PushTExpert, TBlock, to_world

# gym-pusht's T in its body frame: the bar from y = 0 to 30, the stem from 30 to 120; pymunk turns
# it about the mean of the two parts' centroids, with a moment of inertia of 3000 (mass 1)
GYM_PUSHT_T = TBlock(bar_centre=(0.0, 15.0), stem_centre=(0.0, 75.0), pivot=(0.0, 45.0), gyration=float(np.sqrt(3000.0)))


def gym_pusht_module():
    """gym-pusht's environment module, or EnvError if it is not installed."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # pygame greets on stdout otherwise
    try:
        from gym_pusht.envs import pusht
    except ImportError as err:
        raise EnvError(f"env gym_pusht needs the gym-pusht package ({err}); install it with: "
                       "pip install 'leworld[community]'") from None
    return pusht


class GymPushTEnv(Env):
    state_names = ["agent_x", "agent_y", "block_x", "block_y", "block_angle", "agent_vx", "agent_vy"]
    parts = {"agent": (0, 1), "block": (2, 3, 4)}
    object_dims = (2, 3)
    angle_dims = (4,)  # compared modulo 2π
    # the same criterion, distance, cost and proprioception as leworld's PushT: its state begins alike
    success, distance, goal_cost, proprio = PushTEnv.success, PushTEnv.distance, PushTEnv.goal_cost, PushTEnv.proprio

    def __init__(self, image_size: int = 64):
        super().__init__(image_size)
        self.gym_pusht = gym_pusht_module()
        self.sim = self.gym_pusht.PushTEnv(obs_type="pixels", observation_width=self.image_size,
                                           observation_height=self.image_size)
        self.physics_steps = int(round(1 / (self.sim.dt * self.sim.control_hz)))  # 10 at 100 Hz / 10 Hz
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float64)
        self.set_state(self.sample_state(np.random.default_rng(0)))

    @classmethod
    def probe_targets(cls, states: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Every entry (the angle as cos and sin), and the block's pivot (near its centre of mass):
        the state's block x, y is the bar's outer edge, which swings 45 units around the pivot as the
        block turns, so a probe of it also asks for the angle; leworld's PushT reports the centre."""
        targets, names = super().probe_targets(states)
        pivot = to_world(np.array(GYM_PUSHT_T.pivot), states[:, 2:4], states[:, 4])  # (N, 2)
        return np.concatenate([targets, pivot], 1), names + ["block_pivot_x", "block_pivot_y"]

    def sample_state(self, rng: np.random.Generator) -> np.ndarray:
        """gym-pusht's reset draws (agent in [50, 450]², block in [100, 400]², any angle), at rest
        and, unlike gym-pusht's, never overlapping (pymunk would shove them apart in the first step)."""
        while True:
            agent, block, angle = rng.uniform(50, 450, size=2), rng.uniform(100, 400, size=2), rng.uniform(0, 2 * np.pi)
            if GYM_PUSHT_T.distance(agent, block, angle) > AGENT_RADIUS + 5:
                return np.concatenate([agent, block, [angle], np.zeros(2)])

    def get_state(self) -> np.ndarray:
        agent, block = self.sim.agent, self.sim.block
        return np.array([*agent.position, *block.position, block.angle % (2 * np.pi), *agent.velocity])

    def set_state(self, state) -> None:
        state = self.check_state(state)
        self.sim._setup()  # a fresh space: no contact cache from before, so the state decides what follows
        agent, block = self.sim.agent, self.sim.block
        agent.position, agent.velocity = tuple(state[:2]), tuple(state[5:7])
        # the angle first: setting it turns the block about its pivot, setting the position then puts
        # the body's origin exactly there (gym-pusht's own reset does the reverse and moves the block)
        block.angle = state[4]
        block.position = tuple(state[2:4])
        for body in (agent, block):  # the drawn outlines are cached per shape: bring them to the new pose
            self.sim.space.reindex_shapes_for_body(body)

    def advance(self, action: np.ndarray) -> None:
        """gym-pusht's step: a PD controller pulls the agent toward the target for 10 physics steps."""
        sim, agent = self.sim, self.sim.agent
        # the same arithmetic as gym-pusht's, on Python floats: 3x faster than on 2-vectors (the oracle
        # runs this loop hundreds of thousands of times per solve), and the same numbers (tested)
        target_x, target_y = np.asarray(agent.position) + ACTION_SCALE * action
        k_p, k_v, dt = sim.k_p, sim.k_v, sim.dt
        for _ in range(self.physics_steps):
            (x, y), (vx, vy) = agent.position, agent.velocity
            agent.velocity = (vx + (k_p * (target_x - x) + k_v * (0 - vx)) * dt,
                              vy + (k_p * (target_y - y) + k_v * (0 - vy)) * dt)
            sim.space.step(dt)

    def render(self) -> np.ndarray:
        """gym-pusht's drawing (its _draw and _get_img) without the contact points."""
        pygame, pymunk, sim = self.gym_pusht.pygame, self.gym_pusht.pymunk, self.sim
        screen = pygame.Surface((512, 512))
        screen.fill((255, 255, 255))
        goal = sim.get_goal_pose_body(sim.goal_pose)
        for shape in sim.block.shapes:
            corners = [pymunk.pygame_util.to_pygame(goal.local_to_world(v), screen) for v in shape.get_vertices()]
            pygame.draw.polygon(screen, pygame.Color("LightGreen"), corners + corners[:1])
        options = self.gym_pusht.DrawOptions(screen)
        options.flags = options.DRAW_SHAPES
        sim.space.debug_draw(options)
        return sim._get_img(screen, width=self.image_size, height=self.image_size)

    def close(self) -> None:
        self.sim.close()


class GymPushTExpert(PushTExpert):
    """leworld's scripted PushT pusher on gym-pusht's T."""

    block = GYM_PUSHT_T
