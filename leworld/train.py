"""Train a world model from pixel rollouts:  python -m leworld.train env=pusht [key=value ...]

The run collects the environment's dataset first if it is missing, trains the world model of
`model=` (LeWorldModel by default, the DINO-WM baseline with model=dinowm) on clips of
`history + 1` frames, checks held-out losses as it goes, saves checkpoints it can resume from
(resume=true run_dir=...), then probes what the latents learned (leworld/probe.py) and plans with
the model under the evaluation protocol (leworld/planning/). Everything a run can get wrong in its
settings is checked before training starts (leworld/training/preflight.py); the loop is
leworld/training/loop.py. Under torchrun every process trains on its own clips of one global batch
(SIGReg is exact over it); the first process alone logs and saves.

    python -m leworld.train upgrade ckpt=<run>   converts a checkpoint of an older leworld
"""

import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from leworld import LeworldError
from leworld.checkpoint import FILENAME, load_weights, restore_optimizer, restore_rng, select
from leworld.checkpoint.upgrade import upgrade
from leworld.dataset import ClipSampler
from leworld.folders import FolderLock, check_free_space
from leworld.optim import Optimisation
from leworld.runtime import Processes, RunLog, discard_run, run_main, seed_everything, start_processes, stop_processes
from leworld.training.after import after_training, outcome_table
from leworld.training.loop import (TrainingLoop, checkpoint_bytes, held_out_batches, resume_command,
                                   sizing)
from leworld.training.preflight import (check_config, check_later_steps, hold_run_dir, model_and_data,
                                        resume_config)


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


def training_run(cfg: DictConfig, overrides: list[str], procs: Processes, folder: FolderLock | None,
                 started: float) -> dict:
    device, resume_from = procs.device, None
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
    opt, position, per_epoch = start_optimisation(cfg, procs, model, train_clips, resume_from, run_dir)
    resumed, resume_from = resume_from is not None, None  # its tensors are in the model and optimizer now: not held twice

    log = RunLog(run_dir, cfg, enabled=procs.is_main, resume_step=position["step"] if resumed else None)
    log.print(f"{'resuming at step ' + str(position['step']) + ' of ' if resumed else ''}{cfg.model.name} world "
              f"model, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, on {device}"
              f"{f' x {procs.world_size}' if procs.world_size > 1 else ''}; {dataset.path}: {len(train_episodes)} "
              f"training / {len(held_out)} held-out episodes, {len(train_clips)} clips of {frames} frames every "
              f"{model.frameskip} steps; {sizing(cfg, position, per_epoch)}; run folder {run_dir}")
    val_batches = held_out_batches(val_clips, cfg.train.val_batches, cfg.train.batch_size, cfg.seed)
    results = TrainingLoop(opt, cfg, procs, train_clips, val_batches, position, run_dir, log).run()
    opt.net = None  # DDP's reducer holds the process group: let go of it before the group ends
    stop_processes()  # all processes together, before the first alone probes and plans
    if not procs.is_main:
        return {}
    results |= after_training(opt.model, cfg, dataset, train_episodes, held_out, device, run_dir, log)
    print(outcome_table(results, (time.perf_counter() - started) / 60))
    return results


def start_optimisation(cfg: DictConfig, procs: Processes, model, train_clips: ClipSampler, resume_from,
                       run_dir) -> tuple[Optimisation, dict, int]:
    """The optimizer and schedule sized for the run, restored from the checkpoint when resuming (the
    model's weights and the random generators too), with the disk's room for checkpoints checked.
    -> it, the position to train from (step, epoch, batch_in_epoch, total_steps), batches per epoch."""
    per_epoch = train_clips.batches_per_epoch(cfg.train.batch_size * procs.world_size)
    if per_epoch == 0:
        raise LeworldError(f"{len(train_clips)} training clips make no batch of {cfg.train.batch_size} x "
                           f"{procs.world_size} processes; lower train.batch_size or collect more episodes")
    total_steps = max(1, int(np.ceil(cfg.train.epochs * per_epoch)))  # with train.minutes, the most it trains
    opt = Optimisation.start(model, procs, cfg.train, total_steps)
    if cfg.train.compile:
        opt.net = torch.compile(opt.net)
    position = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "total_steps": total_steps}
    if resume_from is not None:
        load_weights(opt.model, select(resume_from.tensors, "model"), resume_from.path)
        restore_optimizer(opt.optimizer, select(resume_from.tensors, "optimizer"), resume_from.info["optimizer"])
        restore_rng(select(resume_from.tensors, "rng"), resume_from.info["rng"])
        opt.schedule.load_state_dict(resume_from.info["schedule"])
        position |= {k: resume_from.info[k] for k in ("step", "epoch", "batch_in_epoch")}
        # a run sized by train.minutes ends where its budget put it, not at its epochs
        position["total_steps"] = resume_from.info.get("total_steps", total_steps)
    if run_dir is not None:  # room for the checkpoint and the next one written beside it, before the first step
        kept = (run_dir / FILENAME).stat().st_size if resume_from is not None else 0
        check_free_space(run_dir, 2 * checkpoint_bytes(opt) - kept,
                         "free space or choose another run_dir (each save writes the new checkpoint beside the last)")
    return opt, position, per_epoch


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "upgrade":
        run_main("upgrade", upgrade, sys.argv[2:])
    else:
        run_main("train", lambda cfg: train(cfg, sys.argv[1:]))


if __name__ == "__main__":
    main()
