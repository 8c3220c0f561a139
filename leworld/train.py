"""Train a world model from pixel rollouts:  python -m leworld.train env=pusht [key=value ...]

The run collects the environment's dataset first if it is missing, trains LeWorldModel on clips
of `history + 1` frames (next-latent prediction + λ·SIGReg, nothing else), checks held-out losses
as it goes, saves checkpoints it can resume from (resume=true run_dir=...), then probes what the
latents learned (leworld/probe.py) and plans with the model under the evaluation protocol
(leworld/eval.py). model=dinowm trains the DINO-WM baseline with the same loop. Under torchrun every process trains on its own clips
of one global batch (SIGReg is exact over it); the first process alone logs and saves.
"""

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from leworld import LeworldError
from leworld.checkpoint import (FILENAME, load_checkpoint, optimizer_state, restore_optimizer, restore_rng,
                                rng_state, save_checkpoint, select)
from leworld.collect import collect
from leworld.data import ClipSampler, EpisodeDataset
from leworld.eval import run_eval
from leworld.models import LeWorldModel
from leworld.models.dinowm import build_dinowm
from leworld.models.lewm import load_weights
from leworld.optim import adamw, optimizer_step, warmup_cosine
from leworld.probe import probe_world_model
from leworld.runtime import (Processes, RunLog, autocast, load_config, new_run_dir, run_main, seed_everything,
                             start_processes, stop_processes)


def ensure_dataset(cfg: DictConfig, procs: Processes) -> Path:
    """The dataset at data.path; collected first (by the first process) when it does not exist."""
    path = Path(cfg.data.path)
    if procs.is_main and not (path / "meta.json").exists():
        if path.exists() and not (path / "episodes").is_dir():
            raise LeworldError(f"data.path={path} exists but holds no dataset; point data.path at one or remove it")
        print(f"no dataset at {path} yet: collecting it first (python -m leworld.collect env={cfg.env.name} "
              f"scale={cfg.scale})")
        collect_cfg = load_config("collect", [f"env={cfg.env.name}", f"scale={cfg.scale}", f"path={path}",
                                              f"resume={path.exists()}"])
        collect_cfg.env = cfg.env  # this run's env settings, overrides included
        collect(collect_cfg)
    if procs.world_size > 1:
        dist.barrier()  # the other processes wait for the collection
    return path


def build_model(cfg: DictConfig, dataset: EpisodeDataset) -> nn.Module:
    """The world model of cfg.model: DINO-WM from its frozen encoder's weights, or LeWorldModel,
    whose backbone starts from an image pretraining checkpoint with model.encoder.init (its
    backbone config then replaces model.encoder.backbone)."""
    if cfg.model.type == "dinowm":
        return build_dinowm(cfg, dataset)
    init = cfg.model.encoder.init
    if init is not None:
        ckpt = load_checkpoint(init)
        if ckpt.info.get("kind") != "pretrain":
            raise LeworldError(f"model.encoder.init={init} is a {ckpt.info.get('kind')} checkpoint, not an image pretraining one")
        backbone = {k: v for k, v in ckpt.config["backbone"].items() if k != "weight_decay"}
        OmegaConf.update(cfg, "model.encoder.backbone", backbone, merge=False)
    model = LeWorldModel(cfg.model, dataset.meta["action_dim"])
    if init is not None:
        load_weights(model.backbone, select(ckpt.tensors, "backbone"), init)
    return model


