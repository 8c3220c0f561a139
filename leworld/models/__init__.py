"""World models, chosen by `model.type`: LeWorldModel (lewm.py) and the DINO-WM baseline
(dinowm.py), both WorldModels (base.py), so training, probes, planning and benchmarks take either.
A world-model checkpoint holds the weights, the resolved config, and what the model was trained
for: its action codec, its env and its data record (base.py says what each is)."""

import dataclasses

import torch

from leworld import LeworldError
from leworld.checkpoint import load_checkpoint, load_weights, select
from leworld.data import ActionCodec, EpisodeDataset
from leworld.models.base import DataRecord, EnvSpec, WorldModel
from leworld.models.dinowm import DinoWorldModel
from leworld.models.lewm import LeWorldModel

WORLD_MODELS = {"lewm": LeWorldModel, "dinowm": DinoWorldModel}
RECORD_KEYS = ("action_codec", "env", "data")


def record(model: WorldModel) -> dict:
    """What a checkpoint says about its model beyond the weights (JSON)."""
    return {"action_codec": model.codec.to_dict(), "env": dataclasses.asdict(model.env),
            "data": dataclasses.asdict(model.data) | {"held_out": list(model.data.held_out)}}


def load_world_model(path, device: str | torch.device = "cpu") -> WorldModel:
    """The world model of a training run (its folder or checkpoint file), in eval mode, with its
    codec, env and data record. Reads tensors and JSON only: nothing is unpickled."""
    ckpt = load_checkpoint(path)
    if ckpt.info.get("kind") != "world_model":
        raise LeworldError(f"{ckpt.path} is a {ckpt.info.get('kind', 'unknown')} checkpoint, not a world model's")
    if not all(key in ckpt.info for key in RECORD_KEYS):
        raise LeworldError(f"{ckpt.path} was written by an older leworld, before checkpoints recorded their action "
                           f"codec, env and held-out episodes; convert it with python -m leworld.train upgrade "
                           f"ckpt={ckpt.path}")
    kind = ckpt.config["model"].get("type", "lewm")
    if kind not in WORLD_MODELS:
        raise LeworldError(f"{ckpt.path} holds a model of unknown type {kind!r}; this leworld knows {', '.join(WORLD_MODELS)}")
    try:
        model = WORLD_MODELS[kind](ckpt.config["model"], ActionCodec.from_dict(ckpt.info["action_codec"]))
        model.env = EnvSpec(**ckpt.info["env"])
        data = ckpt.info["data"]
        model.data = DataRecord(**data | {"held_out": tuple(data["held_out"])})
    except (KeyError, TypeError, ValueError) as err:
        raise LeworldError(f"{ckpt.path} has a config or record that does not describe a model "
                           f"({type(err).__name__}: {err}); it may have been edited or written by another tool") from None
    load_weights(model, select(ckpt.tensors, "model"), ckpt.path)
    return model.to(device).eval()


def open_dataset(model: WorldModel, path: str | None = None) -> EpisodeDataset:
    """The dataset at `path` (default: the model's own), refused when it holds another env's data."""
    dataset = EpisodeDataset.open(path or model.data.path)
    if dataset.meta["env"]["name"] != model.env.name:
        raise LeworldError(f"{dataset.path} holds {dataset.meta['env']['name']} data but the model is a {model.env.name} "
                           f"world model; pass data_path=<a {model.env.name} dataset>")
    return dataset


__all__ = ["WORLD_MODELS", "DataRecord", "DinoWorldModel", "EnvSpec", "LeWorldModel", "WorldModel",
           "load_world_model", "open_dataset", "record"]
