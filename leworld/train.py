"""Train a world model from pixel rollouts:  python -m leworld.train env=pusht [key=value ...]

The run collects the environment's dataset first if it is missing, trains the world model of
`model=` (LeWorldModel by default, the DINO-WM baseline with model=dinowm) on clips of
`history + 1` frames, checks held-out losses as it goes, saves checkpoints it can resume from
(resume=true run_dir=...), then probes what the latents learned (leworld/probe.py) and plans with
the model under the evaluation protocol (leworld/eval.py). Everything a run can get wrong in its
settings is checked before training starts. Under torchrun every process trains on its own clips
of one global batch (SIGReg is exact over it); the first process alone logs and saves.

    python -m leworld.train upgrade ckpt=<run>   converts a checkpoint of an older leworld
"""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

import envs
from leworld import LeworldError, settings
from leworld.checkpoint import (FILENAME, Checkpoint, load_checkpoint, load_weights, optimizer_state, resolve_path,
                                restore_optimizer, restore_rng, rng_state, save_checkpoint, select)
from leworld.collect import collect, unfinished_collection
from leworld.data import ActionCodec, ClipSampler, EpisodeDataset
from leworld.eval import check_protocol, make_planner, plan, sample_tasks
from leworld.folders import FolderLock, check_free_space, lock_folder
from leworld.models import WORLD_MODELS, DataRecord, EnvSpec, WorldModel, record
from leworld.models.dinowm import build_dinowm, dinowm_config
from leworld.optim import Optimisation, check_finite
from leworld.probe import probe_world_model
from leworld.runtime import (Processes, RunLog, Stopped, autocast, check_values, discard_run, load_config, new_run_dir,
                             run_main, seed_everything, start_processes)

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
    if cfg.model.type not in WORLD_MODELS:
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
    if dataset.meta["env"]["name"] != cfg.env.name:
        raise LeworldError(f"data.path={path} holds {dataset.meta['env']['name']} data, not {cfg.env.name}")
    wanted, found = cfg.env.kwargs.image_size, dataset.meta["image_shape"][0]
    if found != wanted:
        raise LeworldError(f"data.path={path} holds {found}-px frames but env.kwargs.image_size={wanted}; pass a "
                           f"data.path for a new dataset (it is collected) or env.kwargs.image_size={found}")
    if cfg.model.type == "lewm" and cfg.model.image_size > found:
        raise LeworldError(f"model.image_size={cfg.model.image_size} but data.path={path} holds {found}-px frames, which "
                           "the encoder would upscale (no detail is gained); drop model.image_size (it follows the "
                           f"frames) or train on {cfg.model.image_size}-px frames (env.kwargs.image_size="
                           f"{cfg.model.image_size} with a new data.path)")
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


def resolved_model_config(cfg: DictConfig, dataset: EpisodeDataset) -> DictConfig:
    """cfg.model with what only the files can say filled in, so that the checkpoint rebuilds the
    model: DINO-WM's encoder architecture (from its weights file) and proprio size, or the
    backbone of the pretraining run that model.encoder.init names."""
    if cfg.model.type == "dinowm":
        return dinowm_config(cfg, dataset)
    if cfg.model.encoder.init is None:
        return cfg.model
    ckpt = load_checkpoint(cfg.model.encoder.init)
    if ckpt.info.get("kind") != "pretrain":
        raise LeworldError(f"model.encoder.init={cfg.model.encoder.init} is a {ckpt.info.get('kind')} checkpoint, not "
                           "an image pretraining one")
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))  # a copy, open to new keys
    model_cfg.encoder.backbone = ckpt.config["backbone"]
    return model_cfg


def new_model(model_cfg: DictConfig, codec: ActionCodec, dataset: EpisodeDataset) -> WorldModel:
    """An untrained world model; DINO-WM's frozen encoder and a pretrained backbone loaded."""
    if model_cfg.type == "dinowm":
        return build_dinowm(model_cfg, codec, dataset)
    model = WORLD_MODELS[model_cfg.type](model_cfg, codec)
    if model_cfg.encoder.init is not None:
        load_weights(model.backbone, select(load_checkpoint(model_cfg.encoder.init).tensors, "backbone"),
                     model_cfg.encoder.init)
    return model