def check_finite(loss: float, step: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise LeworldError(f"the loss became {loss} by step {step}; lower train.lr (now {lr}); the checkpoints "
                           "saved so far are untouched")


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, clips: ClipSampler, batches: int, batch_size: int, seed: int,
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
    clips.generator.manual_seed(seed)
    for _ in range(batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in clips.sample(batch_size).items()}
        with autocast(device):
            latents = model.encode(batch["pixels"], batch.get("proprio"))
            model.predict(latents[:, :-1], batch["actions"][:, :-1])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


@torch.no_grad()
def validate(model: nn.Module, batches: list[dict], device: torch.device) -> dict[str, float]:
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


def save_state(path: Path, model: nn.Module, optimizer, schedule, cfg: DictConfig, dataset: EpisodeDataset,
               step: int, epoch: int, batch_in_epoch: int) -> None:
    """Weights, optimizer, random generators and the position in the data: all a resume needs."""
    optim_tensors, optim_json = optimizer_state(optimizer)
    rng_tensors, rng_json = rng_state()
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
               **{f"optimizer.{k}": v for k, v in optim_tensors.items()},
               **{f"rng.{k}": v for k, v in rng_tensors.items()}}
    dataset_info = {"path": str(dataset.path), "env": dataset.meta["env"], "image_shape": dataset.meta["image_shape"],
                    "stats": dataset.meta["stats"]}
    save_checkpoint(path, tensors, OmegaConf.to_container(cfg, resolve=True), kind="world_model", step=step,
                    epoch=epoch, batch_in_epoch=batch_in_epoch, action_dim=model.action_dim, dataset=dataset_info,
                    optimizer=optim_json, schedule=schedule.state_dict(), rng=rng_json)


