"""Collection and datasets: a round trip through the CLI, action alignment, resuming an
interrupted collection, catching corrupt folders, and the clip sampler."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensordict import TensorDict

import envs
from leworld import LeworldError
from leworld.data import ClipSampler, EpisodeDataset, dataset_problems


def collect_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "leworld.collect", *args], capture_output=True, text=True, **kwargs)


SMALL = ["env=pusht", "env.kwargs.image_size=32", "episodes=4", "episode_length=24", "workers=2"]


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pusht"
    done = collect_cli(*SMALL, f"path={path}")
    assert done.returncode == 0, done.stderr
    return path


def test_collected_folder_verifies_and_describes_itself(dataset_path):
    done = collect_cli("verify", f"path={dataset_path}")
    assert done.returncode == 0 and done.stdout.startswith("ok:"), done.stderr
    meta = json.loads((dataset_path / "meta.json").read_text())
    assert meta["num_episodes"] == 4 and meta["episode_lengths"] == [25] * 4 and meta["num_frames"] == 100
    assert meta["env"] == {"name": "pusht", "id": "leworld/PushT-v0", "kwargs": {"image_size": 32}}
    assert meta["collection"]["seed"] == 0 and len(meta["expert_episodes"]) == 4
    assert set(meta["stats"]) == {"action", "state"} and len(meta["stats"]["action"]["mean"]) == 2
    assert not (dataset_path / "episodes").exists()  # the per-episode files are gone once gathered
    ds = EpisodeDataset.open(dataset_path)
    assert ds.tensors["pixels"].shape == (100, 32, 32, 3) and ds.tensors["pixels"].dtype == torch.uint8
    assert ds.tensors["action"][24].abs().sum() == 0  # nothing follows an episode's last frame


def test_clip_actions_move_frame_t_to_frame_t_plus_frameskip(dataset_path):
    """Replaying a clip's first action block from its first state reproduces its second frame."""
    ds = EpisodeDataset.open(dataset_path)
    sampler = ClipSampler(ds, np.arange(ds.num_episodes), num_frames=3, frameskip=4, seed=1)
    batch = sampler.sample(6)
    env = envs.make("pusht", image_size=32)
    for b in range(6):
        for k in range(2):
            env.reset(options={"state": batch["state"][b, k].double().numpy()})
            raw = ds.denormalise_actions(batch["actions"][b, k].view(4, 2)).double().numpy()
            for action in raw:
                frame, _, _, _, info = env.step(action)
            np.testing.assert_allclose(info["state"], batch["state"][b, k + 1].numpy(), atol=1e-2)
            assert np.abs(frame.astype(int) - batch["pixels"][b, k + 1].permute(1, 2, 0).numpy()).max() <= 1


def test_clips_stay_inside_one_episode_and_an_epoch_sees_each_once(dataset_path):
    ds = EpisodeDataset.open(dataset_path)
    train, val = ds.split(0.25, seed=0)
    assert len(train) == 3 and len(val) == 1 and not set(train) & set(val)
    sampler = ClipSampler(ds, train, num_frames=4, frameskip=5)
    assert len(sampler) == 3 * (25 - 20)  # start frames t with t + 4·5 − 1 before each episode's last frame
    episode = ds.tensors["episode"]
    frames = sampler.starts[:, None] + sampler.frame_offsets
    assert (episode[frames] == episode[frames[:, :1]]).all()
    assert set(episode[sampler.starts].tolist()) == set(train.tolist())
    starts = torch.cat([batch["state"][:, 0] for batch in sampler.epoch(5, seed=0)])
    assert len(starts) == len(sampler) == 15 and len(torch.unique(starts, dim=0)) == 15  # each clip once
    resumed = torch.cat([batch["state"][:, 0] for batch in sampler.epoch(5, seed=0, skip=1)])
    assert torch.equal(resumed, starts[5:])  # picking up mid-epoch gives the rest of the same order
    # the whole set of normalised actions has zero mean and unit spread
    normalised = ds.normalise_actions(ds.tensors["action"][ds.tensors["step"] < 24])
    torch.testing.assert_close(normalised.mean(0), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised.std(0), torch.ones(2), atol=2e-2, rtol=0)