def model_and_data(cfg: DictConfig, procs: Processes, resume_from: Checkpoint | None) -> tuple[WorldModel, EpisodeDataset]:
    """A new model with its record (env, dataset, held-out episodes) and its dataset, collected if
    missing; or, resuming, the model the checkpoint describes and exactly the dataset it trained on.
    Sets cfg.model to the resolved model config of a new run."""
    if resume_from is not None:
        info = resume_from.info
        model = WORLD_MODELS[cfg.model.type](cfg.model, ActionCodec.from_dict(info["action_codec"]))
        model.env = EnvSpec(**info["env"])
        model.data = DataRecord(**info["data"] | {"held_out": tuple(info["data"]["held_out"])})
        return model, dataset_of_run(model.data)
    dataset = ensure_dataset(cfg, procs)
    codec = env_codec(cfg, dataset)
    cfg.model = resolved_model_config(cfg, dataset)
    model = new_model(cfg.model, codec, dataset)
    _, held_out = dataset.split(cfg.data.val_fraction, cfg.seed)
    model.env = EnvSpec(cfg.env.name, OmegaConf.to_container(cfg.env.kwargs, resolve=True))
    model.data = DataRecord(str(dataset.path), dataset.meta["num_frames"], dataset.fingerprint(),
                            tuple(int(e) for e in held_out))
    return model, dataset


def check_later_steps(cfg: DictConfig, dataset: EpisodeDataset, held_out: np.ndarray, model: WorldModel,
                      device: torch.device) -> None:
    """What probing and planning after training will need, checked before training rather than after."""
    if cfg.probe_after_training:
        ClipSampler(dataset, held_out, cfg.model.history + cfg.probe.horizon, model.codec)
    if cfg.plan_after_training:
        sample_tasks(dataset, held_out, 1, cfg.protocol.goal_offset, cfg.seed)
    make_planner(cfg.planner, model.codec, cfg.seed, device)  # saved with the run, and eval's default: valid either way


# ---- training -------------------------------------------------------------------------------


@torch.no_grad()
def recalibrate_batchnorm(model: WorldModel, clips: ClipSampler, batches: int, batch_size: int, seed: int,
                          device: torch.device) -> None:
    """Set every trainable BatchNorm's running statistics to their exact average over fixed training
    batches under the current weights ("precise BN"). The running averages that training keeps lag
    behind weights that move: PushT frames differ in a few pixels, so the projectors' inputs have a
    small spread next to their drift, and eval-mode latents came out far off (held-out SIGReg ~100
    where training showed ~3). Planning and probing run in eval mode; this makes them see what
    training saw. Only buffers change, so training itself is unaffected. Leaves the model in eval mode."""
    frozen = set(model.backbone.modules()) if getattr(model, "frozen_backbone", False) else set()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in frozen]
    if not norms:
        return
    model.eval()  # dropout off; the norms alone collect statistics
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
        m.train()
    generator = clips.generator(seed)
    for _ in range(batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in clips.sample(batch_size, generator).items()}
        with autocast(device):
            latents = model.encode(batch["pixels"], batch.get("proprio"))
            model.predict(latents[:, :-1], batch["actions"][:, :-1])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def held_out_batches(clips: ClipSampler, count: int, batch_size: int, seed: int) -> list[dict]:
    """`count` different batches of held-out clips, fixed by the seed: every validation sees the same ones."""
    generator = clips.generator(seed)
    return [clips.sample(batch_size, generator) for _ in range(count)]


