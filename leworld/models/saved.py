"""What a world-model checkpoint says about its model beyond the weights (its record: action codec,
env, dataset and held-out episodes), and loading a model from one: a leworld run, or a
stable-worldmodel checkpoint folder (models/swm_format.py), which records no env, codec or dataset,
so the verbs supply them. Reads tensors and JSON only: nothing is unpickled, nothing instantiated."""

import dataclasses
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from leworld import LeworldError
from leworld.checkpoint import Checkpoint, load_checkpoint, load_weights, resolve_path, select
from leworld.codec import ActionCodec
from leworld.dataset import EpisodeDataset
from leworld.models.base import DataRecord, EnvSpec, WorldModel, model_class
from leworld.models.lewm_swm import SwmLeWorldModel
from leworld.models.swm_format import leworld_state, read_config, read_weights
from leworld.runtime import load_config, require

RECORD_KEYS = ("action_codec", "env", "data")


def record(model: WorldModel) -> dict:
    """The record a checkpoint stores (JSON)."""
    return {"action_codec": model.codec.to_dict(), "env": dataclasses.asdict(model.env),
            "data": dataclasses.asdict(model.data) | {"held_out": list(model.data.held_out)}}


def model_of_checkpoint(ckpt: Checkpoint) -> WorldModel:
    """The model a world-model checkpoint describes, its record attached, its weights not loaded."""
    if not all(key in ckpt.info for key in RECORD_KEYS):
        raise LeworldError(f"{ckpt.path} was written by an older leworld, before checkpoints recorded their action "
                           f"codec, env and held-out episodes; convert it with python -m leworld.train upgrade "
                           f"ckpt={ckpt.path}")
    cls = model_class(ckpt.config["model"].get("type", "lewm"))
    try:
        model = cls(ckpt.config["model"], ActionCodec.from_dict(ckpt.info["action_codec"]))
        data = ckpt.info["data"]
        model.env, model.data = EnvSpec(**ckpt.info["env"]), DataRecord(**data | {"held_out": tuple(data["held_out"])})
    except (KeyError, TypeError, ValueError) as err:
        raise LeworldError(f"{ckpt.path} has a config or record that does not describe a model "
                           f"({type(err).__name__}: {err}); it may have been edited or written by another tool") from None
    return model


def load_world_model(path, device: str | torch.device = "cpu") -> WorldModel:
    """The world model of a training run (its folder or checkpoint file), in eval mode, with its
    codec, env and data record."""
    ckpt = load_checkpoint(path)
    if ckpt.info.get("kind") != "world_model":
        raise LeworldError(f"{ckpt.path} is a {ckpt.info.get('kind', 'unknown')} checkpoint, not a world model's")
    model = model_of_checkpoint(ckpt)
    load_weights(model, select(ckpt.tensors, "model"), ckpt.path)
    return model.to(device).eval()


def open_dataset(model: WorldModel, path: str | None = None) -> EpisodeDataset:
    """The dataset at `path` (default: the model's own), refused when it holds another env's data."""
    dataset = EpisodeDataset.open(path or model.data.path)
    dataset.check_env(model.env.name, f"the model is a {model.env.name} world model; pass data_path=<a "
                                      f"{model.env.name} dataset>")
    return dataset


def tasks_of(env: EnvSpec, dataset: EpisodeDataset, frameskip: int, val_fraction: float,
             seed: int) -> tuple[ActionCodec, DataRecord]:
    """The action codec and data record (held-out episodes) that a training run on `dataset` with this
    frameskip, val_fraction and seed makes: what a model made elsewhere is planned and probed with."""
    import envs  # here: importing envs picks MuJoCo's GL back end, which loading a leworld run never needs
    dataset.check_env(env.name, f"pass data_path=<a {env.name} dataset>")
    space = envs.make(env.name, **env.kwargs).action_space
    codec = ActionCodec.from_stats(dataset.meta["stats"]["action"], space.low, space.high, frameskip)
    _, held_out = dataset.split(val_fraction, seed)
    return codec, DataRecord.of(dataset, held_out)


def load_swm_model(weights: Path, cfg: dict, env: EnvSpec, dataset: EpisodeDataset, val_fraction: float, seed: int,
                   device: str | torch.device = "cpu") -> WorldModel:
    """A stable-worldmodel LeWM checkpoint (the folder's .pt file; cfg: its config.json read by
    swm_format.read_config) as a lewm_swm model in eval mode, planning in `dataset`'s action
    statistics on `env`. Its frameskip is its action encoder's width over the env's action size."""
    width, size = cfg["action_encoder"]["input_dim"], len(dataset.meta["stats"]["action"]["mean"])
    if width % size:
        raise LeworldError(f"{weights.parent}'s action encoder takes {width} numbers a step, not a multiple of "
                           f"{env.name}'s {size}-number action: it was trained on another environment")
    codec, data = tasks_of(env, dataset, width // size, val_fraction, seed)
    try:
        model = SwmLeWorldModel(cfg, codec)
    except (KeyError, TypeError, ValueError, LeworldError) as err:
        raise LeworldError(f"{weights.parent / 'config.json'} does not describe a model leworld can build "
                           f"({type(err).__name__}: {err})") from None
    model.env, model.data = env, data
    model.load_their_weights(leworld_state(read_weights(weights)), weights)
    return model.to(device).eval()


def open_world_model(cfg: DictConfig, device: str | torch.device, verb: str) -> tuple[WorldModel, Path, EpisodeDataset]:
    """A verb's `ckpt`: the world model, its checkpoint's path and the dataset its tasks come from
    (`data_path`, by default the model's own). A stable-worldmodel folder takes its env from `env=`,
    and its tasks from the dataset and held-out split a leworld training run of that env at `scale`
    would use (or `data_path`); the env renders at that dataset's size, the model resizes to its own."""
    path = resolve_path(require(cfg, "ckpt", f"ckpt is required: python -m leworld.{verb} ckpt=<run folder or checkpoint>"))
    if path.suffix != ".pt":
        model = load_world_model(path, device)
        return model, path, open_dataset(model, cfg.data_path)
    model_cfg = read_config(path.parent)  # a folder leworld will not read is refused before anything else
    env = cfg.get("env")
    name = env if env is None or isinstance(env, str) else env.name
    if name is None:
        raise LeworldError(f"{path.parent} is a stable-worldmodel checkpoint, which does not record its environment; "
                           "pass env=<name> (pusht, tworoom, reacher, cube, gym_pusht)")
    training = load_config("train", [f"env={name}", f"scale={cfg.get('scale', 'cpu')}"])
    dataset = EpisodeDataset.open(cfg.data_path or training.data.path)
    kwargs = OmegaConf.to_container(training.env.kwargs, resolve=True)
    spec = EnvSpec(name, kwargs | {"image_size": dataset.meta["image_shape"][0]})  # rendered as the tasks' frames
    return load_swm_model(path, model_cfg, spec, dataset, training.data.val_fraction, training.seed, device), path, dataset