def train(cfg: DictConfig) -> dict:
    resume_from = None
    if cfg.resume:
        if cfg.run_dir is None:
            raise LeworldError("resume=true needs run_dir=<the folder of the run to continue>")
        resume_from = load_checkpoint(cfg.run_dir)
        if resume_from.info.get("kind") != "world_model":
            raise LeworldError(f"{resume_from.path} is not a world-model training checkpoint")
        cfg = OmegaConf.create(resume_from.config)  # the run continues exactly as it was configured
        OmegaConf.set_struct(cfg, True)
    procs = start_processes(cfg.device)
    device = procs.device
    seed_everything(cfg.seed)  # the same initial weights on every process

    dataset = EpisodeDataset.open(ensure_dataset(cfg, procs))
    if dataset.meta["env"]["name"] != cfg.env.name:
        raise LeworldError(f"data.path={dataset.path} holds {dataset.meta['env']['name']} data, not {cfg.env.name}")
    if cfg.data.on_device and device.type == "cuda":
        dataset = dataset.to(device)
    train_episodes, val_episodes = dataset.split(cfg.data.val_fraction, cfg.seed)
    frames, frameskip = cfg.model.history + 1, cfg.model.frameskip
    train_clips = ClipSampler(dataset, train_episodes, frames, frameskip)
    calibration_clips = ClipSampler(dataset, train_episodes, frames, frameskip)
    val_batches = [ClipSampler(dataset, val_episodes, frames, frameskip, seed=cfg.seed).sample(cfg.train.batch_size)
                   for _ in range(cfg.train.val_batches)]

    model = build_model(cfg, dataset).to(device)
    if procs.world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = DistributedDataParallel(model) if procs.world_size > 1 else model
    per_epoch = train_clips.batches_per_epoch(cfg.train.batch_size * procs.world_size)
    if per_epoch == 0:
        raise LeworldError(f"{len(train_clips)} training clips make no batch of {cfg.train.batch_size} x "
                           f"{procs.world_size} processes; lower train.batch_size or collect more episodes")
    total_steps = max(1, math.ceil(cfg.train.epochs * per_epoch))
    optimizer = adamw(model, cfg.train.lr, cfg.train.weight_decay)
    schedule = warmup_cosine(optimizer, total_steps, int(cfg.train.warmup * total_steps), cfg.train.final_lr_ratio)

    step, epoch, batch_in_epoch = 0, 0, 0
    if resume_from is not None:
        load_weights(model, select(resume_from.tensors, "model"), resume_from.path)
        restore_optimizer(optimizer, select(resume_from.tensors, "optimizer"), resume_from.info["optimizer"])
        restore_rng(select(resume_from.tensors, "rng"), resume_from.info["rng"])
        step, epoch, batch_in_epoch = (resume_from.info[k] for k in ("step", "epoch", "batch_in_epoch"))
        schedule.load_state_dict(resume_from.info["schedule"])

    run_dir = (Path(cfg.run_dir) if resume_from else new_run_dir(cfg.run_dir, "train")) if procs.is_main else None
    log = RunLog(run_dir, cfg, enabled=procs.is_main)
    parameters = sum(p.numel() for p in model.parameters())
    log.print(f"{'resuming at step ' + str(step) + ' of ' if resume_from else ''}{cfg.model.name} world model, "
              f"{parameters / 1e6:.1f}M parameters, on {device}{f' x {procs.world_size}' if procs.world_size > 1 else ''}; "
              f"{dataset.path}: {len(train_episodes)} training / {len(val_episodes)} held-out episodes, "
              f"{len(train_clips)} clips of {frames} frames every {frameskip} steps; {total_steps} steps "
              f"({cfg.train.epochs} epochs of {per_epoch}); run folder {run_dir}")

    def save() -> None:
        if procs.is_main:
            save_state(run_dir / FILENAME, model, optimizer, schedule, cfg, dataset, step, epoch, batch_in_epoch)

    sums, window, first_loss, start = {}, 0, None, time.perf_counter()  # sums: loss terms since the last log
    start_step, metrics = step, {}
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not procs.is_main, dynamic_ncols=True)
    try:
        while step < total_steps:
            order = train_clips.epoch(cfg.train.batch_size, seed=cfg.seed * 100_003 + epoch, skip=batch_in_epoch,
                                      shard=(procs.rank, procs.world_size))
            for batch in order:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast(device):
                    out = net(batch)
                optimizer_step(out["loss"], model, optimizer, schedule, cfg.train.grad_clip)
                step, batch_in_epoch, window = step + 1, batch_in_epoch + 1, window + 1
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value.detach()
                bar.update()

                validating = step % cfg.train.val_every == 0 or step == total_steps
                saving = step % cfg.train.save_every == 0 or step == total_steps
                if validating or saving:
                    recalibrate_batchnorm(model, calibration_clips, cfg.train.bn_batches, cfg.train.batch_size,
                                          cfg.seed, device)
                    model.train()
                if step % cfg.train.log_every == 0 or validating:
                    metrics = {key: float(total) / window for key, total in sums.items()}
                    check_finite(metrics["loss"], step, cfg.train.lr)
                    first_loss = metrics["loss"] if first_loss is None else first_loss
                    clips_per_s = (step - start_step) * cfg.train.batch_size * procs.world_size / (time.perf_counter() - start)
                    metrics |= {"lr": schedule.get_last_lr()[0], "epoch": epoch, "clips_per_s": clips_per_s}
                    if validating:
                        metrics |= validate(model, val_batches, device)
                    log.log(step, metrics)
                    bar.set_postfix({key: f"{metrics[key]:.3g}" for key in sums} | {"clips_s": f"{clips_per_s:.0f}"}
                                    | ({"val": f"{metrics['val_loss']:.3f}"} if "val_loss" in metrics else {}))
                    sums, window = {}, 0
                if saving:
                    check_finite(out["loss"].item(), step, cfg.train.lr)  # never save weights a NaN went through
                    save()
                if step == total_steps:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
    finally:
        bar.close()
    del net  # DDP's reducer holds the process group: it must go while the other processes are still there
    stop_processes()
    if not procs.is_main:
        return {}

    elapsed = time.perf_counter() - start
    results = {"steps": step, "seconds": elapsed, "loss_first": first_loss, **metrics}
    sigreg = f", SIGReg {metrics['sigreg']:.2f} (an isotropic Gaussian scores about 1.06)" if "sigreg" in metrics else ""
    log.print(f"trained to step {step} in {elapsed / 60:.1f} min: loss {first_loss:.3f} -> {metrics['loss']:.3f}, "
              f"held-out {metrics.get('val_loss', float('nan')):.3f}{sigreg}")
    if cfg.probe.after_training:
        results["probe"] = probe_world_model(model.eval(), dataset, train_episodes, val_episodes, cfg.probe, cfg.seed,
                                             device, say=log.print)
        (run_dir / "probe.json").write_text(json.dumps(results["probe"], indent=1))
    log.close()
    if cfg.plan_after_training:
        results["eval"] = run_eval(load_config("eval", [f"ckpt={run_dir}", f"device={cfg.device}",
                                                        f"out_dir={run_dir / 'eval'}", *cfg.plan_overrides]))
    return results | {"run_dir": str(run_dir)}


def main() -> None:
    run_main("train", train)


if __name__ == "__main__":
    main()
