"""Training clips from an episode dataset.

A clip is T frames taken every `frameskip` steps, t, t+fs, ..., t+(T−1)·fs, and for each kept frame
the fs raw actions that follow it, concatenated into one action chunk of fs·A numbers and
normalised (leworld.codec.ActionCodec): chunk k is what moves frame k to frame k+1. A clip never
crosses an episode boundary.
"""

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from leworld import LeworldError
from leworld.codec import ActionCodec
from leworld.dataset.episodes import EpisodeDataset


class ClipSampler:
    """Clips of `num_frames` frames `codec.frameskip` steps apart from the given episodes.

    sample(B, generator) draws B clips at random; epoch(B, seed) goes once through every clip (all
    start frames) in an order fixed by the seed, so that a resumed run can pick up mid-epoch. Both give:
        pixels  (B, T, 3, H, W) uint8
        actions (B, T, fs·A) float32, chunks of the codec; chunk k moves frame k to frame k+1
        state   (B, T, S) float32, and proprio (B, T, P) where the dataset has it
    Gathering runs where the dataset's tensors are: on a GPU after dataset.to("cuda").
    """

    def __init__(self, dataset: EpisodeDataset, episodes: np.ndarray, num_frames: int, codec: ActionCodec):
        self.dataset, self.num_frames, self.codec = dataset, num_frames, codec
        frameskip = codec.frameskip
        span = num_frames * frameskip  # frames t .. t+span-1 must lie in one episode (the last block's actions too)
        starts = [np.arange(s, s + length - span) for s, length in
                  zip(dataset.episode_starts[episodes], dataset.episode_lengths[episodes]) if length > span]
        if not starts:
            raise LeworldError(f"no episode of {dataset.path} is longer than {num_frames} frames x frameskip {frameskip}")
        device = dataset.tensors.device or torch.device("cpu")
        self.starts = torch.as_tensor(np.concatenate(starts), device=device)  # (C,) first frame of every clip
        self.frame_offsets = torch.arange(num_frames, device=device) * frameskip  # (T,)
        self.action_offsets = torch.arange(span, device=device)  # (T·fs,)

    def __len__(self) -> int:
        return len(self.starts)

    def clips(self, starts: Tensor) -> dict[str, Tensor]:
        td = self.dataset.tensors
        frames = starts[:, None] + self.frame_offsets  # (B, T)
        pixels = td["pixels"][frames.flatten()]  # (B·T, H, W, 3)
        raw_actions = td["action"][(starts[:, None] + self.action_offsets).flatten()]  # (B·T·fs, A)
        batch = {
            "pixels": rearrange(pixels, "(b t) h w c -> b t c h w", b=len(starts)),
            "actions": self.codec.to_chunks(rearrange(raw_actions, "(b n) a -> b n a", b=len(starts))),
            "state": rearrange(td["state"][frames.flatten()], "(b t) s -> b t s", b=len(starts)),
        }
        if "proprio" in td.keys():
            batch["proprio"] = rearrange(td["proprio"][frames.flatten()], "(b t) p -> b t p", b=len(starts))
        return batch

    def generator(self, seed: int) -> torch.Generator:
        """A generator for sample(), on the device the clips are gathered on."""
        return torch.Generator(self.starts.device).manual_seed(seed)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        index = torch.randint(len(self.starts), (batch_size,), generator=generator, device=self.starts.device)
        return self.clips(self.starts[index])

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self.starts) // batch_size

    def epoch(self, batch_size: int, seed: int, skip: int = 0, shard: tuple[int, int] = (0, 1)):
        """Every clip once, in full batches, in the order `seed` fixes, leaving out the first `skip`
        batches. With shard=(rank, world_size), the order is cut into global batches of
        batch_size·world_size clips and this process gets its part of each."""
        rank, world_size = shard
        generator = torch.Generator(self.starts.device).manual_seed(seed)
        order = torch.randperm(len(self.starts), generator=generator, device=self.starts.device)
        global_batch = batch_size * world_size
        for i in range(skip, self.batches_per_epoch(global_batch)):
            first = i * global_batch + rank * batch_size
            yield self.clips(self.starts[order[first:first + batch_size]])
