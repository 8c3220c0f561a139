"""Everything a training run checks and prepares before its first step: its settings (a resume's
against the run's own), its dataset (collected if missing, or exactly the one a resumed run trained
on), its run folder's lock, and its model with the record of what it is trained for."""

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import envs
from leworld import LeworldError, settings
from leworld.checkpoint import Checkpoint, load_checkpoint, resolve_path
from leworld.codec import ActionCodec
from leworld.collect import collect, unfinished_collection
from leworld.dataset import ClipSampler, EpisodeDataset
from leworld.folders import FolderLock, lock_folder
from leworld.models import WORLD_MODELS, DataRecord, EnvSpec, WorldModel, model_class, model_of_checkpoint
from leworld.planning import check_protocol, make_planner, sample_tasks
from leworld.prior import check_offset
from leworld.runtime import Processes, check_values, load_config, new_run_dir

# what a resume may be given besides the run's own settings
RESUME_KEYS = ("resume", "run_dir", "device")


# ---- before training: the run's settings, its data and its model -----------------------------


def resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Checkpoint]:
    """The saved config of the run in cfg.run_dir, which continues there (wherever it was first
    started), and its checkpoint. Of the command line's `overrides`, only device may differ from the
    run's own settings: any other that does is refused (one equal to the run's changes nothing)."""
    if cfg.run_dir is None:
        raise LeworldError("resume=true needs run_dir=<the folder of the run to continue>")
    ckpt = load_checkpoint(cfg.run_dir)
    if ckpt.info.get("kind") != "world_model":
        raise LeworldError(f"{ckpt.path} is not a world-model training checkpoint")
    if "total_steps" not in ckpt.info:
        raise LeworldError(f"{ckpt.path} was written by an older leworld and its training cannot be resumed; start a "
                           f"new run (python -m leworld.train upgrade ckpt={cfg.run_dir} makes it usable by eval and probe)")
    saved = OmegaConf.create(ckpt.config)
    differ = overrides_that_change(overrides, saved)
    if differ:
        raise LeworldError(f"resume=true continues the run with the settings it was started with; drop "
                           f"{', '.join(differ)} (only device= may change), or start a new run")
    if ckpt.info["step"] >= ckpt.info["total_steps"]:
        raise LeworldError(f"the run in {cfg.run_dir} is complete ({ckpt.info['step']} of {ckpt.info['total_steps']} "
                           f"steps); nothing to resume: probe or plan with it (python -m leworld.eval ckpt={cfg.run_dir})")
    saved.run_dir, saved.resume, saved.device = str(cfg.run_dir), True, cfg.device
    OmegaConf.set_struct(saved, True)
    return saved, ckpt


def overrides_that_change(overrides: list[str], saved: DictConfig) -> list[str]:
    """The command line's overrides (key=value or group=option) that ask for something else than the
    run's saved config holds, each with the run's value: compared by what they set, so that one
    equal to a default is caught as surely as any other."""
    given = [o for o in overrides if o.split("=", 1)[0].lstrip("~+") not in RESUME_KEYS]
    if not given:
        return []
    asked = OmegaConf.to_container(load_config("train", given), resolve=True)
    had = OmegaConf.to_container(saved, resolve=True)
    differ = []
    for override in given:
        key = override.split("=", 1)[0].lstrip("~+")
        wanted, theirs = lookup(asked, key), lookup(had, key)
        if wanted is MISSING or wanted != theirs:  # a group that sets keys elsewhere (encoder=, recipe=): not comparable
            if isinstance(theirs, dict):  # a group: named by its preset, unless that is what they share
                same_name = isinstance(wanted, dict) and wanted.get("name") == theirs.get("name")
                theirs = "other settings" if same_name else theirs.get("name", "other settings")
            differ.append(override + ("" if theirs is MISSING else f" (the run's: {theirs})"))
    return differ


MISSING = object()