@torch.no_grad()
def validate(model: WorldModel, batches: list[dict], device: torch.device) -> dict[str, float]:
    """Mean held-out loss terms over fixed batches (SIGReg's directions do not advance in eval mode)."""
    model.eval()
    totals = {}
    for batch in batches:
        with autocast(device):
            out = model.loss({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        for key, value in out.items():
            totals[key] = totals.get(key, 0.0) + float(value) / len(batches)
    model.train()
    return {f"val_{key}": value for key, value in totals.items()}


def save_state(path: Path, opt: Optimisation, cfg: DictConfig, **position) -> None:
    """Weights, optimizer, random generators, the model's record and the position in the data
    (step, epoch, batch_in_epoch, total_steps, world_size): all that eval, probe and a resume need."""
    optim_tensors, optim_json = optimizer_state(opt.optimizer)
    rng_tensors, rng_json = rng_state()
    tensors = {**{f"model.{k}": v for k, v in opt.model.state_dict().items()},
               **{f"optimizer.{k}": v for k, v in optim_tensors.items()},
               **{f"rng.{k}": v for k, v in rng_tensors.items()}}
    save_checkpoint(path, tensors, OmegaConf.to_container(cfg, resolve=True), kind="world_model",
                    **record(opt.model), **position, optimizer=optim_json, schedule=opt.schedule.state_dict(), rng=rng_json)


def train(cfg: DictConfig, overrides: list[str] = ()) -> dict:
    """Train (or with resume=true continue) the run cfg describes. overrides: the command line's,
    which a resume compares with the run's own settings. The first process holds the run folder's
    lock for the whole run (leworld/folders.py): a second training there is refused while it runs."""
    started = time.perf_counter()
    if not cfg.resume:
        check_config(cfg)  # a bad setting is refused before a run folder is made
    procs = start_processes(cfg.device)
    folder = hold_run_dir(cfg) if procs.is_main else None
    if procs.world_size > 1 and not cfg.resume:  # every process knows the run folder, to name it if the run stops
        shared = [str(folder.folder) if folder else None]
        dist.broadcast_object_list(shared, src=0)
        cfg.run_dir = shared[0]
    try:
        return training_run(cfg, overrides, procs, folder, started)
    except BaseException:
        if folder is not None and not cfg.resume:
            discard_run(folder, FILENAME)  # nothing worth keeping before a checkpoint: let the run_dir be used again
        raise
    finally:
        if folder is not None:
            folder.release()


def hold_run_dir(cfg: DictConfig) -> FolderLock:
    """The lock of the run folder: a new one (new_run_dir), or the folder of the run to resume."""
    if not cfg.resume:
        return new_run_dir(cfg.run_dir, "train")
    if cfg.run_dir is None:
        raise LeworldError("resume=true needs run_dir=<the folder of the run to continue>")
    resolve_path(cfg.run_dir)  # no checkpoint there: one line, before anything is locked
    return lock_folder(cfg.run_dir, "wait for it to end: a second process would train the same run from the same "
                                    "checkpoint", create=False)


def training_run(cfg: DictConfig, overrides: list[str], procs: Processes, folder: FolderLock | None,
                 started: float) -> dict:
    device = procs.device
    resume_from = None
    if cfg.resume:
        cfg, resume_from = resume_config(cfg, overrides)
        check_config(cfg)
        trained_on = resume_from.info.get("world_size", procs.world_size)  # unknown in checkpoints older than the record
        if trained_on != procs.world_size:
            raise LeworldError(f"the run in {cfg.run_dir} trained on {trained_on} process(es) and this is "
                               f"{procs.world_size}: its steps, learning-rate schedule and clip order are sized for "
                               f"{trained_on}; resume it with {resume_command(cfg.run_dir, trained_on)}")
    run_dir = folder.folder if folder else None
    if run_dir is not None:
        cfg.run_dir = str(run_dir)  # saved with the run, so that its config says where it is
    seed_everything(cfg.seed)  # the same initial weights on every process

    model, dataset = model_and_data(cfg, procs, resume_from)
    if cfg.data.on_device and device.type == "cuda":
        dataset = dataset.to(device)
    held_out = np.asarray(model.data.held_out)
    train_episodes = np.setdiff1d(np.arange(dataset.num_episodes), held_out)
    frames = cfg.model.history + 1
    train_clips = ClipSampler(dataset, train_episodes, frames, model.codec)
    val_clips = ClipSampler(dataset, held_out, frames, model.codec)
    check_later_steps(cfg, dataset, held_out, model, device)

    per_epoch = train_clips.batches_per_epoch(cfg.train.batch_size * procs.world_size)
    if per_epoch == 0:
        raise LeworldError(f"{len(train_clips)} training clips make no batch of {cfg.train.batch_size} x "
                           f"{procs.world_size} processes; lower train.batch_size or collect more episodes")
    total_steps = max(1, int(np.ceil(cfg.train.epochs * per_epoch)))
    if cfg.train.minutes is not None and resume_from is None:  # until its speed is measured
        total_steps = max(total_steps, TimeBudget.warm_steps + TimeBudget.timed_steps + 1)
    opt = Optimisation.start(model, procs, cfg.train, total_steps)
    if cfg.train.compile:
        opt.net = torch.compile(opt.net)
    position = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "total_steps": total_steps}
    resumed = resume_from is not None
    if resumed:
        load_weights(opt.model, select(resume_from.tensors, "model"), resume_from.path)
        restore_optimizer(opt.optimizer, select(resume_from.tensors, "optimizer"), resume_from.info["optimizer"])
        restore_rng(select(resume_from.tensors, "rng"), resume_from.info["rng"])
        opt.schedule.load_state_dict(resume_from.info["schedule"])
        position |= {k: resume_from.info[k] for k in ("step", "epoch", "batch_in_epoch")}
        resume_from = None  # its tensors are in the model and optimizer now: not held twice for the whole run
    if run_dir is not None:  # room for the checkpoint and the next one written beside it, before the first step
        kept = (run_dir / FILENAME).stat().st_size if resumed else 0
        check_free_space(run_dir, 2 * checkpoint_bytes(opt) - kept,
                         "free space or choose another run_dir (each save writes the new checkpoint beside the last)")

    log = RunLog(run_dir, cfg, enabled=procs.is_main, resume_step=position["step"] if resumed else None)
    log.print(f"{'resuming at step ' + str(position['step']) + ' of ' if resumed else ''}{cfg.model.name} world "
              f"model, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, on {device}"
              f"{f' x {procs.world_size}' if procs.world_size > 1 else ''}; {dataset.path}: {len(train_episodes)} "
              f"training / {len(held_out)} held-out episodes, {len(train_clips)} clips of {frames} frames every "
              f"{model.frameskip} steps; {sizing(cfg, total_steps, per_epoch, resumed)}; run folder {run_dir}")
    val_batches = held_out_batches(val_clips, cfg.train.val_batches, cfg.train.batch_size, cfg.seed)
    results = training_loop(opt, cfg, procs, train_clips, val_batches, position, run_dir, log)
    opt.finish()
    if not procs.is_main:
        return {}
    results |= after_training(opt.model, cfg, dataset, train_episodes, held_out, device, run_dir, log)
    print(outcome_table(results, (time.perf_counter() - started) / 60))
    return results


def checkpoint_bytes(opt: Optimisation) -> int:
    """About what a checkpoint of this run takes: weights and buffers, AdamW's two moments of every
    trained parameter, and a MiB for the random generators' states and the header."""
    weights = sum(t.numel() * t.element_size() for t in opt.model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in opt.model.parameters() if p.requires_grad)
    return weights + moments + 2**20


# what the gloo and NCCL back ends say when a peer process is gone
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "ProcessGroupNCCL")


