"""Collection and datasets: a round trip through the CLI, action alignment, resuming an
interrupted collection (and only leworld's own, with its settings), catching corrupt folders, full
disks and unwritable folders, workers that die with their collector, and the clip sampler."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict

import envs
from leworld import LeworldError, collect as collect_module
from leworld.collect import collect, unfinished_collection
from leworld.codec import ActionCodec
from leworld.dataset import ClipSampler, EpisodeDataset, dataset_problems
from leworld.runtime import load_config
from conftest import child_pids, run, run_process, written_with_these_files


def collect_cli(*args, **kwargs):
    return run("collect", *args, **kwargs)


SMALL = ["env=pusht", "env.kwargs.image_size=32", "episodes=4", "episode_length=24", "workers=2"]
TINY = ["env=tworoom", "env.kwargs.image_size=32", "episodes=4", "episode_length=20", "workers=1"]


def pusht_codec(ds: EpisodeDataset, frameskip: int) -> ActionCodec:
    space = envs.make("pusht", image_size=32).action_space
    return ActionCodec.from_stats(ds.meta["stats"]["action"], space.low, space.high, frameskip)


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
    codec = pusht_codec(ds, frameskip=4)
    sampler = ClipSampler(ds, np.arange(ds.num_episodes), num_frames=3, codec=codec)
    batch = sampler.sample(6, sampler.generator(1))
    env = envs.make("pusht", image_size=32)
    for b in range(6):
        for k in range(2):
            env.reset(options={"state": batch["state"][b, k].double().numpy()})
            raw = codec.to_env(batch["actions"][b, k:k + 1]).astype(np.float64)  # (4, 2)
            for action in raw:
                frame, _, _, _, info = env.step(action)
            np.testing.assert_allclose(info["state"], batch["state"][b, k + 1].numpy(), atol=1e-2)
            assert np.abs(frame.astype(int) - batch["pixels"][b, k + 1].permute(1, 2, 0).numpy()).max() <= 1


def test_clips_stay_inside_one_episode_and_an_epoch_sees_each_once(dataset_path):
    ds = EpisodeDataset.open(dataset_path)
    train, val = ds.split(0.25, seed=0)
    assert len(train) == 3 and len(val) == 1 and not set(train) & set(val)
    sampler = ClipSampler(ds, train, num_frames=4, codec=pusht_codec(ds, frameskip=5))
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
    normalised = pusht_codec(ds, frameskip=1).to_chunks(ds.tensors["action"][ds.tensors["step"] < 24])
    torch.testing.assert_close(normalised.mean(0), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised.std(0), torch.ones(2), atol=2e-2, rtol=0)


def test_in_memory_sampling_matches_the_memory_map(dataset_path):
    ds = EpisodeDataset.open(dataset_path)
    on_disk = ClipSampler(ds, np.arange(4), 4, pusht_codec(ds, 5))
    in_memory = ClipSampler(ds.to("cpu"), np.arange(4), 4, pusht_codec(ds, 5))
    on_disk, in_memory = on_disk.sample(7, on_disk.generator(3)), in_memory.sample(7, in_memory.generator(3))
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


def test_a_second_collection_into_a_folder_is_refused_while_the_first_runs_and_sigterm_says_how_to_finish(tmp_path):
    args = ["env=tworoom", "env.kwargs.image_size=16", "episodes=100", "episode_length=30", "workers=1"]
    path = tmp_path / "data"
    first = subprocess.Popen([sys.executable, "-m", "leworld.collect", *args, f"path={path}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while len(list((path / "episodes").glob("ep_*[0-9].npz"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGSTOP)  # held mid-collection (it would otherwise finish before the second starts)
    for again in (args, [*args, "resume=true"]):  # neither a new collection nor a resume while it runs
        with pytest.raises(LeworldError, match=f"is in use by process {first.pid} "):
            collect_here(*again, f"path={path}")
    first.send_signal(signal.SIGTERM)  # delivered as it continues
    os.killpg(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "leaked" not in err  # no semaphore left behind by the worker pool
    stopped = next(line for line in err.splitlines() if line.startswith("stopped by SIGTERM:"))
    kept = int(stopped.split(": ")[1].split(" of ")[0])
    assert 2 <= kept < 100 and len(list((path / "episodes").glob("ep_*[0-9].npz"))) == kept
    finish = stopped.split("; ", 1)[1].removesuffix(" finishes the collection").split()
    assert finish[:3] == ["python", "-m", "leworld.collect"] and "resume=true" in finish
    done = run("collect", *finish[3:])  # the command it printed
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{kept} already there" in done.stdout and EpisodeDataset.open(path).num_episodes == 100
    assert not (path / ".leworld.lock").exists()  # released with the collection


def test_a_dataset_knows_its_content_and_refuses_another_collections_files(dataset_path, tmp_path):
    """A dataset whose tensor files were replaced by those of another collection of the same sizes is
    refused when it is opened (sampled blocks), and a changed byte by verify (every byte)."""
    meta = json.loads((dataset_path / "meta.json").read_text())
    assert meta["version"] == 2 and set(meta["content"]) == {"pixels", "action", "state", "proprio", "episode", "step"}
    other = tmp_path / "other"
    collect_here(*SMALL, "workers=1", "seed=1", f"path={other}")
    swapped = copy_dataset(dataset_path, tmp_path / "swapped")
    for file in ("pixels.memmap", "state.memmap"):  # same sizes, other episodes; meta.json kept
        shutil.copy(other / "tensors" / file, swapped / "tensors" / file)
    with pytest.raises(LeworldError, match="pixels.memmap is not the file this dataset was written with"):
        EpisodeDataset.open(swapped)
    done = collect_cli("verify", f"path={swapped}")
    assert done.returncode == 2 and "not the file this dataset was written with" in done.stderr

    one_byte = copy_dataset(dataset_path, tmp_path / "one_byte")
    with open(one_byte / "tensors" / "pixels.memmap", "r+b") as f:
        value = f.read(12_346)[-1]
        f.seek(12_345)
        f.write(bytes([value ^ 1]))
    assert "pixels.memmap is not the file" in dataset_problems(one_byte, content=True)[0]  # verify reads every byte


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
    assert "state.memmap is not the file" in problem(nan)  # changed after it was written
    written_with_these_files(nan)  # a writer that wrote the NaN itself
    assert dataset_problems(nan) == []  # the quick structural check reads no data
    assert "'state' holds NaN" in problem(nan)

    missing = copy_dataset(dataset_path, tmp_path / "missing")
    (missing / "tensors" / "action.memmap").unlink()
    assert "action.memmap is missing" in problem(missing)
    assert "does not exist" in problem(tmp_path / "nowhere")


def test_bad_collection_settings_are_one_line(tmp_path):
    done = collect_cli("env=ant", f"path={tmp_path / 'x'}")
    assert done.returncode == 2 and "env=ant; choose one of" in done.stderr
    done = collect_cli("env=pusht", "env.kwargs.image_size=3", f"path={tmp_path / 'x'}")
    assert done.returncode == 2 and "image_size" in done.stderr and not (tmp_path / "x").exists()


def collect_here(*overrides):
    """The collect verb in this process (no interpreter to start): its errors are LeworldErrors."""
    return collect(load_config("collect", list(overrides)))


def test_bad_collection_values_are_refused_before_any_work(tmp_path):
    path = tmp_path / "x"
    for value in ["episodes=0", "workers=0", "episode_length=0", "expert_fraction=2", "noise=-1", "episodes=abc",
                  "seed=-1", "env.kwargs.image_size=100000"]:  # 100000 px: a 27.9 GiB frame buffer, not a traceback
        with pytest.raises(LeworldError, match=f"^{value.split('=')[0]}=.*: it must be") as err:
            collect_here(*TINY, value, f"path={path}")
        assert "\n" not in str(err.value)
    assert not path.exists()


def test_only_leworlds_own_unfinished_collection_is_resumed(tmp_path, dataset_path):
    """A folder that leworld did not start collecting into is the user's: never collected into, never
    cleaned up, even when it looks like an unfinished collection (an episodes/ folder)."""
    kept = tmp_path / "kept"
    (kept / "episodes").mkdir(parents=True)
    (kept / "episodes" / "ep_000000.npz").write_bytes(b"the user's own file")
    done = collect_cli(*TINY, f"path={kept}", "resume=true")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "neither a dataset (meta.json) nor a collection (collection.json)" in done.stderr
    assert sorted(p.name for p in kept.rglob("*")) == ["ep_000000.npz", "episodes"]
    assert (kept / "episodes" / "ep_000000.npz").read_bytes() == b"the user's own file"
    assert "not a leworld dataset" in dataset_problems(kept)[0]

    a_file = tmp_path / "a_file"
    a_file.write_text("notes")
    with pytest.raises(LeworldError, match="is a file"):
        collect_here(*TINY, f"path={a_file}", "resume=true")
    with pytest.raises(LeworldError, match="cannot write in .*a_file/data"):
        collect_here(*TINY, f"path={a_file / 'data'}")
    assert a_file.read_text() == "notes"

    (tmp_path / "empty").mkdir()
    assert not unfinished_collection(tmp_path / "nothing") and not unfinished_collection(tmp_path / "empty")
    assert not unfinished_collection(dataset_path)  # finished: meta.json, and no marker left in it
    assert not (dataset_path / "collection.json").exists()
    with pytest.raises(LeworldError, match="choose another path"):
        unfinished_collection(kept)


def test_a_full_disk_is_refused_in_one_line_and_the_collection_resumes_with_its_own_settings(tmp_path, monkeypatch):
    path, real = tmp_path / "data", shutil.disk_usage
    monkeypatch.setattr(collect_module.shutil, "disk_usage", lambda where: real(where)._replace(free=1000))
    with pytest.raises(LeworldError, match=r"needs \d+\.\d MB but its disk has 0\.0 MB free; free space or choose"):
        collect_here(*TINY, f"path={path}")
    assert not path.exists()  # refused before any work

    def filling_up(where):  # the disk fills while the episodes are collected
        full = (path / "episodes" / "ep_000000.npz").exists()
        return real(where)._replace(free=1000) if full else real(where)
    monkeypatch.setattr(collect_module.shutil, "disk_usage", filling_up)
    with pytest.raises(LeworldError, match="MB free; free space, then run again with resume=true"):
        collect_here(*TINY, f"path={path}")
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == ["collection.json", "episodes"]  # no half-written tensors
    assert len(list((path / "episodes").glob("ep_*.npz"))) == 4 and unfinished_collection(path)
    assert "did not finish" in dataset_problems(path)[0]

    with pytest.raises(LeworldError, match="pass resume=true"):
        collect_here(*TINY, f"path={path}")
    with pytest.raises(LeworldError, match=r"other settings: env=tworoom \(this run: reacher\);"):
        collect_here(*TINY, "env=reacher", f"path={path}", "resume=true")
    with pytest.raises(LeworldError, match=r"episode_length=20 \(this run: 30\), noise=0.1 \(this run: 0.2\);"):
        collect_here(*TINY, "episode_length=30", "noise=0.2", f"path={path}", "resume=true")
    collect_here(*TINY, "workers=2", f"path={path}", "resume=true")  # the number of workers may change
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "tensors"]
    assert dataset_problems(path, content=True) == []
    assert EpisodeDataset.open(path).meta["episode_lengths"] == [21] * 4


def test_an_episode_that_cannot_be_written_ends_in_one_line(tmp_path):
    """A worker's write error (here EFBIG: files over 20 kB are refused, as a full disk refuses them)
    reaches the user as one line, and leaves no half-written file."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    path = tmp_path / "data"
    done = run_process("collect", *TINY, f"path={path}", preexec_fn=limit_file_size)  # the limit: in its own process
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: could not write") and "ep_0000" in last and "resume=true" in last
    assert not list((path / "episodes").iterdir())


