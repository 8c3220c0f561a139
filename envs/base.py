"""What leworld's environments share. `Env` is the contract every environment keeps (the
gymnasium API, the physical state as one vector that a reset restores, pixel frames, success as a
pure function of two states, input checks); `MujocoEnv` keeps it for the MuJoCo ones: a model
built from XML, a fixed number of physics steps per action, offscreen rendering.

Rendering is offscreen through EGL unless MUJOCO_GL says otherwise (MUJOCO_GL=osmesa for machines
without EGL); it must be chosen before mujoco is first imported, which this module does. Scenes are
drawn with flat colours and no shadows, and floors are boxes: MuJoCo draws a plane as a fine grid,
which made a 64-px frame 40 times slower.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
# Mesa's software rasteriser (EGL or OSMesa without a GPU) is fastest for small frames when it
# draws in the calling thread; a GPU driver ignores this.
os.environ.setdefault("LP_NUM_THREADS", "0")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402


class EnvError(ValueError):
    """A problem with what was asked of an environment (a bad action, state or size), or with the
    machine's means to render it. `user_error` is the protocol by which callers (leworld's verbs)
    print it as one line without importing this package."""

    user_error = True


try:  # importing mujoco loads the GL back end that MUJOCO_GL names, which fails on some machines
    import mujoco  # noqa: E402

    GL_FAILURE = None
except Exception as err:
    mujoco = None
    GL_FAILURE = (f"MuJoCo cannot load its offscreen renderer with MUJOCO_GL={os.environ.get('MUJOCO_GL')} "
                  f"({type(err).__name__}: {err}); use MUJOCO_GL=egl (needs libEGL, libegl1 on Debian) or "
                  "MUJOCO_GL=osmesa (needs libOSMesa, libosmesa6)")


PALETTE = [(0.9, 0.1, 0.1), (0.1, 0.7, 0.1), (0.1, 0.2, 0.9), (0.95, 0.8, 0.1)]  # recolour's vivid colours

# Radians everywhere (MJCF's default unit of angle is the degree); flat colours from an
# ambient-only headlight, no shadows, no reflections.
VISUAL = """
  <compiler angle="radian"/>
  <visual>
    <quality shadowsize="0"/>
    <headlight ambient="1 1 1" diffuse="0 0 0" specular="0 0 0"/>
    <rgba haze="0 0 0 0"/>
  </visual>
