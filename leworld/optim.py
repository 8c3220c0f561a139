"""What both training loops (world model, image pretraining) share: AdamW with the usual decay
groups, a linear warm-up followed by a cosine decay by steps, the data-parallel wrapper, one
optimisation step, and the guard that stops a run whose loss is no longer a number."""

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from leworld import LeworldError
from leworld.runtime import Processes


def adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), fused: bool = False) -> torch.optim.AdamW:
    """Weight decay on matrices and kernels only: biases, norms, tokens and embeddings (1-D) are
    not shrunk toward zero. fused: one kernel for all parameters (CUDA), not a loop over them."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            shrink = param.ndim >= 2 and not name.endswith(("cls_token", "pos_embed"))
            (decay if shrink else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


class WarmupCosine:
    """The learning-rate factor at a step: rising linearly over the first `warmup` fraction of
    `total_steps`, then a cosine down to `final_ratio`. A callable object rather than a closure so
    that a time-budgeted run can resize it once it knows its speed, and so that LambdaLR saves
    its sizes with the checkpoint."""

    def __init__(self, total_steps: int, warmup: float, final_ratio: float):
        self.warmup, self.final_ratio = warmup, final_ratio
        self.resize(total_steps)

    def resize(self, total_steps: int) -> None:
        self.total_steps, self.warmup_steps = total_steps, int(self.warmup * total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float, final_ratio: float):
    """LambdaLR over WarmupCosine: `warmup` is the fraction of the steps that warm up."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup, final_ratio))


@dataclass
class Optimisation:
    """A model being trained: `model` is the module itself (what is saved), `net` what the loop
    calls (its DistributedDataParallel wrapper under torchrun, else the model)."""

    model: nn.Module
    net: nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    grad_clip: float | None

    @classmethod
    def start(cls, model: nn.Module, procs: Processes, train: DictConfig, total_steps: int) -> "Optimisation":
        """train: lr, weight_decay, warmup (a fraction of the steps), final_lr_ratio, grad_clip."""
        model = model.to(procs.device)
        if procs.world_size > 1 and procs.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over the global batch
        net = DistributedDataParallel(model) if procs.world_size > 1 else model
        optimizer = adamw(model, train.lr, train.weight_decay, fused=procs.device.type == "cuda")
        schedule = warmup_cosine(optimizer, total_steps, train.warmup, train.final_lr_ratio)
        return cls(model, net, optimizer, schedule, train.grad_clip)

    def step(self, loss: torch.Tensor) -> None:
        """Backward, clip the gradient norm (when grad_clip is set), step the optimizer and the schedule."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.schedule.step()

    def resize(self, total_steps: int) -> None:
        """A new length for the schedule (a time-budgeted run that has measured its speed)."""
        self.schedule.lr_lambdas[0].resize(total_steps)

    @property
    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]


def check_finite(loss: float, step: int, hint: str) -> None:
    """Stop before weights a NaN went through are saved; hint: what to change."""
    if not math.isfinite(loss):
        raise LeworldError(f"the loss became {loss} by step {step}; {hint}; the checkpoints saved so far are untouched")