def what_is_kept(cfg: DictConfig, saved_at: int, processes: int) -> str:
    """What an interrupted run leaves, and the command that continues it (every process can say it)."""
    if cfg.run_dir is None or not (Path(cfg.run_dir) / FILENAME).exists():
        return "no checkpoint was saved yet"
    return f"the checkpoint of step {saved_at} is kept in {cfg.run_dir}; continue with {resume_command(cfg.run_dir, processes)}"


def resume_command(run_dir: str | Path, processes: int) -> str:
    launch = f"torchrun --nproc_per_node={processes} -m" if processes > 1 else "python -m"
    return f"{launch} leworld.train resume=true run_dir={run_dir}"


def sizing(cfg: DictConfig, total_steps: int, per_epoch: int, resumed: bool) -> str:
    if cfg.train.minutes is None or resumed:
        return f"{total_steps} steps ({total_steps / per_epoch:.3g} epochs of {per_epoch})"
    first, last = TimeBudget.warm_steps + 1, TimeBudget.warm_steps + TimeBudget.timed_steps
    return f"as many steps as fit in {cfg.train.minutes:g} minutes (sized from the speed of steps {first}-{last})"


class TimeBudget:
    """train.minutes: how many steps fit, from the speed measured over the run's first steps (after
    `warm_steps`, which pay for compilation and autotuning), measured again at each validation of
    the first half of the run (validations and checkpoints then count), so that the run ends on
    time with its learning-rate schedule finished. Under torchrun the first process decides."""
    warm_steps, timed_steps = 5, 20

    def __init__(self, minutes: float, procs: Processes):
        self.seconds, self.procs = 60 * minutes, procs
        self.started, self.timed_from = time.perf_counter(), None

    def total_steps(self, step: int, total_steps: int, validating: bool) -> int | None:
        """The new total at this step, or None when it is not the time to measure."""
        first = step == self.warm_steps + self.timed_steps
        again = validating and self.warm_steps + self.timed_steps < step < total_steps // 2
        if not (first or again or step == self.warm_steps):
            return None
        if self.procs.device.type == "cuda":
            torch.cuda.synchronize()  # the steps queued so far, done
        now = time.perf_counter()
        if step == self.warm_steps:
            self.timed_from = now
            return None
        seconds_per_step = (now - self.timed_from) / (step - self.warm_steps)
        total = torch.tensor(step + max(1, int((self.seconds - (now - self.started)) / seconds_per_step)))
        if self.procs.world_size > 1:
            total = total.to(self.procs.device)
            dist.broadcast(total, 0)
        return int(total)


