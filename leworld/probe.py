"""Probes: how much a frozen encoder's features tell.

Images: a linear probe (LayerNorm, then a linear classifier fit by L-BFGS) and a k-NN classifier
(cosine similarity, temperature-weighted votes, as in DINO) on features of held-out images.
World models (python -m leworld.probe ckpt=<run>): a linear probe from latents to the physical
state on held-out frames, and the error of imagined rollouts against "nothing changes".
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import DictConfig
from torch import Tensor, nn

from leworld import LeworldError, settings
from leworld.nn.preprocess import normalize, resize, to_float
from leworld.dataset import ClipSampler
from leworld.models import open_world_model
from leworld.plots import plot_probe, plot_rollout
from leworld.runtime import autocast, check_values, pick_device, run_main


@torch.no_grad()
def extract_features(backbone: nn.Module, images: np.ndarray, size: int, device: torch.device,
                     batch_size: int = 256) -> Tensor:
    """uint8 images (N, H, W, 3) -> features (N, F) on the CPU, the whole image resized to size²."""
    was_training = backbone.training
    backbone.eval()
    features = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
        x = normalize(resize(to_float(batch.permute(0, 3, 1, 2)), size))
        with autocast(device):
            features.append(backbone(x).float().cpu())
    backbone.train(was_training)
    return torch.cat(features)


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                          weight_decay: float = 1e-4, iterations: int = 300) -> float:
    """Fit softmax regression on LayerNorm'd features by full-batch L-BFGS; accuracy on val."""
    train_x, val_x = F.layer_norm(train_x, train_x.shape[-1:]), F.layer_norm(val_x, val_x.shape[-1:])
    classifier = nn.Linear(train_x.shape[1], int(max(train_y.max(), val_y.max())) + 1)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(train_x), train_y) + weight_decay * classifier.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (classifier(val_x).argmax(1) == val_y).float().mean().item()


def knn_accuracy(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Each held-out feature votes with its k most cosine-similar training features, each vote
    weighted by exp(similarity / temperature)."""
    train_x, val_x = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    k = min(k, len(train_x))
    correct = 0
    for start in range(0, len(val_x), chunk):
        similarity = val_x[start:start + chunk] @ train_x.T  # (chunk, N_train)
        top_sim, top_idx = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), num_classes).scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == val_y[start:start + chunk]).sum().item()
    return correct / len(val_x)


# ---- world models ---------------------------------------------------------------------------


def ridge_r2(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """R² per target column of a ridge regression fit on (train_x, train_y), scored on val, and its
    predictions of val_y."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    features = lambda x: torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # noqa: E731
    a, v = features(train_x), features(val_x)
    weights = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ train_y)
    predicted = v @ weights
    residual = ((predicted - val_y) ** 2).sum(0)
    return 1 - residual / ((val_y - val_y.mean(0)) ** 2).sum(0).clamp_min(1e-12), predicted


