"""Building blocks: backbones (ViT, ResNet-style ConvNet) and the BatchNorm MLP projector."""

import inspect

from omegaconf import DictConfig, OmegaConf
from torch import nn

from leworld import LeworldError
from leworld.nn.convnet import ConvNet
from leworld.nn.projector import Projector
from leworld.nn.vit import ViT

BACKBONES = {"vit": ViT, "convnet": ConvNet}


def build_backbone(cfg: DictConfig | dict) -> nn.Module:
    """A backbone from its config (configs/backbone/*.yaml): `name` picks the class, the other keys
    are its arguments. Every backbone maps images (B, C, H, W) to features (B, feature_dim)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    name = cfg.get("name")
    check_backbone_name(name)
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    accepted = inspect.signature(BACKBONES[name]).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise LeworldError(f"backbone {name!r} takes no {', '.join(unknown)}; it takes {', '.join(accepted)}")
    return BACKBONES[name](**kwargs)


def check_backbone_name(name) -> None:
    if name not in BACKBONES:
        raise LeworldError(f"unknown backbone name {name!r}; choose one of: {', '.join(BACKBONES)}")


__all__ = ["ViT", "ConvNet", "Projector", "build_backbone", "check_backbone_name", "BACKBONES"]