def test_in_memory_sampling_matches_the_memory_map(dataset_path):
    ds = EpisodeDataset.open(dataset_path)
    on_disk = ClipSampler(ds, np.arange(4), 4, 5, seed=3).sample(7)
    in_memory = ClipSampler(ds.to("cpu"), np.arange(4), 4, 5, seed=3).sample(7)
    for key in on_disk:
        assert torch.equal(on_disk[key], in_memory[key])


def test_an_interrupted_collection_resumes_without_loss_or_duplicates(tmp_path):
    args = ["env=tworoom", "env.kwargs.image_size=16", "episodes=10", "episode_length=30", "workers=1"]
    reference = tmp_path / "reference"
    assert collect_cli(*args, f"path={reference}").returncode == 0

    path = tmp_path / "interrupted"
    run = subprocess.Popen([sys.executable, "-m", "leworld.collect", *args, f"path={path}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while len(list((path / "episodes").glob("ep_*[0-9].npz"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # the collector and its worker, mid-episode
    run.wait()
    kept = len(list((path / "episodes").glob("ep_*[0-9].npz")))
    assert 3 <= kept < 10
    (path / "episodes" / "ep_000009.partial.npz").write_bytes(b"half an episode")  # as a kill mid-write leaves

    assert "did not finish" in collect_cli("verify", f"path={path}").stderr
    again = collect_cli(*args, f"path={path}")
    assert again.returncode == 2 and "resume=true" in again.stderr
    resumed = collect_cli(*args, f"path={path}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{kept} already there" in resumed.stdout

    a, b = EpisodeDataset.open(reference), EpisodeDataset.open(path)
    assert a.meta["episode_lengths"] == b.meta["episode_lengths"]
    for key in ("pixels", "state", "action", "episode", "step"):
        assert torch.equal(a.tensors[key], b.tensors[key]), key  # the same episodes, each once


def test_refuses_to_overwrite_a_finished_dataset(dataset_path):
    done = collect_cli(*SMALL, f"path={dataset_path}")
    assert done.returncode == 2 and "already holds a finished dataset" in done.stderr


def copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_verify_names_what_is_wrong(dataset_path, tmp_path):
    def problem(path) -> str:  # what `collect verify` reports (the command itself is run once below)
        problems = dataset_problems(path, content=True)
        assert problems
        return problems[0]

    truncated = copy_dataset(dataset_path, tmp_path / "truncated")
    with open(truncated / "tensors" / "pixels.memmap", "r+b") as f:
        f.truncate(1000)
    done = collect_cli("verify", f"path={truncated}")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "pixels.memmap is 1000 bytes" in done.stderr
    with pytest.raises(LeworldError, match="truncated"):
        EpisodeDataset.open(truncated)

    no_meta = copy_dataset(dataset_path, tmp_path / "no_meta")
    (no_meta / "meta.json").unlink()
    assert "no meta.json" in problem(no_meta)

    bad_json = copy_dataset(dataset_path, tmp_path / "bad_json")
    (bad_json / "meta.json").write_text('{"format": "leworld-dataset", ')
    assert "not valid JSON" in problem(bad_json)

    nan = copy_dataset(dataset_path, tmp_path / "nan")
    td = TensorDict.load_memmap(nan / "tensors")
    td["state"][5, 0] = float("nan")
    del td
    assert dataset_problems(nan) == []  # the quick structural check reads no data
    assert "'state' holds NaN" in problem(nan)

    missing = copy_dataset(dataset_path, tmp_path / "missing")
    (missing / "tensors" / "action.memmap").unlink()
    assert "action.memmap is missing" in problem(missing)
    assert "does not exist" in problem(tmp_path / "nowhere")


def test_bad_collection_settings_are_one_line(tmp_path):
    done = collect_cli("env=cube", f"path={tmp_path / 'x'}")
    assert done.returncode == 2 and "env=cube; choose one of" in done.stderr
    done = collect_cli("env=pusht", "env.kwargs.image_size=3", f"path={tmp_path / 'x'}")
    assert done.returncode == 2 and "image_size" in done.stderr and not (tmp_path / "x").exists()
