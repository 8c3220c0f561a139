"""Violation of expectation:  python -m leworld.surprise ckpt=<run folder> [key=value ...]

Does the world model know what cannot happen? Held-out clips of its dataset are replayed twice from
the frame `event` on: once as they were, once with something impossible done to them at that frame
(a part teleported, a part drawn in another colour, two frames swapped in time). The surprise at a
frame is how far its latent lies from the one the model predicted from the frames before it
(`distance`, what planning minimises). A model that has learned the physics is surprised by a
teleport at the event and not before it; one that has learned what matters for control should be
little surprised by a colour (the LeWM paper: teleports p < 0.01, a colour change of the cube not).

Per perturbation: the surprise before, at and after the event in both copies, and a paired
sign-flip test of the difference per clip (two-sided; its p-value is the share of random sign
flips whose mean difference is at least as large). Works on any world model through its
`encode`, `predict` and `distance`. Writes surprise.json and surprise.png into out_dir.
"""

import json
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from omegaconf import DictConfig
from torch import Tensor

import envs
from leworld import LeworldError, settings
from leworld.dataset import ClipSampler
from leworld.models import open_world_model
from leworld.plots import plot_surprise
from leworld.runtime import autocast, check_values, pick_device, run_main


def perturbations_of(env: envs.Env) -> list[str]:
    """Every perturbation the env can make: teleport_<part> for each part, colour_<part> where it
    can draw a part in another colour, swap (frames exchanged in time) everywhere."""
    names = [f"teleport_{part}" for part in env.parts]
    if type(env).recolour is not envs.Env.recolour:
        names += [f"colour_{part}" for part in env.parts]
    return names + ["swap"]


def copies(env: envs.Env, clip: dict, names: list[str], event: int, frameskip: int,
           rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One clip as it was ("control") and once per perturbation: frames (T, H, W, 3) and states
    (T, S) each, the frames before `event` the recorded ones. The control copy is replayed from the
    event on like the perturbed ones, so that replaying changes nothing between them."""
    pixels, states, actions = clip["pixels"], clip["state"], clip["raw_actions"][event * frameskip:]
    keep = lambda frames, st: (np.concatenate([pixels[:event], frames]), np.concatenate([states[:event], st]))  # noqa: E731
    out = {"control": keep(*env.replay(states[event], actions[:-frameskip], frameskip))}
    for name in names:
        kind, _, part = name.partition("_")
        if kind == "teleport":
            out[name] = keep(*env.replay(env.teleport(states[event], part, rng), actions[:-frameskip], frameskip))
        elif kind == "colour":
            env.recolour(part)
            out[name] = keep(*env.replay(states[event], actions[:-frameskip], frameskip))
            env.recolour(None)
        else:  # swap: frames `event` and `event` + 1 exchanged
            order = np.arange(len(pixels))
            order[[event, event + 1]] = order[[event + 1, event]]
            out[name] = tuple(x[order] for x in out["control"])
    return out


@torch.no_grad()
def surprise_curve(model, pixels: Tensor, chunks: Tensor, proprio: Tensor | None) -> Tensor:
    """uint8 frames (B, T, 3, H, W), their chunks (B, T, fs·A) -> surprise (B, T − w) of frames
    w .. T − 1: each latent's distance to the one predicted from the w frames before it (w: the
    frames the model imagines from, its `window`)."""
    w = model.window or model.history
    z = model.encode(pixels, proprio).float()  # (B, T, *L)
    starts = range(z.shape[1] - w)
    context = rearrange(torch.stack([z[:, s:s + w] for s in starts], 1), "b n w ... -> (b n) w ...")
    steps = rearrange(torch.stack([chunks[:, s:s + w] for s in starts], 1), "b n w a -> (b n) w a")
    predicted = rearrange(model.predict(context, steps)[:, -1].float(), "(b n) ... -> b n ...", b=len(z))
    return model.distance(predicted, z[:, w:])


def sign_flip_p(differences: np.ndarray, permutations: int, rng: np.random.Generator) -> float:
    """Two-sided paired test: the share of random sign flips of the per-clip differences whose mean
    is at least as far from zero as the observed one (counting the observed)."""
    observed = abs(differences.mean())
    signs = rng.choice([-1.0, 1.0], size=(permutations, len(differences)))
    null = np.abs((signs * differences).mean(1))
    return float((1 + (null >= observed - 1e-12 * max(observed, 1)).sum()) / (1 + permutations))


def summarise(control: np.ndarray, perturbed: np.ndarray, event: int, first: int, cfg: DictConfig,
              rng: np.random.Generator) -> dict:
    """control, perturbed: surprise (N clips, steps) of frames first .. T − 1 -> their curves and,
    before / at / after the event, each copy's mean and the paired test."""
    at = event - first
    windows = {"before": slice(0, at), "at": slice(at, at + 1), "after": slice(at + 1, None)}
    summary = {"frames": list(range(first, first + control.shape[1])),
               "control": {"mean": control.mean(0).tolist(), "se": (control.std(0, ddof=1) / np.sqrt(len(control))).tolist()},
               "perturbed": {"mean": perturbed.mean(0).tolist(),
                             "se": (perturbed.std(0, ddof=1) / np.sqrt(len(perturbed))).tolist()}}
    for name, window in windows.items():
        c, p = control[:, window].mean(1), perturbed[:, window].mean(1)  # per clip
        summary[name] = {"control": float(c.mean()), "perturbed": float(p.mean()),
                         "ratio": float(p.mean() / max(c.mean(), 1e-12)),
                         "p": sign_flip_p(p - c, cfg.permutations, rng)}
    summary["significant"] = summary["at"]["p"] < cfg.alpha and summary["at"]["perturbed"] > summary["at"]["control"]
    return summary


