"""Episode datasets and the clips a world model trains on.

A dataset folder (written by `python -m leworld.collect`) holds

    meta.json    env and its config, collection policy and seed, action/state statistics, format,
                 and the content fingerprint of the tensors (below)
    tensors/     a tensordict memmap, one row per frame:
                   pixels  (N, H, W, 3) uint8    the frame seen at that step
                   action  (N, A) float32        the action taken after seeing it (0 after an episode's last frame)
                   state   (N, S) float32        the physical state (env.get_state())
                   proprio (N, P) float32        proprioception, where the env has one
                   episode (N,) int64, step (N,) int64   episode index and step within it

A clip is T frames taken every `frameskip` steps, t, t+fs, ..., t+(T−1)·fs, and for each kept frame
the fs raw actions that follow it, concatenated into one action chunk of fs·A numbers and
normalised (ActionCodec): chunk k is what moves frame k to frame k+1. A clip never
crosses an episode boundary.

The content fingerprint (format 2): for each tensor file its size, the SHA-256 of all its bytes,
and the SHA-256 of 64 blocks of 64 KiB spread evenly through it, computed by the writer from the
files on disk. Opening a dataset checks the sampled blocks (a few MiB read, whatever its size): a
file replaced by another collection's or overwritten is refused. `collect verify` checks every
byte. A checkpoint records a hash of meta.json, and so of this fingerprint: a resumed run or an
evaluation knows its data by content, not by name.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from tensordict import TensorDict
from torch import Tensor

from leworld import LeworldError

FORMAT, VERSION = "leworld-dataset", 2  # 2: meta.json holds the content fingerprint
FLOAT_KEYS = ("action", "state", "proprio")
SAMPLED_BLOCKS, BLOCK_BYTES = 64, 1 << 16


def _digest(file: Path, blocks: int | None = None) -> str:
    """SHA-256 of a file's bytes: all of them, or `blocks` blocks of BLOCK_BYTES spread evenly
    through it (the whole file when it is no bigger than those) with its size."""
    size, sha = file.stat().st_size, hashlib.sha256()
    with open(file, "rb") as f:
        if blocks is None or size <= blocks * BLOCK_BYTES:
            while chunk := f.read(1 << 23):
                sha.update(chunk)
        else:
            sha.update(size.to_bytes(8, "little"))
            for i in range(blocks):
                f.seek(i * (size - BLOCK_BYTES) // (blocks - 1))
                sha.update(f.read(BLOCK_BYTES))
    return sha.hexdigest()


def content_fingerprint(tensors: Path) -> dict:
    """The fingerprint of a tensors/ folder's files as meta.json stores it (see the docstring)."""
    return {file.stem: {"bytes": file.stat().st_size, "sha256": _digest(file),
                        "sampled_sha256": _digest(file, SAMPLED_BLOCKS)} for file in sorted(tensors.glob("*.memmap"))}


def fingerprint_problems(tensors: Path, meta: dict, full: bool) -> list[str]:
    """Tensor files whose bytes differ from meta.json's content fingerprint (sampled blocks, or
    every byte when `full`); none for a format-1 dataset, which has no fingerprint."""
    problems = []
    for key, expected in meta.get("content", {}).items():
        file = tensors / f"{key}.memmap"
        if not file.is_file() or file.stat().st_size != expected["bytes"]:
            problems.append(f"{file} is missing or not {expected['bytes']} bytes")
        elif (_digest(file) != expected["sha256"]) if full else (_digest(file, SAMPLED_BLOCKS) != expected["sampled_sha256"]):
            problems.append(f"{file} is not the file this dataset was written with (its bytes differ from meta.json's "
                            "content fingerprint: replaced, overwritten or damaged); put the original back or collect "
                            "the dataset again")
    return problems


def dataset_problems(path: str | Path, content: bool = False) -> list[str]:
    """What is wrong with a dataset folder (empty list: nothing). The structural checks read a few
    MiB (the sampled content fingerprint); `content=True` checks every byte against the
    fingerprint, reads the episode indices and checks every number is finite."""
    root = Path(path)
    meta, problems = read_meta(root)
    if problems:
        return problems
    problems = layout_problems(root / "tensors", meta) or fingerprint_problems(root / "tensors", meta, full=content)
    if problems or not content:
        return problems
    return content_problems(TensorDict.load_memmap(root / "tensors"), meta)


