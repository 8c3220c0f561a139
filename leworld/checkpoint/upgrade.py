"""Checkpoints of older leworld versions made current:  python -m leworld.train upgrade ckpt=<run>"""

import shutil
from pathlib import Path

from omegaconf import DictConfig

import envs
from leworld import LeworldError
from leworld.checkpoint import load_checkpoint, save_checkpoint
from leworld.codec import ActionCodec
from leworld.dataset import EpisodeDataset
from leworld.folders import lock_folder
from leworld.models import DataRecord, EnvSpec, model_class, record


def upgrade(cfg: DictConfig) -> Path:
    """python -m leworld.train upgrade ckpt=<run> [data_path=<its dataset>]: give a world-model
    checkpoint written before checkpoints carried their record (action codec, env, data) that
    record, rebuilt from its config and its dataset exactly as that version computed them. The
    original is kept beside it as checkpoint.v1.safetensors."""
    ckpt = load_checkpoint(cfg.ckpt)
    if ckpt.info.get("kind") != "world_model":
        raise LeworldError(f"{ckpt.path} is not a world-model checkpoint")
    if "action_codec" in ckpt.info:
        raise LeworldError(f"{ckpt.path} is already current; nothing to do")
    config = ckpt.config
    dataset = EpisodeDataset.open(cfg.data_path or config["data"]["path"])
    env = envs.make(config["env"]["name"], **config["env"]["kwargs"])
    stats = ckpt.info.get("dataset", {}).get("stats", dataset.meta["stats"])["action"]  # what the model trained with
    model = model_class(config["model"].get("type", "lewm"))(
        config["model"], ActionCodec.from_stats(stats, env.action_space.low, env.action_space.high,
                                                config["model"]["frameskip"]))
    _, held_out = dataset.split(config["data"]["val_fraction"], config["seed"])
    model.env, model.data = EnvSpec(config["env"]["name"], config["env"]["kwargs"]), DataRecord.of(dataset, held_out)
    backup = ckpt.path.with_name("checkpoint.v1.safetensors")
    if backup.exists():
        raise LeworldError(f"{backup} exists (an earlier upgrade's, or a file of yours); move it away to upgrade again")
    with lock_folder(ckpt.path.parent, "wait for it to end, then upgrade", create=False):
        shutil.copy2(ckpt.path, backup)
        info = {k: v for k, v in ckpt.info.items() if k not in ("dataset", "action_dim")} | record(model)
        save_checkpoint(ckpt.path, ckpt.tensors, config, **info)
    print(f"upgraded {ckpt.path} (the original is kept as {backup}); eval and probe can load it")
    return ckpt.path