def sample_clips(model, dataset, cfg: DictConfig) -> dict[str, Tensor]:
    """`clips` held-out clips of `frames` frames, with the raw actions between their frames."""
    sampler = ClipSampler(dataset, np.asarray(model.data.held_out), cfg.frames, model.codec)
    generator = sampler.generator(cfg.seed)
    starts = sampler.starts[torch.randint(len(sampler.starts), (cfg.clips,), generator=generator)]
    batch = sampler.clips(starts)
    rows = starts[:, None] + sampler.action_offsets  # (N, T·fs)
    batch["raw_actions"] = dataset.tensors["action"][rows.flatten()].reshape(*rows.shape, -1)
    return batch


def measure(model, dataset, cfg: DictConfig, device: torch.device, say=print) -> dict:
    """The surprise of every clip's copies, and per perturbation its summary."""
    env = envs.make(model.env.name, **model.env.kwargs)
    names = list(cfg.perturbations) if cfg.perturbations is not None else perturbations_of(env)
    unknown = sorted(set(names) - set(perturbations_of(env)))
    if unknown:
        raise LeworldError(f"perturbations={unknown} cannot be made in {model.env.name}; it offers "
                           f"{', '.join(perturbations_of(env))}")
    first = model.window or model.history
    if not first <= cfg.event <= cfg.frames - 2:
        raise LeworldError(f"event={cfg.event} must leave the model's {first} frames of history before it and a "
                           f"frame after it: between {first} and frames - 2 = {cfg.frames - 2}")
    batch, rng = sample_clips(model, dataset, cfg), np.random.default_rng(cfg.seed)
    curves = {name: [] for name in ["control", *names]}
    for i in range(cfg.clips):
        clip = {key: batch[key][i].cpu().numpy() for key in ("state", "raw_actions")}
        clip["pixels"] = rearrange(batch["pixels"][i].cpu().numpy(), "t c h w -> t h w c")
        made = copies(env, clip, names, cfg.event, model.frameskip, rng)  # name -> (frames, states)
        pixels = rearrange(torch.from_numpy(np.stack([f for f, _ in made.values()])), "n t h w c -> n t c h w")
        proprio = None if "proprio" not in batch else torch.as_tensor(  # (copies, T, P)
            np.stack([[env.proprio(s) for s in states] for _, states in made.values()]), dtype=torch.float32)
        chunks = batch["actions"][i:i + 1].expand(len(made), -1, -1)  # every copy took the recorded actions
        with autocast(device):
            values = surprise_curve(model, pixels.to(device), chunks.to(device),
                                    None if proprio is None else proprio.to(device)).cpu()  # (copies, steps)
        for name, value in zip(made, values):
            curves[name].append(value[None])
    env.close()
    control = torch.cat(curves.pop("control")).double().numpy()
    results = {name: summarise(control, torch.cat(c).double().numpy(), cfg.event, first, cfg, rng)
               for name, c in curves.items()}
    report(results, cfg, say)
    return results


def report(results: dict, cfg: DictConfig, say=print) -> None:
    say(f"surprise (the model's latent prediction error) on {cfg.clips} held-out clips of {cfg.frames} frames, "
        f"the event at frame {cfg.event}; each cell: unperturbed / perturbed copies (ratio, paired p)")
    say(f"  {'perturbation':<18}{'before':<34}{'at the event':<34}after")
    cell = lambda s: f"{s['control']:.3g} / {s['perturbed']:.3g} ({s['ratio']:.2f}x, p {s['p']:.2g})"  # noqa: E731
    for name, s in results.items():
        verdict = "surprised" if s["significant"] else "not significantly surprised"
        say(f"  {name:<18}{cell(s['before']):<34}{cell(s['at']):<34}{cell(s['after'])}   {verdict} at p < {cfg.alpha}")


def surprise(cfg: DictConfig) -> dict:
    check_values(cfg, settings.SURPRISE_VERB)
    device = pick_device(cfg.device)
    model, path, dataset = open_world_model(cfg, device, "surprise")
    model.requires_grad_(False)
    if dataset.fingerprint() != model.data.fingerprint:
        raise LeworldError(f"{dataset.path} is not the dataset {path} was trained on, so its held-out episodes are "
                           "unknown; drop data_path= (the model's own dataset is used)")
    results = measure(model, dataset, cfg, device)
    out = Path(cfg.out_dir or path.parent / "surprise")
    out.mkdir(parents=True, exist_ok=True)
    (out / "surprise.json").write_text(json.dumps({"ckpt": str(path), "clips": cfg.clips, "frames": cfg.frames,
                                                   "event": cfg.event, "perturbations": results}, indent=1))
    plot_surprise(results, cfg.event, out / "surprise.png", title=f"{model.env.name}: {path.parent.name}")
    print(f"saved {out / 'surprise.json'} and {out / 'surprise.png'}")
    return results


def main() -> None:
    run_main("surprise", surprise)


if __name__ == "__main__":
    main()