def frame_rows(dataset, episodes: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Up to `limit` dataset rows of the given episodes, drawn by `seed`, in order."""
    rows = np.concatenate([np.arange(s, s + n) for s, n in
                           zip(dataset.episode_starts[episodes], dataset.episode_lengths[episodes])])
    return np.sort(np.random.default_rng(seed).permutation(rows)[:limit])


@torch.no_grad()
def encode_frames(model, dataset, episodes: np.ndarray, limit: int, device: torch.device, seed: int,
                  batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Latents (N, D) and states (N, S) of up to `limit` frames of the given episodes (frame_rows),
    on the CPU."""
    rows = frame_rows(dataset, episodes, limit, seed)
    latents = []
    for i in range(0, len(rows), batch_size):
        index = torch.as_tensor(rows[i:i + batch_size])
        pixels = dataset.tensors["pixels"][index].to(device)
        proprio = dataset.tensors["proprio"][index, None].to(device) if "proprio" in dataset.tensors.keys() else None
        with autocast(device):
            z = model.encode(rearrange(pixels, "n h w c -> n 1 c h w"), proprio)[:, 0].float()  # (n, D), or (n, P, E) patch tokens
            latents.append((z if z.dim() == 2 else z.mean(1)).cpu())  # patch tokens: probe their average
    return torch.cat(latents), dataset.tensors["state"][torch.as_tensor(rows)].cpu()


@torch.no_grad()
def rollout_errors(model, dataset, episodes: np.ndarray, clips: int, horizon: int, device: torch.device,
                   seed: int) -> dict[str, list[float]]:
    """Mean squared latent error of imagined rollouts at horizons 1..H from `history` real frames,
    and of the baseline that predicts no change (the last real latent), on held-out clips."""
    sampler = ClipSampler(dataset, episodes, model.history + horizon, model.codec)
    batch = sampler.sample(clips, sampler.generator(seed))
    latents, predicted = [], []
    for i in range(0, clips, 64):
        pixels = batch["pixels"][i:i + 64].to(device)
        actions = batch["actions"][i:i + 64].to(device)
        proprio = batch["proprio"][i:i + 64].to(device) if "proprio" in batch else None
        with autocast(device):
            z = model.encode(pixels, proprio).float()  # (b, history + H, D)
            context = z[:, :model.history]
            imagined = model.rollout(context, actions[:, model.history - 1:model.history - 1 + horizon],
                                     actions[:, :model.history - 1]).float()
        latents.append(z.cpu())
        predicted.append(imagined.cpu())
    z, imagined = torch.cat(latents), torch.cat(predicted)
    future = z[:, model.history:]  # (N, H, D), or (N, H, P, E) patch tokens
    model_error = (imagined - future).square().flatten(2).mean((0, 2))
    still_error = (z[:, model.history - 1:model.history] - future).square().flatten(2).mean((0, 2))
    return {"model": model_error.tolist(), "no_change": still_error.tolist()}


def effective_dimensions(latents: Tensor) -> float:
    """Participation ratio of the latents' covariance, (Σλ)² / Σλ²: how many dimensions their spread
    really fills (an isotropic Gaussian of width D: about D; all of it along one direction: 1)."""
    eigenvalues = torch.linalg.eigvalsh(torch.cov(latents.double().T)).clamp_min(0)
    return float(eigenvalues.sum() ** 2 / eigenvalues.square().sum().clamp_min(1e-30))


@torch.no_grad()
def sigreg_by_rows(latents: Tensor, rows: int, seed: int, draws: int = 8) -> dict[str, float]:
    """SIGReg of `rows` latents at a time (the mean over `draws` samples) and of all of them, each
    beside an isotropic Gaussian sample of the same size: the statistic is N-scaled, so latents that
    fill few dimensions can score near the Gaussian's at a batch's rows and far above it at many."""
    from leworld.sigreg import SIGReg

    sigreg = SIGReg(num_slices=256, seed=seed).eval()  # eval: the same directions for every call
    generator = torch.Generator().manual_seed(seed)
    n, d = latents.shape
    few = [sigreg(latents[torch.randperm(n, generator=generator)[:rows]].float()) for _ in range(draws)]
    return {"rows": rows, "few": float(torch.stack(few).mean()),
            "few_gaussian": float(torch.stack([sigreg(torch.randn(rows, d, generator=generator)) for _ in range(draws)]).mean()),
            "all_rows": n, "all": float(sigreg(latents.float())), "all_gaussian": float(sigreg(torch.randn(n, d, generator=generator)))}


def neighbour_errors(train_x: Tensor, train_state: Tensor, val_x: Tensor, val_state: Tensor,
                     angle_dims: tuple[int, ...], seed: int) -> dict[str, Tensor]:
    """What the model's distance tells apart: each held-out latent's nearest training latent (squared
    L2, the planning cost's measure) and that frame's error in every state entry (angles modulo 2π),
    against a random training frame's. -> {"nearest": (S,), "random": (S,)} medians over held-out frames."""
    nearest = torch.cat([torch.cdist(chunk.double(), train_x.double()).argmin(1) for chunk in val_x.split(1024)])
    chosen = torch.randint(len(train_x), (len(val_x),), generator=torch.Generator().manual_seed(seed))

    def error(other: Tensor) -> Tensor:
        diff = (other - val_state).double().abs()
        for i in angle_dims:
            diff[:, i] = torch.remainder(diff[:, i], 2 * torch.pi)
            diff[:, i] = torch.minimum(diff[:, i], 2 * torch.pi - diff[:, i])
        return diff.median(0).values

    return {"nearest": error(train_state[nearest]), "random": error(train_state[chosen])}


def probe_world_model(model, dataset, train_episodes, val_episodes, spec, device, say=print,
                      pictures: Path | None = None) -> dict:
    """How much the latents know: a linear probe to the physical state on held-out frames, for the
    trained encoder and for the same encoder at random initialisation, and the rollout error
    against "nothing changes". spec: frames, clips, horizon, ridge (configs/probe.yaml). A DINO-WM
    with proprioception carries the agent's own state in its tokens, so the probe reads it from there.
    With `pictures`, a folder: probe.png (the trained probe's reading against the truth) and
    rollout.png there."""
    from envs import ENVS  # here: importing envs picks MuJoCo's GL back end, which image probes never need

    env_class, seed = ENVS[dataset.meta["env"]["name"]], spec.seed
    untrained = model.untrained(seed).to(device).eval()  # the same random init every time
    r2, geometry = {}, {}
    for name, net in [("trained", model), ("random_init", untrained)]:
        train_x, train_state = encode_frames(net, dataset, train_episodes, spec.frames, device, seed)
        val_x, val_state = encode_frames(net, dataset, val_episodes, spec.frames, device, seed + 1)
        train_y, labels = env_class.probe_targets(train_state.double().numpy())
        val_y, _ = env_class.probe_targets(val_state.double().numpy())
        fit, read = ridge_r2(train_x.double(), torch.from_numpy(train_y), val_x.double(), torch.from_numpy(val_y), spec.ridge)
        r2[name] = dict(zip(labels, fit.tolist()))
        errors = neighbour_errors(train_x, train_state, val_x, val_state, env_class.angle_dims, seed)
        geometry[name] = {"effective_dimensions": effective_dimensions(val_x), "latent_dim": val_x.shape[1],
                          "sigreg": sigreg_by_rows(val_x, spec.sigreg_rows, seed),
                          "nearest_error": dict(zip(env_class.state_names, errors["nearest"].tolist())),
                          "random_error": dict(zip(env_class.state_names, errors["random"].tolist()))}
        if name == "trained" and pictures is not None:
            plot_probe(val_y, read.numpy(), labels, r2[name], pictures / "probe.png")
    errors = rollout_errors(model, dataset, val_episodes, spec.clips, spec.horizon, device, seed)
    results = {"r2": r2, "geometry": geometry, "rollout": errors, "frames": {"train": len(train_x), "held_out": len(val_x)}}
    if pictures is not None:
        plot_rollout(errors, pictures / "rollout.png")

    say(f"linear probe from latents to the state, R² on {len(val_x)} held-out frames:")
    say(f"  {'':24} {'trained':>9} {'random init':>12}")
    for label in r2["trained"]:
        say(f"  {label:24} {r2['trained'][label]:>9.3f} {r2['random_init'][label]:>12.3f}")
    say_geometry(geometry, env_class, say)
    say(f"imagined rollouts, latent MSE on {spec.clips} held-out clips (lower is better):")
    say("  chunks ahead            " + "".join(f"{h + 1:>9}" for h in range(spec.horizon)))
    # significant digits, not decimals: a fixed encoder's latents can be small enough to print 0.000
    say("  world model             " + "".join(f"{e:>9.3g}" for e in errors["model"]))
    say("  nothing changes         " + "".join(f"{e:>9.3g}" for e in errors["no_change"]))
    return results


def say_geometry(geometry: dict, env_class, say) -> None:
    """The probe's table of what the latent distance tells apart (neighbour_errors, effective_dimensions,
    sigreg_by_rows), for the entries that place the env's parts."""
    trained, initial, test = geometry["trained"], geometry["random_init"], geometry["trained"]["sigreg"]
    say(f"what the latent distance tells apart: the state error of each held-out frame's nearest training latent "
        f"(median; a random frame's beside it); the latents fill {trained['effective_dimensions']:.1f} of "
        f"{trained['latent_dim']} dimensions (random init {initial['effective_dimensions']:.1f}); their SIGReg is "
        f"{test['few']:.2f} at {test['rows']} rows (a Gaussian sample's {test['few_gaussian']:.2f}) and {test['all']:.1f} "
        f"at all {test['all_rows']} (a Gaussian sample's {test['all_gaussian']:.2f}):")
    say(f"  {'':24} {'trained':>9} {'random init':>12} {'random frame':>13}")
    placed = sorted({i for entries in env_class.parts.values() for i in entries}) or range(len(env_class.state_names))
    for label in [env_class.state_names[i] for i in placed]:  # what places the env's parts (no velocities)
        say(f"  {label:24} {trained['nearest_error'][label]:>9.3g} {initial['nearest_error'][label]:>12.3g} "
            f"{trained['random_error'][label]:>13.3g}")


def probe(cfg: DictConfig) -> dict:
    """python -m leworld.probe ckpt=<run folder or checkpoint>: probe a trained world model on the
    held-out episodes of its dataset (the split it was trained with), and write probe.json beside
    the checkpoint."""
    check_values(cfg, settings.PROBE_VERB)
    device = pick_device(cfg.device)
    model, path, dataset = open_world_model(cfg, device, "probe")
    if dataset.fingerprint() != model.data.fingerprint:
        raise LeworldError(f"{dataset.path} is not the dataset {path} was trained on, so its training and held-out "
                           "episodes are unknown; drop data_path= (the model's own dataset is used)")
    val_episodes = np.asarray(model.data.held_out)
    train_episodes = np.setdiff1d(np.arange(dataset.num_episodes), val_episodes)
    pictures = path.parent / "plots"
    pictures.mkdir(exist_ok=True)
    results = probe_world_model(model, dataset, train_episodes, val_episodes, cfg.probe, device, pictures=pictures)
    (path.parent / "probe.json").write_text(json.dumps(results, indent=1))
    print(f"saved {path.parent / 'probe.json'}, {pictures / 'probe.png'} and {pictures / 'rollout.png'}")
    return results


def main() -> None:
    run_main("probe", probe)


if __name__ == "__main__":
    main()
