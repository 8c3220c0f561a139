"""stable-worldmodel's checkpoint folders, read as data: `config.json` and one `.pt` file of
`torch.save(model.state_dict())` (stable_worldmodel.wm.utils.save_pretrained, 0.1.1; le-wm's
releases). Their own loader unpickles the weights with a bare torch.load and calls
hydra.utils.instantiate on the config, so a folder from elsewhere runs whatever its config names.
Here nothing is instantiated and nothing but tensors is unpickled: every `_target_` in the config
must be one this module knows at its place, every other key one the LeWM constructors take, and the
weights are read with torch.load(weights_only=True). The Hugging Face ViT's keys load in both
spellings (transformers 4 and 5, le-wm #68 / #95), mapped here onto leworld's ViT (leworld/nn/vit.py).
"""

import json
import pickle
from pathlib import Path

import torch
from torch import Tensor

from leworld import LeworldError

# the `_target_`s a LeWM checkpoint names: the model's, and each component's; le-wm's own (jepa.JEPA,
# module.*) and stable-worldmodel's
MODEL_TARGETS = {"stable_worldmodel.wm.lewm.LeWM", "stable_worldmodel.wm.lewm.lewm.LeWM", "stable_worldmodel.wm.LeWM",
                 "jepa.JEPA"}
TARGETS = {
    "encoder": {"stable_pretraining.backbone.utils.vit_hf", "stable_pretraining.backbone.vit_hf"},
    "predictor": {"stable_worldmodel.wm.lewm.module.Predictor", "module.ARPredictor"},
    "action_encoder": {"stable_worldmodel.wm.lewm.module.Embedder", "module.Embedder"},
    "projector": {"stable_worldmodel.wm.lewm.module.MLP", "module.MLP"},
    "pred_proj": {"stable_worldmodel.wm.lewm.module.MLP", "module.MLP"},
}
NORM_TARGETS = {"torch.nn.BatchNorm1d": "batch", "torch.nn.LayerNorm": "layer"}
# the arguments each constructor takes (vit_hf: its own and the ViTConfig fields leworld's ViT has)
ARGUMENTS = {
    "encoder": {"size", "patch_size", "image_size", "pretrained", "use_mask_token", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "intermediate_size", "layer_norm_eps"},
    "predictor": {"num_frames", "depth", "heads", "mlp_dim", "input_dim", "hidden_dim", "output_dim", "dim_head",
                  "dropout", "emb_dropout"},
    "action_encoder": {"input_dim", "smoothed_dim", "emb_dim", "mlp_scale"},
    "projector": {"input_dim", "hidden_dim", "output_dim", "norm_fn"},
    "pred_proj": {"input_dim", "hidden_dim", "output_dim", "norm_fn"},
}
VIT_SIZES = {  # stable_pretraining.backbone.utils.vit_hf's; intermediate_size is 4 x hidden_size
    "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16),
}


def read_config(folder: Path) -> dict:
    """config.json as leworld's lewm_swm model config, refused in one line unless it is a LeWM."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LeworldError(f"{folder / 'config.json'} is not readable JSON ({err}); the folder may be damaged") from None
    if not isinstance(config, dict):
        raise LeworldError(f"{folder / 'config.json'} is not a model config (a JSON object with _target_ keys)")
    check_targets(config, folder)
    try:
        return model_config(config)
    except KeyError as err:
        raise LeworldError(f"{folder / 'config.json'} has no {err.args[0]!r} where a LeWM needs one") from None


def check_targets(config: dict, folder: Path) -> None:
    """Every `_target_` anywhere in the config is one this module knows at its place; every
    component's keys are its constructor's. Nothing named is imported or called."""
    def refuse(where: str, what) -> None:
        raise LeworldError(f"{folder / 'config.json'} names {what!r} at {where}; leworld reads only stable-worldmodel's "
                           f"LeWM ({', '.join(sorted(MODEL_TARGETS))}) and runs nothing a config names")

    if config.get("_target_") not in MODEL_TARGETS:
        refuse("_target_", config.get("_target_"))
    for key, value in config.items():
        if key in TARGETS:
            if value is None and key in ("projector", "pred_proj"):
                continue
            if not isinstance(value, dict):
                refuse(key, value)
            if value.get("_target_") not in TARGETS[key] | {None}:  # le-wm's converted configs drop it
                refuse(f"{key}._target_", value["_target_"])
            for name, argument in value.items():
                if name == "_target_":
                    continue
                if name not in ARGUMENTS[key]:
                    refuse(f"{key}.{name}", argument)
                if name == "norm_fn" and argument is not None and (
                        not isinstance(argument, dict) or argument.get("_target_") not in NORM_TARGETS
                        or set(argument) - {"_target_", "_partial_"}):
                    refuse(f"{key}.norm_fn", argument)
                if name != "norm_fn" and isinstance(argument, (dict, list)):
                    refuse(f"{key}.{name}", argument)
        elif isinstance(value, (dict, list)):  # LeWM takes **kwargs and ignores them, but hydra would build these
            refuse(key, value)
    for key in ("encoder", "predictor", "action_encoder"):
        if key not in config:
            raise LeworldError(f"{folder / 'config.json'} has no {key}; it does not describe a LeWM")


def model_config(config: dict) -> dict:
    """Their config (checked) -> leworld's lewm_swm model config (models/lewm_swm.py)."""
    enc, pred, act = config["encoder"], config["predictor"], config["action_encoder"]
    size = VIT_SIZES.get(enc.get("size", "tiny"))
    if size is None:
        raise LeworldError(f"encoder.size={enc['size']!r} is not one of vit_hf's sizes ({', '.join(VIT_SIZES)})")
    dim = enc.get("hidden_size", size[0])
    backbone = {"name": "vit", "image_size": enc.get("image_size", 224), "patch_size": enc.get("patch_size", 16),
                "dim": dim, "depth": enc.get("num_hidden_layers", size[1]),
                "heads": enc.get("num_attention_heads", size[2]),
                "mlp_ratio": enc.get("intermediate_size", 4 * dim) / dim, "eps": enc.get("layer_norm_eps", 1e-12)}
    return {"type": "lewm_swm", "name": "lewm_swm", "history": pred["num_frames"], "image_size": backbone["image_size"],
            "encoder": backbone, "predictor": {k: v for k, v in pred.items() if k != "_target_"},
            "action_encoder": {k: v for k, v in act.items() if k != "_target_"},
            "projector": head_config(config.get("projector"), dim), "pred_proj": head_config(config.get("pred_proj"), dim)}


