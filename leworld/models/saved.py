"""What a world-model checkpoint says about its model beyond the weights (its record: action codec,
env, dataset and held-out episodes), and loading a model from one. Reads tensors and JSON only:
nothing is unpickled."""

import dataclasses

import torch

from leworld import LeworldError
from leworld.checkpoint import Checkpoint, load_checkpoint, load_weights, select
from leworld.codec import ActionCodec
from leworld.dataset import EpisodeDataset
from leworld.models.base import DataRecord, EnvSpec, WorldModel, model_class

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
