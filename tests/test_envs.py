"""The environments (MuJoCo's, and gym-pusht's where the community extra is installed; its own
physics tests are in test_community.py): physics sanity, determinism, exact state round trips, success
functions, the scripted experts' data, and bad input."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from conftest import env_names

import envs
from envs import EnvError
from envs.base import wrap_angle
from envs.cube import HALF, UNIT
from envs.pusht import AGENT_RADIUS, PUSHT_T
from envs.reacher import ELBOW_LIMIT
from envs.tworoom import SUCCESS_DISTANCE, WALL_X

NAMES = env_names()


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_gymnasium(name):
    env = gym.make(envs.IDS[name], image_size=32)
    obs, info = env.reset(seed=0)
    assert obs.shape == (32, 32, 3) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert info["state"].shape == (env.unwrapped.state_dim,) and "proprio" in info
    env.close()


# ---- physics --------------------------------------------------------------------------------


def pusht_state(agent, block, angle=0.0):
    return np.array([*agent, *block, angle, 0, 0, 0, 0, 0], dtype=float)


def test_pusht_agent_reaches_its_pd_target_and_the_free_block_stays():
    env = envs.make("pusht")
    env.reset(options={"state": pusht_state((100, 100), (400, 400))})
    target = np.array([160.0, 140.0])
    for _ in range(15):
        obs, _, _, _, info = env.step((target - info["state"][:2]) / 100 if _ else (target - [100, 100]) / 100)
    state = info["state"]
    assert np.linalg.norm(state[:2] - target) < 1.0
    np.testing.assert_array_equal(state[2:5], [400, 400, 0])  # untouched: not a hair of drift


def test_pusht_block_moves_only_while_pushed():
    env = envs.make("pusht")
    # the agent left of the T's stem, pushing right
    _, info = env.reset(options={"state": pusht_state((160, 300), (256, 300), 0.0)})
    for _ in range(10):
        _, _, _, _, info = env.step(np.array([1.0, 0.0]))
    assert info["state"][2] - 256 > 50  # measured: 147 units in 10 steps
    assert PUSHT_T.distance(info["state"][:2], info["state"][2:4], info["state"][4]) < AGENT_RADIUS + 1  # in contact
    for _ in range(3):  # back off: the block stops at once
        _, _, _, _, info = env.step(np.array([-0.3, 0.0]))
    resting = info["state"][2:5].copy()
    for _ in range(5):
        _, _, _, _, info = env.step(np.array([-0.3, 0.0]))
    np.testing.assert_allclose(info["state"][2:5], resting, atol=1e-6)
    assert abs(info["state"][7]) < 1e-6  # no velocity left


def test_pusht_walls_keep_agent_and_block_inside():
    env = envs.make("pusht")
    _, info = env.reset(options={"state": pusht_state((60, 256), (300, 300))})
    for _ in range(20):
        _, _, _, _, info = env.step(np.array([-1.0, 0.0]))
    assert info["state"][0] >= 10 + 15 - 1  # the wall's inner face is at x = 10, the agent's radius 15


def test_tworoom_displacement_and_walls():
    env = envs.make("tworoom")
    _, info = env.reset(options={"state": np.array([50.0, 40.0, 0, 0])})
    _, _, _, _, info = env.step(np.array([1.0, 0.0]))
    assert 10 < info["state"][0] - 50 < 13  # about 12 units per full action
    for _ in range(20):  # into the middle wall, well below the door
        _, _, _, _, info = env.step(np.array([1.0, 0.0]))
    assert info["state"][0] < WALL_X[0]
    _, info = env.reset(options={"state": np.array([90.0, 112.0, 0, 0])})
    for _ in range(10):  # through the door
        _, _, _, _, info = env.step(np.array([1.0, 0.0]))
    assert info["state"][0] > WALL_X[1]


def test_reacher_torque_turns_the_joints_within_limits():
    env = envs.make("reacher")
    _, info = env.reset(options={"state": np.zeros(4)})
    for _ in range(5):
        _, _, _, _, info = env.step(np.array([1.0, -1.0]))
    assert info["state"][0] > 0.3 and info["state"][1] < -0.3
    for _ in range(60):
        _, _, _, _, info = env.step(np.array([0.0, -1.0]))
    assert info["state"][1] >= -ELBOW_LIMIT - 0.05


# ---- determinism and state round trips -------------------------------------------------------


def cube_state(gripper, cube, opening=4.5):
    """Gripper (x, y, z) and cube (x, y, z) in cm, both fingers `opening` cm out, at rest."""
    return np.array([*gripper, opening, opening, *cube, 1, 0, 0, 0, *np.zeros(11)], dtype=float)


def move_gripper(env, info, target, grip, steps):
    for _ in range(steps):
        move = np.clip((np.asarray(target) - info["state"][:3]) / 3.0, -1, 1)
        _, _, _, _, info = env.step(np.array([*move, grip]))
    return info


def test_cube_is_grasped_lifted_carried_and_falls_when_released():
    env = envs.make("cube", image_size=16)
    rest = HALF * UNIT
    _, info = env.reset(options={"state": cube_state((5, 5, 10), (5, 5, rest))})
    info = move_gripper(env, info, (5, 5, 10), -1, 3)
    np.testing.assert_allclose(info["state"][5:8], [5, 5, rest], atol=0.05)  # resting: it neither sinks nor slides
    info = move_gripper(env, info, (5, 5, 1.5), -1, 10)  # down around it, open
    info = move_gripper(env, info, (5, 5, 1.5), 1, 6)  # close
    assert abs(info["state"][3] - rest) < 0.3 and abs(info["state"][4] - rest) < 0.3  # both fingers on its faces
    info = move_gripper(env, info, (-5, 0, 15), 1, 20)  # lift and carry
    assert info["state"][7] > 12 and np.linalg.norm(info["state"][5:7] - [-5, 0]) < 1  # held up there
    info = move_gripper(env, info, (-5, 0, 15), -1, 15)  # open: it drops to the table and stays
    np.testing.assert_allclose(info["state"][5:8], [-5, 0, rest], atol=0.5)
    assert info["state"][2] > 14  # the gripper stayed up
    np.testing.assert_allclose(info["proprio"], [*info["state"][:3], info["state"][3] + info["state"][4]])


def test_cube_gripper_stays_above_the_table_and_pushes_the_cube():
    env = envs.make("cube", image_size=16)
    _, info = env.reset(options={"state": cube_state((-10, 0, 1.0), (0, 0, HALF * UNIT))})
    info = move_gripper(env, info, (-10, 0, -5), -1, 5)
    assert info["state"][2] >= 0.4  # the z range ends 5 mm above the table
    info = move_gripper(env, info, (6, 0, 1.0), 1, 15)  # sweep right, closed, through the cube
    assert info["state"][5] > 2 and info["state"][7] < HALF * UNIT + 1  # pushed along the table


@pytest.mark.parametrize("name", NAMES)
def test_seeded_resets_and_rollouts_are_deterministic(name):
    def rollout(seed):
        env = envs.make(name, image_size=32)
        obs, info = env.reset(seed=seed)
        rng = np.random.default_rng(0)
        frames, states = [obs], [info["state"]]
        for _ in range(10):
            obs, _, _, _, info = env.step(rng.uniform(-1, 1, size=env.action_space.shape))
            frames.append(obs)
            states.append(info["state"])
        return np.stack(frames), np.stack(states)

    (frames_a, states_a), (frames_b, states_b) = rollout(3), rollout(3)
    assert np.array_equal(frames_a, frames_b) and np.array_equal(states_a, states_b)
    assert not np.array_equal(states_a[0], rollout(4)[1][0])


@pytest.mark.parametrize("name", NAMES)
def test_reset_to_a_recorded_state_renders_the_recorded_frame(name):
    env = envs.make(name, image_size=48)
    _, info = env.reset(seed=1)
    policy = envs.make_policy(name, env, np.random.default_rng(1), expert=True)
    policy.reset(info["state"])
    for _ in range(12):
        frame, _, _, _, info = env.step(policy(info["state"]))
    state = info["state"]
    other = envs.make(name, image_size=48)
    restored, restored_info = other.reset(options={"state": state})
    assert np.array_equal(restored, frame)
    np.testing.assert_array_equal(restored_info["state"], state)
    # and the next step continues alike from the restored state
    action = np.resize([0.3, -0.2], env.action_space.shape)
    np.testing.assert_allclose(other.step(action)[4]["state"], env.step(action)[4]["state"], atol=1e-6)


# ---- success ---------------------------------------------------------------------------------


def test_pusht_success():
    env = envs.make("pusht", image_size=16)
    goal = pusht_state((100, 100), (300, 300), np.pi - 0.05)
    assert env.success(goal, goal)
    assert env.success(pusht_state((100, 119), (300, 300), np.pi - 0.05), goal)
    assert not env.success(pusht_state((100, 121), (300, 300), np.pi - 0.05), goal)
    assert env.success(pusht_state((100, 100), (314, 314), np.pi - 0.05), goal)  # √(14² + 14²) ≈ 19.8
    assert not env.success(pusht_state((100, 100), (315, 315), np.pi - 0.05), goal)  # ≈ 21.2
    # angles compare modulo 2π: π − 0.05 and −π + 0.05 are 0.1 apart
    assert env.success(pusht_state((100, 100), (300, 300), -np.pi + 0.05), goal)
    assert env.success(pusht_state((100, 100), (300, 300), np.pi - 0.05 + 4 * np.pi), goal)
    assert not env.success(pusht_state((100, 100), (300, 300), np.pi - 0.05 - np.pi / 8 - 0.1), goal)


def test_tworoom_and_reacher_success():
    tworoom = envs.make("tworoom", image_size=16)
    goal = np.array([50.0, 50.0, 0, 0])
    assert tworoom.success(np.array([50.0, 50.0 + SUCCESS_DISTANCE - 0.5, 3, 3]), goal)
    assert not tworoom.success(np.array([50.0, 50.0 + SUCCESS_DISTANCE + 0.5, 0, 0]), goal)
    reacher = envs.make("reacher", image_size=16)
    goal = np.array([np.pi - 0.02, 0.5, 0, 0])
    assert reacher.success(np.array([-np.pi + 0.02, 0.54, 1, 1]), goal)  # shoulder wraps around
    assert not reacher.success(np.array([np.pi - 0.02, 0.56, 0, 0]), goal)
    assert not reacher.success(np.array([np.pi - 0.08, 0.5, 0, 0]), goal)


def test_cube_success_is_the_cube_within_4_cm():
    cube = envs.make("cube", image_size=16)
    goal = cube_state((0, 0, 10), (5, 5, 2))
    assert cube.success(cube_state((10, -10, 3), (5, 8.9, 2)), goal)  # the gripper does not count
    assert not cube.success(cube_state((0, 0, 10), (5, 5, 6.1)), goal)  # 4.1 cm above
    assert cube.distance(cube_state((0, 0, 10), (8, 9, 2)), goal) == pytest.approx(5.0)


def test_cube_probe_reads_its_pose_as_tilt_and_yaw_not_quaternion_components():
    def posed(axis, angle):  # the cube turned by `angle` about a world axis
        state = cube_state((0, 0, 10), (0, 0, 2))
        state[8:12] = [np.cos(angle / 2), *(np.sin(angle / 2) * np.asarray(axis, dtype=float))]
        return state

    states = np.stack([posed((0, 0, 1), 0.3), posed((0, 0, 1), 0.3 + np.pi / 2), posed((0, 0, 1), 0.3 + np.pi),
                       posed((1, 0, 0), np.pi / 2), posed((1, 0, 0), np.pi / 6), posed((0, 0, 1), 0.3)])
    states[5, 8:12] *= -1  # −q: the same pose
    targets, names = envs.CubeEnv.probe_targets(states)
    assert targets.shape == (6, len(names)) and not [n for n in names if n.startswith("cube_q")]
    tilt, cos4, sin4 = (targets[:, names.index(n)] for n in ("cube_tilt", "cube_yaw4.cos", "cube_yaw4.sin"))
    np.testing.assert_allclose(tilt, [0, 0, 0, 0, np.pi / 6, 0], atol=1e-9)  # on any face: flat
    np.testing.assert_allclose(cos4[[0, 1, 2, 5]], np.cos(1.2))  # 4 × 0.3: a quarter turn looks the same
    np.testing.assert_allclose(sin4[[0, 1, 2, 5]], np.sin(1.2))
    np.testing.assert_allclose(targets[:, names.index("cube_z")], 2)
    # the other envs keep their entries, angles as cosine and sine
    _, pusht_names = envs.PushTEnv.probe_targets(np.zeros((2, 10)))
    assert pusht_names[4:6] == ["block_angle.cos", "block_angle.sin"] and len(pusht_names) == 11


def test_success_is_reported_against_the_goal_given_at_reset():
    env = envs.make("tworoom", image_size=16)
    start = np.array([40.0, 40.0, 0, 0])
    _, info = env.reset(options={"state": start, "goal": start + [5, 0, 0, 0]})
    assert info["success"]
    _, _, _, _, info = env.step(np.array([-1.0, -1.0]))  # about 12 units down and left: 20 from the goal
    assert info["success"] is False


def test_wrap_angle():
    np.testing.assert_allclose(wrap_angle(np.array([0, np.pi, -np.pi, 3 * np.pi, 7.0])),
                               [0, np.pi, np.pi, np.pi, 7.0 - 2 * np.pi])


# ---- the scripted data -----------------------------------------------------------------------


def pusht_rollouts(expert: bool, episodes: int = 8, steps: int = 100, name: str = "pusht", block=PUSHT_T) -> dict:
    """Per episode: the block's path length and turning, the share of steps in contact, where it ended."""
    env = envs.make(name, image_size=16)
    stats = {"path": [], "rotation": [], "contact": [], "final": []}
    for i in range(episodes):
        _, info = env.reset(seed=i)
        policy = envs.make_policy(name, env, np.random.default_rng(i), expert=expert)
        policy.reset(info["state"])
        states = [info["state"]]
        for _ in range(steps):
            _, _, _, _, info = env.step(policy(info["state"]))
            states.append(info["state"])
        states = np.array(states)
        stats["path"].append(np.linalg.norm(np.diff(states[:, 2:4], axis=0), axis=1).sum())  # block's path length
        stats["rotation"].append(np.abs(wrap_angle(np.diff(states[:, 4]))).sum())
        stats["contact"].append(np.mean(block.distance(states[:, :2], states[:, 2:4], states[:, 4]) < AGENT_RADIUS + 1))
        stats["final"].append(states[-1, 2:4])
    return {key: np.array(value) for key, value in stats.items()}