def head_config(head: dict | None, dim: int) -> dict | None:
    """A projector's config; their MLP's norm defaults to LayerNorm, a missing head is the identity."""
    if head is None:
        return None
    norm = head.get("norm_fn", {"_target_": "torch.nn.LayerNorm"})
    return {"input_dim": head.get("input_dim", dim), "hidden_dim": head["hidden_dim"],
            "output_dim": head.get("output_dim"), "norm": None if norm is None else NORM_TARGETS[norm["_target_"]]}


def read_weights(path: Path) -> dict[str, Tensor]:
    """The state dict in a .pt file, tensors only (weights_only: a pickled object is refused, not run)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise LeworldError(f"{path} holds pickled objects, not a plain state dict; leworld does not unpickle them "
                           f"(nothing in it was run: {str(err).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise LeworldError(f"{path} is not a readable weights file ({type(err).__name__}: {str(err)[:100]}); it may "
                           "be truncated or corrupt") from None
    for wrapper in ("state_dict", "model"):  # a training checkpoint nests the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise LeworldError(f"{path} is not a state dict (names to tensors); save it with torch.save(model.state_dict())")
    return state


# transformers 4 -> 5 spellings of a ViT layer's parts (the longest first: output.dense is inside attention.output.dense)
VIT4 = (("encoder.layer.", "layers."), ("attention.attention.query", "attention.q_proj"),
        ("attention.attention.key", "attention.k_proj"), ("attention.attention.value", "attention.v_proj"),
        ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"))
VIT5 = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
LAYER5 = {"attention.o_proj": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def vit_state(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face ViTModel's state dict (either spelling) -> leworld ViT names, q, k and v joined
    into one projection; the masked-image-modelling token and the pooler are unused and dropped."""
    renamed = {}
    for key, tensor in hf.items():
        if key.startswith("encoder.layer."):
            for old, new in VIT4:
                key = key.replace(old, new)
        renamed[key] = tensor
    state = {VIT5[k]: v for k, v in renamed.items() if k in VIT5}
    layers = sorted({int(k.split(".")[1]) for k in renamed if k.startswith("layers.")})
    for i in layers:
        part = {k[len(f"layers.{i}."):]: v for k, v in renamed.items() if k.startswith(f"layers.{i}.")}
        for kind in ("weight", "bias"):
            qkv = [part.pop(f"attention.{p}_proj.{kind}", None) for p in "qkv"]
            if all(t is not None for t in qkv):
                state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv)
        for name, tensor in part.items():
            module, _, kind = name.rpartition(".")
            state[f"blocks.{i}.{LAYER5.get(module, module)}.{kind}"] = tensor
    unused = ("embeddings.mask_token", "pooler.")
    leftover = [k for k in renamed if not k.startswith(("layers.", *unused)) and k not in VIT5]
    state.update({k: renamed[k] for k in leftover})  # unknown names stay, for load_weights to name them
    return state


def leworld_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Their LeWM state dict -> the lewm_swm model's: the encoder's keys through vit_state, the rest as they are."""
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    rest = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    return rest | {f"encoder.{k}": v for k, v in vit_state(encoder).items()}
