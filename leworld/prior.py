"""Train a policy prior:  python -m leworld.prior ckpt=<run folder> [key=value ...]

A goal-conditioned policy (leworld/nn/policy.py) learns, on the world model's frozen latents, the
plan the dataset took from a frame to the frame `goal_offset` steps later: every such pair of its
training episodes, the recorded action chunks as the target (hindsight: whatever an episode did
reaches where it went). The world model and its two-term training are untouched. The prior is
saved in <run>/prior/ and used by `python -m leworld.eval ckpt=<run> prior=true` (CEM starts from
its plan) or `planner=prior` (its plan alone, no search).
"""

import math

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


def pair_data(model, dataset, episodes: np.ndarray, horizon: int, offset: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """-> latents of the starts (N, D), of their goals (N, D), and the recorded plans between (N, H, fs·A)."""
    rows = goal_pairs(dataset, episodes, offset)
    if len(rows) == 0:
        raise LeworldError(f"no episode of {dataset.path} is longer than the goal offset ({offset} steps)")
    latents, _ = encode_frames(model, dataset, episodes, limit=len(dataset.tensors["state"]), device=device, seed=0)
    frames = np.concatenate([np.arange(s, s + n) for s, n in  # the rows encode_frames encoded, in order
                             zip(dataset.episode_starts[episodes], dataset.episode_lengths[episodes])])
    frames.sort()
    at = torch.as_tensor(np.searchsorted(frames, rows))
    plans = recorded_plans(dataset.tensors["action"], rows, model.codec, horizon, offset)[:, 0]
    return latents[at], latents[at + offset], plans


def train_prior(model, dataset, cfg: DictConfig, device: torch.device, say=print) -> tuple[GoalPolicy, dict]:
    """The policy prior of a world model and what it achieved: held-out MSE against the zero plan's.
    A share of the training episodes (prior.check_fraction) is kept aside to stop where the policy
    stops generalising (the held-out episodes, where eval's tasks come from, choose nothing)."""
    horizon, offset = cfg.protocol.horizon, cfg.protocol.goal_offset
    if offset != horizon * model.frameskip:
        raise LeworldError(f"the prior proposes one plan of protocol.horizon={horizon} chunks of {model.frameskip} steps, "
                           f"so protocol.goal_offset must be {horizon * model.frameskip}, not {offset}")
    held_out = np.asarray(model.data.held_out)
    training = np.random.default_rng(cfg.seed).permutation(np.setdiff1d(np.arange(dataset.num_episodes), held_out))
    aside = max(1, int(len(training) * cfg.prior.check_fraction))
    fit = pair_data(model, dataset, np.sort(training[aside:]), horizon, offset, device)
    if fit[0].dim() != 2:
        raise LeworldError(f"the policy prior reads one latent vector per frame; {model.kind} latents are "
                           f"{tuple(fit[0].shape[1:])}")
    check = pair_data(model, dataset, np.sort(training[:aside]), horizon, offset, device)
    val = pair_data(model, dataset, held_out, horizon, offset, device)
    say(f"policy prior: {len(fit[0])} (frame, goal {offset} steps later) pairs of {len(training) - aside} training "
        f"episodes, {len(check[0])} of {aside} more to stop on, {len(val[0])} held out")
    seed_everything(cfg.seed)
    policy = GoalPolicy(fit[0].shape[1], horizon, fit[2].shape[-1], list(cfg.prior.hidden), cfg.prior.dropout).to(device)
    best_step = fit_policy(policy, fit, check, cfg.prior, cfg.seed, device)
    results = {"pairs": len(fit[0]), "held_out_pairs": len(val[0]), "best_step": best_step,
               "train_mse": mse(policy, *fit, device), "check_mse": mse(policy, *check, device),
               "check_zero_plan_mse": float(check[2].square().mean()),
               "held_out_mse": mse(policy, *val, device), "zero_plan_mse": float(val[2].square().mean())}
    say(f"policy prior: held-out MSE {results['held_out_mse']:.3f} of the recorded plans (the zero plan's: "
        f"{results['zero_plan_mse']:.3f}; training pairs {results['train_mse']:.3f}), kept from step {best_step}")
    return policy.eval(), results


def fit_policy(policy: GoalPolicy, fit: tuple, check: tuple, spec: DictConfig, seed: int, device) -> int:
    """AdamW with cosine decay on the fit pairs; the weights of the step with the lowest MSE on the
    check pairs (measured every spec.check_every steps) are kept. -> that step."""
    z, goal, plans = fit
    optimizer = torch.optim.AdamW(policy.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    generator = torch.Generator().manual_seed(seed)
    best = (float("inf"), 0, None)  # (check MSE, step, weights)
    for step in range(1, spec.steps + 1):
        batch = torch.randint(len(z), (spec.batch_size,), generator=generator)
        loss = (policy(z[batch].to(device), goal[batch].to(device)) - plans[batch].to(device)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % spec.check_every == 0 or step == spec.steps:
            error = mse(policy, *check, device)
            if error < best[0]:
                best = (error, step, {k: v.clone() for k, v in policy.state_dict().items()})
    policy.load_state_dict(best[2])
    return best[1]


@torch.no_grad()
def mse(policy: GoalPolicy, z: Tensor, goal: Tensor, plans: Tensor, device) -> float:
    policy.eval()
    errors = [(policy(z[i:i + 4096].to(device), goal[i:i + 4096].to(device)).cpu() - plans[i:i + 4096]).square().sum()
              for i in range(0, len(z), 4096)]
    policy.train()
    return float(sum(errors) / plans.numel())


def load_prior(run: str, model, device) -> GoalPolicy:
    """The policy prior saved beside the world model of `run` (a run folder or its checkpoint file),
    refused if that world model has trained on since the prior was made from it."""
    ckpt = load_companion(run, FOLDER, "prior", "policy prior", f"python -m leworld.prior ckpt={run}")
    spec = ckpt.config
    policy = GoalPolicy(spec["latent_dim"], spec["horizon"], spec["chunk_dim"], spec["hidden"], spec["dropout"])
    load_weights(policy, ckpt.tensors, ckpt.path)
    return policy.to(device).eval()


def prior(cfg: DictConfig) -> dict:
    path = resolve_path(require(cfg, "ckpt", "ckpt is required: python -m leworld.prior ckpt=<run folder or checkpoint>"))
    check_values(cfg, settings.PRIOR_VERB)
    device = pick_device(cfg.device)
    model = load_world_model(path, device).requires_grad_(False)
    dataset = open_dataset(model)
    policy, results = train_prior(model, dataset, cfg, device)
    first = policy.net[0]
    spec = {"latent_dim": first.in_features // 2, "horizon": cfg.protocol.horizon, "chunk_dim": policy.net[-1].out_features
            // cfg.protocol.horizon, "hidden": list(cfg.prior.hidden), "dropout": cfg.prior.dropout,
            "goal_offset": cfg.protocol.goal_offset,
            "training": OmegaConf.to_container(cfg.prior)}
    (path.parent / FOLDER).mkdir(exist_ok=True)
    out = save_checkpoint(path.parent / FOLDER / "checkpoint.safetensors", policy.state_dict(), spec, kind="prior",
                          world_model=str(path), world_model_step=load_checkpoint(path).info.get("step"), **results)
    print(f"saved {out}; plan with it: python -m leworld.eval ckpt={path.parent} prior=true (or planner=prior)")
    return results


def main() -> None:
    run_main("prior", prior)


if __name__ == "__main__":
    main()
