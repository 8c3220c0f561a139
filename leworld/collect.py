"""Collect a dataset of pixel rollouts:  python -m leworld.collect env=pusht [key=value ...]
Check one:                             python -m leworld.collect verify path=data/pusht-cpu
See what a model will see:             python -m leworld.collect preview env=pusht out=pusht.png

Worker processes roll out the environment's scripted policies (a noisy expert, and random
exploration for a `expert_fraction` share of the episodes) and write each finished episode to its
own file, atomically. When all are there, they are gathered into the dataset (leworld/data.py
describes the format) and meta.json is written last. An interrupted run keeps every finished
episode; `resume=true` collects only the missing ones.
"""

import datetime
import json
import multiprocessing as mp
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from tqdm import tqdm

import envs
from leworld import LeworldError
from leworld.data import FORMAT, VERSION, dataset_problems
from leworld.runtime import run_main

EPISODE_FILE = "ep_{:06d}.npz"


def env_kwargs(env_cfg: DictConfig) -> dict:
    """The environment's constructor arguments from its config (configs/env/*.yaml)."""
    return OmegaConf.to_container(env_cfg.kwargs, resolve=True)


def record_episode(env: envs.MujocoEnv, policy, length: int, seed: int) -> dict[str, np.ndarray]:
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
    np.savez(partial, expert=expert, **episode)
    os.replace(partial, final)
    return index


# ---- the dataset ---------------------------------------------------------------------------


def _statistics(values: np.ndarray) -> dict:
    return {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
            "min": values.min(0).tolist(), "max": values.max(0).tolist()}


def write_dataset(root: Path, episode_files: list[Path], meta: dict) -> None:
    """Gather episode files into tensors/ (a tensordict memmap), then write meta.json."""
    first = np.load(episode_files[0])
    lengths = [int(np.load(f, mmap_mode="r")["state"].shape[0]) for f in episode_files]
    n = sum(lengths)
    layout = {
        "pixels": torch.zeros((), dtype=torch.uint8).expand(n, *first["pixels"].shape[1:]),
        "action": torch.zeros(()).expand(n, first["action"].shape[1]),
        "state": torch.zeros(()).expand(n, first["state"].shape[1]),
        "episode": torch.zeros((), dtype=torch.int64).expand(n),
        "step": torch.zeros((), dtype=torch.int64).expand(n),
    }
    if "proprio" in first:
        layout["proprio"] = torch.zeros(()).expand(n, first["proprio"].shape[1])
    partial = root / "tensors.partial"
    shutil.rmtree(partial, ignore_errors=True)
    tensors = TensorDict(layout, batch_size=[n]).memmap_like(partial)

    start, actions, states, experts = 0, [], [], []
    for index, file in enumerate(tqdm(episode_files, desc="writing dataset", leave=False)):
        episode = np.load(file)
        length = len(episode["state"])
        rows = slice(start, start + length)
        tensors["pixels"][rows] = torch.from_numpy(episode["pixels"])
        tensors["state"][rows] = torch.from_numpy(episode["state"]).float()
        # the action after each frame; none follows an episode's last frame: 0, never sampled
        tensors["action"][rows] = torch.from_numpy(np.concatenate([episode["action"], np.zeros_like(episode["action"][:1])])).float()
        if "proprio" in episode:
            tensors["proprio"][rows] = torch.from_numpy(episode["proprio"]).float()
        tensors["episode"][rows] = index
        tensors["step"][rows] = torch.arange(length)
        actions.append(episode["action"])
        states.append(episode["state"])
        experts.append(bool(episode["expert"]))
        start += length
    del tensors  # flush the memory maps before the folder is renamed
    shutil.rmtree(root / "tensors", ignore_errors=True)
    os.replace(partial, root / "tensors")

    meta |= {
        "format": FORMAT, "version": VERSION, "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "num_frames": n, "num_episodes": len(episode_files), "episode_lengths": lengths,
        "image_shape": list(first["pixels"].shape[1:]), "action_dim": int(first["action"].shape[1]),
        "state_dim": int(first["state"].shape[1]), "proprio_dim": int(first["proprio"].shape[1]) if "proprio" in first else 0,
        "expert_episodes": experts,
        "stats": {"action": _statistics(np.concatenate(actions)), "state": _statistics(np.concatenate(states))},
    }
    (root / "meta.json.partial").write_text(json.dumps(meta, indent=1))
    os.replace(root / "meta.json.partial", root / "meta.json")


def collect(cfg: DictConfig) -> Path:
    kwargs = env_kwargs(cfg.env)
    envs.make(cfg.env.name, **kwargs).close()  # bad env settings fail here, in one line, before any file is made
    root = Path(cfg.path)
    if (root / "meta.json").exists():
        raise LeworldError(f"{root} already holds a finished dataset; choose another path= or delete it")
    episodes_dir = root / "episodes"
    if root.exists() and any(root.iterdir()) and not cfg.resume:
        raise LeworldError(f"{root} holds an unfinished collection; pass resume=true to finish it, or choose another path=")
    episodes_dir.mkdir(parents=True, exist_ok=True)
    for stale in episodes_dir.glob("*.partial.npz"):  # written when a run was killed: incomplete
        stale.unlink()

    done = {int(f.stem.split("_")[1]) for f in episodes_dir.glob("ep_*.npz")}
    todo = [i for i in range(cfg.episodes) if i not in done]
    print(f"collecting {cfg.env.name} into {root}: {cfg.episodes} episodes of {cfg.episode_length} steps at "
          f"{kwargs.get('image_size')} px, {cfg.expert_fraction:.0%} expert, {cfg.workers} workers"
          + (f"; {len(done)} already there" if done else ""))
    spec = {"seed": cfg.seed, "expert_fraction": cfg.expert_fraction, "noise": cfg.noise,
            "episode_length": cfg.episode_length, "folder": str(episodes_dir)}
    if todo:
        with mp.get_context("spawn").Pool(cfg.workers, _start_worker, (cfg.env.name, kwargs, spec)) as pool:
            finished = pool.imap_unordered(_collect_one, todo)
            list(tqdm(finished, total=len(todo), desc="episodes", dynamic_ncols=True))

    files = [episodes_dir / EPISODE_FILE.format(i) for i in range(cfg.episodes)]
    meta = {"env": {"name": cfg.env.name, "id": envs.IDS[cfg.env.name], "kwargs": kwargs},
            "collection": OmegaConf.to_container(cfg, resolve=True)}
    write_dataset(root, files, meta)
    shutil.rmtree(episodes_dir)
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
    if len(sys.argv) > 1 and sys.argv[1] in verbs:
        run_main("collect", verbs[sys.argv[1]], sys.argv[2:])
    else:
        run_main("collect", collect)


if __name__ == "__main__":
    main()