"""


def arena_xml(centre: float, half: float, wall: float = 0.0) -> str:
    """Worldbody XML of a square arena seen from above, in MuJoCo units: an orthographic camera
    named "top" framing [centre ± half]², a floor (a thin box: MuJoCo draws planes as fine grids,
    40 times slower here), and, if `wall` > 0, walls of that thickness just inside the edges."""
    c, w = centre, wall
    xml = f"""
    <camera name="top" pos="{c} {c} 10" xyaxes="1 0 0 0 1 0" projection="orthographic" fovy="{2 * half}"/>
    <geom type="box" pos="{c} {c} -0.3" size="{half} {half} 0.01" rgba=".94 .94 .94 1" contype="0" conaffinity="0"/>"""
    for x, y, sx, sy in [(c - half + w, c, w, half), (c + half - w, c, w, half),
                         (c, c - half + w, half, w), (c, c + half - w, half, w)] if wall else []:
        xml += f"""
    <geom type="box" pos="{x} {y} 0" size="{sx} {sy} 0.2" rgba=".2 .2 .2 1"/>"""
    return xml


class Env(gym.Env):
    """What every leworld environment is (the contract the collector, the trainer, the probe and
    the planners rely on). A subclass provides:

        get_state() / set_state(state)   the physical state as one vector (`state_names`), restored
                                         exactly enough that set_state then render reproduces the frame
        sample_state(rng)                an initial physical state for a plain reset
        advance(action)                  one env step of physics from a checked, clipped action
        render()                         uint8 (image_size, image_size, 3), the current frame
        success(state, goal)             a pure function of two states
        distance(state, goal)            the error that success thresholds (for reports)
        proprio(state)                   the part of the state the agent senses of itself (or None)
        action_space                     a Box
        parts                            its movable parts, each with the state entries that place it
                                         (what `teleport` moves; a MuJoCo env's part is also a body)
    and may set `object_dims`, the state entries that place what the agent moves (PushT's block):
    eval splits its success by how far each task asks to move it.

    `reset(options={"state": s})` restores a state, and `options={"goal": g}` sets the goal that
    `info["success"]` is measured against.
    """

    metadata = {"render_modes": ["rgb_array"]}
    state_names: list[str] = []  # one per state entry, for tables and probes
    angle_dims: tuple[int, ...] = ()  # entries that are angles
    parts: dict[str, tuple[int, ...]] = {}  # movable part -> the state entries that place it
    object_dims: tuple[int, ...] = ()  # the position of what the agent moves (PushT's block), if anything

    def __init__(self, image_size: int = 64):
        if not isinstance(image_size, (int, np.integer)) or image_size < 8:
            raise EnvError(f"image_size must be an integer of at least 8 pixels, not {image_size!r}")
        self.image_size = int(image_size)
        self.state_dim = len(self.state_names)
        self.observation_space = gym.spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        self.render_mode = "rgb_array"
        self.goal_state = None

    def proprio(self, state: np.ndarray) -> np.ndarray | None:
        return None

    def check_state(self, state) -> np.ndarray:
        """`state` as float64 if it is `state_dim` finite numbers, else EnvError."""
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (self.state_dim,) or not np.isfinite(state).all():
            raise EnvError(f"{type(self).__name__} state must be {self.state_dim} finite numbers, got shape "
                           f"{state.shape}{'' if np.isfinite(state).all() else ' with NaN or inf'}")
        return state

    @classmethod
    def probe_targets(cls, states: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """What a linear probe of the latents regresses, from states (N, S): every entry, angles
        as their cosine and sine -> (N, K) targets and their K names."""
        columns, names = [], []
        for i, name in enumerate(cls.state_names):
            if i in cls.angle_dims:
                columns += [np.cos(states[:, i]), np.sin(states[:, i])]
                names += [f"{name}.cos", f"{name}.sin"]
            else:
                columns.append(states[:, i])
                names.append(name)
        return np.stack(columns, 1), names

    def teleport(self, state: np.ndarray, part: str, rng: np.random.Generator) -> np.ndarray:
        """`state` with `part` put where a fresh initial state (sample_state) puts it, the rest as it
        was: an event no physics makes, for tests of what a world model expects (leworld.surprise)."""
        if part not in self.parts:
            raise EnvError(f"{type(self).__name__} has no part {part!r} to teleport; its parts: {', '.join(self.parts)}")
        moved, entries = self.check_state(state).copy(), list(self.parts[part])
        moved[entries] = self.sample_state(rng)[entries]
        return moved

    def recolour(self, part: str | None) -> None:
        """Draw `part` in another colour from now on (None: every part as built). Physics unchanged."""
        raise EnvError(f"{type(self).__name__} cannot draw its parts in other colours")

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        state = options.get("state")
        self.set_state(self.sample_state(self.np_random) if state is None else state)
        self.goal_state = None if options.get("goal") is None else np.asarray(options["goal"], dtype=np.float64)
        return self.render(), self._info()

    def simulate(self, state: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The state reached from `state` by raw actions (K, A), physics only (nothing is drawn):
        what an oracle planner asks of the simulator. The env is left in that state."""
        self.set_state(state)
        for action in np.clip(actions, self.action_space.low, self.action_space.high):
            self.advance(action)
        return self.get_state()

    def replay(self, state: np.ndarray, actions: np.ndarray, frameskip: int) -> tuple[np.ndarray, np.ndarray]:
        """Set `state`, then take raw actions (n·frameskip, A) -> frames (n + 1, H, W, 3) and states
        (n + 1, S) after every `frameskip` steps, the first at `state`."""
        self.set_state(state)
        frames, states = [self.render()], [self.get_state()]
        for chunk in np.reshape(actions, (-1, frameskip, actions.shape[-1])):
            for action in np.clip(chunk, self.action_space.low, self.action_space.high):
                self.advance(action)
            frames.append(self.render())
            states.append(self.get_state())
        return np.stack(frames), np.stack(states)

    def goal_cost(self, state: np.ndarray, goal: np.ndarray) -> float:
        """What an oracle planner minimises on its way to the goal: every part of the success
        criterion. The distance that success thresholds, unless the criterion has more parts or the
        goal is reached only through something else (Cube: the gripper must reach the cube)."""
        return self.distance(state, goal)

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise EnvError(f"{type(self).__name__} takes actions of shape {self.action_space.shape}, got {action.shape}")
        if not np.isfinite(action).all():
            raise EnvError(f"{type(self).__name__} got an action with NaN or inf: {action}")
        self.advance(np.clip(action, self.action_space.low, self.action_space.high))
        info = self._info()
        return self.render(), float(info.get("success", False)), False, False, info

    def _info(self) -> dict:
        state = self.get_state()
        info = {"state": state}
        proprio = self.proprio(state)
        if proprio is not None:
            info["proprio"] = proprio
        if self.goal_state is not None:
            info["success"] = bool(self.success(state, self.goal_state))
        return info


class MujocoEnv(Env):
    """A leworld environment simulated and drawn by MuJoCo. A subclass sets `state_names` and
    `state_scale` (or leaves it 1) and provides, besides sample_state, success, distance and
    proprio (see Env):

        xml()                      the MJCF model, with the camera named by `camera` ("top")
        apply_action(action)       set controls from a checked action (before the physics steps)

    The state is (qpos, qvel) times `state_scale`: workspace units for planar tasks, radians for
    joints; set_state restores it exactly.
    """

    camera = "top"  # the camera that renders observations
    physics_dt = 0.01
    physics_steps = 10  # physics steps per env step (per action)

    def __init__(self, image_size: int = 64):
        if GL_FAILURE:
            raise EnvError(GL_FAILURE)
        super().__init__(image_size)
        self.model = mujoco.MjModel.from_xml_string(self.xml())
        self.model.opt.timestep = self.physics_dt
        self.data = mujoco.MjData(self.model)
        self.state_dim = self.model.nq + self.model.nv
        self.state_scale = np.broadcast_to(np.asarray(getattr(self, "state_scale", 1.0), dtype=np.float64),
                                           (self.state_dim,)).copy()
        self._renderer = None
        self._colours = self.model.geom_rgba.copy()  # as built, for recolour(None)

    def get_state(self) -> np.ndarray:
        return np.concatenate([self.data.qpos, self.data.qvel]) * self.state_scale

    def set_state(self, state) -> None:
        state = self.check_state(state)
        mujoco.mj_resetData(self.model, self.data)
        physical = state / self.state_scale
        self.data.qpos[:] = physical[: self.model.nq]
        self.data.qvel[:] = physical[self.model.nq:]
        mujoco.mj_forward(self.model, self.data)

    def advance(self, action: np.ndarray) -> None:
        self.apply_action(action)
        mujoco.mj_step(self.model, self.data, nstep=self.physics_steps)

    def render(self) -> np.ndarray:
        """The current frame from the env's camera: uint8 (image_size, image_size, 3)."""
        if self._renderer is None:
            try:
                self._renderer = mujoco.Renderer(self.model, self.image_size, self.image_size)
            except Exception as err:  # the GL back end fails in many ways, none of them the user's code
                raise EnvError(
                    f"MuJoCo cannot render offscreen with MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({err}); use "
                    "MUJOCO_GL=egl (needs libEGL, libegl1 on Debian) or MUJOCO_GL=osmesa (needs libOSMesa, libosmesa6)"
                ) from None
        # mj_step leaves body poses (what is drawn) from before its last integration: bring them up
        # to date, so that a frame shows exactly the state reported with it
        mujoco.mj_forward(self.model, self.data)
        self._renderer.update_scene(self.data, camera=self.camera)
        return self._renderer.render()

    def recolour(self, part: str | None) -> None:
        """Draw the geoms of `part`'s body and the bodies it carries in the palette colour farthest
        from their own (None: every geom as built): a change of look that no physics follows."""
        self.model.geom_rgba[:] = self._colours
        if part is None:
            return
        if part not in self.parts:
            raise EnvError(f"{type(self).__name__} has no part {part!r} to recolour; its parts: {', '.join(self.parts)}")
        root = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, part)
        carried = {root} | {b for b in range(self.model.nbody) if self._carried_by(b, root)}
        geoms = [g for g in range(self.model.ngeom) if self.model.geom_bodyid[g] in carried]
        own = self._colours[geoms, :3].mean(0)
        self.model.geom_rgba[geoms, :3] = max(PALETTE, key=lambda colour: np.abs(np.asarray(colour) - own).sum())

    def _carried_by(self, body: int, root: int) -> bool:
        while body > 0:
            body = self.model.body_parentid[body]
            if body == root:
                return True
        return False

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def wrap_angle(angle):
    """Angles to (-π, π]."""
    return np.pi - np.mod(np.pi - angle, 2 * np.pi)


class RandomPolicy:
    """Exploration: smoothed random actions, a_t = ρ·a_{t−1} + √(1 − ρ²)·σ·ε clipped to the action
    box, so that the agent wanders instead of jittering in place."""

    def __init__(self, rng: np.random.Generator, action_space: gym.spaces.Box, smoothness: float = 0.8,
                 scale: float = 0.7):
        self.rng, self.space, self.smoothness, self.scale = rng, action_space, smoothness, scale

    def reset(self, state: np.ndarray) -> None:
        self.action = np.zeros(self.space.shape)

    def __call__(self, state: np.ndarray) -> np.ndarray:
        noise = self.rng.normal(0, self.scale, size=self.space.shape)
        self.action = self.smoothness * self.action + np.sqrt(1 - self.smoothness**2) * noise
        self.action = np.clip(self.action, self.space.low, self.space.high)
        return self.action