def lookup(tree: dict, key: str):
    """The value at a dotted key of nested dicts, or MISSING."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return MISSING
        tree = tree[part]
    return tree


def check_config(cfg: DictConfig) -> None:
    if cfg.model.type not in WORLD_MODELS and ":" not in cfg.model.type:  # package.module:Class: checked when built
        raise LeworldError(f"model={cfg.model.name} is not a world model that trains (the oracle is the simulator, for "
                           f"python -m leworld.eval model=oracle env=...); choose a preset of type "
                           f"{' or '.join(WORLD_MODELS)}")
    if cfg.data.val_fraction == 0:
        raise LeworldError("data.val_fraction=0 holds no episode out, but validation, probes and planning tasks need "
                           "episodes the model never trained on; use e.g. data.val_fraction=0.1")
    check_values(cfg, settings.train(cfg))
    check_protocol(cfg)


def collect_config(cfg: DictConfig, path: Path, resume: bool) -> DictConfig:
    """The collection that makes this run's dataset: configs/collect.yaml with this run's env."""
    collect_cfg = load_config("collect", [f"scale={cfg.scale}"])
    collect_cfg.env = cfg.env  # overrides of the env included
    collect_cfg.path, collect_cfg.resume = str(path), resume
    return collect_cfg


def ensure_dataset(cfg: DictConfig, procs: Processes) -> EpisodeDataset:
    """The dataset at data.path; collected first (by the first process) when nothing is there, or
    finished when leworld's own collection there was interrupted. Anything else is refused."""
    path = Path(cfg.data.path)
    if procs.is_main and not (path / "meta.json").exists():
        resume = unfinished_collection(path)  # refuses a folder that leworld did not start
        print(f"no dataset at {path} yet: {'finishing' if resume else 'collecting'} it first "
              f"(python -m leworld.collect env={cfg.env.name} scale={cfg.scale})")
        collect(collect_config(cfg, path, resume))
    if procs.world_size > 1:
        dist.barrier()  # the other processes wait for the collection
    dataset = EpisodeDataset.open(path)
    dataset.check_env(cfg.env.name, f"pass env={dataset.meta['env']['name']} or another data.path")
    wanted, found = cfg.env.kwargs.image_size, dataset.meta["image_shape"][0]
    if found != wanted:
        raise LeworldError(f"data.path={path} holds {found}-px frames but env.kwargs.image_size={wanted}; pass a "
                           f"data.path for a new dataset (it is collected) or env.kwargs.image_size={found}")
    return dataset


def dataset_of_run(data: DataRecord) -> EpisodeDataset:
    """A resumed run's dataset: exactly the one it trained on, or a refusal (never another)."""
    if not (Path(data.path) / "meta.json").exists():
        raise LeworldError(f"the run trained on {data.path}, which is gone; put that dataset back to resume (a new "
                           "collection would be other data)")
    dataset = EpisodeDataset.open(data.path)
    if dataset.meta["num_frames"] != data.num_frames or dataset.fingerprint() != data.fingerprint:
        raise LeworldError(f"{data.path} is not the dataset the run trained on (its frames or meta.json differ: "
                           "collected again?); put the original back to resume, or start a new run")
    return dataset


def env_codec(cfg: DictConfig, dataset: EpisodeDataset) -> ActionCodec:
    """The run's action codec: the dataset's action statistics and the env's bounds. Making and
    rendering the env once here also finds a machine that cannot render before training starts."""
    env = envs.make(cfg.env.name, **OmegaConf.to_container(cfg.env.kwargs, resolve=True))
    env.reset(seed=0)
    env.render()
    env.close()
    return ActionCodec.from_stats(dataset.meta["stats"]["action"], env.action_space.low, env.action_space.high,
                                  cfg.model.frameskip)


def hold_run_dir(cfg: DictConfig) -> FolderLock:
    """The lock of the run folder: a new one (new_run_dir), or the folder of the run to resume."""
    if not cfg.resume:
        return new_run_dir(cfg.run_dir, "train")
    if cfg.run_dir is None:
        raise LeworldError("resume=true needs run_dir=<the folder of the run to continue>")
    resolve_path(cfg.run_dir)  # no checkpoint there: one line, before anything is locked
    return lock_folder(cfg.run_dir, "wait for it to end: a second process would train the same run from the same "
                                    "checkpoint", create=False)


def model_and_data(cfg: DictConfig, procs: Processes, resume_from: Checkpoint | None) -> tuple[WorldModel, EpisodeDataset]:
    """A new model with its record (env, dataset, held-out episodes) and its dataset, collected if
    missing; or, resuming, the model the checkpoint describes and exactly the dataset it trained on.
    Sets cfg.model to the resolved model config of a new run."""
    if resume_from is not None:
        model = model_of_checkpoint(resume_from)
        return model, dataset_of_run(model.data)
    dataset = ensure_dataset(cfg, procs)
    codec = env_codec(cfg, dataset)
    cls = model_class(cfg.model.type)
    cfg.model = cls.configure(cfg, dataset)
    model = cls.build(cfg.model, codec, dataset)
    _, held_out = dataset.split(cfg.data.val_fraction, cfg.seed)
    model.env = EnvSpec(cfg.env.name, OmegaConf.to_container(cfg.env.kwargs, resolve=True))
    model.data = DataRecord.of(dataset, held_out)
    return model, dataset


def check_later_steps(cfg: DictConfig, dataset: EpisodeDataset, held_out: np.ndarray, model: WorldModel,
                      device: torch.device) -> None:
    """What probing and planning after training will need, checked before training rather than after."""
    if cfg.probe_after_training:
        ClipSampler(dataset, held_out, cfg.model.history + cfg.probe.horizon, model.codec)
    if cfg.plan_after_training:
        sample_tasks(dataset, held_out, 1, cfg.protocol.goal_offset, cfg.seed)
    if cfg.prior_after_training:
        check_offset(cfg.protocol, model.frameskip)
    make_planner(cfg.planner, model.codec, cfg.seed, device)  # saved with the run, and eval's default: valid either way
