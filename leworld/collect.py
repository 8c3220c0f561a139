"""Collect a dataset of pixel rollouts:  python -m leworld.collect env=pusht [key=value ...]
Check one:                             python -m leworld.collect verify path=data/pusht-cpu
See what a model will see:             python -m leworld.collect preview env=pusht out=pusht.png
Import stable-worldmodel's HDF5:       python -m leworld.collect import path=<file.h5> out=<dataset> [env=gym_pusht]
Export to it:                          python -m leworld.collect export path=<dataset> out=<file.h5>
(import and export: leworld/dataset/hdf5.py)

Worker processes roll out the environment's scripted policies (a noisy expert, and random
exploration for a `expert_fraction` share of the episodes) and write each finished episode to its
own file, atomically. When all are there, they are gathered into the dataset (leworld/data.py
describes the format) and meta.json is written last. An interrupted run keeps every finished
episode; `resume=true` collects only the missing ones.

A folder being collected into holds collection.json (the settings that decide its episodes) until
meta.json replaces it: only such a folder is resumed or cleaned up, and only with the same settings.
The collecting process holds the folder's lock (leworld/folders.py): a second collection into it,
resumed or not, is refused while the first runs. Ctrl-C or SIGTERM ends it with the command that
finishes it.
"""

import ctypes
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import envs
from leworld import LeworldError, settings
from leworld.dataset.format import COLLECTING, column_statistics, dataset_problems
from leworld.dataset.writer import PARTIAL, DatasetWriter
from leworld.folders import check_free_space, entries, lock_folder, write_atomically
from leworld.runtime import Stopped, check_values, run_main

EPISODE_FILE = "ep_{:06d}.npz"


def env_kwargs(env_cfg: DictConfig) -> dict:
    """The environment's constructor arguments from its config (configs/env/*.yaml)."""
    return OmegaConf.to_container(env_cfg.kwargs, resolve=True)


def record_episode(env: envs.Env, policy, length: int, seed: int) -> dict[str, np.ndarray]:
    """One rollout: length + 1 frames and states, and the length actions between them."""
    obs, info = env.reset(seed=seed)
    policy.reset(info["state"])
    frames, states, actions = [obs], [info["state"]], []
    proprio = [info["proprio"]] if "proprio" in info else None
    for _ in range(length):
        action = policy(info["state"])
        obs, _, _, _, info = env.step(action)
        frames.append(obs)
        states.append(info["state"])
        actions.append(action)
        if proprio is not None:
            proprio.append(info["proprio"])
    episode = {"pixels": np.stack(frames), "state": np.stack(states), "action": np.stack(actions)}
    if proprio is not None:
        episode["proprio"] = np.stack(proprio)
    return episode


# ---- worker processes ----------------------------------------------------------------------

_worker = {}


