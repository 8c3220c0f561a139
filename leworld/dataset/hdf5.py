"""Datasets in stable-worldmodel's HDF5 layout (LeWM's released datasets are in it), in and out:

    python -m leworld.collect import path=<file.h5> out=<dataset folder> [env=gym_pusht]
    python -m leworld.collect export path=<dataset folder> out=<file.h5>

The layout (stable_worldmodel/data/formats/hdf5.py): one .h5 file holding one HDF5 dataset per
column over the steps of all episodes, and `ep_len` / `ep_offset`, each episode's number of rows
and first row. A row is one step: the frame, and the action taken after it (NaN after an
episode's last frame). The import reads three columns, named by `columns` (configs/collect.yaml):
pixels (N, H, W, 3) uint8, action (N, A) and state (N, S); proprioception is computed from the
state by the env, as the collector does. The frames must be square; their size, or the one
`resize` asks for (PIL's bilinear filter), becomes the dataset's env.kwargs.image_size.

Import streams one episode at a time into the dataset folder's tensors.partial/ (import.json
records the file and how many episodes are in), so that files bigger than memory import, and an
interrupted import continues with resume=true. Each episode is checked before it is written, the
whole dataset is read back and compared with the file, and only then is meta.json written. A
file that cannot be read, lacks a column or disagrees with itself is refused in one line and
leaves nothing behind. The importing process holds the folder's lock (leworld/folders.py). Export
writes a file of its own beside <file> (a hidden name with a unique suffix) and gives it the name
<file> once complete, never over a file that is there; its attributes name leworld's env, so that
the file imports back without env=.
"""

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tensordict import TensorDict
from tqdm import tqdm

import envs
from leworld import LeworldError, settings
from leworld.dataset.episodes import EpisodeDataset
from leworld.dataset.format import IMPORTING, column_statistics, content_problems
from leworld.dataset.writer import PARTIAL, DatasetWriter
from leworld.folders import check_free_space, entries, lock_folder, move_without_overwriting, unique_partial, write_atomically
from leworld.runtime import check_values, load_config

ENV_ATTRIBUTE, KWARGS_ATTRIBUTE = "leworld_env", "leworld_env_kwargs"


def h5py_module():
    """h5py (with hdf5plugin's compression filters where installed), or a one-line error."""
    try:
        import h5py
    except ImportError:
        raise LeworldError("HDF5 import and export need h5py: pip install 'leworld[community]'") from None
    try:
        import hdf5plugin  # noqa: F401  (registers the filters LeWM's files may be compressed with)
    except ImportError:
        pass
    return h5py


@dataclass
class Layout:
    """What the file holds, checked: column names, sizes and each episode's rows."""

    keys: dict  # our name -> the file's column
    lengths: np.ndarray  # (E,)
    offsets: np.ndarray  # (E,) each episode's first row in the file
    file_size: int  # the file's frames are file_size x file_size
    size: int  # the dataset's frames (resized where it differs from file_size)
    action_dim: int
    state_dim: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)

    @property
    def num_frames(self) -> int:
        return int(self.lengths.sum())

    @cached_property
    def starts(self) -> np.ndarray:
        """(E,) each episode's first row in the leworld dataset (which has no gaps between episodes)."""
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]])

    def rows(self, index: int) -> slice:
        return slice(int(self.starts[index]), int(self.starts[index] + self.lengths[index]))


