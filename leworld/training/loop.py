"""The training loop of a world model: steps over the epochs of its clips, with held-out losses,
BatchNorm recalibration, metric rows, checkpoints it can resume from (leworld/checkpoint), a time
budget (train.minutes), and the message that says what an interrupted run kept."""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from leworld import LeworldError
from leworld.checkpoint import FILENAME, optimizer_state, rng_state, save_checkpoint
from leworld.dataset import ClipSampler
from leworld.models import WorldModel, record
from leworld.optim import Optimisation, check_finite
from leworld.runtime import Processes, RunLog, Stopped, autocast


@torch.no_grad()
def recalibrate_batchnorm(model: WorldModel, clips: ClipSampler, batches: int, batch_size: int, seed: int,
                          device: torch.device) -> None:
    """Set every trainable BatchNorm's running statistics to their exact average over fixed training
    batches under the current weights ("precise BN"). The running averages that training keeps lag
    behind weights that move: PushT frames differ in a few pixels, so the projectors' inputs have a
    small spread next to their drift, and eval-mode latents came out far off (held-out SIGReg ~100
    where training showed ~3). Planning and probing run in eval mode; this makes them see what
    training saw. Only buffers change, so training itself is unaffected. Leaves the model in eval mode."""
    frozen = model.frozen_modules()
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


def budgeted(cfg: DictConfig, position: dict) -> bool:
    """Whether train.minutes sizes this run: a new run with more steps than measuring its speed takes
    (a shorter one ends before the budget could say anything)."""
    return (cfg.train.minutes is not None and position["step"] == 0
            and position["total_steps"] > TimeBudget.warm_steps + TimeBudget.timed_steps)


def sizing(cfg: DictConfig, position: dict, per_epoch: int) -> str:
    total_steps = position["total_steps"]
    if not budgeted(cfg, position):
        return f"{total_steps} steps ({total_steps / per_epoch:.3g} epochs of {per_epoch})"
    first, last = TimeBudget.warm_steps + 1, TimeBudget.warm_steps + TimeBudget.timed_steps
    return (f"as many steps as fit in {cfg.train.minutes:g} minutes, at most {total_steps} ({total_steps / per_epoch:.3g} "
            f"epochs of {per_epoch}; sized from the speed of steps {first}-{last})")


class TimeBudget:
    """train.minutes: how many steps fit, from the speed measured over the run's first steps (after
    `warm_steps`, which pay for compilation and autotuning), measured again at each validation of
    the first half of the run (validations and checkpoints then count), so that the run ends on
    time with its learning-rate schedule finished; never more than `most` (train.epochs' steps), so
    that a fast machine finishes early rather than training past what was asked. Under torchrun the
    first process decides."""
    warm_steps, timed_steps = 5, 20

    def __init__(self, minutes: float, procs: Processes, most: int):
        self.seconds, self.procs, self.most = 60 * minutes, procs, most
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
        fit = step + max(1, int((self.seconds - (now - self.started)) / seconds_per_step))
        total = torch.tensor(min(fit, self.most))
        if self.procs.world_size > 1:
            total = total.to(self.procs.device)
            dist.broadcast(total, 0)
        return int(total)


@dataclass
class Progress:
    """Where a run is, and what it has summed since its last metric row."""

    step: int
    epoch: int
    batch_in_epoch: int
    total_steps: int
    saved_at: int  # the step of the last checkpoint
    sums: dict = field(default_factory=dict)  # loss terms since the last metric row
    window: int = 0  # steps summed there
    first_loss: float | None = None
    metrics: dict = field(default_factory=dict)  # the last metric row
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.start_step = self.step


