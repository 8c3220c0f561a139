"""The community's PushT (gym-pusht behind leworld's env contract) and datasets in
stable-worldmodel's HDF5 layout (import and export), on files stable-worldmodel's own writer makes.
Skipped without the community extra (pip install 'leworld[community]'); CI installs it with the
test extra."""

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, needs_community, run, train_probe_and_plan
from swm_reference import swm
from test_envs import pusht_rollouts
from test_eval import SMALL

import envs
from envs import EnvError
from leworld import LeworldError
from leworld.collect import record_episode
from leworld.dataset import EpisodeDataset, dataset_problems
from leworld.models import load_world_model
from leworld.runtime import load_config

pytestmark = needs_community


@functools.cache
def swm_hdf5():
    """stable-worldmodel's own HDF5 module (HDF5Writer, HDF5Dataset), loaded past the torchvision its
    package imports (tests/swm_reference.py)."""
    return swm("data.formats.hdf5")


def gym_pusht_episodes(count: int, steps: int, image_size: int = 32, seed: int = 0) -> list[dict]:
    """Expert episodes of env=gym_pusht, as stable-worldmodel's World.collect records them: a row per
    frame with the action taken after it (NaN after the last), and columns it adds."""
    env = envs.make("gym_pusht", image_size=image_size)
    episodes = []
    for i in range(count):
        policy = envs.make_policy("gym_pusht", env, np.random.default_rng([seed, i]), expert=True)
        recorded = record_episode(env, policy, steps, seed=seed * 1000 + i)
        action = np.concatenate([recorded["action"], np.full((1, 2), np.nan)]).astype(np.float32)
        episodes.append({"pixels": list(recorded["pixels"]), "action": list(action), "state": list(recorded["state"]),
                         "proprio": list(recorded["proprio"]), "step_idx": list(np.arange(steps + 1)),
                         "reward": list(np.zeros(steps + 1))})
    return episodes


def write_swm_file(path: Path, episodes: list[dict]) -> Path:
    with swm_hdf5().HDF5Writer(path, mode="error") as writer:
        writer.write_episodes(episodes)
    return path


def import_cfg(path, out, *overrides):
    return load_config("collect", [f"path={path}", f"out={out}", "env=gym_pusht", *overrides])


# ---- the environment -------------------------------------------------------------------------


def test_gym_pusht_steps_exactly_as_gym_pusht_does():
    """Our PD loop (without gym-pusht's reward and observation) against gym-pusht's own step."""
    from gym_pusht.envs.pusht import PushTEnv

    env = envs.make("gym_pusht", image_size=16)
    _, info = env.reset(seed=2)
    policy = envs.make_policy("gym_pusht", env, np.random.default_rng(2), expert=True)
    policy.reset(info["state"])
    theirs = PushTEnv(obs_type="state")
    theirs.reset(seed=0)
    theirs._setup()
    theirs.agent.position = tuple(info["state"][:2])
    theirs.block.angle, theirs.block.position = info["state"][4], tuple(info["state"][2:4])
    start = info["state"]
    for _ in range(80):
        action = policy(info["state"])
        _, _, _, _, info = env.step(action)
        theirs.step(np.asarray(theirs.agent.position) + 100 * np.clip(action, -1, 1))  # gym-pusht: absolute targets
        state = [*theirs.agent.position, *theirs.block.position, theirs.block.angle % (2 * np.pi), *theirs.agent.velocity]
        np.testing.assert_array_equal(info["state"], state)
    assert np.linalg.norm(info["state"][2:4] - start[2:4]) > 10  # pushed: contacts were compared too