def read_layout(file, source: Path, keys: dict, resize: int | None = None) -> Layout:
    """The layout of an open HDF5 file (its frames to be resized to `resize`, if given), or a
    LeworldError naming the first thing wrong with it."""
    columns = sorted(file.keys())
    for name, column in {**keys, "ep_len": "ep_len", "ep_offset": "ep_offset"}.items():
        if column not in file:
            hint = f"; name the file's {name} column with columns.{name}=<column>" if name in keys else ""
            raise LeworldError(f"{source} has no '{column}' column (it has: {', '.join(columns)}){hint}")
    pixels, action, state = (file[keys[k]] for k in ("pixels", "action", "state"))
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3 or pixels.shape[1] != pixels.shape[2]:
        raise LeworldError(f"{source}: '{keys['pixels']}' is {pixels.dtype} {pixels.shape}; leworld imports square RGB "
                           "frames, uint8 (N, H, H, 3)")
    for name, column in (("action", action), ("state", state)):
        if column.ndim != 2 or column.dtype.kind != "f":
            raise LeworldError(f"{source}: '{keys[name]}' is {column.dtype} {column.shape}, not floats (N, D)")
    if not len(pixels) == len(action) == len(state):
        raise LeworldError(f"{source}: its columns have different lengths ({keys['pixels']} {len(pixels)}, "
                           f"{keys['action']} {len(action)}, {keys['state']} {len(state)} rows)")
    lengths, offsets = file["ep_len"][:].astype(np.int64), file["ep_offset"][:].astype(np.int64)
    if lengths.ndim != 1 or lengths.shape != offsets.shape or len(lengths) == 0:
        raise LeworldError(f"{source}: ep_len and ep_offset must list the same episodes (they have {lengths.shape} "
                           f"and {offsets.shape})")
    if (lengths < 1).any() or (offsets < 0).any() or (offsets + lengths > len(pixels)).any():
        bad = int(np.flatnonzero((lengths < 1) | (offsets < 0) | (offsets + lengths > len(pixels)))[0])
        raise LeworldError(f"{source}: episode {bad} (rows {offsets[bad]} to {offsets[bad] + lengths[bad]}) does not fit "
                           f"in its {len(pixels)} rows: ep_len / ep_offset disagree with the columns (a truncated file?)")
    return Layout(keys, lengths, offsets, pixels.shape[1], resize or pixels.shape[1], action.shape[1], state.shape[1])


def read_episode(file, layout: Layout, index: int, source: Path) -> dict[str, np.ndarray]:
    """One episode's rows, checked: every number finite but the action after the last frame."""
    rows = slice(int(layout.offsets[index]), int(layout.offsets[index] + layout.lengths[index]))
    episode = {name: file[column][rows] for name, column in layout.keys.items()}
    if layout.size != layout.file_size:
        size = (layout.size, layout.size)
        episode["pixels"] = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR)) for f in episode["pixels"]])
    episode["action"] = episode["action"].copy()
    episode["action"][-1] = 0  # no action follows an episode's last frame: 0 in leworld, NaN in the file
    for name in ("action", "state"):
        if not np.isfinite(episode[name]).all():
            step = int(np.flatnonzero(~np.isfinite(episode[name]).all(1))[0])
            raise LeworldError(f"{source}: episode {index} has NaN or inf in '{layout.keys[name]}' at step {step}")
    return episode


def open_file(h5py, source: Path):
    if not source.is_file():
        what = "is a folder" if source.is_dir() else "does not exist"
        raise LeworldError(f"{source} {what}; path= names the HDF5 file to import")
    try:
        return h5py.File(source, "r")
    except OSError as err:
        raise LeworldError(f"{source} is not a readable HDF5 file ({err}); download or export it again") from None


def import_hdf5(cfg: DictConfig, env_given: bool = True) -> Path:
    """Convert the file at cfg.path into a leworld dataset at cfg.out (see the module's docstring).
    env_given false: the env is the one the file's attributes name (a leworld export), not cfg.env."""
    h5py = h5py_module()
    if cfg.out is None:
        raise LeworldError("out= is required: the dataset folder to import into")
    source, root = Path(cfg.path), Path(cfg.out)
    if not env_given:
        with open_file(h5py, source) as file:
            name = file.attrs.get(ENV_ATTRIBUTE)
        if name is None:
            raise LeworldError(f"{source} does not say which environment it was recorded in; pass env=<"
                               f"{'|'.join(envs.ENVS)}> (stable-worldmodel's PushT is env=gym_pusht)")
        cfg.env = load_config("collect", [f"env={name}"]).env
    if root.exists() and not (root / IMPORTING).is_file() and (not root.is_dir() or entries(root)):
        raise LeworldError(f"{root} is not empty and holds no import of leworld's; choose another out=")
    check_values(cfg, {"resize": settings.COLLECT["resize"]})
    with open_file(h5py, source) as file, lock_folder(root, "wait for it to end, or choose another out="):
        return _import_into(root, file, source, cfg)


