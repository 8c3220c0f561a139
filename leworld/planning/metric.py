"""How the planning cost measures a latent's distance to the goal's (eval metric=...).

`latent`: the model's own squared L2. `change`: each latent direction in units of how far the
training episodes' latents move along it in one chunk, i.e. the difference whitened by the
covariance of one chunk's latent change. Under L2 the directions the latent moves along most
weigh most: on PushT the agent's, which moves every step, so a plan that parks the agent on its
goal and leaves the block where it was scores well. Measured in chunks, a block still to be pushed
costs what pushing it takes, since the block moves little per chunk."""

import numpy as np
import torch
from torch import Tensor

from leworld import LeworldError
from leworld.models.lewm import LeWorldModel
from leworld.probe import encode_frames


def change_whitening(latents: Tensor, starts: np.ndarray, lengths: np.ndarray, frameskip: int, shrink: float) -> Tensor:
    """Latents (F, D) of whole episodes in order (episode i: rows starts[i] .. starts[i] + lengths[i])
    -> A (D, D) with ‖A d‖² = dᵀ C⁻¹ d, C the covariance of z[t + frameskip] − z[t] within episodes,
    shrunk toward its mean variance (C ← (1 − shrink)·C + shrink·mean(diag C)·I): directions the
    episodes never move along would otherwise weigh without bound, and with them any error of a
    predictor there."""
    rows = np.concatenate([np.arange(s, s + n - frameskip) for s, n in zip(starts, lengths) if n > frameskip] or [[]])
    if len(rows) < 2:
        raise LeworldError(f"metric=change needs episodes longer than one chunk ({frameskip} steps) to measure how "
                           "latents change; use metric=latent")
    rows = torch.as_tensor(rows.astype(int))
    change = (latents[rows + frameskip] - latents[rows]).double()  # (N, D)
    cov = torch.cov(change.T)
    cov = (1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    values, vectors = torch.linalg.eigh(cov)
    return (vectors / values.sqrt()).T.float()  # (D, D): rows are C's eigenvectors scaled by 1/sqrt(eigenvalue)


def measure_in_chunks(model, dataset, shrink: float, device: torch.device) -> Tensor:
    """The `change` metric of a world model, from its training episodes (not the held-out ones, where
    eval's tasks come from) -> A (D, D) on `device`."""
    if not isinstance(model, LeWorldModel):
        raise LeworldError(f"metric=change measures a LeWM's latent vectors; a {type(model).__name__} measures its "
                           "own latents: use metric=latent")
    episodes = np.setdiff1d(np.arange(dataset.num_episodes), np.asarray(model.data.held_out))
    latents, _ = encode_frames(model, dataset, episodes, limit=len(dataset.tensors["state"]), device=device, seed=0)
    lengths = dataset.episode_lengths[episodes]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # where each episode begins among the encoded rows
    return change_whitening(latents, starts, lengths, model.frameskip, shrink).to(device)
