"""What a world model imagines, drawn. A JEPA world model has no decoder; this trains one after it,
on its frozen latents, and never touches the world model or its two-term training.

    python -m leworld.decode train ckpt=<run folder>
        a pixel decoder (leworld/nn/decoder.py) from latents of the training episodes' frames to
        the frames, saved in <run>/decoder/; its held-out error is reported beside the mean
        frame's. Eval's videos then show, beside what happened and the goal, the decoded latents
        the model imagined for the plan it chose.
    python -m leworld.decode rollout ckpt=<run folder> [rollout.episode=0] [rollout.start=0] [rollout.chunks=10]
        [rollout.actions=<file.npy>]
        imagine a sequence of action chunks from a held-out frame (the recorded ones, or raw actions
        from a .npy file) and write a GIF: what the simulator did with them beside what the model
        imagined, decoded.
"""

import math
import sys
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from omegaconf import DictConfig
from torch import Tensor

import envs
from leworld import LeworldError, settings
from leworld.checkpoint import load_checkpoint, load_companion, load_weights, resolve_path, save_checkpoint
from leworld.models import load_world_model, open_dataset
from leworld.nn.decoder import FrameDecoder
from leworld.planning.report import write_gif
from leworld.probe import encode_frames, frame_rows
from leworld.runtime import autocast, check_values, pick_device, require, run_main, seed_everything

FOLDER = "decoder"  # beside the world model's checkpoint


def latents_and_frames(model, dataset, episodes: np.ndarray, limit: int, device, seed: int) -> tuple[Tensor, Tensor]:
    """Latents (N, D) of up to `limit` frames of the episodes, and those frames (N, 3, H, W) uint8."""
    latents, _ = encode_frames(model, dataset, episodes, limit, device, seed)
    if latents.dim() != 2:
        raise LeworldError(f"the decoder draws one latent vector per frame; {model.kind} latents are "
                           f"{tuple(latents.shape[1:])}")
    rows = torch.as_tensor(frame_rows(dataset, episodes, limit, seed))
    return latents, rearrange(dataset.tensors["pixels"][rows], "n h w c -> n c h w")


@torch.no_grad()
def draws_vectors(model, dataset, device) -> bool:
    """Whether the model's latent of a frame is one vector (D,), which is what a decoder draws."""
    frame = rearrange(dataset.tensors["pixels"][:1], "n h w c -> n 1 c h w").to(device)
    proprio = dataset.tensors["proprio"][:1, None].to(device) if "proprio" in dataset.tensors.keys() else None
    return model.encode(frame, proprio).dim() == 3  # (1, 1, D)


@torch.no_grad()
def pixel_error(decoder: FrameDecoder, latents: Tensor, frames: Tensor, device) -> float:
    """Mean squared error of the decoded frames, pixels in [0, 1]."""
    decoder.eval()
    total = sum(float((decoder(latents[i:i + 256].to(device)).cpu() - frames[i:i + 256] / 255).square().sum())
                for i in range(0, len(latents), 256))
    decoder.train()
    return total / frames.numel()