def _import_into(root: Path, file, source: Path, cfg: DictConfig) -> Path:
    """The import, into a folder this process holds the lock of."""
    if (root / "meta.json").exists():
        raise LeworldError(f"{root} already holds a dataset; choose another out= or delete it")
    try:
        layout = read_layout(file, source, dict(cfg.columns), cfg.resize)
    except (OSError, KeyError, ValueError) as err:  # h5py's errors for damaged objects inside a file that opens
        raise LeworldError(f"{source} is damaged ({err}); download or export it again") from None
    recorded = json.loads(file.attrs.get(KWARGS_ATTRIBUTE, "{}")) if file.attrs.get(ENV_ATTRIBUTE) == cfg.env.name else {}
    kwargs = {**OmegaConf.to_container(cfg.env.kwargs, resolve=True), **recorded, "image_size": layout.size}
    env = envs.make(cfg.env.name, **kwargs)
    if layout.state_dim != env.state_dim or layout.action_dim != env.action_space.shape[0]:
        raise LeworldError(f"{source} has states of {layout.state_dim} and actions of {layout.action_dim} numbers, "
                           f"env={cfg.env.name} {env.state_dim} and {env.action_space.shape[0]}; pass the env it was "
                           "recorded in (stable-worldmodel's PushT is env=gym_pusht)")
    stat = source.stat()
    settings = {"source": str(source.resolve()), "bytes": stat.st_size, "modified_ns": stat.st_mtime_ns,
                "env": cfg.env.name, "env_kwargs": kwargs, "keys": layout.keys}
    done = _episodes_done(root, settings, cfg.resume)
    try:
        writer = _start(root, settings, layout, env) if done is None else DatasetWriter.reopen(root)
        _copy(file, source, layout, env, writer, done or 0, settings)
        print("checking the dataset against the file")
        _compare(file, source, layout, writer.tensors)
    except (LeworldError, OSError) as err:  # a bad file or a full disk: leave nothing half written
        shutil.rmtree(root / PARTIAL, ignore_errors=True)
        (root / IMPORTING).unlink(missing_ok=True)  # the folder itself goes with the lock, if this import made it
        if isinstance(err, LeworldError):
            raise
        raise LeworldError(f"reading {source} or writing {root} failed ({err}); nothing was kept") from None
    _finish(writer, layout, settings)
    print(f"imported {source} into {root}: {len(layout.lengths)} episodes, {layout.num_frames} frames of "
          f"{'x'.join(map(str, layout.image_shape))} (env={cfg.env.name})")
    return root


