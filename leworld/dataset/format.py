"""The dataset format, and every check of it.

A dataset folder (written by leworld.dataset.writer: collection and HDF5 import) holds

    meta.json    env and its config, where the data came from, action/state statistics, format,
                 and the content fingerprint of the tensors (below)
    tensors/     a tensordict memmap, one row per frame:
                   pixels  (N, H, W, 3) uint8    the frame seen at that step
                   action  (N, A) float32        the action taken after seeing it (0 after an episode's last frame)
                   state   (N, S) float32        the physical state (env.get_state())
                   proprio (N, P) float32        proprioception, where the env has one
                   episode (N,) int64, step (N,) int64   episode index and step within it

While a writer works in a folder, the folder holds its marker (collection.json or import.json)
and tensors.partial/; meta.json is written last and replaces the marker.

The content fingerprint (format 2): for each tensor file its size, the SHA-256 of all its bytes,
and the SHA-256 of 64 blocks of 64 KiB spread evenly through it, computed by the writer from the
files on disk. Opening a dataset checks the sampled blocks (a few MiB read, whatever its size): a
file replaced by another collection's or overwritten is refused. `collect verify` checks every
byte. A checkpoint records a hash of meta.json, and so of this fingerprint: a resumed run or an
evaluation knows its data by content, not by name.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict


FORMAT, VERSION = "leworld-dataset", 2  # 2: meta.json holds the content fingerprint
FLOAT_KEYS = ("action", "state", "proprio")
SAMPLED_BLOCKS, BLOCK_BYTES = 64, 1 << 16
COLLECTING, IMPORTING = "collection.json", "import.json"  # the markers of an unfinished collection, import


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
        partial, imported = (root / COLLECTING).is_file(), (root / IMPORTING).is_file()
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


def column_statistics(values: np.ndarray) -> dict:
    """Per-column mean, std, min and max of (N, D) values, as meta.json stores them."""
    return {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
            "min": values.min(0).tolist(), "max": values.max(0).tolist()}


def open_meta(root: Path) -> dict:
    """meta.json of a dataset that dataset_problems found sound."""
    return json.loads((root / "meta.json").read_text())