def training_loop(opt: Optimisation, cfg: DictConfig, procs: Processes, train_clips: ClipSampler,
                  val_batches: list[dict], position: dict, run_dir: Path | None, log: RunLog) -> dict:
    """Train from `position` to its total_steps, validating and saving as configured."""
    device, total_steps = procs.device, position["total_steps"]
    step, epoch, batch_in_epoch = position["step"], position["epoch"], position["batch_in_epoch"]
    sums, window, first_loss, metrics, saved_at = {}, 0, None, {}, step  # sums: loss terms since the last log
    start, start_step = time.perf_counter(), step
    budget = TimeBudget(cfg.train.minutes, procs) if cfg.train.minutes is not None and step == 0 else None
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not procs.is_main, dynamic_ncols=True)
    try:
        while step < total_steps:
            order = train_clips.epoch(cfg.train.batch_size, seed=cfg.seed * 100_003 + epoch, skip=batch_in_epoch,
                                      shard=(procs.rank, procs.world_size))
            for batch in order:
                with autocast(device):
                    out = opt.net({k: v.to(device, non_blocking=True) for k, v in batch.items()})
                opt.step(out["loss"])
                step, batch_in_epoch, window = step + 1, batch_in_epoch + 1, window + 1
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value.detach()
                bar.update()
                validating = step % cfg.train.val_every == 0
                resized = budget.total_steps(step, total_steps, validating) if budget else None
                if resized is not None:
                    if step == budget.warm_steps + budget.timed_steps:
                        log.print(f"{cfg.train.minutes:g} minutes fit {resized} steps at this speed")
                    total_steps = bar.total = resized
                    opt.resize(total_steps)
                validating = validating or step == total_steps
                saving = step % cfg.train.save_every == 0 or step == total_steps
                if validating or saving:
                    recalibrate_batchnorm(opt.model, train_clips, cfg.train.bn_batches, cfg.train.batch_size, cfg.seed,
                                          device)
                    opt.model.train()
                if step % cfg.train.log_every == 0 or validating:
                    metrics = {key: float(total) / window for key, total in sums.items()}
                    check_finite(metrics["loss"], step, f"lower train.lr (now {cfg.train.lr})")
                    first_loss = metrics["loss"] if first_loss is None else first_loss
                    clips_per_s = (step - start_step) * cfg.train.batch_size * procs.world_size / (time.perf_counter() - start)
                    metrics |= {"lr": opt.lr, "epoch": epoch, "clips_per_s": clips_per_s}
                    if validating:
                        metrics |= validate(opt.model, val_batches, device)
                    log.log(step, metrics)
                    bar.set_postfix({key: f"{metrics[key]:.3g}" for key in sums} | {"clips_s": f"{clips_per_s:.0f}"}
                                    | ({"val": f"{metrics['val_loss']:.3f}"} if "val_loss" in metrics else {}))
                    sums, window = {}, 0
                if saving:
                    check_finite(out["loss"].item(), step, f"lower train.lr (now {cfg.train.lr})")
                    if procs.is_main:
                        save_state(run_dir / FILENAME, opt, cfg, step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
                                   total_steps=total_steps, world_size=procs.world_size)
                    saved_at = step
                if step == total_steps:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
    except KeyboardInterrupt as stop:
        bar.close()
        log.print(f"{'stopped by SIGTERM' if isinstance(stop, Stopped) else 'interrupted'} at step {step}: "
                  f"{what_is_kept(cfg, saved_at, procs.world_size)}")
        raise
    except RuntimeError as err:  # under torchrun: a peer that died (killed, out of memory) ends the collectives
        if procs.world_size == 1 or not any(word in str(err) for word in PEER_LOST):
            raise
        bar.close()
        raise LeworldError(f"another training process stopped at step {step} (killed, or out of memory: its own "
                           f"output says which); {what_is_kept(cfg, saved_at, procs.world_size)}") from None
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    sigreg = f", SIGReg {metrics['sigreg']:.2f} (an isotropic Gaussian scores about 1.06)" if "sigreg" in metrics else ""
    log.print(f"trained to step {step} in {elapsed / 60:.1f} min: loss {first_loss:.3f} -> {metrics['loss']:.3f}, "
              f"held-out {metrics.get('val_loss', float('nan')):.3f}{sigreg}")
    return {"steps": step, "clips": step * cfg.train.batch_size * procs.world_size, "seconds": elapsed,
            "loss_first": first_loss, **metrics}


