"""A dataset's meta.json and its small float tensors are checked when it is opened: damage is one
line naming what is wrong, never a KeyError or TypeError later, and NaN never reaches training
(even from a writer that wrote it, with a fingerprint to match)."""

import json
import shutil
import subprocess
import sys

import pytest
from tensordict import TensorDict

from leworld import LeworldError
from leworld.collect import collect
from leworld.dataset import EpisodeDataset, dataset_problems
from leworld.runtime import load_config
from conftest import written_with_these_files


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tworoom"
    collect(load_config("collect", ["env=tworoom", "env.kwargs.image_size=32", "episodes=4", "episode_length=20",
                                    "workers=1", f"path={path}"]))
    return path


def without(key):
    return lambda meta: meta.pop(key)


def setting(key, value):
    return lambda meta: meta.update({key: value})


DAMAGE = {  # how meta.json is damaged -> what the one line must name
    **{f"no {key}": (without(key), f"it has no '{key}'") for key in
       ["num_frames", "num_episodes", "episode_lengths", "image_shape", "action_dim", "state_dim", "stats", "env"]},
    "version as text": (setting("version", "1"), "'version' is \"1\", not an integer"),
    "num_frames as text": (setting("num_frames", "84"), "'num_frames' is \"84\", not an integer"),
    "stats a list": (setting("stats", []), "'stats' is [], not a dict"),
    "lengths short of num_frames": (setting("episode_lengths", [21, 21, 21, 20]),
                                    "4 episodes of 83 frames, but it says num_episodes 4 and num_frames 84"),
    "lengths one episode short": (setting("episode_lengths", [21, 21, 42]),
                                  "3 episodes of 84 frames, but it says num_episodes 4"),
    "a zero length": (setting("episode_lengths", [42, 0, 21, 21]), "episode lengths must be positive integers"),
    "a fractional length": (setting("episode_lengths", [21.5, 20.5, 21, 21]), "must be positive integers"),
    "image_shape of two": (setting("image_shape", [32, 32]), "image_shape three of them"),
    "no action stats": (lambda meta: meta["stats"].pop("action"), "finite mean and std of the actions"),
    "no env name": (setting("env", {}), "the env's name"),
    "no content": (without("content"), "'content' fingerprint is missing or malformed"),
    "content a list": (setting("content", []), "'content' fingerprint is missing or malformed"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_meta_json_is_one_line(dataset_path, tmp_path, damage):
    edit, expected = DAMAGE[damage]
    path = tmp_path / "damaged"
    shutil.copytree(dataset_path, path)
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))
    problems = dataset_problems(path)
    assert len(problems) == 1 and expected in problems[0] and "\n" not in problems[0], problems
    assert "collect the dataset again" in problems[0]
    with pytest.raises(LeworldError, match="meta.json is damaged"):
        EpisodeDataset.open(path)


def test_verify_reports_damaged_meta_json_in_one_line(dataset_path, tmp_path):
    path = tmp_path / "damaged"
    shutil.copytree(dataset_path, path)
    (path / "meta.json").write_text((path / "meta.json").read_text().replace('"num_frames": 84', '"num_frames": "84"'))
    done = subprocess.run([sys.executable, "-m", "leworld.collect", "verify", f"path={path}"], capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "'num_frames' is \"84\", not an integer" in done.stderr


@pytest.mark.parametrize("key, value", [("action", float("nan")), ("state", float("inf")), ("proprio", float("-inf"))])
def test_opening_refuses_non_finite_actions_states_and_proprioception(dataset_path, tmp_path, key, value):
    path = tmp_path / "bad_numbers"
    shutil.copytree(dataset_path, path)
    td = TensorDict.load_memmap(path / "tensors")
    td[key][30, 1] = value
    del td
    written_with_these_files(path)
    with pytest.raises(LeworldError, match=f"'{key}' holds NaN or inf; collect the dataset again"):
        EpisodeDataset.open(path)
    assert EpisodeDataset.open(dataset_path).num_episodes == 4  # the untouched copy opens