def test_pusht_expert_pushes_the_block_to_varied_poses():
    expert = pusht_rollouts(expert=True)
    # measured over 30 episodes: path 94-379 units (mean 229), in contact 39% of the steps
    assert (expert["path"] > 50).all()  # every episode moves the block
    assert expert["path"].mean() > 150 and expert["rotation"].mean() > 1.0  # far, and turning it
    assert expert["final"].std(0).min() > 30  # to poses that differ from episode to episode
    random = pusht_rollouts(expert=False)
    assert expert["contact"].mean() > 0.25 and random["contact"].mean() < expert["contact"].mean() / 2


def test_tworoom_expert_crosses_between_rooms():
    env = envs.make("tworoom", image_size=16)
    crossings = 0
    for i in range(4):
        _, info = env.reset(seed=i)
        policy = envs.make_policy("tworoom", env, np.random.default_rng(i), expert=True)
        policy.reset(info["state"])
        sides = []
        for _ in range(100):
            _, _, _, _, info = env.step(policy(info["state"]))
            sides.append(info["state"][0] > sum(WALL_X) / 2)
        crossings += np.abs(np.diff(np.array(sides, dtype=int))).sum()
    assert crossings >= 3


def cube_rollouts(policy: str, episodes: int = 6, steps: int = 100) -> dict:
    """Per episode: how far the cube got from where it started (cm) and how high it went."""
    env = envs.make("cube", image_size=16)
    moved, height = [], []
    for i in range(episodes):
        _, info = env.reset(seed=i)
        rng = np.random.default_rng(i)
        behaviour = (envs.RandomPolicy(rng, env.action_space) if policy == "random"
                     else envs.make_policy("cube", env, rng, expert=policy == "expert"))
        behaviour.reset(info["state"])
        start, states = info["state"], []
        for _ in range(steps):
            _, _, _, _, info = env.step(behaviour(info["state"]))
            states.append(info["state"])
        states = np.array(states)
        moved.append(np.linalg.norm(states[:, 5:7] - start[5:7], axis=1).max())
        height.append(states[:, 7].max())
    return {"moved": np.array(moved), "height": np.array(height)}