def _start_worker(env_name: str, kwargs: dict, spec: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the collector ends us
    if sys.platform.startswith("linux"):  # a killed collector must not leave its workers collecting
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != spec["parent"]:  # it died before prctl took effect
            os._exit(1)
    torch.set_num_threads(1)  # workers do numpy and MuJoCo only
    _worker.update(env=envs.make(env_name, **kwargs), name=env_name, **spec)


def _collect_one(index: int) -> int:
    """Collect episode `index` (its seed and policy follow from the run's seed and the index) and
    write it atomically: a crash leaves either the whole file or none."""
    w = _worker
    rng = np.random.default_rng([w["seed"], index])
    expert = bool(rng.random() < w["expert_fraction"])
    policy = envs.make_policy(w["name"], w["env"], rng, expert=expert, noise=w["noise"])
    episode = record_episode(w["env"], policy, w["episode_length"], seed=int(rng.integers(2**31)))
    final = Path(w["folder"]) / EPISODE_FILE.format(index)
    partial = final.with_suffix(".partial.npz")
    try:
        np.savez(partial, expert=expert, **episode)
        os.replace(partial, final)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise LeworldError(f"could not write {final} ({err.strerror or err}); free space or make the folder "
                           "writable, then run again with resume=true") from None
    return index


# ---- the dataset ---------------------------------------------------------------------------


def write_dataset(root: Path, episode_files: list[Path], meta: dict) -> None:
    """Gather episode files into the dataset (leworld/dataset/writer.py), meta.json last."""
    lengths = [int(np.load(f, mmap_mode="r")["state"].shape[0]) for f in episode_files]
    first = np.load(episode_files[0])
    shapes = {key: first[key].shape[1:] for key in ("pixels", "action", "state", "proprio") if key in first}
    writer = DatasetWriter.start(root, sum(lengths), shapes, "free space, then run again with resume=true (the "
                                                             "episodes are kept)")
    actions, states, experts = [], [], []
    for index, (file, row) in enumerate(zip(tqdm(episode_files, desc="writing dataset", leave=False),
                                            np.cumsum([0, *lengths[:-1]]))):
        episode = dict(np.load(file))
        actions.append(episode["action"])
        states.append(episode["state"])
        experts.append(bool(episode["expert"]))
        # the action after each frame; none follows an episode's last frame: 0, never sampled
        episode["action"] = np.concatenate([episode["action"], np.zeros_like(episode["action"][:1])])
        writer.write_episode(index, int(row), episode)
    writer.finish(meta | {"expert_episodes": experts, "stats": {"action": column_statistics(np.concatenate(actions)),
                                                                 "state": column_statistics(np.concatenate(states))}})


def unfinished_collection(path: str | Path) -> bool:
    """Whether `path` holds a collection leworld started and did not finish (resume=true finishes it).
    False for nothing there, an empty folder, or a finished dataset (meta.json). Anything else is the
    user's, never to be collected into nor cleaned up: LeworldError."""
    root = Path(path)
    if (root / "meta.json").exists() or not root.exists() or root.is_dir() and not entries(root):
        return False
    if (root / COLLECTING).is_file():
        return True
    what = "a file" if not root.is_dir() else f"a folder with neither a dataset (meta.json) nor a collection ({COLLECTING}) in it"
    raise LeworldError(f"{root} is {what}; choose another path, or empty it yourself (leworld changed nothing there)")


def collection_settings(cfg: DictConfig) -> dict:
    """What decides a collection's episodes, by override name: a resumed run must have the same."""
    return {"env": cfg.env.name, **{f"env.kwargs.{k}": v for k, v in env_kwargs(cfg.env).items()},
            "episodes": cfg.episodes, "episode_length": cfg.episode_length,
            "expert_fraction": cfg.expert_fraction, "noise": cfg.noise, "seed": cfg.seed}


def _check_resumable(root: Path, settings: dict) -> None:
    try:
        before = json.loads((root / COLLECTING).read_text())
        now = json.loads(json.dumps(settings))  # compared as they are stored
        differ = [f"{key}={before.get(key)} (this run: {now.get(key)})" for key in {**before, **now}
                  if before.get(key) != now.get(key)]
    except (OSError, ValueError, AttributeError) as err:
        raise LeworldError(f"{root / COLLECTING} is unreadable ({err}); collect into another path=") from None
    if differ:
        raise LeworldError(f"{root} is an unfinished collection with other settings: {', '.join(differ)}; resume it "
                           "with its settings or choose another path=")


def _frame_bytes(env: envs.Env, seed: int) -> int:
    """About what one frame takes in an episode file, and again in the dataset."""
    obs, info = env.reset(seed=seed)
    floats = env.action_space.shape[0] + np.size(info["state"]) + np.size(info.get("proprio", ()))
    return obs.nbytes + 8 * floats + 16


def collect(cfg: DictConfig) -> Path:
    if cfg.workers == "auto":
        cfg.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    check_values(cfg, settings.COLLECT)
    kwargs = env_kwargs(cfg.env)
    env = envs.make(cfg.env.name, **kwargs)  # bad env settings fail here, in one line, before any file is made
    frame_bytes = _frame_bytes(env, cfg.seed)
    env.close()
    root = Path(cfg.path)
    unfinished_collection(root)  # a folder of the user's is refused before anything is made in it
    with lock_folder(root, "wait for it to end (a second collection there would write the same episodes), or choose "
                           "another path="):
        return _collect_into(root, cfg, kwargs, frame_bytes)


def _collect_into(root: Path, cfg: DictConfig, kwargs: dict, frame_bytes: int) -> Path:
    """The collection, in a folder this process holds the lock of."""
    if (root / "meta.json").exists():
        raise LeworldError(f"{root} already holds a finished dataset; choose another path= or delete it")
    settings = collection_settings(cfg)
    if unfinished_collection(root):
        if not cfg.resume:
            raise LeworldError(f"{root} holds an unfinished collection; pass resume=true to finish it, or choose another path=")
        _check_resumable(root, settings)
    episodes_dir = root / "episodes"
    done = {int(f.stem.split("_")[1]) for f in episodes_dir.glob("ep_*[0-9].npz")}
    todo = [i for i in range(cfg.episodes) if i not in done]
    check_free_space(root, (len(todo) + cfg.episodes) * (cfg.episode_length + 1) * frame_bytes)
    try:
        # before anything else, the marker that makes the folder leworld's (rewritten on resume: proves it writable)
        write_atomically(root / COLLECTING, json.dumps(settings, indent=1).encode())
        episodes_dir.mkdir(exist_ok=True)
        for stale in episodes_dir.glob("*.partial.npz"):  # written when a run was killed: incomplete
            stale.unlink()
    except OSError as err:
        raise LeworldError(f"cannot write in {root} ({err.strerror or err}); make it writable or choose another path=") from None

    print(f"collecting {cfg.env.name} into {root}: {cfg.episodes} episodes of {cfg.episode_length} steps at "
          f"{kwargs.get('image_size')} px, {cfg.expert_fraction:.0%} expert, {cfg.workers} workers"
          + (f"; {len(done)} already there" if done else ""))
    spec = {"seed": cfg.seed, "expert_fraction": cfg.expert_fraction, "noise": cfg.noise,
            "episode_length": cfg.episode_length, "folder": str(episodes_dir), "parent": os.getpid()}
    files = [episodes_dir / EPISODE_FILE.format(i) for i in range(cfg.episodes)]
    meta = {"env": {"name": cfg.env.name, "id": envs.IDS[cfg.env.name], "kwargs": kwargs},
            "collection": OmegaConf.to_container(cfg, resolve=True)}
    try:
        if todo:
            with mp.get_context("spawn").Pool(cfg.workers, _start_worker, (cfg.env.name, kwargs, spec)) as pool:
                finished = pool.imap_unordered(_collect_one, todo)
                list(tqdm(finished, total=len(todo), desc="episodes", dynamic_ncols=True))
        write_dataset(root, files, meta)
    except OSError as err:
        shutil.rmtree(root / PARTIAL, ignore_errors=True)
        raise LeworldError(f"could not write the dataset in {root} ({err.strerror or err}); free space, then run "
                           "again with resume=true (the episodes are kept)") from None
    except KeyboardInterrupt as stop:
        kept = len(list(episodes_dir.glob("ep_*[0-9].npz")))
        finish = " ".join(["python -m leworld.collect", *(f"{k}={v}" for k, v in settings.items()), f"path={root}",
                           "resume=true"])
        print(f"{'stopped by SIGTERM' if isinstance(stop, Stopped) else 'interrupted'}: {kept} of {cfg.episodes} "
              f"episodes are kept in {root}; {finish} finishes the collection", file=sys.stderr)
        raise
    shutil.rmtree(episodes_dir)
    (root / COLLECTING).unlink()  # meta.json marks the folder from now on
    frames = sum(json.loads((root / "meta.json").read_text())["episode_lengths"])
    print(f"wrote {root}: {cfg.episodes} episodes, {frames} frames")
    return root


def verify(cfg: DictConfig) -> None:
    problems = dataset_problems(cfg.path, content=True)
    if problems:
        raise LeworldError(f"dataset {cfg.path} is broken: {'; '.join(problems)}")
    meta = json.loads((Path(cfg.path) / "meta.json").read_text())
    print(f"ok: {cfg.path}: {meta['env']['name']}, {meta['num_episodes']} episodes, {meta['num_frames']} frames "
          f"of {'x'.join(map(str, meta['image_shape']))}")


def preview(cfg: DictConfig) -> Path:
    """A PNG strip of frames from one expert episode, at the dataset's image size (each pixel drawn
    as a 3 x 3 block so that small frames can be seen)."""
    check_values(cfg, {key: rule for key, rule in settings.COLLECT.items() if key != "workers"})  # it starts none
    env = envs.make(cfg.env.name, **env_kwargs(cfg.env))
    rng = np.random.default_rng(cfg.seed)
    episode = record_episode(env, envs.make_policy(cfg.env.name, env, rng, expert=True, noise=cfg.noise),
                             cfg.episode_length, seed=cfg.seed)
    frames = episode["pixels"][:: max(1, cfg.episode_length // 8)][:8]
    strip = np.concatenate([np.pad(f, ((2, 2), (2, 2), (0, 0)), constant_values=255) for f in frames], axis=1)
    out = Path(cfg.out or f"{cfg.env.name}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip.repeat(3, 0).repeat(3, 1)).save(out)
    print(f"wrote {out}: {len(frames)} frames of an expert episode, every {cfg.episode_length // 8} steps")
    return out


def main() -> None:
    verbs = {"verify": verify, "preview": preview}
    verb, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else (None, [])
    if verb in verbs:
        run_main("collect", verbs[verb], args)
    elif verb in ("import", "export"):
        from leworld.dataset import hdf5

        # without env= an import takes the env a leworld export names (the default, pusht, would be a guess)
        env_given = any(a.startswith("env=") for a in args)
        run_main("collect", lambda cfg: hdf5.import_hdf5(cfg, env_given) if verb == "import" else hdf5.export_hdf5(cfg), args)
    else:
        run_main("collect", collect)


if __name__ == "__main__":
    main()
