"""An opened dataset: its meta.json and its tensors, checked (leworld/dataset/format.py)."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

from leworld import LeworldError
from leworld.dataset.format import FLOAT_KEYS, dataset_problems, open_meta


@dataclass
class EpisodeDataset:
    """An opened dataset: its meta.json and its tensors (memory-mapped, or in memory on a device)."""

    path: Path
    meta: dict
    tensors: TensorDict
    episode_starts: np.ndarray  # (E,) first frame of each episode
    episode_lengths: np.ndarray  # (E,) frames in each episode

    @classmethod
    def open(cls, path: str | Path) -> "EpisodeDataset":
        problems = dataset_problems(path)
        if problems:
            raise LeworldError(f"dataset {path}: {problems[0]}; verify it with python -m leworld.collect verify path={path}")
        root = Path(path)
        meta = open_meta(root)
        tensors = TensorDict.load_memmap(root / "tensors")
        for key in FLOAT_KEYS:  # small next to the pixels, which are not read; NaN here would reach training
            if key in tensors.keys() and not torch.isfinite(tensors[key]).all():
                raise LeworldError(f"dataset {path}: '{key}' holds NaN or inf; collect the dataset again")
        lengths = np.asarray(meta["episode_lengths"])
        return cls(root, meta, tensors, np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)

    def check_env(self, name: str, fix: str) -> None:
        """LeworldError unless this dataset was recorded in env `name`; fix: what the user can do."""
        if self.meta["env"]["name"] != name:
            raise LeworldError(f"{self.path} holds {self.meta['env']['name']} data, not {name}; {fix}")

    @property
    def num_episodes(self) -> int:
        return len(self.episode_lengths)

    def to(self, device: str | torch.device) -> "EpisodeDataset":
        """The whole dataset loaded into memory on `device` (uint8 pixels), so that clips are
        gathered there without touching the disk."""
        tensors = self.tensors.apply(lambda t: torch.as_tensor(t).clone().to(device))
        return EpisodeDataset(self.path, self.meta, tensors, self.episode_starts, self.episode_lengths)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(train, held-out) episode indices: a seeded random split by whole episodes."""
        order = np.random.default_rng(seed).permutation(self.num_episodes)
        n_val = int(round(val_fraction * self.num_episodes))
        if val_fraction > 0 and n_val == 0 or n_val >= self.num_episodes:
            raise LeworldError(f"a held-out fraction of {val_fraction} of {self.num_episodes} episodes leaves a split empty")
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def fingerprint(self) -> str:
        """A short hash of meta.json: it changes when the dataset is collected again (its creation time,
        episode lengths and statistics are in it), so a checkpoint can tell its own data from another."""
        return hashlib.sha256((self.path / "meta.json").read_bytes()).hexdigest()[:16]