def read_meta(root: Path) -> tuple[dict | None, list[str]]:
    """A dataset's meta.json and what is wrong with it: every key that readers of a dataset use is
    checked here, so a damaged file is one line, not a KeyError later."""
    if not root.is_dir():
        return None, [f"{root} does not exist"]
    meta_file = root / "meta.json"
    if not meta_file.is_file():
        partial = (root / "collection.json").is_file()  # collect.MARKER: leworld is collecting into the folder
        imported = (root / "import.json").is_file()  # hdf5.IMPORT_MARKER: an import into the folder
        return None, [f"{root} has no meta.json: " + ("its collection did not finish (run collect again with "
                                                       "resume=true)" if partial else "its import did not finish (run "
                                                       "the import again with resume=true)" if imported else
                                                       "it is not a leworld dataset")]
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        return None, [f"{meta_file} is not valid JSON ({err})"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None, [f"{meta_file} does not describe a leworld dataset"]
    required = {"num_frames": int, "num_episodes": int, "episode_lengths": list, "image_shape": list,
                "action_dim": int, "state_dim": int, "stats": dict, "env": dict}
    damaged = f"{meta_file} is damaged (restore it or collect the dataset again): "
    for key, kind in {**required, "version": int, "proprio_dim": int}.items():
        if key not in meta:
            if key in required:
                return None, [damaged + f"it has no '{key}'"]
        elif not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            wanted = "an integer" if kind is int else "a " + kind.__name__
            return None, [damaged + f"'{key}' is {json.dumps(meta[key])}, not {wanted}"]
    if meta.get("version", 0) > VERSION:
        return None, [f"{root} was written by a newer leworld (format {meta['version']}); upgrade leworld"]
    n, lengths, action_stats = meta["num_frames"], meta["episode_lengths"], meta["stats"].get("action")
    counts = [meta["action_dim"], meta["state_dim"], *meta["image_shape"], *lengths]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in counts) or len(meta["image_shape"]) != 3:
        return None, [damaged + "its dimensions and episode lengths must be positive integers (image_shape three of them)"]
    if len(lengths) != meta["num_episodes"] or sum(lengths) != n:
        return None, [damaged + f"'episode_lengths' lists {len(lengths)} episodes of {sum(lengths)} frames, but it says "
                                f"num_episodes {meta['num_episodes']} and num_frames {n}"]
    if not isinstance(meta["env"].get("name"), str) or not isinstance(action_stats, dict) or not all(
            isinstance(action_stats.get(k), list) and len(action_stats[k]) == meta["action_dim"]
            and all(isinstance(x, (int, float)) and np.isfinite(x) for x in action_stats[k]) for k in ("mean", "std")):
        return None, [damaged + "it lacks the env's name or the finite mean and std of the actions"]
    content = meta.get("content")
    if meta.get("version", 1) >= 2 and not (isinstance(content, dict) and content and all(
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("sampled_sha256"), str) for entry in content.values())):
        return None, [damaged + "its 'content' fingerprint is missing or malformed"]
    return meta, []