def test_gym_pusht_block_geometry_is_gym_pushts():
    env = envs.make("gym_pusht", image_size=16)
    from envs.gym_pusht import GYM_PUSHT_T

    block = env.sim.block
    assert block.moment == pytest.approx(GYM_PUSHT_T.gyration**2) and tuple(block.center_of_gravity) == GYM_PUSHT_T.pivot
    corners = {tuple(v) for shape in block.shapes for v in shape.get_vertices()}
    assert {tuple(v) for v in GYM_PUSHT_T.outline()} == corners
    # the probe's pivot is where pymunk puts the block's centre of gravity
    states = np.stack([env.sample_state(np.random.default_rng(i)) for i in range(4)])
    targets, names = env.probe_targets(states)
    for state, target in zip(states, targets):
        env.set_state(state)  # a fresh pymunk space: a new block body
        block = env.sim.block
        np.testing.assert_allclose(target[names.index("block_pivot_x"):], block.local_to_world(block.center_of_gravity))


def test_gym_pusht_frames_are_a_function_of_the_state():
    """Every frame of an expert episode (contacts included) is drawn again by a reset to its state;
    the state is stable-worldmodel's (7), proprioception its (agent position and velocity)."""
    env = envs.make("gym_pusht", image_size=48)
    episode = record_episode(env, envs.make_policy("gym_pusht", env, np.random.default_rng(1), expert=True), 60, seed=1)
    other = envs.make("gym_pusht", image_size=48)
    for frame, state in zip(episode["pixels"], episode["state"]):
        restored, info = other.reset(options={"state": state})
        assert np.array_equal(restored, frame)
        np.testing.assert_array_equal(info["state"], state)
        np.testing.assert_array_equal(info["proprio"], state[[0, 1, 5, 6]])
    assert env.state_dim == 7 and (episode["state"][:, 4] >= 0).all() and (episode["state"][:, 4] < 2 * np.pi).all()


def test_gym_pusht_success_is_the_lewm_criterion():
    env = envs.make("gym_pusht", image_size=16)
    goal = np.array([100.0, 100, 300, 300, 0.05, 0, 0])
    assert env.success(goal + [0, 19, 0, 0, 0, 5, 5], goal) and not env.success(goal + [0, 21, 0, 0, 0, 0, 0], goal)
    assert env.success(goal + [0, 0, 0, 0, 2 * np.pi - 0.2, 0, 0], goal)  # angles modulo 2π: 0.1 apart
    assert not env.success(goal + [0, 0, 0, 0, np.pi / 9 + 0.01, 0, 0], goal)


def test_gym_pusht_expert_pushes_the_block_to_varied_poses():
    from envs.gym_pusht import GYM_PUSHT_T

    expert = pusht_rollouts(True, name="gym_pusht", block=GYM_PUSHT_T)
    # measured over 30 episodes: path 144-449 units (mean 282), turning 2.5 rad, in contact 29% of the steps;
    # random actions: path 36, in contact 2%
    assert (expert["path"] > 50).all() and expert["path"].mean() > 150 and expert["rotation"].mean() > 1.0
    assert expert["final"].std(0).min() > 30
    random = pusht_rollouts(False, name="gym_pusht", block=GYM_PUSHT_T)
    assert expert["contact"].mean() > 0.15 and random["contact"].mean() < expert["contact"].mean() / 2


def test_gym_pusht_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gym_pusht", None)  # what a missing package looks like to import
    monkeypatch.setitem(sys.modules, "gym_pusht.envs", None)
    with pytest.raises(EnvError, match=r"pip install 'leworld\[community\]'"):
        envs.make("gym_pusht")


def test_gym_pusht_collects_trains_probes_and_plans_from_the_command_line(tmp_path):
    """The whole path on the community's PushT: train collects, trains, probes; eval plans with the
    checkpoint and with the simulator (the oracle)."""
    _, probe = train_probe_and_plan(tmp_path, "gym_pusht", SMALL)
    assert {"agent_x", "block_angle.cos", "agent_vy", "block_pivot_x"} <= set(probe["r2"]["trained"])


# ---- stable-worldmodel's HDF5 layout -----------------------------------------------------------


@pytest.fixture(scope="module")
def swm_file(tmp_path_factory):
    """12 gym_pusht episodes of 30 steps at 32 px, written by stable-worldmodel's HDF5Writer."""
    episodes = gym_pusht_episodes(12, 30)
    return write_swm_file(tmp_path_factory.mktemp("swm") / "pusht.h5", episodes), episodes