def after_training(model: WorldModel, cfg: DictConfig, dataset: EpisodeDataset, train_episodes: np.ndarray,
                   held_out: np.ndarray, device: torch.device, run_dir: Path, log: RunLog) -> dict:
    """Probe what the latents learned, then plan with the model, as configured."""
    results = {"run_dir": str(run_dir)}
    model.eval()
    if cfg.probe_after_training:
        results["probe"] = probe_world_model(model, dataset, train_episodes, held_out, cfg.probe, device, say=log.print)
        (run_dir / "probe.json").write_text(json.dumps(results["probe"], indent=1))
    log.close()
    if cfg.plan_after_training:
        results["eval"] = plan(model.requires_grad_(False), dataset, cfg.planner, cfg.protocol, cfg.seed, device,
                               run_dir / "eval", {"ckpt": str(run_dir / FILENAME)})
    return results


def outcome_table(results: dict, minutes: float) -> str:
    """What the run achieved, in one table: this model against its floor (the same encoder at
    random initialisation for the probe, random actions for planning)."""
    rows = [("training minutes", f"{results['seconds'] / 60:.1f}", ""),
            ("clips seen", f"{results['clips'] / 1000:.0f}k ({results['steps']} steps)", ""),
            ("held-out loss", f"{results.get('val_loss', float('nan')):.3f}", "")]
    if "probe" in results:
        r2 = results["probe"]["r2"]
        rows += [(f"probe R² {name}", f"{value:.3f}", f"{r2['random_init'][name]:.3f}")
                 for name, value in r2["trained"].items()]
    if "eval" in results:
        ours, floor = results["eval"]["planner"], results["eval"].get("random")
        rate = lambda s: f"{100 * s['success_rate']:.1f}% ± {100 * s['standard_error']:.1f}%"
        rows += [("planning success", rate(ours), rate(floor) if floor else ""),
                 ("median final distance", f"{ours['median_final_distance']:.3g}",
                  f"{floor['median_final_distance']:.3g}" if floor else ""),
                 ("planning s per solve", f"{ours['median_solve_seconds']:.0f}", "")]
    rows.append(("whole command, minutes", f"{minutes:.1f}", ""))
    first, second = max(len(r[0]) for r in rows) + 2, max(len(r[1]) for r in rows) + 2
    lines = [f"what {results['run_dir']} achieved:", f"  {'':<{first}}{'this model':<{second}}random init / random actions"]
    lines += [f"  {name:<{first}}{ours:<{second}}{floor}".rstrip() for name, ours, floor in rows]
    return "\n".join(lines)


# ---- checkpoints of older leworld versions --------------------------------------------------


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
    model = WORLD_MODELS[config["model"].get("type", "lewm")](
        config["model"], ActionCodec.from_stats(stats, env.action_space.low, env.action_space.high,
                                                config["model"]["frameskip"]))
    _, held_out = dataset.split(config["data"]["val_fraction"], config["seed"])
    model.env = EnvSpec(config["env"]["name"], config["env"]["kwargs"])
    model.data = DataRecord(str(dataset.path), dataset.meta["num_frames"], dataset.fingerprint(),
                            tuple(int(e) for e in held_out))
    backup = ckpt.path.with_name("checkpoint.v1.safetensors")
    if backup.exists():
        raise LeworldError(f"{backup} exists (an earlier upgrade's, or a file of yours); move it away to upgrade again")
    with lock_folder(ckpt.path.parent, "wait for it to end, then upgrade", create=False):
        shutil.copy2(ckpt.path, backup)
        info = {k: v for k, v in ckpt.info.items() if k not in ("dataset", "action_dim")} | record(model)
        save_checkpoint(ckpt.path, ckpt.tensors, config, **info)
    print(f"upgraded {ckpt.path} (the original is kept as {backup}); eval and probe can load it")
    return ckpt.path


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "upgrade":
        run_main("upgrade", upgrade, sys.argv[2:])
    else:
        run_main("train", lambda cfg: train(cfg, sys.argv[1:]))


if __name__ == "__main__":
    main()