def _episodes_done(root: Path, settings: dict, resume: bool) -> int | None:
    """How many episodes an unfinished import at root holds (None: there is none). Refuses one of
    another file or other settings, and one not asked to resume."""
    marker = root / IMPORTING
    if not marker.is_file():
        return None
    if not resume:
        raise LeworldError(f"{root} holds an unfinished import; pass resume=true to finish it, or choose another out=")
    try:
        before = json.loads(marker.read_text())
        same = {k: before.get(k) for k in settings} == json.loads(json.dumps(settings))
        done = int(before["episodes_done"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LeworldError(f"{marker} is unreadable ({err}); import into another out=") from None
    if not same:
        raise LeworldError(f"{root} is an unfinished import of another file or with other settings "
                           f"({before.get('source')}); resume it with the same, or choose another out=")
    return done


def proprio_dim(env) -> int:
    proprio = env.proprio(np.zeros(env.state_dim))
    return 0 if proprio is None else len(proprio)


def _start(root: Path, settings: dict, layout: Layout, env) -> DatasetWriter:
    """A writer for the whole dataset, and the marker that makes the folder an import."""
    shapes = {"pixels": layout.image_shape, "action": (layout.action_dim,), "state": (layout.state_dim,)}
    if proprio_dim(env):
        shapes["proprio"] = (proprio_dim(env),)
    writer = DatasetWriter.start(root, layout.num_frames, shapes, "free space or choose another out=")
    _mark(root, settings, 0)
    return writer


def _mark(root: Path, settings: dict, episodes_done: int) -> None:
    write_atomically(root / IMPORTING, json.dumps({**settings, "episodes_done": episodes_done}, indent=1).encode())


def _copy(file, source: Path, layout: Layout, env, writer: DatasetWriter, done: int, settings: dict) -> None:
    for index in tqdm(range(done, len(layout.lengths)), desc="importing episodes", initial=done,
                      total=len(layout.lengths), dynamic_ncols=True):
        episode = read_episode(file, layout, index, source)
        if "proprio" in writer.tensors.keys():
            episode["proprio"] = np.stack([env.proprio(s) for s in episode["state"].astype(np.float64)])
        writer.write_episode(index, layout.rows(index).start, episode)
        if index % 64 == 63 or index == len(layout.lengths) - 1:  # a killed process's writes to a memory map stay
            _mark(writer.root, settings, index + 1)


def _compare(file, source: Path, layout: Layout, tensors: TensorDict) -> None:
    """Every episode of the dataset equals the file's (the numbers as float32)."""
    for index in tqdm(range(len(layout.lengths)), desc="checking", leave=False, dynamic_ncols=True):
        episode, rows = read_episode(file, layout, index, source), layout.rows(index)
        for name in ("pixels", "action", "state"):
            written = tensors[name][rows].numpy()
            if not np.array_equal(written, episode[name].astype(written.dtype)):
                raise LeworldError(f"episode {index}'s '{name}' differs from {source} after writing (a disk error?); "
                                   "nothing was kept, import again")
    problems = content_problems(tensors, {"num_frames": layout.num_frames, "num_episodes": len(layout.lengths)})
    if problems:
        raise LeworldError(f"the imported dataset is inconsistent: {problems[0]}")


def _finish(writer: DatasetWriter, layout: Layout, settings: dict) -> None:
    """tensors/ and meta.json, the stats over real actions (not the 0 after each last frame)."""
    acted = np.ones(layout.num_frames, dtype=bool)
    acted[np.cumsum(layout.lengths) - 1] = False
    # in float64, as the collector computes them (from its float64 episodes): float32 sums drift over millions of rows
    actions = writer.tensors["action"].numpy()[acted].astype(np.float64)
    states = writer.tensors["state"].numpy().astype(np.float64)
    writer.finish({"env": {"name": settings["env"], "id": envs.IDS[settings["env"]], "kwargs": settings["env_kwargs"]},
                   "imported": {"source": settings["source"], "bytes": settings["bytes"], "keys": settings["keys"]},
                   "stats": {"action": column_statistics(actions), "state": column_statistics(states)}})
    (writer.root / IMPORTING).unlink()


def export_hdf5(cfg: DictConfig) -> Path:
    """Write the dataset at cfg.path to the HDF5 file cfg.out in stable-worldmodel's layout."""
    h5py = h5py_module()
    if cfg.out is None or Path(cfg.out).suffix not in (".h5", ".hdf5"):
        raise LeworldError(f"out= must name the .h5 file to write, not {cfg.out}")
    dataset, out = EpisodeDataset.open(cfg.path), Path(cfg.out)
    if out.exists():
        raise LeworldError(f"{out} exists; exports never overwrite: choose another out= or delete it")
    tensors, n = dataset.tensors, dataset.meta["num_frames"]
    columns = ["pixels", "action", "state"] + (["proprio"] if "proprio" in tensors.keys() else [])
    partial = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = unique_partial(out)
        check_free_space(out.parent, sum(tensors[c].numel() * tensors[c].element_size() for c in columns), "free space or choose another out=")
        with h5py.File(partial, "w") as file:
            for name in columns:
                shape = tuple(tensors[name].shape[1:])
                dtype = np.uint8 if name == "pixels" else np.float32
                file.create_dataset(name, shape=(n, *shape), dtype=dtype, chunks=(1, *shape))
            file.create_dataset("ep_len", data=dataset.episode_lengths.astype(np.int32))
            file.create_dataset("ep_offset", data=dataset.episode_starts.astype(np.int64))
            file.attrs[ENV_ATTRIBUTE] = dataset.meta["env"]["name"]
            file.attrs[KWARGS_ATTRIBUTE] = json.dumps(dataset.meta["env"].get("kwargs", {}))
            file.attrs["leworld_state_names"] = json.dumps(list(envs.ENVS[dataset.meta["env"]["name"]].state_names))
            for index in tqdm(range(dataset.num_episodes), desc="exporting episodes", dynamic_ncols=True):
                start = int(dataset.episode_starts[index])
                rows = slice(start, start + int(dataset.episode_lengths[index]))
                for name in columns:
                    values = tensors[name][rows].numpy()
                    if name == "action":
                        values = values.copy()
                        values[-1] = np.nan  # stable-worldmodel's convention: no action after the last frame
                    file[name][rows] = values
    except BaseException as err:
        if partial is not None:
            partial.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise LeworldError(f"could not write {out} ({err}); nothing was kept") from None
        raise
    try:
        move_without_overwriting(partial, out)
    except OSError as err:
        partial.unlink(missing_ok=True)
        why = "someone made it while this export ran" if isinstance(err, FileExistsError) else err
        raise LeworldError(f"could not name the export {out} ({why}); exports never overwrite: choose another out= or "
                           "delete it") from None
    print(f"exported {dataset.path} to {out}: {dataset.num_episodes} episodes, {n} frames "
          f"(columns {', '.join(columns)}, ep_len, ep_offset)")
    return out