class TrainingLoop:
    """Train from `position` (step, epoch, batch_in_epoch, total_steps) to its total_steps,
    validating, logging and saving as cfg.train says."""

    def __init__(self, opt: Optimisation, cfg: DictConfig, procs: Processes, train_clips: ClipSampler,
                 val_batches: list[dict], position: dict, run_dir: Path | None, log: RunLog):
        self.opt, self.cfg, self.procs, self.clips, self.val_batches = opt, cfg, procs, train_clips, val_batches
        self.run_dir, self.log = run_dir, log
        self.progress = Progress(**position, saved_at=position["step"])
        self.budget = TimeBudget(cfg.train.minutes, procs, most=position["total_steps"]) if budgeted(cfg, position) else None

    def run(self) -> dict:
        p, cfg = self.progress, self.cfg
        self.bar = tqdm(total=p.total_steps, initial=p.step, desc="train", disable=not self.procs.is_main,
                        dynamic_ncols=True)
        try:
            self.epochs()
        except KeyboardInterrupt as stop:
            self.bar.close()
            said = (f"{'stopped by SIGTERM' if isinstance(stop, Stopped) else 'interrupted'} at step {p.step}: "
                    f"{what_is_kept(cfg, p.saved_at, self.procs.world_size)}")
            if self.procs.is_main:
                self.log.print(said)
            elif isinstance(stop, Stopped):  # torchrun's SIGTERM to the survivors of a dead process, maybe rank 0
                print(f"rank {self.procs.rank}: {said}", file=sys.stderr, flush=True)
            raise
        except RuntimeError as err:  # under torchrun: a peer that died (killed, out of memory) ends the collectives
            if self.procs.world_size == 1 or not any(word in str(err) for word in PEER_LOST):
                raise
            self.bar.close()
            raise LeworldError(f"another training process stopped at step {p.step} (killed, or out of memory: its own "
                               f"output says which); {what_is_kept(cfg, p.saved_at, self.procs.world_size)}") from None
        finally:
            self.bar.close()
        elapsed, metrics = time.perf_counter() - p.started, p.metrics
        sigreg = f", SIGReg {metrics['sigreg']:.2f} (an isotropic Gaussian scores about 1.06)" if "sigreg" in metrics else ""
        self.log.print(f"trained to step {p.step} in {elapsed / 60:.1f} min: loss {p.first_loss:.3f} -> "
                       f"{metrics['loss']:.3f}, held-out {metrics.get('val_loss', float('nan')):.3f}{sigreg}")
        return {"steps": p.step, "clips": p.step * cfg.train.batch_size * self.procs.world_size, "seconds": elapsed,
                "loss_first": p.first_loss, **metrics}

    def epochs(self) -> None:
        p, cfg, device = self.progress, self.cfg, self.procs.device
        while p.step < p.total_steps:
            order = self.clips.epoch(cfg.train.batch_size, seed=cfg.seed * 100_003 + p.epoch, skip=p.batch_in_epoch,
                                     shard=(self.procs.rank, self.procs.world_size))
            for batch in order:
                with autocast(device):
                    out = self.opt.net({k: v.to(device, non_blocking=True) for k, v in batch.items()})
                self.opt.step(out["loss"])
                p.step, p.batch_in_epoch, p.window = p.step + 1, p.batch_in_epoch + 1, p.window + 1
                for key, value in out.items():
                    p.sums[key] = p.sums.get(key, 0.0) + value.detach()
                self.bar.update()
                self.after_step(out)
                if p.step == p.total_steps:
                    break
            else:
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0

    def after_step(self, out: dict) -> None:
        """The time budget's new total, then validation, the metric row and the checkpoint that are due."""
        p, cfg = self.progress, self.cfg
        validating = p.step % cfg.train.val_every == 0
        resized = self.budget.total_steps(p.step, p.total_steps, validating) if self.budget else None
        if resized is not None:
            if p.step == self.budget.warm_steps + self.budget.timed_steps:
                self.log.print(f"{cfg.train.minutes:g} minutes fit {resized} steps at this speed")
            p.total_steps = self.bar.total = resized
            self.opt.resize(p.total_steps)
        validating = validating or p.step == p.total_steps
        saving = p.step % cfg.train.save_every == 0 or p.step == p.total_steps
        if validating or saving:
            recalibrate_batchnorm(self.opt.model, self.clips, cfg.train.bn_batches, cfg.train.batch_size, cfg.seed,
                                  self.procs.device)
            self.opt.model.train()
        if p.step % cfg.train.log_every == 0 or validating:
            self.log_metrics(validating)
        if saving:
            check_finite(out["loss"].item(), p.step, f"lower train.lr (now {cfg.train.lr})")
            if self.procs.is_main:
                save_state(self.run_dir / FILENAME, self.opt, cfg, step=p.step, epoch=p.epoch,
                           batch_in_epoch=p.batch_in_epoch, total_steps=p.total_steps, world_size=self.procs.world_size)
            p.saved_at = p.step

    def log_metrics(self, validating: bool) -> None:
        p, cfg = self.progress, self.cfg
        metrics = {key: float(total) / p.window for key, total in p.sums.items()}
        check_finite(metrics["loss"], p.step, f"lower train.lr (now {cfg.train.lr})")
        p.first_loss = metrics["loss"] if p.first_loss is None else p.first_loss
        clips_per_s = ((p.step - p.start_step) * cfg.train.batch_size * self.procs.world_size
                       / (time.perf_counter() - p.started))
        metrics |= {"lr": self.opt.lr, "epoch": p.epoch, "clips_per_s": clips_per_s}
        if validating:
            metrics |= validate(self.opt.model, self.val_batches, self.procs.device)
        self.log.log(p.step, metrics)
        self.bar.set_postfix({key: f"{metrics[key]:.3g}" for key in p.sums} | {"clips_s": f"{clips_per_s:.0f}"}
                             | ({"val": f"{metrics['val_loss']:.3f}"} if "val_loss" in metrics else {}))
        p.sums, p.window, p.metrics = {}, 0, metrics
