"""ViT weights from elsewhere: DINOv2-format .pth / .safetensors files (facebookresearch/dinov2's key
names) or a leworld image-pretraining run with a ViT backbone, read into leworld's ViT names with
the architecture they imply. Tensors only: .pth files are loaded with weights_only, nothing is
downloaded."""

import math
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from leworld import LeworldError
from leworld.checkpoint import FILENAME, load_checkpoint, select


def read_vit_weights(path: str | Path, heads: int | None = None) -> tuple[dict[str, Tensor], dict]:
    """A ViT state dict in leworld's names, and the ViT arguments it was made with, from a
    DINOv2-format .pth / .safetensors file (facebookresearch/dinov2's keys: patch_embed.proj.*,
    blocks.i.ls1.gamma, register_tokens, ...) or a leworld image-pretraining run with a ViT.
    Reads tensors only: .pth files are loaded with weights_only."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise LeworldError(f"encoder weights {path} do not exist; pass a DINOv2 .pth/.safetensors file or a leworld "
                           "pretraining run (nothing is downloaded)")
    try:
        if path.suffix == ".safetensors" and leworld_checkpoint(path):
            ckpt = load_checkpoint(path)
            if ckpt.info.get("kind") != "pretrain" or ckpt.config["backbone"]["name"] != "vit":
                raise LeworldError(f"{path} is a leworld checkpoint but not an image-pretraining one with a ViT backbone")
            return select(ckpt.tensors, "backbone"), ckpt.config["backbone"]
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise LeworldError(f"{path} is not a readable weights file ({type(err).__name__}: {str(err)[:100]}); it may "
                           "be truncated or corrupt") from None
    for wrapper in ("teacher", "model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if not isinstance(state, dict) or not all(k in state for k in required):
        raise LeworldError(f"{path} holds no ViT weights in DINOv2's format (it needs {', '.join(required)})")
    state = {k.replace("patch_embed.proj.", "patch_embed."): v for k, v in state.items()
             if k != "mask_token"}  # DINOv2's masked-image-modelling token is unused here
    return state, vit_config(state, heads)


def leworld_checkpoint(path: Path) -> bool:
    with open(path, "rb") as f:  # the safetensors JSON header holds leworld's metadata
        header = f.read(8 + min(int.from_bytes(f.read(8), "little"), 1 << 24))
    return b'"format":"leworld"' in header.replace(b" ", b"")


def vit_config(state: dict[str, Tensor], heads: int | None = None) -> dict:
    """The ViT arguments of a DINOv2 state dict (leworld names). Heads are not in the tensors:
    DINOv2 uses 64 channels per head, the default when `heads` is None."""
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    config = {"name": "vit", "image_size": grid * patch, "patch_size": patch, "dim": dim, "depth": depth,
              "heads": heads or max(1, dim // 64), "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / dim}
    if "blocks.0.ls1.gamma" in state:
        config["layer_scale"] = 1.0  # switches layer scale on; the loaded values replace it
    if "register_tokens" in state:
        config["registers"] = state["register_tokens"].shape[1]
    return config