def layout_problems(tensors: Path, meta: dict) -> list[str]:
    """Whether tensors/ holds every tensor meta.json describes, with its dtype, shape and file size."""
    try:
        layout = json.loads((tensors / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"{tensors} is missing or unreadable ({err})"]
    n = meta["num_frames"]
    expected = {"pixels": ("torch.uint8", [n, *meta["image_shape"]]), "episode": ("torch.int64", [n]),
                "step": ("torch.int64", [n]), "action": ("torch.float32", [n, meta["action_dim"]]),
                "state": ("torch.float32", [n, meta["state_dim"]])}
    if meta.get("proprio_dim"):
        expected["proprio"] = ("torch.float32", [n, meta["proprio_dim"]])
    problems = []
    for key, (dtype, shape) in expected.items():
        entry = layout.get(key) if isinstance(layout, dict) else None
        if not isinstance(entry, dict):
            problems.append(f"{tensors} has no '{key}'")
            continue
        if entry.get("dtype") != dtype or entry.get("shape") != shape:
            problems.append(f"'{key}' is {entry.get('dtype')} {entry.get('shape')}, meta.json says {dtype} {shape}")
            continue
        file = tensors / f"{key}.memmap"
        size = int(np.prod(shape)) * torch.empty((), dtype=getattr(torch, dtype.split(".")[1])).element_size()
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{file} is {file.stat().st_size} bytes, expected {size} (truncated or overwritten)")
    return problems


def content_problems(td: TensorDict, meta: dict) -> list[str]:
    """Episode and step indices that count as meta.json says, and finite numbers everywhere."""
    problems, n = [], meta["num_frames"]
    episode, step = td["episode"].numpy(), td["step"].numpy()
    starts = np.flatnonzero(np.diff(episode, prepend=-1))
    if not np.array_equal(episode[starts], np.arange(len(starts))) or len(starts) != meta["num_episodes"]:
        problems.append(f"episode indices are not 0..{meta['num_episodes'] - 1} in order")
    elif not np.array_equal(step, np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))):
        problems.append("step indices do not count 0, 1, 2, ... within each episode")
    for key in FLOAT_KEYS:
        if key in td.keys() and not torch.isfinite(td[key]).all():
            problems.append(f"'{key}' holds NaN or inf")
    return problems


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
        meta = json.loads((root / "meta.json").read_text())
        tensors = TensorDict.load_memmap(root / "tensors")
        for key in FLOAT_KEYS:  # small next to the pixels, which are not read; NaN here would reach training
            if key in tensors.keys() and not torch.isfinite(tensors[key]).all():
                raise LeworldError(f"dataset {path}: '{key}' holds NaN or inf; collect the dataset again")
        lengths = np.asarray(meta["episode_lengths"])
        return cls(root, meta, tensors, np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)

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


