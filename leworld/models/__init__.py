"""World models, chosen by `model.type`: LeWorldModel (lewm.py) and the DINO-WM baseline
(dinowm.py). Both have encode / predict / rollout / plan_cost / loss, so training, planning and
evaluation take either."""

import torch

from leworld import LeworldError
from leworld.checkpoint import load_checkpoint, select
from leworld.models.dinowm import DinoWorldModel
from leworld.models.lewm import LeWorldModel, load_weights

WORLD_MODELS = {"lewm": LeWorldModel, "dinowm": DinoWorldModel}


def load_world_model(path, device: str | torch.device = "cpu"):
    """The world model of a training run (its folder or checkpoint file), in eval mode, with
    `train_config` (how it was trained) and `dataset_info` attached. Reads tensors and JSON only:
    nothing is unpickled."""
    ckpt = load_checkpoint(path)
    if ckpt.info.get("kind") != "world_model":
        raise LeworldError(f"{ckpt.path} is a {ckpt.info.get('kind', 'unknown')} checkpoint, not a world model's")
    kind = ckpt.config["model"].get("type", "lewm")
    if kind not in WORLD_MODELS:
        raise LeworldError(f"{ckpt.path} holds a model of unknown type {kind!r}; this leworld knows {', '.join(WORLD_MODELS)}")
    model = WORLD_MODELS[kind](ckpt.config["model"], ckpt.info["action_dim"])
    load_weights(model, select(ckpt.tensors, "model"), ckpt.path)
    model.train_config = ckpt.config  # env, data path and split, seed
    model.dataset_info = ckpt.info.get("dataset", {})  # the training data's env, image shape, action statistics
    return model.to(device).eval()


__all__ = ["WORLD_MODELS", "DinoWorldModel", "LeWorldModel", "load_world_model"]
