"""Checkpoints: one safetensors file holding the weights, with the run's resolved config (and any
other JSON-able facts) in its metadata.

Loading reads tensors and JSON only, never unpickles objects, and survives renamed Python classes.
It reads the file into memory rather than mapping it, so that a checkpoint a resumed run replaces
is not kept alive on disk by a mapping (a run that needs room for two checkpoints would need three).
Saving is atomic: the file is written beside its destination under a name of its own, flushed to
disk and renamed over it, so a crash while saving leaves the previous checkpoint intact.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor, nn

from leworld import LeworldError
from leworld.folders import write_atomically

FORMAT = "leworld"
VERSION = 1
FILENAME = "checkpoint.safetensors"


@dataclass
class Checkpoint:
    tensors: dict[str, Tensor]
    config: dict
    info: dict  # what kind of checkpoint, its step, and anything else saved with it
    path: Path


def save_checkpoint(path: str | Path, tensors: dict[str, Tensor], config: dict, **info) -> Path:
    path = Path(path)
    metadata = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config), "info": json.dumps(info)}
    payload = save({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, metadata)
    try:
        write_atomically(path, payload, sync=True)
    except OSError as err:
        kept = "the previous checkpoint there is intact" if path.exists() else "no checkpoint was kept"
        raise LeworldError(f"could not write {path} ({err.strerror or err}; {len(payload) / 2**20:.0f} MiB); {kept}: "
                           "free space or make the folder writable") from None
    return path


def resolve_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder holding one; for a stable-worldmodel checkpoint folder
    (config.json and one .pt file, leworld/models/swm_format.py) its .pt file."""
    path = Path(path)
    if path.is_dir() and not (path / FILENAME).exists() and (path / "config.json").is_file() and any(path.glob("*.pt")):
        found = sorted(path.glob("*.pt"))
        if len(found) > 1:
            raise LeworldError(f"{path} holds {len(found)} .pt files; pass the one to load (ckpt={found[-1]})")
        return found[0]
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise LeworldError(f"checkpoint {path} does not exist; pass the path of a run folder or of its {FILENAME}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = resolve_path(path)
    try:
        data = path.read_bytes()
        tensors = {name: t.to(map_location) for name, t in load(data).items()}
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # the JSON header after its length
    except (SafetensorError, OSError, ValueError) as err:
        raise LeworldError(f"{path} is not a readable safetensors checkpoint ({err}); it may be truncated or corrupt") from None
    metadata = header.get("__metadata__", {})
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise LeworldError(f"{path} is a safetensors file but not a leworld checkpoint (no leworld config inside)")
    version = metadata.get("version", "")
    if not version.isdigit():
        raise LeworldError(f"{path} has no valid format version in its metadata ({version!r}); it was not written by "
                           "leworld, or was edited")
    if int(version) > VERSION:
        raise LeworldError(f"{path} was written by a newer leworld (format {version}); upgrade leworld")
    try:
        return Checkpoint(tensors, json.loads(metadata["config"]), json.loads(metadata.get("info", "{}")), path)
    except json.JSONDecodeError as err:
        raise LeworldError(f"{path} has unreadable metadata ({err}); it may be corrupt") from None


def load_companion(run: str | Path, folder: str, kind: str, label: str, how: str) -> Checkpoint:
    """The checkpoint of a network trained on a world model's frozen latents (a policy prior, a pixel
    decoder), saved in <run>/<folder>/, refused if missing, of another kind, or made from an earlier
    step of that world model. kind: its info's kind; label: its name in messages; how: the command
    that makes one."""
    path = resolve_path(run)
    where = path.parent / folder
    if not (where / FILENAME).is_file():
        raise LeworldError(f"{where} holds no {label}; train one first: {how}")
    ckpt = load_checkpoint(where)
    if ckpt.info.get("kind") != kind:
        raise LeworldError(f"{ckpt.path} is a {ckpt.info.get('kind')} checkpoint, not a {label}")
    step = load_checkpoint(path).info.get("step")
    if ckpt.info.get("world_model_step") != step:
        raise LeworldError(f"{ckpt.path} was trained on the latents of step {ckpt.info.get('world_model_step')} of "
                           f"{path}, which is now at step {step}; train it again: {how}")
    return ckpt


def load_weights(module: nn.Module, tensors: dict[str, Tensor], source) -> None:
    """Load a state dict, with one clear error when it does not fit the module."""
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # a tensor of another shape: the config describes another model
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
        raise LeworldError(f"{source} does not fit the model its config describes ({first})") from None
    if missing or unexpected:
        raise LeworldError(f"{source} does not fit the model its config describes "
                           f"(missing {json.dumps(missing[:3])}, unexpected {json.dumps(unexpected[:3])})")


def select(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under `prefix.`, with the prefix removed (a submodule's state dict)."""
    return {name[len(prefix) + 1:]: t for name, t in tensors.items() if name.startswith(prefix + ".")}


# ---- training state: optimizer and random generators as tensors + JSON ---------------------


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """An optimizer's state as flat tensors ("<param index>.<key>") and JSON (its param groups)."""
    state = optimizer.state_dict()
    tensors, numbers = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            (tensors if torch.is_tensor(value) else numbers)[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "numbers": numbers}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], saved: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *saved["numbers"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def rng_state() -> tuple[dict[str, Tensor], dict]:
    """The torch (CPU and CUDA), NumPy and Python generators' states."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return tensors, {"numpy": [kind, position, has_gauss, gauss], "python": random.getstate()}


def restore_rng(tensors: dict[str, Tensor], saved: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    kind, position, has_gauss, gauss = saved["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