def test_a_file_stable_worldmodel_wrote_imports_exactly_and_trains(swm_file, tmp_path):
    source, episodes = swm_file
    out = tmp_path / "imported"
    done = run("collect", "import", f"path={source}", f"out={out}", "env=gym_pusht", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert dataset_problems(out, content=True) == []
    dataset = EpisodeDataset.open(out)
    assert dataset.meta["env"] == {"name": "gym_pusht", "id": "leworld/GymPushT-v0", "kwargs": {"image_size": 32}}
    assert dataset.num_episodes == 12 and list(dataset.episode_lengths) == [31] * 12
    for index, episode in enumerate(episodes):
        rows = slice(int(dataset.episode_starts[index]), int(dataset.episode_starts[index]) + 31)
        assert np.array_equal(dataset.tensors["pixels"][rows].numpy(), np.stack(episode["pixels"]))
        np.testing.assert_array_equal(dataset.tensors["state"][rows].numpy(), np.float32(episode["state"]))
        np.testing.assert_array_equal(dataset.tensors["proprio"][rows].numpy(), np.float32(episode["proprio"]))
        np.testing.assert_array_equal(dataset.tensors["action"][rows][:-1].numpy(), np.stack(episode["action"][:-1]))
        assert (dataset.tensors["action"][rows][-1] == 0).all()  # NaN after the last frame in the file, 0 here
    tiny = [a for a in TINY_RUN if not a.startswith("env=")]
    done = run("train", *tiny, "env=gym_pusht", f"data.path={out}", "train.epochs=1", f"run_dir={tmp_path / 'run'}",
               "probe.horizon=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_world_model(tmp_path / "run").data.path == str(out)


def test_an_interrupted_import_resumes(swm_file, tmp_path, monkeypatch):
    from leworld.dataset import hdf5

    source, _ = write_swm_file(tmp_path / "long.h5", gym_pusht_episodes(70, 3, image_size=16, seed=1)), None
    whole = tmp_path / "whole"
    hdf5.import_hdf5(import_cfg(source, whole))
    calls, original = [], hdf5.read_episode

    def interrupted(file, layout, index, path):
        calls.append(index)
        if index == 66:
            raise KeyboardInterrupt
        return original(file, layout, index, path)

    out = tmp_path / "resumed"
    monkeypatch.setattr(hdf5, "read_episode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hdf5.import_hdf5(import_cfg(source, out))
    monkeypatch.setattr(hdf5, "read_episode", original)
    assert json.loads((out / "import.json").read_text())["episodes_done"] == 64 and not (out / "meta.json").exists()
    assert "import did not finish" in dataset_problems(out)[0]
    with pytest.raises(LeworldError, match="resume=true"):
        hdf5.import_hdf5(import_cfg(source, out))
    hdf5.import_hdf5(import_cfg(source, out, "resume=true"))
    a, b = EpisodeDataset.open(whole), EpisodeDataset.open(out)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors.keys()) and not (out / "import.json").exists()


def break_file(source: Path, path: Path, how: str) -> Path:
    """A copy of an HDF5 file broken one way."""
    import h5py

    data = source.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "not hdf5":
        path.write_bytes(b"not an HDF5 file\n" * 10)
    else:
        path.write_bytes(data)
        with h5py.File(path, "a") as file:
            if how == "missing state":
                del file["state"]
            elif how == "short action":
                file["action"].resize(len(file["action"]) - 5, axis=0)
            elif how == "episodes past the end":
                file["ep_len"][-1] += 3
            elif how == "NaN inside":
                file["action"][40] = np.nan
    return path


@pytest.mark.parametrize("how, message", [
    ("truncated", "not a readable HDF5 file"), ("not hdf5", "not a readable HDF5 file"),
    ("missing state", "has no 'state' column"), ("short action", "different lengths"),
    ("episodes past the end", "does not fit"), ("NaN inside", "NaN or inf in 'action' at step"),
    ("wrong env", "pass the env it was recorded in"), ("missing", "does not exist")])
def test_a_broken_file_is_one_line_and_leaves_nothing(swm_file, tmp_path, how, message):
    source = tmp_path / "broken.h5" if how == "missing" else break_file(swm_file[0], tmp_path / "broken.h5", how) \
        if how != "wrong env" else swm_file[0]
    out = tmp_path / "out"
    env = "env=pusht" if how == "wrong env" else "env=gym_pusht"
    done = run("collect", "import", f"path={source}", f"out={out}", env, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()  # a progress bar may come first
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1 and "Traceback" not in done.stderr
    assert not out.exists()


def test_export_reads_with_stable_worldmodels_reader_and_imports_back(swm_file, tmp_path):
    source, episodes = swm_file
    from leworld.dataset import hdf5

    original = tmp_path / "original"
    hdf5.import_hdf5(import_cfg(source, original))
    exported = tmp_path / "exported.h5"
    (tmp_path / "exported.h5.partial").write_text("a file of the user's, at the name a writer might use")
    hdf5.export_hdf5(load_config("collect", [f"path={original}", f"out={exported}"]))
    with pytest.raises(LeworldError, match="exports never overwrite"):
        hdf5.export_hdf5(load_config("collect", [f"path={original}", f"out={exported}"]))
    assert (tmp_path / "exported.h5.partial").read_text().startswith("a file of the user's")  # untouched
    assert not list(tmp_path.glob(".exported.h5.*"))  # and nothing of the export's own left beside it
    # stable-worldmodel's reader: clips of 4 steps with the actions between them
    theirs = swm_hdf5().HDF5Dataset(path=exported, num_steps=4, frameskip=1)
    clip = theirs[0]
    assert tuple(clip["pixels"].shape) == (4, 3, 32, 32)  # its reader gives channels first
    assert torch.equal(clip["pixels"].permute(0, 2, 3, 1), torch.from_numpy(np.stack(episodes[0]["pixels"][:4])))
    np.testing.assert_array_equal(clip["state"].numpy(), np.float32(episodes[0]["state"][:4]))
    np.testing.assert_array_equal(clip["action"].numpy().reshape(4, 2), np.stack(episodes[0]["action"][:4]))
    # and back, without env=: the file names it
    back = tmp_path / "back"
    done = run("collect", "import", f"path={exported}", f"out={back}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = EpisodeDataset.open(original), EpisodeDataset.open(back)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors.keys())
    assert a.meta["env"] == b.meta["env"] and a.meta["stats"] == b.meta["stats"]


def test_a_file_without_its_env_asks_for_env(swm_file, tmp_path):
    done = run("collect", "import", f"path={swm_file[0]}", f"out={tmp_path / 'out'}", cwd=tmp_path)
    assert done.returncode == 2 and "pass env=" in done.stderr and not (tmp_path / "out").exists()


def test_an_import_can_resize_the_frames(swm_file, tmp_path):
    """LeWM's 224-px PushT set is ~350 GB as raw frames; resize= imports it at a CPU recipe's size."""
    from PIL import Image

    from leworld.dataset import hdf5

    source, episodes = swm_file
    out = tmp_path / "small"
    hdf5.import_hdf5(import_cfg(source, out, "resize=16"))
    dataset = EpisodeDataset.open(out)
    assert dataset.meta["image_shape"] == [16, 16, 3] and dataset.meta["env"]["kwargs"]["image_size"] == 16
    expected = [np.asarray(Image.fromarray(f).resize((16, 16), Image.Resampling.BILINEAR)) for f in episodes[0]["pixels"]]
    assert np.array_equal(dataset.tensors["pixels"][:31].numpy(), np.stack(expected))
    with pytest.raises(LeworldError, match="resize"):
        hdf5.import_hdf5(import_cfg(source, tmp_path / "tiny", "resize=4"))
    assert not (tmp_path / "tiny").exists()
