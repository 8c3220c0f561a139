"""AdamW with the usual decay groups, and a linear warm-up followed by a cosine decay, by steps."""

import math

import torch
from torch import nn


def adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """Weight decay on matrices and kernels only: biases, norms, tokens and embeddings (1-D) are
    not shrunk toward zero."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            shrink = param.ndim >= 2 and not name.endswith(("cls_token", "pos_embed"))
            (decay if shrink else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, schedule,
                   grad_clip: float | None) -> None:
    """Backward, clip the gradient norm (when grad_clip is set), step the optimizer and the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    schedule.step()


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, final_ratio: float):
    """Learning rate rising linearly over `warmup_steps`, then a cosine down to `final_ratio`·lr."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