def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    path = tmp_path / "read_only"
    path.mkdir()
    path.chmod(0o500)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("this user writes in read-only folders (root)")
        with pytest.raises(LeworldError, match="cannot write in .*read_only .*Permission denied"):
            collect_here(*TINY, f"path={path}")
    finally:
        path.chmod(0o700)
    assert not any(path.iterdir())


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with their parent on Linux")
def test_workers_die_with_a_killed_collector_and_a_resumed_run_finishes(tmp_path):
    path = tmp_path / "data"
    # enough episodes that workers left running would go on for seconds
    args = ["env=tworoom", "env.kwargs.image_size=16", "episodes=40", "episode_length=100", "workers=2", f"path={path}"]
    run = subprocess.Popen([sys.executable, "-m", "leworld.collect", *args],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((path / "episodes").glob("ep_*[0-9].npz")) and time.time() < deadline:
        time.sleep(0.05)
    workers = child_pids(run.pid)
    assert len(workers) >= 2 and run.poll() is None  # still collecting
    run.kill()  # the collector alone: nothing else kills its workers
    run.wait()
    deadline = time.time() + 2
    while any(map(running, workers)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(running, workers))
    kept = len(list((path / "episodes").glob("ep_*[0-9].npz")))
    time.sleep(0.5)
    assert kept == len(list((path / "episodes").glob("ep_*[0-9].npz"))) < 40  # nobody collects on

    resumed = collect_cli(*args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert dataset_problems(path, content=True) == [] and EpisodeDataset.open(path).num_episodes == 40
