"""The one writer of dataset folders (leworld/dataset/format.py): collection and HDF5 import both
write through it.

    writer = DatasetWriter.start(root, num_frames, shapes, fix)   tensors.partial/, zeros, its disk room taken
    writer.write_episode(index, first_row, episode)               one episode's rows
    writer.finish(meta)                                           fingerprint, tensors/, then meta.json

The tensors are memory maps: a process killed while writing keeps what it wrote, which is how an
import resumes (DatasetWriter.reopen). The files' blocks are taken on disk before anything is
written, so that a full disk is an OSError at the start rather than SIGBUS in the middle.
"""

import datetime
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

from leworld.dataset.format import FORMAT, VERSION, content_fingerprint
from leworld.folders import check_free_space, write_atomically

PARTIAL = "tensors.partial"


class DatasetWriter:
    def __init__(self, root: Path, tensors: TensorDict):
        self.root, self.tensors = root, tensors

    @classmethod
    def start(cls, root: Path, num_frames: int, shapes: dict[str, tuple], fix: str) -> "DatasetWriter":
        """Zero tensors for `num_frames` rows in root/tensors.partial/ (made afresh). shapes: one
        row's shape of pixels, action, state and, where the env has one, proprio. fix: what the user
        can do when the disk lacks the room."""
        dtypes = {"pixels": torch.uint8, "action": torch.float32, "state": torch.float32, "proprio": torch.float32}
        layout = {key: torch.zeros((), dtype=dtypes[key]).expand(num_frames, *shape) for key, shape in shapes.items()}
        layout |= {key: torch.zeros((), dtype=torch.int64).expand(num_frames) for key in ("episode", "step")}
        partial = root / PARTIAL
        shutil.rmtree(partial, ignore_errors=True)
        check_free_space(root, sum(t.numel() * t.element_size() for t in layout.values()), fix)
        tensors = TensorDict(layout, batch_size=[num_frames]).memmap_like(partial)
        if hasattr(os, "posix_fallocate"):  # the files are sparse: take their blocks now (see the docstring)
            for file in partial.glob("*.memmap"):
                with open(file, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, file.stat().st_size)
        return cls(root, tensors)

    @classmethod
    def reopen(cls, root: Path) -> "DatasetWriter":
        """The tensors an interrupted writer left in root/tensors.partial/."""
        return cls(root, TensorDict.load_memmap(root / PARTIAL))

    def write_episode(self, index: int, first_row: int, episode: dict[str, np.ndarray]) -> None:
        """Episode `index` at rows first_row.. : pixels (L, H, W, 3) uint8, action (L, A) (the action
        after each frame: 0 after the last), state (L, S) and, where the dataset has it, proprio (L, P)."""
        length = len(episode["state"])
        rows = slice(first_row, first_row + length)
        self.tensors["pixels"][rows] = torch.from_numpy(episode["pixels"])
        for key in ("action", "state", "proprio"):
            if key in self.tensors.keys():
                self.tensors[key][rows] = torch.from_numpy(episode[key]).float()
        self.tensors["episode"][rows] = index
        self.tensors["step"][rows] = torch.arange(length)

    def finish(self, meta: dict) -> dict:
        """tensors.partial/ becomes tensors/, then meta.json is written: `meta` (what the source says:
        env, statistics, its origin) with the format, the sizes and the content fingerprint added.
        -> the meta.json written."""
        self.tensors, tensors = None, self.tensors  # the memory maps flushed and closed before the folder is renamed
        lengths = np.bincount(tensors["episode"].numpy()).tolist()
        shapes = {key: list(tensors[key].shape[1:]) for key in tensors.keys()}
        del tensors
        content = content_fingerprint(self.root / PARTIAL)  # from the files on disk, as a reader will find them
        shutil.rmtree(self.root / "tensors", ignore_errors=True)
        os.replace(self.root / PARTIAL, self.root / "tensors")
        meta = {"format": FORMAT, "version": VERSION, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                "num_frames": sum(lengths), "num_episodes": len(lengths), "episode_lengths": lengths,
                "image_shape": shapes["pixels"], "action_dim": shapes["action"][0], "state_dim": shapes["state"][0],
                "proprio_dim": shapes["proprio"][0] if "proprio" in shapes else 0} | meta | {"content": content}
        write_atomically(self.root / "meta.json", json.dumps(meta, indent=1).encode())
        return meta
