"""Train a policy prior:  python -m leworld.prior ckpt=<run folder> [key=value ...]

A goal-conditioned policy (leworld/nn/policy.py) learns, on the world model's frozen latents, the
plan the dataset took from a frame to the frame 1 to `horizon` chunks later, told how many chunks
that is: every such pair of its training episodes, the recorded action chunks as the target
(hindsight: whatever an episode did reaches where it went). The world model and its two-term
training are untouched. The prior is saved in <run>/prior/ and used by `python -m leworld.eval
ckpt=<run> prior=true` (CEM starts from its plan) or `planner=prior` (its plan alone, no search,
asked again after every chunk: configs/planner/prior.yaml; protocol.receding_horizon=5 runs its
plans whole).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from leworld import LeworldError, settings
from leworld.checkpoint import load_checkpoint, load_companion, load_weights, resolve_path, save_checkpoint
from leworld.models import load_world_model, open_dataset
from leworld.nn.policy import GoalPolicy
from leworld.planning.anatomy import recorded_plans
from leworld.probe import encode_frames
from leworld.runtime import check_values, pick_device, require, run_main, seed_everything

FOLDER = "prior"  # beside the world model's checkpoint


def goal_pairs(dataset, episodes: np.ndarray, offset: int) -> np.ndarray:
    """Rows of every frame of these episodes whose frame `offset` steps later is in the same episode."""
    starts, lengths = dataset.episode_starts[episodes], dataset.episode_lengths[episodes]
    return np.concatenate([np.arange(s, s + n - offset) for s, n in zip(starts, lengths) if n > offset] or [[]]).astype(int)


@dataclass
class Pairs:
    """Recorded plans and where they lead: start i's goal after k chunks is latents[at[i] + k·fs]."""

    latents: Tensor  # (F, D) every frame of the episodes, in order
    at: Tensor  # (N,) the starts: rows of latents whose whole horizon lies in their episode
    plans: Tensor  # (N, H, fs·A) the recorded chunks from each start
    frameskip: int

    def __len__(self) -> int:
        return len(self.at)

    def take(self, index: Tensor, chunks: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> starts (n, D), goals `chunks` (n,) chunks later (n, D), those chunks, the recorded plans (n, H, fs·A)."""
        at = self.at[index]
        return self.latents[at], self.latents[at + chunks * self.frameskip], chunks, self.plans[index]


def pair_data(model, dataset, episodes: np.ndarray, horizon: int, offset: int, device) -> Pairs:
    """Every start of these episodes with a whole plan (`offset` = horizon chunks of steps) after it."""
    rows = goal_pairs(dataset, episodes, offset)
    if len(rows) == 0:
        raise LeworldError(f"no episode of {dataset.path} is longer than the goal offset ({offset} steps)")
    latents, _ = encode_frames(model, dataset, episodes, limit=len(dataset.tensors["state"]), device=device, seed=0)
    frames = np.concatenate([np.arange(s, s + n) for s, n in  # the rows encode_frames encoded, in order
                             zip(dataset.episode_starts[episodes], dataset.episode_lengths[episodes])])
    frames.sort()
    at = torch.as_tensor(np.searchsorted(frames, rows))
    plans = recorded_plans(dataset.tensors["action"], rows, model.codec, horizon, offset)[:, 0]
    return Pairs(latents, at, plans, model.frameskip)


def check_offset(protocol: DictConfig, frameskip: int) -> None:
    """The prior learns plans of one horizon, so the protocol's goals must be one horizon away."""
    if protocol.goal_offset != protocol.horizon * frameskip:
        raise LeworldError(f"the prior proposes one plan of protocol.horizon={protocol.horizon} chunks of {frameskip} "
                           f"steps, so protocol.goal_offset must be {protocol.horizon * frameskip}, not "
                           f"{protocol.goal_offset} (python -m leworld.train: or prior_after_training=false)")


def train_prior(model, dataset, cfg: DictConfig, device: torch.device, say=print) -> tuple[GoalPolicy, dict]:
    """The policy prior of a world model and what it achieved: held-out MSE against the zero plan's.
    A share of the training episodes (prior.check_fraction) is kept aside to stop where the policy
    stops generalising (the held-out episodes, where eval's tasks come from, choose nothing)."""
    horizon, offset = cfg.protocol.horizon, cfg.protocol.goal_offset
    check_offset(cfg.protocol, model.frameskip)
    held_out = np.asarray(model.data.held_out)
    training = np.random.default_rng(cfg.seed).permutation(np.setdiff1d(np.arange(dataset.num_episodes), held_out))
    aside = max(1, int(len(training) * cfg.prior.check_fraction))
    fit = pair_data(model, dataset, np.sort(training[aside:]), horizon, offset, device)
    if fit.latents.dim() != 2:
        raise LeworldError(f"the policy prior reads one latent vector per frame; {model.kind} latents are "
                           f"{tuple(fit.latents.shape[1:])}")
    check = pair_data(model, dataset, np.sort(training[:aside]), horizon, offset, device)
    val = pair_data(model, dataset, held_out, horizon, offset, device)
    say(f"policy prior: {len(fit)} starts of {len(training) - aside} training episodes, each with goals 1 to {horizon} "
        f"chunks of {model.frameskip} steps later, {len(check)} of {aside} more to stop on, {len(val)} held out")
    seed_everything(cfg.seed)
    policy = GoalPolicy(fit.latents.shape[1], horizon, fit.plans.shape[-1], list(cfg.prior.hidden), cfg.prior.dropout,
                        model.frameskip, cfg.prior.heads).to(device)
    best_step = fit_policy(policy, fit, check, cfg.prior, cfg.seed, device)
    results = {"pairs": len(fit), "held_out_pairs": len(val), "best_step": best_step,
               "train_mse": mse(policy, fit, device, horizon), "check_mse": mse(policy, check, device, horizon),
               "check_zero_plan_mse": float(check.plans.square().mean()),
               "held_out_mse": mse(policy, val, device, horizon), "zero_plan_mse": float(val.plans.square().mean()),
               "held_out_one_chunk_mse": mse(policy, val, device, 1),
               "zero_chunk_mse": float(val.plans[:, 0].square().mean())}
    say(f"policy prior: held-out MSE {results['held_out_mse']:.3f} of the recorded plans to a goal {horizon} chunks "
        f"away (the zero plan's: {results['zero_plan_mse']:.3f}; training pairs {results['train_mse']:.3f}), "
        f"{results['held_out_one_chunk_mse']:.3f} of the one chunk to a goal one chunk away (zero: "
        f"{results['zero_chunk_mse']:.3f}), kept from step {best_step}")
    return policy.eval(), results


def left_mask(chunks: Tensor, horizon: int) -> Tensor:
    """Chunks left (n,) -> (n, H, 1): which chunks of a plan lead to its goal (the rest are free)."""
    return (torch.arange(horizon, device=chunks.device) < chunks[:, None])[..., None]


def plan_error(policy: GoalPolicy, pairs: Pairs, index: Tensor, chunks: Tensor, device,
               others: float = 0.0) -> tuple[Tensor, Tensor]:
    """-> the squared error summed over the chunks that lead to each goal, of the head closest to
    each recorded plan (winner takes all; `others`: the weight of the other heads' mean error, so
    that no head is left untrained), and how many numbers of one plan it sums."""
    z, goal, chunks, plans = (t.to(device) for t in pairs.take(index, chunks))
    mask = left_mask(chunks, policy.horizon)  # (n, H, 1)
    per_head = ((policy(z, goal, chunks) - plans[:, None]).square() * mask[:, None]).sum((2, 3))  # (n, K)
    error = (1 - others) * per_head.min(1).values + others * per_head.mean(1)  # (n,)
    return error.sum(), mask.sum() * plans.shape[-1]


def fit_policy(policy: GoalPolicy, fit: Pairs, check: Pairs, spec: DictConfig, seed: int, device) -> int:
    """AdamW with cosine decay on the fit pairs, each batch's goals 1 to H chunks ahead at random; the
    weights of the step with the lowest MSE on the check pairs (every goal distance, measured every
    spec.check_every steps) are kept. -> that step."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    generator = torch.Generator().manual_seed(seed)
    best = (float("inf"), 0, None)  # (check MSE, step, weights)
    for step in range(1, spec.steps + 1):
        batch = torch.randint(len(fit), (spec.batch_size,), generator=generator)
        chunks = torch.randint(1, policy.horizon + 1, (spec.batch_size,), generator=generator)
        total, count = plan_error(policy, fit, batch, chunks, device, spec.others_weight if policy.heads > 1 else 0.0)
        optimizer.zero_grad(set_to_none=True)
        (total / count).backward()
        optimizer.step()
        schedule.step()
        if step % spec.check_every == 0 or step == spec.steps:
            error = mse(policy, check, device)
            if error < best[0]:
                best = (error, step, {k: v.clone() for k, v in policy.state_dict().items()})
    policy.load_state_dict(best[2])
    return best[1]


@torch.no_grad()
def mse(policy: GoalPolicy, pairs: Pairs, device, chunks: int | None = None) -> float:
    """Per number of the recorded chunks that lead to a goal `chunks` chunks away (None: every distance
    1..H, each start at each), of the closest head's plan."""
    policy.eval()
    total, count = torch.zeros(()), torch.zeros(())
    for k in [chunks] if chunks else range(1, policy.horizon + 1):
        for i in range(0, len(pairs), 4096):
            index = torch.arange(i, min(i + 4096, len(pairs)))
            error, n = plan_error(policy, pairs, index, torch.full_like(index, k), device)
            total, count = total + error.cpu(), count + n.cpu()
    policy.train()
    return float(total / count)


def load_prior(run: str, model, device) -> GoalPolicy:
    """The policy prior saved beside the world model of `run` (a run folder or its checkpoint file),
    refused if that world model has trained on since the prior was made from it."""
    ckpt = load_companion(run, FOLDER, "prior", "policy prior", f"python -m leworld.prior ckpt={run}")
    spec = ckpt.config
    if "frameskip" not in spec:  # made before priors were told the steps left
        raise LeworldError(f"{ckpt.path} is a policy prior of an older leworld; train it again: python -m leworld.prior ckpt={run}")
    policy = GoalPolicy(spec["latent_dim"], spec["horizon"], spec["chunk_dim"], spec["hidden"], spec["dropout"],
                        spec["frameskip"], spec.get("heads", 1))
    load_weights(policy, ckpt.tensors, ckpt.path)
    return policy.to(device).eval()


def prior(cfg: DictConfig) -> dict:
    path = resolve_path(require(cfg, "ckpt", "ckpt is required: python -m leworld.prior ckpt=<run folder or checkpoint>"))
    check_values(cfg, settings.PRIOR_VERB)
    device = pick_device(cfg.device)
    model = load_world_model(path, device).requires_grad_(False)
    dataset = open_dataset(model)
    policy, results = train_prior(model, dataset, cfg, device)
    out = save_prior(policy, path, cfg, results)
    print(f"saved {out}; plan with it: python -m leworld.eval ckpt={path.parent} planner=prior (or prior=true: CEM "
          f"starts from its plan)")
    return results


def save_prior(policy: GoalPolicy, world_model: Path, cfg: DictConfig, results: dict) -> Path:
    """Into <run>/prior/ beside the world model's checkpoint file, with the step of the world model it read."""
    spec = {"latent_dim": (policy.net[0].in_features - 1) // 2, "horizon": policy.horizon,
            "chunk_dim": policy.net[-1].out_features // (policy.heads * policy.horizon), "heads": policy.heads,
            "hidden": list(cfg.prior.hidden),
            "dropout": cfg.prior.dropout, "frameskip": policy.frameskip, "goal_offset": cfg.protocol.goal_offset,
            "training": OmegaConf.to_container(cfg.prior)}
    (world_model.parent / FOLDER).mkdir(exist_ok=True)
    return save_checkpoint(world_model.parent / FOLDER / "checkpoint.safetensors", policy.state_dict(), spec, kind="prior",
                           world_model=str(world_model), world_model_step=load_checkpoint(world_model).info.get("step"),
                           **results)


def main() -> None:
    run_main("prior", prior)


if __name__ == "__main__":
    main()