def train_decoder(model, dataset, cfg: DictConfig, device, say=print) -> tuple[FrameDecoder, dict]:
    """Fit a decoder on the training episodes' frames (AdamW, cosine decay); its held-out error
    against the mean training frame's (a decoder that learned nothing draws about that)."""
    spec, held_out = cfg.decoder, np.asarray(model.data.held_out)
    training = np.setdiff1d(np.arange(dataset.num_episodes), held_out)
    z, frames = latents_and_frames(model, dataset, training, spec.frames, device, cfg.seed)
    val_z, val_frames = latents_and_frames(model, dataset, held_out, max(1, spec.frames // 10), device, cfg.seed + 1)
    seed_everything(cfg.seed)
    decoder = FrameDecoder(z.shape[1], frames.shape[-1], list(spec.widths)).to(device)
    decoder.mean.copy_(frames.float().mean(0) / 255)  # (3, H, W): what it draws before it has learned anything
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    generator = torch.Generator().manual_seed(cfg.seed)
    say(f"decoder: {len(z)} frames of {len(training)} training episodes, {len(val_z)} held out; {spec.steps} steps")
    for _ in range(spec.steps):
        batch = torch.randint(len(z), (spec.batch_size,), generator=generator)
        with autocast(device):
            loss = (decoder(z[batch].to(device)).float() - frames[batch].to(device) / 255).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    mean_frame = decoder.mean[None].cpu()  # (1, 3, H, W)
    results = {"frames": len(z), "held_out_frames": len(val_z), "train_mse": pixel_error(decoder, z, frames, device),
               "held_out_mse": pixel_error(decoder, val_z, val_frames, device),
               "mean_frame_mse": float((val_frames / 255 - mean_frame).square().mean())}
    say(f"decoder: held-out pixel MSE {results['held_out_mse']:.3g} (the mean frame's: {results['mean_frame_mse']:.3g}; "
        f"training frames {results['train_mse']:.3g})")
    return decoder.eval(), results


def save_decoder(decoder: FrameDecoder, path: Path, cfg: DictConfig, results: dict) -> Path:
    """Into <run>/decoder/, with the world model's step (a later step makes it stale)."""
    spec = {"latent_dim": decoder.start.in_features, "image_size": decoder.image_size, "widths": list(cfg.decoder.widths)}
    (path.parent / FOLDER).mkdir(exist_ok=True)
    return save_checkpoint(path.parent / FOLDER / "checkpoint.safetensors", decoder.state_dict(), spec, kind="decoder",
                           world_model=str(path), world_model_step=load_checkpoint(path).info.get("step"), **results)


def load_decoder(run, device) -> FrameDecoder:
    ckpt = load_companion(run, FOLDER, "decoder", "pixel decoder", f"python -m leworld.decode train ckpt={run}")
    spec = ckpt.config
    decoder = FrameDecoder(spec["latent_dim"], spec["image_size"], spec["widths"])
    load_weights(decoder, ckpt.tensors, ckpt.path)
    return decoder.to(device).eval()


def train(cfg: DictConfig) -> dict:
    path = resolve_path(require(cfg, "ckpt", "ckpt is required: python -m leworld.decode train ckpt=<run folder>"))
    check_values(cfg, settings.DECODE_VERB)
    device = pick_device(cfg.device)
    model = load_world_model(path, device).requires_grad_(False)
    decoder, results = train_decoder(model, open_dataset(model), cfg, device)
    out = save_decoder(decoder, path, cfg, results)
    print(f"saved {out}; eval's videos now show what the model imagined; draw a rollout: "
          f"python -m leworld.decode rollout ckpt={path.parent}")
    return results


def rollout(cfg: DictConfig) -> dict:
    """Imagine action chunks from a held-out frame; GIF of the simulator beside the decoded imagination."""
    path = resolve_path(require(cfg, "ckpt", "ckpt is required: python -m leworld.decode rollout ckpt=<run folder>"))
    check_values(cfg, settings.DECODE_VERB)
    device, spec = pick_device(cfg.device), cfg.rollout
    model = load_world_model(path, device).requires_grad_(False)
    decoder, dataset = load_decoder(path, device), open_dataset(model)
    held_out = model.data.held_out
    if spec.episode >= len(held_out):
        raise LeworldError(f"rollout.episode={spec.episode}: the model has {len(held_out)} held-out episodes (0 .. "
                           f"{len(held_out) - 1})")
    row = int(dataset.episode_starts[held_out[spec.episode]]) + spec.start
    raw = recorded_or_given(dataset, model, spec, row)
    env = envs.make(model.env.name, **model.env.kwargs)
    real, states = env.replay(dataset.tensors["state"][row].double().numpy(), raw, model.frameskip)
    env.close()
    proprio = None if "proprio" not in dataset.tensors.keys() else torch.as_tensor(
        env.proprio(states[0]), dtype=torch.float32, device=device)[None, None]
    with autocast(device):
        start = model.encode(rearrange(torch.from_numpy(real[:1]), "t h w c -> 1 t c h w").to(device), proprio)
        chunks = model.codec.to_chunks(torch.as_tensor(raw, dtype=torch.float32)[None]).to(device)
        imagined = torch.cat([start, model.rollout(start, chunks)], 1)[0]  # (1 + chunks, D)
    out = Path(cfg.out or path.parent / FOLDER / f"rollout-{spec.episode}-{spec.start}.gif")
    write_gif([[r, d] for r, d in zip(real, decoder.draw(imagined))], out)
    print(f"saved {out}: left what the simulator did, right what the model imagined ({len(raw) // model.frameskip} chunks)")
    return {"gif": str(out)}


def recorded_or_given(dataset, model, spec: DictConfig, row: int) -> np.ndarray:
    """Raw actions (chunks·fs, A): from spec.actions (a .npy file), or the recorded ones from `row`."""
    steps, width = spec.chunks * model.frameskip, dataset.tensors["action"].shape[-1]
    if spec.actions is not None:
        try:
            raw = np.load(spec.actions)
        except (OSError, ValueError) as err:
            raise LeworldError(f"rollout.actions={spec.actions} is not a readable .npy file ({err})") from None
        if raw.ndim != 2 or raw.shape[1] != width or len(raw) % model.frameskip or not np.isfinite(raw).all():
            raise LeworldError(f"rollout.actions={spec.actions} holds {raw.shape} {raw.dtype}; it must be finite raw "
                               f"actions (K·{model.frameskip}, {width}), whole chunks of {model.frameskip} steps")
        return raw.astype(np.float32)
    episode = np.searchsorted(dataset.episode_starts, row, side="right") - 1
    end = int(dataset.episode_starts[episode] + dataset.episode_lengths[episode])
    if row + steps > end:
        raise LeworldError(f"the episode has {end - row} steps after rollout.start, fewer than rollout.chunks="
                           f"{spec.chunks} chunks of {model.frameskip}; lower one of them")
    return dataset.tensors["action"][row:row + steps].numpy()


def main() -> None:
    verbs = {"train": train, "rollout": rollout}
    if len(sys.argv) < 2 or sys.argv[1] not in verbs:
        print("error: name what to do: python -m leworld.decode train ckpt=<run folder>, or python -m leworld.decode "
              "rollout ckpt=<run folder> [key=value ...]", file=sys.stderr)
        sys.exit(2)
    run_main("decode", verbs[sys.argv[1]], sys.argv[2:])


if __name__ == "__main__":
    main()