def test_cube_expert_picks_and_places_and_exploration_touches_the_cube_more_than_random():
    lifted = HALF * UNIT + 3  # cm: the cube's centre 3 cm above its resting height
    expert, explorer, random = cube_rollouts("expert"), cube_rollouts("explorer"), cube_rollouts("random")
    # measured over 20 episodes: the expert lifts the cube in all, the explorer moves it in 70%
    # (lifts it in none), random actions move it in none
    assert (expert["height"] > lifted).mean() >= 0.8 and (expert["moved"] > 5).mean() >= 0.8
    assert (explorer["moved"] > 2).mean() >= 0.3
    assert (random["moved"] > 2).mean() < (explorer["moved"] > 2).mean() and (random["height"] > lifted).sum() == 0


# ---- bad input --------------------------------------------------------------------------------


def test_bad_actions_states_and_names():
    env = envs.make("pusht", image_size=16)
    env.reset(seed=0)
    with pytest.raises(EnvError, match=r"actions of shape \(2,\)"):
        env.step(np.zeros(3))
    with pytest.raises(EnvError, match="NaN"):
        env.step(np.array([np.nan, 0.0]))
    with pytest.raises(EnvError, match="10 finite numbers"):
        env.reset(options={"state": np.zeros(4)})
    with pytest.raises(EnvError, match="unknown environment 'ant'"):
        envs.make("ant")
    with pytest.raises(EnvError, match="image_size"):
        envs.make("pusht", image_size=2)


def test_unusable_renderer_is_one_clear_error():
    code = "import envs\ntry:\n    envs.make('pusht')\nexcept envs.EnvError as e:\n    print(e)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"MUJOCO_GL": "no-such-backend", "PATH": ""})
    assert "MUJOCO_GL=no-such-backend" in done.stdout and "MUJOCO_GL=osmesa" in done.stdout