@dataclass(frozen=True)
class ActionCodec:
    """Raw env actions <-> the action chunks a world model sees and plans in.

    A chunk is the `frameskip` raw actions (A each) taken between two kept frames, each normalised
    by the training data's mean and std, concatenated in time order: [a_t, a_t+1, ...] (fs·A,).
    low / high are the environment's raw action bounds. A checkpoint saves its model's codec, so
    planning searches the action space the model was trained in whatever dataset is at hand.
    """

    mean: tuple[float, ...]  # (A,)
    std: tuple[float, ...]  # (A,), at least 1e-6
    low: tuple[float, ...]  # (A,)
    high: tuple[float, ...]  # (A,)
    frameskip: int

    @classmethod
    def from_stats(cls, stats: dict, low, high, frameskip: int) -> "ActionCodec":
        """From a dataset's action statistics (meta.json's stats.action) and the env's bounds."""
        std = np.maximum(np.asarray(stats["std"], dtype=float), 1e-6)
        return cls(tuple(map(float, stats["mean"])), tuple(map(float, std)), tuple(map(float, low)),
                   tuple(map(float, high)), int(frameskip))

    @property
    def action_dim(self) -> int:
        return len(self.mean)

    @property
    def block_dim(self) -> int:
        return self.frameskip * self.action_dim

    def to_chunks(self, raw: Tensor) -> Tensor:
        """Raw actions (..., K·fs, A) -> normalised chunks (..., K, fs·A)."""
        normalised = (raw - raw.new_tensor(self.mean)) / raw.new_tensor(self.std)
        return rearrange(normalised, "... (k f) a -> ... k (f a)", f=self.frameskip)

    def to_env(self, chunks: Tensor) -> np.ndarray:
        """Normalised chunks (..., K, fs·A) -> raw actions (..., K·fs, A) inside the env's bounds."""
        normalised = rearrange(chunks.detach().float().cpu(), "... k (f a) -> ... (k f) a", f=self.frameskip).numpy()
        return np.clip(normalised * self.std + np.asarray(self.mean), self.low, self.high)

    def bounds(self, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
        """The env's bounds as normalised chunks: (low, high), each (fs·A,)."""
        low, high = (torch.tensor(v, dtype=torch.float32, device=device) for v in (self.low, self.high))
        return self.to_chunks(low.expand(self.frameskip, -1))[0], self.to_chunks(high.expand(self.frameskip, -1))[0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "ActionCodec":
        return cls(**{f.name: tuple(saved[f.name]) if f.name != "frameskip" else int(saved[f.name])
                      for f in dataclasses.fields(cls)})


class ClipSampler:
    """Clips of `num_frames` frames `codec.frameskip` steps apart from the given episodes.

    sample(B, generator) draws B clips at random; epoch(B, seed) goes once through every clip (all
    start frames) in an order fixed by the seed, so that a resumed run can pick up mid-epoch. Both give:
        pixels  (B, T, 3, H, W) uint8
        actions (B, T, fs·A) float32, chunks of the codec; chunk k moves frame k to frame k+1
        state   (B, T, S) float32, and proprio (B, T, P) where the dataset has it
    Gathering runs where the dataset's tensors are: on a GPU after dataset.to("cuda").
    """

    def __init__(self, dataset: EpisodeDataset, episodes: np.ndarray, num_frames: int, codec: ActionCodec):
        self.dataset, self.num_frames, self.codec = dataset, num_frames, codec
        frameskip = codec.frameskip
        span = num_frames * frameskip  # frames t .. t+span-1 must lie in one episode (the last block's actions too)
        starts = [np.arange(s, s + length - span) for s, length in
                  zip(dataset.episode_starts[episodes], dataset.episode_lengths[episodes]) if length > span]
        if not starts:
            raise LeworldError(f"no episode of {dataset.path} is longer than {num_frames} frames x frameskip {frameskip}")
        device = dataset.tensors.device or torch.device("cpu")
        self.starts = torch.as_tensor(np.concatenate(starts), device=device)  # (C,) first frame of every clip
        self.frame_offsets = torch.arange(num_frames, device=device) * frameskip  # (T,)
        self.action_offsets = torch.arange(span, device=device)  # (T·fs,)

    def __len__(self) -> int:
        return len(self.starts)

    def clips(self, starts: Tensor) -> dict[str, Tensor]:
        td = self.dataset.tensors
        frames = starts[:, None] + self.frame_offsets  # (B, T)
        pixels = td["pixels"][frames.flatten()]  # (B·T, H, W, 3)
        raw_actions = td["action"][(starts[:, None] + self.action_offsets).flatten()]  # (B·T·fs, A)
        batch = {
            "pixels": rearrange(pixels, "(b t) h w c -> b t c h w", b=len(starts)),
            "actions": self.codec.to_chunks(rearrange(raw_actions, "(b n) a -> b n a", b=len(starts))),
            "state": rearrange(td["state"][frames.flatten()], "(b t) s -> b t s", b=len(starts)),
        }
        if "proprio" in td.keys():
            batch["proprio"] = rearrange(td["proprio"][frames.flatten()], "(b t) p -> b t p", b=len(starts))
        return batch

    def generator(self, seed: int) -> torch.Generator:
        """A generator for sample(), on the device the clips are gathered on."""
        return torch.Generator(self.starts.device).manual_seed(seed)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        index = torch.randint(len(self.starts), (batch_size,), generator=generator, device=self.starts.device)
        return self.clips(self.starts[index])

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self.starts) // batch_size

    def epoch(self, batch_size: int, seed: int, skip: int = 0, shard: tuple[int, int] = (0, 1)):
        """Every clip once, in full batches, in the order `seed` fixes, leaving out the first `skip`
        batches. With shard=(rank, world_size), the order is cut into global batches of
        batch_size·world_size clips and this process gets its part of each."""
        rank, world_size = shard
        generator = torch.Generator(self.starts.device).manual_seed(seed)
        order = torch.randperm(len(self.starts), generator=generator, device=self.starts.device)
        global_batch = batch_size * world_size
        for i in range(skip, self.batches_per_epoch(global_batch)):
            first = i * global_batch + rank * batch_size
            yield self.clips(self.starts[order[first:first + batch_size]])
